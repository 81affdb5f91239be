"""The gateway: the whole pipeline in-process. The HTTP server is a thin layer over this."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from thrifty.accounting import Account, Accountant, trailer_of
from thrifty.alerts.rules import budget_alerts
from thrifty.alerts.service import AlertService
from thrifty.cache.exact import ExactCacheStage
from thrifty.cache.prefix import PromptCacheBreakpoints
from thrifty.cache.semantic.stage import EmbedderFactory, SemanticCacheStage
from thrifty.context.stage import ContextStage
from thrifty.context.summaries import SqliteSummaryStore, Summariser
from thrifty.dedup.stage import Deduplicate
from thrifty.errors import AuthenticationFailed, ConfigError, InvalidRequest, ThriftyError
from thrifty.experiments.feedback import FeedbackService
from thrifty.experiments.stage import Experiments
from thrifty.experiments.store import ExperimentStore, Feedback
from thrifty.guard.budgets import BudgetPlan, Limit
from thrifty.guard.limits import InputLimits
from thrifty.guard.output import OutputCeiling
from thrifty.guard.rate import RateLimits
from thrifty.guard.spend import SpendGuard
from thrifty.pipeline import Handler, RequestContext, Result, Stage, build_chain
from thrifty.pricing import PriceCatalog
from thrifty.providers.base import Provider
from thrifty.providers.call import CallProvider
from thrifty.providers.registry import build_providers
from thrifty.providers.resilience import Resilience
from thrifty.recording.stage import RecordingStage
from thrifty.routing.resolve import ROUTE_PREFIX, ResolveModel
from thrifty.routing.stage import RouteStage, possible_calls
from thrifty.settings import Settings
from thrifty.stores.factory import Stores, open_experiment_store
from thrifty.stores.keys import hash_key
from thrifty.stores.ports import KeyDirectory
from thrifty.stores.recordings import RecordingWriter, open_sink
from thrifty.stores.sqlite_db import open_database
from thrifty.tokens import TokenCounter, encoding_for_model
from thrifty.types import ModelTarget, RequestStatus, Tags

if TYPE_CHECKING:
    from thrifty.tracing import LedgerTracer

log = logging.getLogger(__name__)


def _targets(settings: Settings) -> dict[str, ModelTarget]:
    return {
        alias: ModelTarget(
            alias=alias,
            provider=m.provider,
            upstream_model=m.upstream or alias,
            context_window=m.context_window,
        )
        for alias, m in settings.models.items()
    }


def _anthropic_models(settings: Settings) -> frozenset[str]:
    """Anthropic's models: one choice per request whatever `n` says, and prompt-cache writes billed
    above the input price."""
    kinds = {name: p.kind for name, p in settings.providers.items()}
    return frozenset(a for a, m in settings.models.items() if kinds[m.provider] == "anthropic")


def parse_chat_body(raw: bytes, route: str | None = None) -> dict[str, Any]:
    """Parse and check the fields the gateway itself relies on; everything else passes through.

    `route` (the `x-thrifty-route` header) replaces the body's model with `route:NAME`, so an app
    whose code names a model can be put on a route by its platform team without a code change."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidRequest(f"the request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if route and route.strip():
        body["model"] = "route:" + route.strip()
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required: a model alias or route:NAME", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]"
            )
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidRequest(f"'{key}' must be a positive integer", param=key)
    return body


def _model_of(body: Any) -> str | None:
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


