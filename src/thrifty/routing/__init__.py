"""Choosing the model (tier) for a request."""
