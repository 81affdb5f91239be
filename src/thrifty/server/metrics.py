"""`GET /metrics`: Prometheus text format from prometheus-client, one registry per gateway.

Counters are fed from each committed ledger batch (LedgerWriter.observe), not from the request
path: a batch is folded by label set first, so a busy second costs one `inc` per distinct label
set, and only the histograms see every row. Numbers therefore match the ledger: a request is
counted once it is committed, exactly when it appears in `thrifty report`.

Names follow OpenTelemetry's GenAI semantic conventions where one exists
(`gen_ai.client.token.usage` -> `gen_ai_client_token_usage`, `gen_ai.client.operation.duration`
-> `gen_ai_client_operation_duration_seconds`, `gen_ai.server.time_to_first_token`); thrifty's own
measures (cost, cache hits, budget rejections) are `thrifty_*`. Label values are bounded: each of
tenant, feature, route and model keeps the values the settings name plus the first
`metrics.max_label_values` others; later ones are counted as "other".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from thrifty.settings import Settings

OTHER = "other"
NONE = "none"
# The GenAI conventions' advised boundaries (tokens; seconds).
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}

# Positions in a ledger row tuple (stores/ledger.py `_COLUMNS`).
_TENANT, _FEATURE, _ROUTE, _MODEL, _PROVIDER, _ATTEMPTS = 2, 4, 5, 7, 8, 9
_IN, _CACHED, _OUT, _COST, _SAVED, _CACHE, _ESCALATED, _RETRIES, _STATUS, _HTTP = (
    10,
    11,
    13,
    16,
    17,
    18,
    19,
    20,
    22,
    23,
)
_LATENCY, _TTFT = 25, 26


class BoundedLabel:
    """A label's values: the known ones, then the first `cap` others, then "other"."""

    def __init__(self, cap: int, known: Iterable[str] = ()) -> None:
        self._cap = cap
        self._known = set(known)
        self._others: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if value is None:
            return NONE
        if value in self._known or value in self._others:
            return value
        if len(self._others) < self._cap:
            self._others.add(value)
            return value
        return OTHER


class _StateCollector(Collector):
    """Gauges read at scrape time: breaker states and queue depths."""

    def __init__(
        self, breakers: Callable[[], dict[tuple[str, str], str]], depths: dict[str, Callable[[], int]]
    ):
        self._breakers = breakers
        self._depths = depths

    def collect(self) -> Iterator[Metric]:
        breaker = GaugeMetricFamily(
            "thrifty_circuit_breaker_state",
            "Circuit breaker per upstream target: 0 closed, 1 half-open, 2 open",
            labels=["provider", "model"],
        )
        for (provider, model), state in sorted(self._breakers().items()):
            breaker.add_metric([provider, model], BREAKER_STATES[state])
        yield breaker
        depth = GaugeMetricFamily(
            "thrifty_queue_depth", "Items waiting in an internal queue", labels=["queue"]
        )
        for name, read in self._depths.items():
            depth.add_metric([name], read())
        yield depth


