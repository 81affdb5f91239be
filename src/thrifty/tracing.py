"""OpenTelemetry traces (off by default): one span per request, one child per upstream attempt.

Spans are built from each committed ledger batch (LedgerWriter.observe), with the times the
ledger recorded, so requests pay nothing for tracing: with `tracing.enabled: false` the
OpenTelemetry packages are not even imported. Attributes follow the GenAI semantic conventions
(gen_ai.operation.name, gen_ai.request.model, gen_ai.provider.name, gen_ai.usage.*); thrifty's
attribution and cost are `thrifty.*`. Attempts are laid out one after another from the request's
start (the ledger keeps each attempt's duration, not its start). Needs the `otel` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from thrifty.errors import ConfigError
from thrifty.settings import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

# Positions in a ledger row tuple (stores/ledger.py `_COLUMNS`).
_ID, _TS, _TENANT, _USER, _FEATURE, _ROUTE, _PV, _MODEL, _PROVIDER, _ATTEMPTS = range(10)
_IN, _CACHED, _OUT, _COST, _CACHE, _ESCALATED, _STATUS, _HTTP, _ERROR, _LATENCY, _TTFT = (
    10,
    11,
    13,
    16,
    18,
    19,
    22,
    23,
    24,
    25,
    26,
)


class LedgerTracer:
    def __init__(self, settings: TracingSettings) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as err:
            raise ConfigError(
                f"tracing.enabled needs the OpenTelemetry SDK ({err.name} is missing): "
                "pip install 'thrifty[otel]', or set tracing.enabled: false"
            ) from err
        self._trace = trace
        # A provider of our own, not the global one: the gateway's traces go where its settings say.
        self.provider: TracerProvider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name})
        )
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint))
        )
        self._tracer = self.provider.get_tracer("thrifty")

    def observe_batch(self, rows: Sequence[Sequence[Any]]) -> None:
        for row in rows:
            self._request(row)

    def _request(self, row: Sequence[Any]) -> None:
        trace = self._trace
        start = int(row[_TS] * 1e9)
        model = row[_MODEL] or "unknown"
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "gen_ai.usage.input_tokens": row[_IN],
            "gen_ai.usage.output_tokens": row[_OUT],
            "gen_ai.usage.cache_read.input_tokens": row[_CACHED],
            "http.response.status_code": row[_HTTP],
            "thrifty.request_id": row[_ID],
            "thrifty.tenant": row[_TENANT],
            "thrifty.cache": row[_CACHE],
            "thrifty.escalated": bool(row[_ESCALATED]),
            "thrifty.status": row[_STATUS],
        }
        for key, index in (
            ("gen_ai.provider.name", _PROVIDER),
            ("thrifty.user", _USER),
            ("thrifty.feature", _FEATURE),
            ("thrifty.route", _ROUTE),
            ("thrifty.prompt_version", _PV),
            ("thrifty.cost_usd", _COST),
        ):
            if row[index] is not None:
                attributes[key] = row[index]
        if row[_TTFT] is not None:
            attributes["thrifty.ttft_ms"] = row[_TTFT]
        if row[_STATUS] != "ok":
            attributes["error.type"] = str(row[_HTTP])
        span = self._tracer.start_span(
            f"chat {model}", kind=trace.SpanKind.SERVER, start_time=start, attributes=attributes
        )
        if row[_STATUS] != "ok":
            span.set_status(trace.Status(trace.StatusCode.ERROR, row[_ERROR] or row[_STATUS]))
        context = trace.set_span_in_context(span)
        at = start
        for attempt in orjson.loads(row[_ATTEMPTS]):
            took = int(attempt["latency_ms"] * 1e6)
            child: dict[str, Any] = {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": attempt["model"],
                "gen_ai.provider.name": attempt["provider"],
                "gen_ai.usage.input_tokens": attempt["input_tokens"],
                "gen_ai.usage.output_tokens": attempt["output_tokens"],
                "gen_ai.usage.cache_read.input_tokens": attempt["cached_input_tokens"],
                "http.response.status_code": attempt["status"],
                "thrifty.attempt.role": attempt["role"],
            }
            if attempt["cost_usd"] is not None:
                child["thrifty.cost_usd"] = attempt["cost_usd"]
            if attempt.get("gate"):
                child["thrifty.attempt.gate"] = attempt["gate"]
            if attempt["status"] != 200:
                child["error.type"] = str(attempt["status"])
            attempt_span = self._tracer.start_span(
                f"chat {attempt['model']}",
                context=context,
                kind=trace.SpanKind.CLIENT,
                start_time=at,
                attributes=child,
            )
            if attempt["status"] != 200:
                attempt_span.set_status(trace.Status(trace.StatusCode.ERROR, attempt.get("error") or ""))
            attempt_span.end(end_time=at + took)
            at += took
        span.end(end_time=max(start + int(row[_LATENCY] * 1e6), at))

    def close(self) -> None:
        """Export what is queued and stop."""
        self.provider.shutdown()


__all__ = ["LedgerTracer"]
