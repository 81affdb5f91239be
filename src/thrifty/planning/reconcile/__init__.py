"""`thrifty reconcile`: provider exports read (exports.py) and compared with the ledger (compare.py)."""
