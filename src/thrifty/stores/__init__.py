"""Storage implementations behind small ports: ledger, keys (SQLite is the embedded default)."""
