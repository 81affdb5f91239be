"""`thrifty bench`: measurements that print a table and write JSON (stub upstream, load generator)."""
