"""Planning the savings: the cost estimator (`thrifty estimate`) and invoice reconciliation
(`thrifty reconcile`). Pure calculators and parsers beside the small modules that do the I/O."""