class GatewayMetrics:
    def __init__(
        self,
        settings: Settings,
        *,
        breakers: Callable[[], dict[tuple[str, str], str]] = dict,
        depths: dict[str, Callable[[], int]] | None = None,
    ) -> None:
        cap = settings.metrics.max_label_values
        self.registry = CollectorRegistry(auto_describe=True)
        self._tenant = BoundedLabel(cap, settings.tenants)
        self._feature = BoundedLabel(cap, {f for t in settings.tenants.values() for f in t.features})
        self._route = BoundedLabel(cap, settings.routes)
        self._model = BoundedLabel(cap, settings.models)
        self._provider = BoundedLabel(cap, settings.providers)
        attribution = ("tenant", "feature", "route", "model")
        r = self.registry
        self.requests = Counter(
            "thrifty_requests",
            "Logical requests committed to the ledger",
            [*attribution, "status"],
            registry=r,
        )
        self.tokens = Counter(
            "thrifty_tokens",
            "Tokens billed: input (incl. cached), cached_input, output",
            [*attribution, "type"],
            registry=r,
        )
        self.cost = Counter("thrifty_cost_usd", "Spend in USD (priced requests)", attribution, registry=r)
        self.saved = Counter(
            "thrifty_saved_usd", "USD not spent: cache hits and shared generations", attribution, registry=r
        )
        self.cache_hits = Counter(
            "thrifty_cache_hits", "Requests answered from a cache", ["tenant", "route", "kind"], registry=r
        )
        self.escalations = Counter(
            "thrifty_escalations",
            "Cascade requests that went past their first tier",
            ["tenant", "route"],
            registry=r,
        )
        self.rejections = Counter(
            "thrifty_budget_rejections",
            "Requests refused with 429 (budgets, rate limits), as the report counts them",
            ["tenant", "feature", "route"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "thrifty_upstream_errors",
            "Upstream attempts that failed, by HTTP status (0: no response)",
            ["provider", "model", "status"],
            registry=r,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request (OpenTelemetry gen_ai.client.token.usage)",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Request duration through the gateway (OpenTelemetry gen_ai.client.operation.duration)",
            ["gen_ai_operation_name", "gen_ai_request_model", "route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first streamed token (OpenTelemetry gen_ai.server.time_to_first_token)",
            ["gen_ai_operation_name", "gen_ai_request_model", "route"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        r.register(_StateCollector(breakers, depths or {}))
        # Histogram children by label values: a batch observes one per row.
        self._observers: dict[tuple[str, ...], tuple[Any, ...]] = {}

    def observe_batch(self, rows: Sequence[Sequence[Any]]) -> None:
        """Fold a committed ledger batch into the counters (LedgerWriter.observe)."""
        folded: dict[tuple[str, str, str, str, str], list[Any]] = {}
        for row in rows:
            model = self._model(row[_MODEL])
            route = self._route(row[_ROUTE])
            key = (self._tenant(row[_TENANT]), self._feature(row[_FEATURE]), route, model, row[_STATUS])
            acc = folded.get(key)
            if acc is None:
                # requests, input, cached, output, cost, saved, exact, semantic, escalated, 429s
                acc = folded[key] = [0, 0, 0, 0, Decimal(0), Decimal(0), 0, 0, 0, 0]
            acc[0] += 1
            acc[1] += row[_IN]
            acc[2] += row[_CACHED]
            acc[3] += row[_OUT]
            if row[_COST] is not None:
                acc[4] += Decimal(row[_COST])
            if row[_SAVED] is not None:
                acc[5] += Decimal(row[_SAVED])
            acc[6] += row[_CACHE] == "exact"
            acc[7] += row[_CACHE] == "semantic"
            acc[8] += row[_ESCALATED]
            acc[9] += row[_HTTP] == 429
            hist = self._observers.get((model, route))
            if hist is None:
                hist = self._observers[(model, route)] = (
                    self.token_usage.labels("chat", model, "input"),
                    self.token_usage.labels("chat", model, "output"),
                    self.duration.labels("chat", model, route),
                    self.ttft.labels("chat", model, route),
                )
            if row[_IN] or row[_OUT]:
                hist[0].observe(row[_IN])
                hist[1].observe(row[_OUT])
            hist[2].observe(row[_LATENCY] / 1000)
            if row[_TTFT] is not None:
                hist[3].observe(row[_TTFT] / 1000)
            if row[_RETRIES] or row[_STATUS] != "ok":
                self._attempt_errors(row[_ATTEMPTS])
        for (tenant, feature, route, model, status), acc in folded.items():
            self.requests.labels(tenant, feature, route, model, status).inc(acc[0])
            for kind, n in (("input", acc[1]), ("cached_input", acc[2]), ("output", acc[3])):
                if n:
                    self.tokens.labels(tenant, feature, route, model, kind).inc(n)
            if acc[4]:
                self.cost.labels(tenant, feature, route, model).inc(float(acc[4]))
            if acc[5]:
                self.saved.labels(tenant, feature, route, model).inc(float(acc[5]))
            for kind, n in (("exact", acc[6]), ("semantic", acc[7])):
                if n:
                    self.cache_hits.labels(tenant, route, kind).inc(n)
            if acc[8]:
                self.escalations.labels(tenant, route).inc(acc[8])
            if acc[9]:
                self.rejections.labels(tenant, feature, route).inc(acc[9])

    def _attempt_errors(self, attempts_json: str) -> None:
        for attempt in orjson.loads(attempts_json):
            if attempt["status"] != 200:
                self.upstream_errors.labels(
                    self._provider(attempt["provider"]), self._model(attempt["model"]), str(attempt["status"])
                ).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["BoundedLabel", "GatewayMetrics"]
