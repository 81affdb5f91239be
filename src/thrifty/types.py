"""Frozen value types shared by every layer of the gateway."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal


def decimal_text(value: Decimal) -> str:
    """Plain positional notation (never '1E-7'), so stored and shown amounts read the same."""
    return format(value, "f")


# How a request was answered without (or with) its own upstream call: `dedup` is an idempotent
# repeat or a coalesced duplicate, answered from another request's generation.
CacheOutcome = Literal["miss", "exact", "semantic", "dedup"]
# What an upstream call was for: the answer returned, a cascade draft the gate rejected (or that was
# not chosen), a voter asked by an agreement gate, or a summary of older turns (context compaction).
# verify: a shadow call that checked a semantic cache hit after it was served (cache/semantic/verify.py).
AttemptRole = Literal["answer", "draft", "voter", "compaction", "verify", "judge"]
RequestStatus = Literal["ok", "error", "client_disconnected"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Normalised token usage of one call.

    `input_tokens` is the whole prompt, *including* tokens read from or written to the
    provider's prompt cache (OpenAI's convention, and genai-prices'). Adapters for providers
    that report them separately (Anthropic) add them in before building a Usage.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    # The part of `cache_write_tokens` written with Anthropic's 1-hour TTL, priced at its own,
    # higher rate; the rest are 5-minute writes.
    cache_write_1h_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.output_tokens + other.output_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.estimated or other.estimated,
            self.cache_write_1h_tokens + other.cache_write_1h_tokens,
        )


@dataclass(frozen=True, slots=True)
class Tags:
    """Attribution of one request, from the virtual key and the x-thrifty-* headers."""

    tenant_id: str
    feature: str | None = None
    prompt_version: str | None = None
    user: str | None = None
    idempotency_key: str | None = None
    session: str | None = None
    corpus_version: str | None = None
    cache_control: str | None = None  # the request's Cache-Control header, lower-cased
    evidence: tuple[str, ...] = ()  # x-thrifty-evidence: ids of the sources an answer rests on
    task: str | None = None  # x-thrifty-task: the kind of work, for routes that route by task


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream call made on behalf of a logical request."""

    model: str
    provider: str
    status: int
    usage: Usage
    cost_usd: Decimal | None
    latency_ms: float
    error: str | None = None
    role: AttemptRole = "answer"
    gate: str | None = None  # the quality gate's verdict on this draft (cascade routes)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": self.provider,
            "status": self.status,
            "input_tokens": self.usage.input_tokens,
            "cached_input_tokens": self.usage.cached_input_tokens,
            "cache_write_tokens": self.usage.cache_write_tokens,
            "cache_write_1h_tokens": self.usage.cache_write_1h_tokens,
            "output_tokens": self.usage.output_tokens,
            "reasoning_tokens": self.usage.reasoning_tokens,
            "usage_estimated": self.usage.estimated,
            "cost_usd": None if self.cost_usd is None else decimal_text(self.cost_usd),
            "latency_ms": round(self.latency_ms, 3),
            "error": self.error,
            "role": self.role,
            "gate": self.gate,
        }


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """The unit of attribution: one row per logical request (see DESIGN.md)."""

    request_id: str
    ts: float
    tenant_id: str
    user: str | None
    feature: str | None
    route: str | None
    prompt_version: str | None
    model: str | None
    provider: str | None
    attempts: tuple[Attempt, ...]
    usage: Usage
    cost_usd: Decimal | None
    saved_usd: Decimal | None
    cache: CacheOutcome
    escalated: bool
    retries: int
    status: RequestStatus
    error: str | None
    http_status: int
    latency_ms: float
    ttft_ms: float | None
    idempotency_key: str | None
    batch: bool = False
    stream: bool = False
    # Context budgets: tokens per section before and after, what was done (see context/report.py).
    context: dict[str, Any] | None = None
    variant: str | None = None  # the experiment arm the request was assigned (route experiments)


@dataclass(frozen=True, slots=True)
class ModelTarget:
    """A model alias resolved to the provider that serves it."""

    alias: str
    provider: str
    upstream_model: str
    context_window: int | None


@dataclass(slots=True)
class UpstreamResult:
    """A completed, non-streaming upstream response, already in OpenAI's shape."""

    body: dict[str, Any]
    usage: Usage | None  # None when the provider did not report it
    status: int = 200
    extra: dict[str, Any] = field(default_factory=dict)
