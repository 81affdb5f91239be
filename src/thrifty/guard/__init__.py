"""Limits that reject a request before any spend."""
