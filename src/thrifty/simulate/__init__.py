"""`thrifty simulate`: replay recorded traffic through candidate settings (see engine.py)."""
