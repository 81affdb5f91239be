"""`GET /metrics`: Prometheus text format from prometheus-client, one registry per gateway.

Counters are fed from each committed ledger batch (LedgerWriter.observe), not from the request
path, so they match the ledger: a request is counted once it is committed, exactly when it appears
in `thrifty report`. A row costs a few dict and list updates: the sums live in plain Python
accumulators (money as exact Decimal) and a custom collector hands them to prometheus-client at
scrape time, which formats the exposition. (Counter/Histogram children cost ~40 us a row here in
label lookups, locks and checks; at one row per commit that was most of the metrics' cost.)

Names follow OpenTelemetry's GenAI semantic conventions where one exists
(`gen_ai.client.token.usage` -> `gen_ai_client_token_usage`, `gen_ai.client.operation.duration`
-> `gen_ai_client_operation_duration_seconds`, `gen_ai.server.time_to_first_token`); thrifty's own
measures (cost, cache hits, budget rejections) are `thrifty_*`. Label values are bounded: each of
tenant, feature, route and model keeps the values the settings name plus the first
`metrics.max_label_values` others; later ones are counted as "other".
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class _Histogram:
    """One histogram's label sets: per-bucket counts (not cumulative), sum and count."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[tuple[str, ...], list[Any]] = {}

    def of(self, labels: tuple[str, ...]) -> list[Any]:
        series = self.series.get(labels)
        if series is None:
            # [count per bucket (+Inf last)], sum, count
            series = self.series[labels] = [[0] * (len(self.bounds) + 1), 0.0, 0]
        return series

    def family(self, name: str, documentation: str, label_names: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=label_names)
        edges = [*(_le(b) for b in self.bounds), "+Inf"]
        for labels, (counts, total, _count) in sorted(self.series.items()):
            cumulative, buckets = 0, []
            for edge, n in zip(edges, counts, strict=True):
                cumulative += n
                buckets.append((edge, cumulative))
            family.add_metric(list(labels), buckets, total)
        return family


def _le(bound: float) -> str:
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]  # as its own Histogram writes `le`


def _observe(series: list[Any], bounds: tuple[float, ...], value: float) -> None:
    series[0][bisect_left(bounds, value)] += 1  # le: a value on a bound falls in that bucket
    series[1] += value
    series[2] += 1


# Accumulator positions per (tenant, feature, route, model, status).
_N_REQ, _N_IN, _N_CACHED, _N_OUT, _N_COST, _N_SAVED, _N_EXACT, _N_SEM, _N_ESC, _N_429 = range(10)
_KEY_CACHE_MAX = 10_000


