"""What operators see: alerts, the dashboard, Prometheus metrics and OpenTelemetry traces."""

from __future__ import annotations

from pydantic import Field, model_validator

from thrifty.settings._base import _Strict


class AlertSettings(_Strict):
    webhook_url: str | None = None  # Slack-compatible incoming webhook; alerts are stored either way
    budget_thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.8, 1.0])
    anomaly_check_s: float = Field(default=60.0, gt=0)  # how often spend and rate anomalies are checked
    spend_spike_factor: float = Field(default=2.0, gt=1)  # feature's last hour vs the 7-day median
    rate_spike_factor: float = Field(default=10.0, gt=1)  # tenant's last hour vs the 7-day median
    # Drift watch of routes a trained router drives as a cascade: an alert when a route's
    # escalation rate over the last window departs from its calibrated rate by more than the margin.
    escalation_drift_margin: float = Field(default=0.15, gt=0, lt=1)
    escalation_drift_window_s: float = Field(default=3600.0, gt=0)
    escalation_drift_min_requests: int = Field(default=50, ge=1)


class DashboardSettings(_Strict):
    """`GET /dashboard`: read-only over the ledger. A tenant's virtual key sees its own tenant."""

    enabled: bool = True
    # sha256 hex digests of admin keys (`printf %s KEY | sha256sum`): they see every tenant, and
    # /metrics. Any string works as an admin key; make it long and random.
    admin_key_hashes: list[str] = Field(default_factory=list)
    top_n: int = Field(default=10, ge=1, le=1000)  # rows in the top features / tenants / users tables
    explorer_rows: int = Field(default=50, ge=1, le=1000)  # requests per explorer page
    # How often the gateway looks for new ledger rows to fold into the rollups (off the requests'
    # path); it folds once `fold_min_rows` wait or the last fold is `fold_max_age_s` old. The page is
    # exact either way (rows not folded yet are read from the ledger); these bound that tail.
    fold_interval_s: float = Field(default=1.0, gt=0, le=3600)
    fold_min_rows: int = Field(default=2000, ge=0)
    fold_max_age_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _hashes(self) -> DashboardSettings:
        for h in self.admin_key_hashes:
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError(f"admin_key_hashes: {h!r} is not a sha256 hex digest")
        return self


class MetricsSettings(_Strict):
    """`GET /metrics` in Prometheus' text format, updated from each committed ledger batch."""

    enabled: bool = True
    # Distinct values kept per label (tenant, feature, route, model); later ones count as "other".
    max_label_values: int = Field(default=50, ge=1)
    # Spend per tenant is not for everyone: scrapes send an admin key (Bearer) unless this is off.
    require_admin_key: bool = True


class TracingSettings(_Strict):
    """OpenTelemetry spans per request, one child per upstream attempt (`pip install thrifty[otel]`)."""

    enabled: bool = False
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"  # OTLP over HTTP
    service_name: str = "thrifty"
