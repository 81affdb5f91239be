"""Alerts: budget thresholds and spend/rate anomalies, each fired once per window."""
