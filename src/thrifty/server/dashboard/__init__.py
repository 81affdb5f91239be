"""The dashboard: spend, budgets, alerts and requests in the browser, read-only over the ledger."""

from thrifty.server.dashboard.app import DashboardApp

__all__ = ["DashboardApp"]
