"""Process-wide runtime: the listener, where state lives, retries, idempotency, the embedder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from thrifty.settings._base import _Strict


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)


class StorageSettings(_Strict):
    # sqlite:///PATH (embedded default) or postgresql://USER@HOST:PORT/DB (several replicas).
    url: str = "sqlite:///thrifty.db"
    # NORMAL survives a killed process (WAL); FULL also survives power loss, at an fsync per batch.
    synchronous: Literal["normal", "full"] = "normal"
    ledger_batch_max: int = Field(default=512, ge=1)
    # PostgreSQL only: completed rows go here (fsynced) while the database is unreachable and are
    # replayed when it returns; the per-replica SQLite file for what is not shared (semantic cache).
    spool_path: str = "thrifty-ledger.spool.jsonl"
    local_path: str = "thrifty-local.db"
    pool_size: int = Field(default=8, ge=1)
    key_refresh_s: float = Field(default=2.0, gt=0)  # keys created or revoked elsewhere apply this soon

    @model_validator(mode="after")
    def _known_url(self) -> StorageSettings:
        if not self.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError(f"url must be sqlite:///PATH or postgresql://..., got {self.url!r}")
        return self

    @property
    def backend(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.url.startswith("sqlite:///") else "postgresql"

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file: the whole store, or with PostgreSQL the per-replica local file."""
        if self.backend == "postgresql":
            return Path(self.local_path)
        return Path(self.url.removeprefix("sqlite:///"))


class SharedStateSettings(_Strict):
    """Redis for what several replicas must share atomically (budgets, rate limits)."""

    url: str | None = None  # redis://HOST:PORT/DB; unset: in-process state (one replica)
    prefix: str = "thrifty:"  # key prefix, so several deployments can share one Redis
    # Redis unreachable: refuse with a 503 naming Redis, or fall back to per-replica limits.
    fault_mode: Literal["fail_closed", "degrade_local"] = "fail_closed"
    timeout_s: float = Field(default=0.5, gt=0)
    # A reservation its replica never settled (it died) is released after this long.
    reservation_lease_s: float = Field(default=900.0, gt=0)
    # How often a replica reads the breakers other replicas opened (off the request path).
    breaker_poll_s: float = Field(default=0.5, gt=0)

    @model_validator(mode="after")
    def _known_url(self) -> SharedStateSettings:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must be redis://HOST:PORT/DB, got {self.url!r}")
        return self


class ResilienceSettings(_Strict):
    max_retries: int = Field(default=2, ge=0)  # per target, for routes that do not set their own
    retry_base_s: float = Field(default=0.25, ge=0)  # backoff: base x 2^n, full jitter
    retry_max_s: float = Field(default=8.0, ge=0)  # also caps a provider's Retry-After
    retry_budget_per_minute: int = Field(default=60, ge=0)  # extra calls per target per minute
    breaker_failures: int = Field(default=5, ge=1)  # consecutive failures that open the circuit
    breaker_cooldown_s: float = Field(default=30.0, gt=0)  # open this long, then one probe


class IdempotencySettings(_Strict):
    ttl_s: float = Field(default=86400.0, gt=0)  # how long a finished result answers repeats
    # Finished results kept (oldest dropped beyond this); also the most keys running at once in
    # one process: a running key is never dropped, a new key past it is refused (503).
    max_entries: int = Field(default=10000, ge=1)
    # The longest a live gateway holds a running key (or a coalesced flight) before a repeat may
    # generate anew; longer than the slowest request (timeouts x retries).
    lease_s: float = Field(default=600.0, gt=0)
    # The lease a running key or flight is actually written with, renewed every third of it while
    # its owner works (up to `lease_s`): when the owner dies, a repeat waits at most this long
    # instead of `lease_s`. Above a Redis round trip or an SQLite write under load by far.
    flight_lease_s: float = Field(default=15.0, ge=0.3, le=3600)

    @model_validator(mode="after")
    def _flight_lease_within_lease(self) -> IdempotencySettings:
        if "flight_lease_s" in self.model_fields_set and self.flight_lease_s > self.lease_s:
            raise ValueError(
                f"idempotency.flight_lease_s ({self.flight_lease_s:g}) must not exceed "
                f"idempotency.lease_s ({self.lease_s:g})"
            )
        return self

    @property
    def running_lease_s(self) -> float:
        """The renewed lease: `flight_lease_s`, or `lease_s` when that is set shorter (and the
        short lease is the default)."""
        return min(self.flight_lease_s, self.lease_s)


class SemanticSettings(_Strict):
    """The semantic cache's shared embedding model (routes switch the cache on with semantic_cache)."""

    # Worker threads for query embeddings (onnxruntime releases the GIL): each does ~200 queries/s.
    embed_threads: int = Field(default=1, ge=1, le=64)
    # Routes that verify hits: how often what verification learned per partition is written to the
    # SQLite file (for `thrifty cache stats` and restarts); it is always written at shutdown.
    state_flush_s: float = Field(default=2.0, ge=0)
    # Semantic hits of routes that verify are kept this long (7 days), so feedback on one
    # (`x-thrifty-cache-wrong`) is matched after a restart or on another replica; older feedback
    # matches nothing.
    hit_retention_s: float = Field(default=7 * 86400.0, gt=0)
    # ... and at most this many of them (the newest), whatever the traffic of those 7 days.
    hit_max_rows: int = Field(default=1_000_000, ge=1)