class _Collector(Collector):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        attribution = ["tenant", "feature", "route", "model"]
        requests = CounterMetricFamily(
            "thrifty_requests", "Logical requests committed to the ledger", labels=[*attribution, "status"]
        )
        tokens = CounterMetricFamily(
            "thrifty_tokens",
            "Tokens billed: input (incl. cached), cached_input, output",
            labels=[*attribution, "type"],
        )
        cost = CounterMetricFamily("thrifty_cost_usd", "Spend in USD (priced requests)", labels=attribution)
        saved = CounterMetricFamily(
            "thrifty_saved_usd", "USD not spent: cache hits and shared generations", labels=attribution
        )
        per_route: dict[tuple[str, str, str], int] = {}
        escalations: dict[tuple[str, str], int] = {}
        rejections: dict[tuple[str, str, str], int] = {}
        totals: dict[tuple[str, str, str, str], list[Any]] = {}
        for (tenant, feature, route, model, status), acc in sorted(m.sums.items()):
            requests.add_metric([tenant, feature, route, model, status], acc[_N_REQ])
            into = totals.get((tenant, feature, route, model))
            if into is None:
                into = totals[(tenant, feature, route, model)] = [0, 0, 0, Decimal(0), Decimal(0)]
            into[0] += acc[_N_IN]
            into[1] += acc[_N_CACHED]
            into[2] += acc[_N_OUT]
            into[3] += acc[_N_COST]
            into[4] += acc[_N_SAVED]
            for kind, n in (("exact", acc[_N_EXACT]), ("semantic", acc[_N_SEM])):
                if n:
                    per_route[(tenant, route, kind)] = per_route.get((tenant, route, kind), 0) + n
            if acc[_N_ESC]:
                escalations[(tenant, route)] = escalations.get((tenant, route), 0) + acc[_N_ESC]
            if acc[_N_429]:
                key = (tenant, feature, route)
                rejections[key] = rejections.get(key, 0) + acc[_N_429]
        for labels, (inp, cached, out, usd, saved_usd) in totals.items():
            for kind, n in (("input", inp), ("cached_input", cached), ("output", out)):
                if n:
                    tokens.add_metric([*labels, kind], n)
            if usd:
                cost.add_metric(list(labels), float(usd))
            if saved_usd:
                saved.add_metric(list(labels), float(saved_usd))
        yield from (requests, tokens, cost, saved)
        hits = CounterMetricFamily(
            "thrifty_cache_hits", "Requests answered from a cache", labels=["tenant", "route", "kind"]
        )
        for labels3, n in sorted(per_route.items()):
            hits.add_metric(list(labels3), n)
        yield hits
        escalated = CounterMetricFamily(
            "thrifty_escalations",
            "Cascade requests that went past their first tier",
            labels=["tenant", "route"],
        )
        for labels2, n in sorted(escalations.items()):
            escalated.add_metric(list(labels2), n)
        yield escalated
        rejected = CounterMetricFamily(
            "thrifty_budget_rejections",
            "Requests refused with 429 (budgets, rate limits), as the report counts them",
            labels=["tenant", "feature", "route"],
        )
        for labels3, n in sorted(rejections.items()):
            rejected.add_metric(list(labels3), n)
        yield rejected
        errors = CounterMetricFamily(
            "thrifty_upstream_errors",
            "Upstream attempts that failed, by HTTP status (0: no response)",
            labels=["provider", "model", "status"],
        )
        for labels3, n in sorted(m.upstream_errors.items()):
            errors.add_metric(list(labels3), n)
        yield errors
        yield m.token_usage.family(
            "gen_ai_client_token_usage",
            "Tokens per request (OpenTelemetry gen_ai.client.token.usage)",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
        )
        yield m.duration.family(
            "gen_ai_client_operation_duration_seconds",
            "Request duration through the gateway (OpenTelemetry gen_ai.client.operation.duration)",
            ["gen_ai_operation_name", "gen_ai_request_model", "route"],
        )
        yield m.ttft.family(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first streamed token (OpenTelemetry gen_ai.server.time_to_first_token)",
            ["gen_ai_operation_name", "gen_ai_request_model", "route"],
        )


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
        # Sums per bounded (tenant, feature, route, model, status); see _N_* for the positions.
        self.sums: dict[tuple[str, str, str, str, str], list[Any]] = {}
        self.upstream_errors: dict[tuple[str, str, str], int] = {}
        self.token_usage = _Histogram(TOKEN_BUCKETS)
        self.duration = _Histogram(DURATION_BUCKETS)
        self.ttft = _Histogram(TTFT_BUCKETS)
        # Raw label values -> (bounded key, its sums, its histogram series): one dict read a row.
        # The bounded values of a raw value never change, so this only ever saves work.
        self._keys: dict[tuple[Any, ...], tuple[list[Any], list[Any], list[Any], list[Any], list[Any]]] = {}
        self.registry.register(_Collector(self))
        self.registry.register(_StateCollector(breakers, depths or {}))

    def _slot(self, raw: tuple[Any, ...]) -> tuple[list[Any], list[Any], list[Any], list[Any], list[Any]]:
        tenant, feature, route, model, status = raw
        b_model, b_route = self._model(model), self._route(route)
        key = (self._tenant(tenant), self._feature(feature), b_route, b_model, status)
        sums = self.sums.get(key)
        if sums is None:
            sums = self.sums[key] = [0, 0, 0, 0, Decimal(0), Decimal(0), 0, 0, 0, 0]
        slot = (
            sums,
            self.token_usage.of(("chat", b_model, "input")),
            self.token_usage.of(("chat", b_model, "output")),
            self.duration.of(("chat", b_model, b_route)),
            self.ttft.of(("chat", b_model, b_route)),
        )
        if len(self._keys) >= _KEY_CACHE_MAX:
            self._keys.clear()  # raw values from headers are unbounded; the cache must not be
        self._keys[raw] = slot
        return slot

    def observe_batch(self, rows: Sequence[Sequence[Any]]) -> None:
        """Add a committed ledger batch to the sums (LedgerWriter.observe)."""
        keys = self._keys
        for row in rows:
            raw = (row[_TENANT], row[_FEATURE], row[_ROUTE], row[_MODEL], row[_STATUS])
            slot = keys.get(raw) or self._slot(raw)
            acc = slot[0]
            inp, out = row[_IN], row[_OUT]
            acc[_N_REQ] += 1
            acc[_N_IN] += inp
            acc[_N_CACHED] += row[_CACHED]
            acc[_N_OUT] += out
            if row[_COST] is not None:
                acc[_N_COST] += Decimal(row[_COST])
            if row[_SAVED] is not None:
                acc[_N_SAVED] += Decimal(row[_SAVED])
            cache = row[_CACHE]
            if cache != "miss":
                acc[_N_EXACT] += cache == "exact"
                acc[_N_SEM] += cache == "semantic"
            acc[_N_ESC] += row[_ESCALATED]
            acc[_N_429] += row[_HTTP] == 429
            if inp or out:
                _observe(slot[1], TOKEN_BUCKETS, inp)
                _observe(slot[2], TOKEN_BUCKETS, out)
            _observe(slot[3], DURATION_BUCKETS, row[_LATENCY] / 1000)
            if row[_TTFT] is not None:
                _observe(slot[4], TTFT_BUCKETS, row[_TTFT] / 1000)
            if row[_RETRIES] or row[_STATUS] != "ok":
                self._attempt_errors(row[_ATTEMPTS])

    def _attempt_errors(self, attempts_json: str) -> None:
        for attempt in orjson.loads(attempts_json):
            if attempt["status"] != 200:
                key = (
                    self._provider(attempt["provider"]),
                    self._model(attempt["model"]),
                    str(attempt["status"]),
                )
                self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["BoundedLabel", "GatewayMetrics"]
