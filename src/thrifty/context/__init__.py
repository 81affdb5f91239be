"""Context budgets: every section of a prompt within its route's budget (see stage.py)."""