class Gateway:
    """Build once from settings; `start()` inside the event loop, `close()` at the end."""

    def __init__(
        self,
        settings: Settings,
        *,
        secrets: Mapping[str, str | None] | None = None,
        providers: Mapping[str, Provider] | None = None,
        stores: Stores | None = None,
        embedder_factory: EmbedderFactory | None = None,
    ) -> None:
        """`providers` replaces the providers the settings name (tests, `thrifty simulate`);
        `embedder_factory` the semantic cache's embedding model (simulate hands it one that has
        embedded the whole traffic in batches beforehand)."""
        self.settings = settings
        # Every store comes from the factory, chosen by the settings' URLs; nothing below knows
        # whether it is SQLite, PostgreSQL or Redis.
        self.stores = stores or Stores(settings)
        self.counter = TokenCounter()
        self.catalog = PriceCatalog.from_settings(settings.models, settings.providers)
        self.targets = _targets(settings)
        self.providers: dict[str, Provider] = dict(
            providers if providers is not None else build_providers(settings, secrets or {}, self.counter)
        )
        self.db_path = settings.storage.sqlite_path
        self.ledger = self.stores.ledger
        self.tracer: LedgerTracer | None = None
        if settings.tracing.enabled:  # off: OpenTelemetry is not even imported
            from thrifty.tracing import LedgerTracer

            self.tracer = LedgerTracer(settings.tracing)
            self.ledger.observe(self.tracer.observe_batch)
        self._key_tenants = {h: tenant for tenant, t in settings.tenants.items() for h in t.key_hashes}
        self._keys: KeyDirectory | None = None
        accountant = self._accountant = Accountant(self.catalog, self.counter, self.ledger)
        unpriced = frozenset(a for a in self.targets if not self.catalog.is_priced(a))
        # Route experiments: arms from the settings, then as promote/stop/release left them.
        self.experiments = Experiments(settings.routes, self.targets)
        self.experiment_store: ExperimentStore | None = None
        self.feedback = FeedbackService(None)  # observers subscribe here (see experiments/feedback.py)
        self.feedback.subscribe(self._feedback_to_cache)
        self._experiment_refresh: asyncio.Task[None] | None = None
        self.resolver = ResolveModel(
            self.targets,
            settings.routes,
            settings.tenants,
            refuse_unpriced=unpriced if settings.pricing.reject_unpriced else frozenset(),
            experiments=self.experiments,
        )
        self.router = RouteStage(settings.routes, self.targets, _anthropic_models(settings))
        route_calls = {name: self.router.possible_calls(name, r) for name, r in settings.routes.items()}
        route_calls |= {key: possible_calls(r) for key, r in self.router.variant_routes.items()}
        self.budget_plan = BudgetPlan(settings)
        self.budget_book = self.stores.budget_book
        spend_guard = self._spend_guard = SpendGuard(
            catalog=self.catalog,
            counter=self.counter,
            models=settings.models,
            routes=settings.routes,
            plan=self.budget_plan,
            book=self.budget_book,
            on_spend=self._budget_alerts,
            route_calls=route_calls,
            route_models={name: self.router.possible_models(name) for name in settings.routes},
            anthropic=_anthropic_models(settings),
            shared=self.stores.shared_budgets,
            fallback=self.stores.budget_fallback,
        )
        self.alerts: AlertService | None = None
        self.idempotency = self.stores.idempotency
        self.exact_cache = ExactCacheStage(settings.routes, self.catalog)
        self.semantic_cache = SemanticCacheStage(
            settings.routes,
            self.catalog,
            embed_threads=settings.semantic.embed_threads,
            embedder_factory=embedder_factory,
            state_flush_s=settings.semantic.state_flush_s,
            hit_retention_s=settings.semantic.hit_retention_s,
            hit_max_rows=settings.semantic.hit_max_rows,
        )
        prefix_marks = PromptCacheBreakpoints(
            settings.routes, {n: p.kind for n, p in settings.providers.items()}
        )
        rate_limits = {t: s.rate_limit for t, s in settings.tenants.items() if s.rate_limit is not None}
        resilience = self.resilience = Resilience(
            settings.resilience, settings.routes, self.targets, board=self.stores.breaker_board
        )
        call_provider = CallProvider(self.providers, accountant)
        # Context summaries go down the same retries, breakers and fallbacks as answers.
        self.context = ContextStage(
            settings.routes,
            self.counter,
            summariser=Summariser(build_chain([resilience], call_provider), self.targets),
            budget=spend_guard,
        )
        if self.semantic_cache.active:
            self.context.embed = self.semantic_cache.embed_texts  # ranks evidence sent without scores
        self.semantic_cache.verifier.recorder = self._record_verification
        self.semantic_cache.verifier.route_target = lambda route: self.resolver.resolve(f"route:{route}")[1]
        self._context_db: sqlite3.Connection | None = None
        self.recorder = RecordingStage(settings.routes)
        # A stage the settings leave nothing to do is not in the chain: it would cost every request.
        stages: list[Stage | None] = [
            # Outermost: it keeps the body as the client sent it and the answer as the client got it.
            self.recorder if self.recorder.active else None,
            Account(accountant),
            self.resolver,
            OutputCeiling(
                settings.models, settings.routes, _anthropic_models(settings), self.router.trained_aliases()
            ),
            # Before the prompt limits, the cache keys and the spend guard: they see the compacted request.
            self.context if self.context.active else None,
            InputLimits(self.counter, settings.routes)
            if any(m.context_window for m in settings.models.values())
            or any(r.max_input_tokens for r in settings.routes.values())
            else None,
            self.exact_cache if self.exact_cache.active else None,
            self.semantic_cache if self.semantic_cache.active else None,
            # Before the spend guard: a duplicate must neither reserve nor be refused budget.
            Deduplicate(
                settings.idempotency,
                settings.routes,
                self.idempotency,
                wait_elsewhere=self.stores.redis is not None,
                shared_flights=self.stores.shared_flights,
            ),
            RateLimits(
                rate_limits,
                settings.routes,
                settings.models,
                self.counter,
                shared=self.stores.shared_rates,
                fallback=self.stores.rate_fallback,
                # Admission and reservation in one round trip when budgets are shared too: the
                # spend guard must come right after (it sends the admission the rate stage left).
                with_budget=self.stores.shared_budgets is not None and not spend_guard.unlimited,
            )
            if rate_limits or any(r.max_steps_per_session for r in settings.routes.values())
            else None,
            spend_guard,
            self.router if self.router.active else None,
            resilience,
            prefix_marks if prefix_marks.active else None,  # per attempt: fallbacks may not be Anthropic
        ]
        self._handle: Handler = build_chain([stage for stage in stages if stage is not None], call_provider)
        from thrifty.batch.runner import BatchRunner
        from thrifty.batch.service import BatchService
        from thrifty.batch.wiring import build_adapters

        self.batch = BatchService(self, build_adapters(settings, secrets or {}, self.providers))
        self.batch_runner = BatchRunner(self.batch)
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        loop = asyncio.get_running_loop()
        await self.stores.start(
            exact_cache=self.exact_cache.active, semantic_cache=self.semantic_cache.active
        )
        self._keys = self.stores.keys
        if not self.budget_plan.empty:
            await self.stores.rebuild_budgets(self.budget_plan, time.time())
        self.exact_cache.store = self.stores.exact_local
        self.exact_cache.remote = self.stores.exact_remote
        if self.semantic_cache.active:
            await self.semantic_cache.start(
                self.stores.cache_db,
                remote=self.stores.semantic_remote,
                states=self.stores.semantic_states,
                hits=self.stores.semantic_hits,
                writer=self.stores.cache_writer,
            )
        if self.context.active:
            # Summaries of conversation prefixes: PostgreSQL when it is the storage (shared by the
            # replicas: a chat's summary made on one is reused on the others), else the SQLite file.
            self.context.store = self.stores.summary_store()
            if self.context.store is None:
                self._context_db = open_database(self.db_path, synchronous=self.settings.storage.synchronous)
                self._context_db.execute("PRAGMA busy_timeout=0")  # never wait for a lock on the loop
                self.context.store = SqliteSummaryStore(self._context_db)
        if self.recorder.active:
            self.recorder.writer = RecordingWriter(open_sink(self.settings))
            self.recorder.writer.start()
        self.alerts = AlertService(
            self.settings.alerts, self.stores.alert_store, self.router.expected_escalation()
        )
        await self.alerts.start()
        if self.stores.breaker_board is not None:
            self.stores.breaker_board.start(self.resilience.apply_shared)
        await self.idempotency.start()
        encodings = {encoding_for_model(t.upstream_model)[0] for t in self.targets.values()}
        # Vocabularies load in ~0.5 s; do it now, not on the first request that needs a count.
        await loop.run_in_executor(None, self.counter.warm, encodings)
        for provider in self.providers.values():
            await provider.start()
        self.batch.start()
        await self.batch_runner.start()
        # Feedback and the arms promote/stop/release left: the ledger's SQLite file or PostgreSQL.
        self.experiment_store = store = await asyncio.to_thread(open_experiment_store, self.settings)
        self.feedback.attach(store)
        self.experiments.apply_state(await asyncio.to_thread(store.states))
        self._experiment_refresh = asyncio.ensure_future(self._refresh_experiments(store))
        self._started = True

    async def _refresh_experiments(self, store: ExperimentStore) -> None:
        """Arms changed by the CLI (promote, stop, a release step) reach this gateway soon."""
        while True:
            await asyncio.sleep(self.settings.experiments.refresh_s)
            try:
                self.experiments.apply_state(await asyncio.to_thread(store.states))
            except (sqlite3.Error, ThriftyError) as err:  # the arms stay as they were; next time
                log.warning("could not read the experiments' state: %s", err)

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _budget_alerts(self, spent: list[tuple[Limit, float, Decimal]]) -> None:
        if self.alerts is None:
            return
        found = []
        for limit, start, amount in spent:
            found += budget_alerts(limit, start, amount, self.settings.alerts.budget_thresholds)
        if found:
            self.alerts.fire(found)

    async def close(self) -> None:
        # Shadow verifications in flight finish first: they need the providers and write ledger rows.
        await self.semantic_cache.drain()
        if self._experiment_refresh is not None:
            self._experiment_refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._experiment_refresh
            self._experiment_refresh = None
        if self.experiment_store is not None:
            self.feedback.attach(None)
            self.experiment_store.close()
            self.experiment_store = None
        await self.batch_runner.close()
        self.batch.close()
        if self.alerts is not None:
            await self.alerts.close()
            self.alerts = None
        for provider in self.providers.values():
            await provider.close()
        await self._spend_guard.drain()
        await self.exact_cache.drain()
        await self.idempotency.close()
        await self.semantic_cache.aclose()
        if self._context_db is not None:
            self._context_db.close()
            self._context_db = None
        if self.recorder.writer is not None:
            await asyncio.to_thread(self.recorder.writer.close)  # writes what is queued
            self.recorder.writer = None
        await self.stores.close()  # the ledger flushes its last batch here
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.close)  # exports what is queued; never on the loop
        self._started = False

    async def _record_verification(
        self, ctx: RequestContext, status: RequestStatus, http_status: int, error: str | None
    ) -> None:
        """The ledger entry of a semantic cache verification (its attempts have role ``verify``)."""
        await self.ledger.submit(self._accountant.entry(ctx, status, http_status, error))

    async def _feedback_to_cache(self, feedback: Feedback) -> None:
        """`POST /v1/thrifty/feedback` with label `cache_wrong` on a semantic hit counts as a failed
        verification of that hit (the same as the `x-thrifty-cache-wrong` header)."""
        if feedback.cache == "semantic" and feedback.label == "cache_wrong":
            await self.cache_feedback(feedback.tenant_id, feedback.request_id, wrong=True)

    async def cache_feedback(self, tenant: str, request_id: str, wrong: bool) -> bool:
        """A user's verdict on an earlier answer of ``tenant``'s, for the semantic cache.

        ``wrong`` True: the answer of ``request_id`` was wrong; if it was a semantic hit, its partition
        counts a failed verification at that hit's score (its threshold tightens, verification is
        sampled more), else a verified right one. Returns whether it named a semantic hit of this
        tenant's not yet judged (each hit counts once; another tenant's request ids are ignored).
        Called by the feedback endpoint; the hit may be from before a restart or another replica's
        (the hits are stored, ``semantic.hit_retention_s``).
        """
        return await self.semantic_cache.feedback(tenant, request_id, wrong)

    def cache_feedback_soon(self, tenant: str, request_id: str, wrong: bool) -> None:
        """``cache_feedback`` in the background, for the ``x-thrifty-cache-wrong: REQUEST_ID`` header:
        the request carrying it does not wait for the hit to be looked up."""
        self.semantic_cache.feedback_soon(tenant, request_id, wrong)

    def health(self) -> dict[str, int]:
        """Counters for /healthz: decisions taken per replica while Redis was away (degrade_local),
        ledger rows spooled while PostgreSQL was. Empty in the embedded default."""
        return self.stores.health()

    # -- auth ------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str:
        """A virtual key (Bearer) -> its tenant id."""
        if not authorization:
            raise AuthenticationFailed(
                "no API key: send your thrifty virtual key as 'Authorization: Bearer KEY' "
                "(create one with `thrifty keys create --tenant NAME`)"
            )
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationFailed(
                "the Authorization header must be 'Bearer KEY' with your thrifty virtual key "
                "(the openai SDK sends it so when given api_key=KEY)"
            )
        digest = hash_key(key.strip())
        tenant = self._key_tenants.get(digest)
        if tenant is None and self._keys is not None:
            tenant = self._keys.tenant_for_hash(digest)
        if tenant is None:
            raise AuthenticationFailed(
                "invalid API key: it is not a thrifty virtual key known to this gateway, or it was revoked"
            )
        if tenant not in self.settings.tenants:
            raise AuthenticationFailed(f"the key's tenant {tenant!r} is no longer in the settings")
        return tenant

    # -- requests --------------------------------------------------------------------------

    def new_context(self, body: dict[str, Any], body_bytes: int, tags: Tags) -> RequestContext:
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        return RequestContext(
            # Time-ordered ids keep ledger inserts at the right edge of the primary-key index
            # (random ids cost ~3x per row once the table is large).
            request_id=f"req_{time.time_ns():016x}{os.urandom(6).hex()}",
            ts=time.time(),
            started=time.perf_counter(),
            tags=tags,
            body=body,
            body_bytes=body_bytes,
            requested_model=body["model"],
            stream=stream,
            client_wants_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        )

    async def refuse(
        self, tags: Tags, err: ThriftyError, *, body_bytes: int, model: str | None = None
    ) -> RequestContext:
        """Record a request refused before it could be parsed (413, malformed JSON or schema), so
        every request that passed authentication has its ledger row; wait for it to be committed."""
        ctx = self.new_context({"model": model or ""}, body_bytes, tags)
        entry = self._accountant.entry(ctx, "error", err.status, err.message)
        ctx.trailer = trailer_of(entry)
        await self.ledger.submit(entry)
        return ctx

    async def run(self, ctx: RequestContext) -> Result:
        try:
            return await self._handle(ctx)
        finally:
            if ctx.budget_remaining is None:
                # Answered or refused before the spend guard ran: the header is still owed.
                ctx.budget_remaining = self._spend_guard.describe(ctx)

    async def chat_completion(
        self,
        body: dict[str, Any],
        *,
        tenant: str,
        feature: str | None = None,
        prompt_version: str | None = None,
        user: str | None = None,
        task: str | None = None,
        corpus_version: str | None = None,
        evidence: tuple[str, ...] = (),
        cache_control: str | None = None,
        idempotency_key: str | None = None,
        cache_wrong: str | None = None,
    ) -> tuple[RequestContext, Result]:
        """Library entry point: the same pipeline, attributed to `tenant` without a key; the keyword
        arguments are what the x-thrifty-* headers carry over HTTP (``cache_wrong``: the request id of
        an earlier answer that was wrong, as ``x-thrifty-cache-wrong``)."""
        if tenant not in self.settings.tenants:
            raise ConfigError(f"unknown tenant {tenant!r}")
        if cache_wrong:
            self.cache_feedback_soon(tenant, cache_wrong.strip(), wrong=True)
        raw = orjson.dumps(body)
        tags = Tags(
            tenant,
            feature,
            prompt_version,
            user,
            idempotency_key=(idempotency_key or "").strip() or None,  # as over HTTP: empty is none
            corpus_version=corpus_version,
            cache_control=cache_control.lower() if cache_control else None,
            evidence=tuple(sorted(set(evidence))),
            task=task,
        )
        try:
            parsed = parse_chat_body(raw)
        except InvalidRequest as err:
            await self.refuse(tags, err, body_bytes=len(raw), model=_model_of(body))
            raise
        ctx = self.new_context(parsed, len(raw), tags)
        return ctx, await self.run(ctx)

    def model_list(self) -> list[dict[str, Any]]:
        created = 0
        data = [
            {"id": alias, "object": "model", "created": created, "owned_by": t.provider}
            for alias, t in self.targets.items()
        ]
        data += [
            {"id": ROUTE_PREFIX + name, "object": "model", "created": created, "owned_by": "thrifty-route"}
            for name in self.settings.routes
        ]
        return data


__all__ = ["Gateway", "ThriftyError", "parse_chat_body"]
