"""Experiments on a route: variants with weights, sticky assignment, feedback, the stop rule,
promote/stop actions, and gated releases."""
