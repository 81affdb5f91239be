"""The semantic cache stage: a paraphrase of an earlier question gets the earlier answer.

On a route with `semantic_cache`, the last user turn is normalised and embedded locally (MiniLM on
onnxruntime, in a worker thread so the event loop never waits on the model), its nearest entries
are found in the request's partition, and the multi-signal policy of ``decision`` says hit or miss.

What may answer what is decided by the partition key, never by similarity: tenant, user (when the
route says answers are personal), route, prompt version, corpus version, model, safety policy
version and the whole conversation around the last user turn (system prompt, earlier turns, tools,
response format, sampling parameters). Two questions are only ever compared when everything but
their wording is the same.

Entries vote by *answer*: entries whose answers rest on the same evidence (`x-thrifty-evidence`) or,
without evidence ids, have the same text, count as one answer. That is what makes "the nearest
entries agree" a meaningful signal in live traffic, where every generated answer is worded anew.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from thrifty.cache.common import DELIVERY_FIELDS, answer_scope, cacheable, serve_stored, usage_worth_keeping
from thrifty.cache.semantic.adaptive import Bound
from thrifty.cache.semantic.decision import DecisionParams, Neighbour, assess, decide, default_params
from thrifty.cache.semantic.density import cluster_gap, member_rows, outside_cluster
from thrifty.cache.semantic.entries import UNREADABLE, Entries, LocalEntries, SharedEntries
from thrifty.cache.semantic.hit_log import HitLog, SqliteHitLog
from thrifty.cache.semantic.index import HnswIndex
from thrifty.cache.semantic.near_miss import NearMissJudge
from thrifty.cache.semantic.normalise import normalise
from thrifty.cache.semantic.partitions import EntryMeta, Partition, Partitions, build_graph
from thrifty.cache.semantic.state_store import SqlitePartitionStateStore
from thrifty.cache.semantic.store import LiveEntry, NewEntry, SharedSemanticStore
from thrifty.cache.semantic.tune import SEARCH_K
from thrifty.cache.semantic.verify import HIT_MAX_ROWS, HIT_RETENTION_S, Verifier
from thrifty.errors import ConfigError
from thrifty.pipeline import Completion, Handler, RequestContext, Result, Streamed
from thrifty.pricing import PriceCatalog
from thrifty.providers.base import StreamChunk, relay_and_keep
from thrifty.settings import RouteSettings, SemanticCacheSettings
from thrifty.shapes import as_completion
from thrifty.stores.write_behind import SqliteWriteBehind
from thrifty.types import Usage

if TYPE_CHECKING:
    from thrifty.stores.postgres_semantic_state import PostgresPartitionStateStore

log = logging.getLogger(__name__)

# Stored with every entry: entries made by another model are not comparable and are not loaded.
EMBEDDING_MODEL_ID = "all-MiniLM-L6-v2/int8-onnx"
# Besides the delivery fields: the model is in the partition key already.
_NOT_CONTEXT = DELIVERY_FIELDS | {"model"}
_PURGE_EXPIRED_EVERY = 1000


class Embedder(Protocol):
    dim: int

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> npt.NDArray[np.float32]: ...


EmbedderFactory = Callable[[], Embedder]


def _default_embedder() -> Embedder:
    from thrifty.cache.semantic import extra

    try:
        from thrifty.cache.semantic.embedder import OnnxMiniLM
    except ImportError as err:
        raise extra.missing("a route with semantic_cache", err) from err
    try:
        return OnnxMiniLM(threads=1)
    except extra.ModelNotInstalledError as err:
        raise extra.missing("a route with semantic_cache", err) from err


def last_user_text(body: Mapping[str, Any]) -> str | None:
    """The text of the last message when it is a user turn made only of text, else None."""
    messages = body.get("messages") or []
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return content if content.strip() else None
    if isinstance(content, list) and content:
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(content) and all(isinstance(p, str) for p in parts):
            return "\n".join(parts)  # type: ignore[arg-type]  # all str, checked just above
    return None  # images, audio, tool results: not a question to match by meaning


def context_hash(body: Mapping[str, Any]) -> str:
    """Everything of the request but the last user turn's wording: system prompt, earlier turns,
    tools, response format, sampling parameters."""
    context = {k: v for k, v in body.items() if k not in _NOT_CONTEXT}
    context["messages"] = (body.get("messages") or [])[:-1]
    return hashlib.sha256(orjson.dumps(context, option=orjson.OPT_SORT_KEYS)).hexdigest()


def partition_key(ctx: RequestContext, settings: SemanticCacheSettings, system_hash: str) -> str:
    parts = [
        *answer_scope(ctx, settings.per_user),
        settings.safety_policy_version,
        system_hash,
        EMBEDDING_MODEL_ID,
    ]
    return hashlib.sha256(orjson.dumps(parts)).hexdigest()


def answer_id(response: Mapping[str, Any], evidence: Sequence[str]) -> str:
    """Answers resting on the same evidence are one answer; without evidence, the same text is."""
    if evidence:
        return "evidence:" + hashlib.sha256("\x1f".join(sorted(evidence)).encode()).hexdigest()[:32]
    said = [
        ((c.get("message") or {}).get("content"), (c.get("message") or {}).get("tool_calls"))
        for c in response.get("choices") or ()
    ]
    return "text:" + hashlib.sha256(orjson.dumps(said)).hexdigest()[:32]


def load_params(settings: SemanticCacheSettings) -> DecisionParams:
    if settings.params is None:
        params = default_params()
    else:
        try:
            params = DecisionParams.from_dict(json.loads(Path(settings.params).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"semantic_cache.params {settings.params}: not a parameters file written by "
                f"`thrifty cache tune --out` ({err})"
            ) from err
    if settings.threshold is not None:
        # The route's own cut replaces the learned one at every cache size.
        params = replace(params, threshold=settings.threshold, size_steps=(), size_thresholds=())
    return params


@dataclass(frozen=True, slots=True)
class _Candidate:
    """The entry a lookup would serve and how sure the rule is (for verification)."""

    entry_id: int
    answer_id: str
    score: float | None  # None: a repeat of a cached question, served without the rule
    verdict: Bound | None  # the partition's adaptive threshold, on routes that verify
    cached: dict[str, Any] | None = None  # the answer served (on a hit)


class SemanticCacheStage:
    def __init__(
        self,
        routes: Mapping[str, RouteSettings],
        catalog: PriceCatalog,
        *,
        embed_threads: int = 1,
        embedder_factory: EmbedderFactory | None = None,
        state_flush_s: float = 2.0,
        hit_retention_s: float = HIT_RETENTION_S,
        hit_max_rows: int = HIT_MAX_ROWS,
    ) -> None:
        self._settings = {
            name: r.semantic_cache
            for name, r in routes.items()
            if r.semantic_cache is not None and r.semantic_cache.enabled
        }
        self._params = {name: load_params(s) for name, s in self._settings.items()}
        self._catalog = catalog
        self._embedder_factory = embedder_factory or _default_embedder
        self._embedder: Embedder | None = None
        # Embeddings run in worker threads (onnxruntime releases the GIL); the index and the store
        # are only ever touched on the event loop.
        self._threads = embed_threads
        self._pool: ThreadPoolExecutor | None = None
        # The rows (SQLite, or PostgreSQL for several replicas: ``entries``); the index is here.
        self._entries: Entries | None = None
        self._near_miss: NearMissJudge | None = None
        self._parts: Partitions | None = None
        self._age: dict[str, deque[int]] = {name: deque() for name in self._settings}
        self._adds = 0
        self._background: set[asyncio.Future[HnswIndex]] = set()
        self.verifier = Verifier(
            {
                name: s.verify
                for name, s in self._settings.items()
                if s.verify is not None and s.verify.enabled
            },
            flush_every_s=state_flush_s,
            hit_retention_s=hit_retention_s,
            hit_max_rows=hit_max_rows,
        )

    @property
    def active(self) -> bool:
        return bool(self._settings)

    @property
    def entries(self) -> int:
        return len(self._parts) if self._parts is not None else 0

    async def start(
        self,
        conn: sqlite3.Connection | None,
        remote: SharedSemanticStore | None = None,
        states: PostgresPartitionStateStore | None = None,
        hits: HitLog | None = None,
        writer: SqliteWriteBehind | None = None,
    ) -> None:
        """Load the model and rebuild the index from the stored, unexpired entries (of the SQLite
        file `conn`, or of the shared store `remote`, which it then follows; `states`: where the
        replicas share what verification learned; `hits`: where they keep their hits for feedback;
        `writer`: SQLite, the thread that commits new entries, waiting for the lock off the loop)."""
        loop = asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="thrifty-embed")
        self._embedder = await loop.run_in_executor(self._pool, self._embedder_factory)
        now = time.time()
        parts = Partitions(self._embedder.dim)
        if remote is not None:
            self._entries = SharedEntries(remote)
            if states is not None:
                await self.verifier.start_shared(states, hits)
        else:
            assert conn is not None
            self._entries = LocalEntries(conn, writer)
            self.verifier.start(SqlitePartitionStateStore(conn), SqliteHitLog(conn))
        self._near_miss = NearMissJudge(self.verifier, self._settings, self._entries)
        async for entry in self._entries.start(now, EMBEDDING_MODEL_ID):
            self._load(parts, entry)
        self._parts = parts
        for route in self._settings:
            self._evict(route)
        # Before serving: partitions that start large get their graphs now, in the worker thread.
        for part in parts.large():
            part.finish_graph(
                await loop.run_in_executor(self._pool, build_graph, parts.dim, part.start_graph())
            )
        log.info("semantic cache: %d entries loaded", len(parts))
        self._entries.follow(self._followed)

    def _load(self, parts: Partitions, entry: LiveEntry) -> bool:
        settings = self._settings.get(entry.route)
        if settings is None or parts.meta(entry.entry_id) is not None:
            return False  # the route no longer caches (its rows expire by TTL or purge), or known
        meta = EntryMeta(entry.query, entry.normalised_query, entry.answer_id, entry.expires_at)
        part = parts.add(entry.partition, entry.entry_id, entry.embedding, meta)
        self._age[entry.route].append(entry.entry_id)
        if part.wants_graph and self._parts is not None:
            self._grow(part)
        return True

    def _followed(self, entries: list[LiveEntry]) -> None:
        """Entries another replica added: into this replica's index, within the routes' bounds."""
        assert self._parts is not None
        routes = {entry.route for entry in entries if self._load(self._parts, entry)}
        for route in routes:
            self._evict(route)

    async def aclose(self) -> None:
        """Finish the shared store's pending writes and stop following it, then `close`."""
        if self._entries is not None:
            await self._entries.aclose()
        await self.verifier.drain()  # feedback claims in flight count before the last writes
        await self.verifier.stop_hits()
        await self.verifier.stop_shared()
        self.close()

    async def drain(self) -> None:
        """Wait for the verifications in flight, and write what they learned."""
        await self.verifier.drain()
        self.verifier.flush()

    def stats(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """What `thrifty cache stats` shows, from this gateway's memory (``tenant``: only its
        partitions), for the dashboard."""
        from thrifty.cache.semantic.stats import partition_stats

        states = [(p, s) for p, s in self.verifier.states() if tenant is None or s.tenant_id == tenant]
        verify = {r: s.verify for r, s in self._settings.items() if s.verify is not None and s.verify.enabled}
        sizes = {p: self._parts.size(p) for p, _ in states} if self._parts is not None else {}
        return [row.to_dict() for row in partition_stats(states, verify, self._params, sizes)]

    async def feedback(self, tenant_id: str, request_id: str, wrong: bool) -> bool:
        """A user's verdict on an earlier answer (see ``Verifier.feedback``)."""
        return await self.verifier.feedback(tenant_id, request_id, wrong)

    def feedback_soon(self, tenant_id: str, request_id: str, wrong: bool) -> None:
        """``feedback`` off the response path of the request that carries it."""
        self.verifier.feedback_soon(tenant_id, request_id, wrong)

    def close(self) -> None:
        self.verifier.flush()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """L2-normalised embeddings of `texts`, in a worker thread (after start)."""
        assert self._embedder is not None and self._pool is not None
        embedder = self._embedder
        rows: npt.NDArray[np.float32] = await asyncio.get_running_loop().run_in_executor(
            self._pool, embedder.embed, list(texts)
        )
        return rows

    async def _embed(self, text: str) -> npt.NDArray[np.float32]:
        assert self._embedder is not None and self._pool is not None
        embedder = self._embedder
        rows = await asyncio.get_running_loop().run_in_executor(self._pool, embedder.embed, [text])
        vector: npt.NDArray[np.float32] = rows[0]
        return vector

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        settings = self._settings.get(ctx.route) if ctx.route is not None else None
        if settings is None or self._parts is None or not cacheable(ctx.body, settings):
            return await call_next(ctx)
        query = last_user_text(ctx.body)
        directive = ctx.tags.cache_control or ""
        lookup, keep = "no-cache" not in directive, "no-store" not in directive
        if query is None or not (lookup or keep):
            return await call_next(ctx)
        assert ctx.route is not None
        system_hash = context_hash(ctx.body)
        partition = partition_key(ctx, settings, system_hash)
        normalised = normalise(query)
        vector = await self._embed(normalised)
        candidate: _Candidate | None = None
        if lookup:
            served, candidate = await self._lookup(ctx, ctx.route, partition, query, normalised, vector)
            if served is not None:
                if candidate is not None and self.verifier.covers(ctx.route):
                    self._after_hit(
                        ctx, call_next, partition, candidate, settings, system_hash, query, vector
                    )
                return served
        result = await call_next(ctx)
        near_miss = candidate if candidate is not None and candidate.verdict is not None else None
        if not keep and near_miss is None:
            return result
        add = _Adder(self, ctx, settings, partition, system_hash, query, normalised, vector, keep, near_miss)
        if isinstance(result, Completion):
            add(result.body)
            return result
        return Streamed(relay_and_keep(result.chunks, add.on_stream_end))

    async def _lookup(
        self,
        ctx: RequestContext,
        route: str,
        partition: str,
        query: str,
        normalised: str,
        vector: npt.NDArray[np.float32],
    ) -> tuple[Result | None, _Candidate | None]:
        """The cached answer, or None; and the candidate entry the rule judged (hit or near miss)."""
        assert self._parts is not None
        now = time.time()
        found = self._parts.search(partition, vector, SEARCH_K, now)
        verifying = self.verifier.covers(route)
        if not found:
            if verifying:
                self.verifier.looked_up(partition, ctx.tags.tenant_id, route, None)
            return None, None
        # The same question up to case, spacing and punctuation needs no vote: the learned rule
        # cannot judge a lone entry (no other answer to measure a margin to), this can.
        same = [i for i, _ in found if (m := self._parts.meta(i)) is not None and m.normalised == normalised]
        size = self._parts.size(partition)
        if same:
            meta = self._parts.meta(same[0])
            candidate = _Candidate(same[0], meta.answer_id if meta is not None else "", None, None)
        elif size < self._settings[route].min_entries:
            log.debug("semantic miss: partition below min_entries, repeats only")
            return None, None
        elif verifying:
            hit, judged = self._judge_adaptive(ctx, route, partition, query, vector, found, size)
            if not hit or judged is None:
                return None, judged
            candidate = judged
        else:
            # The learned thresholds depend on how many entries the partition holds: a sparse
            # cache's nearest entry is often a neighbouring question nobody cached yet.
            decision = decide(query, [n for _, n in found], self._params[route], cache_size=size)
            if not decision.hit or decision.entry is None:
                log.debug("semantic miss: %s", decision.reason)
                return None, None
            if self._outside_cluster(route, vector, found, decision.entry.answer_id):
                return None, None
            entry = decision.entry
            candidate = _Candidate(next(i for i, n in found if n is entry), entry.answer_id, None, None)
        stored = await self._stored(candidate.entry_id, now)
        if stored is None:
            return None, None
        return serve_stored(ctx, "semantic", *stored, self._catalog), replace(candidate, cached=stored[0])

    async def _stored(self, entry_id: int, now: float) -> tuple[dict[str, Any], Usage] | None:
        """The entry's stored answer; None (and the entry leaves the index) when another process
        purged it or it expired just now. A shared store that does not answer is a miss."""
        assert self._parts is not None and self._entries is not None
        stored = await self._entries.answer(entry_id, now)
        if stored is UNREADABLE:
            return None
        if stored is None:
            self._parts.drop(entry_id)
            return None
        assert isinstance(stored, tuple)
        return stored

    def _judge_adaptive(
        self,
        ctx: RequestContext,
        route: str,
        partition: str,
        query: str,
        vector: npt.NDArray[np.float32],
        found: Sequence[tuple[int, Neighbour]],
        size: int,
    ) -> tuple[bool, _Candidate | None]:
        """The learned score against the partition's own threshold (``adaptive.bound``), which
        starts at the shipped one and moves with what verification finds."""
        params = self._params[route]
        a = assess(query, [n for _, n in found], params)
        tenant = ctx.tags.tenant_id
        if a.served is None:
            self.verifier.looked_up(partition, tenant, route, None)
            log.debug("semantic miss: %s", a.reason)
            return False, None
        self.verifier.looked_up(partition, tenant, route, a.score)
        verdict = self.verifier.verdict(partition, tenant, route, params.threshold_for(size))
        served = a.served
        candidate = _Candidate(next(i for i, n in found if n is served), served.answer_id, a.score, verdict)
        if a.score < self.verifier.threshold(partition, route, verdict, served.answer_id):
            log.debug("semantic miss: %.3f below the partition's %s threshold", a.score, verdict.status)
            return False, candidate
        if self._outside_cluster(route, vector, found, served.answer_id):
            return False, candidate  # a near miss: the fresh answer says whether the guard was right
        if self.verifier.method(route) == "evidence" and ctx.tags.evidence:
            # The request names its evidence: the candidate's answer is right when it rests on the
            # same, checked now, for free, before anything is served.
            right = served.answer_id == answer_id({}, ctx.tags.evidence)
            self.verifier.observe(partition, tenant, route, a.score, right, served.answer_id, near_miss=False)
            if not right:
                log.debug("semantic miss: the candidate rests on other evidence")
                return False, None
        return True, candidate

    def _outside_cluster(
        self, route: str, vector: npt.NDArray[np.float32], found: Sequence[tuple[int, Neighbour]], answer: str
    ) -> bool:
        """The out-of-scope guard (``density``): the query is much further from its answer's nearest
        entries than they are from each other."""
        params = self._params[route]
        if params.cluster_margin is None:
            return False
        assert self._parts is not None
        rows = member_rows([n for _, n in found], answer)
        if len(rows) < 2:
            return False  # no cluster to measure
        gap = cluster_gap(vector, self._parts.vectors([found[i][0] for i in rows]))
        if outside_cluster(gap, params):
            log.debug("semantic miss: outside the answer's cluster (gap %.3f)", gap or 0.0)
            return True
        return False

    def _after_hit(
        self,
        ctx: RequestContext,
        call_next: Handler,
        partition: str,
        candidate: _Candidate,
        settings: SemanticCacheSettings,
        system_hash: str,
        query: str,
        vector: npt.NDArray[np.float32],
    ) -> None:
        """Count the hit, and maybe verify it with a shadow call that the response never waits for."""
        if not self.verifier.served(ctx, partition, candidate.score, candidate.verdict, candidate.answer_id):
            return
        assert candidate.score is not None and candidate.cached is not None

        def store_fresh(shadow: RequestContext, fresh: dict[str, Any]) -> None:
            _Adder(self, shadow, settings, partition, system_hash, query, normalise(query), vector)(fresh)

        self.verifier.shadow(
            ctx, call_next, partition, candidate.score, candidate.answer_id, candidate.cached, store_fresh
        )

    def judge_near_miss(
        self, ctx: RequestContext, partition: str, candidate: _Candidate, response: dict[str, Any]
    ) -> None:
        """A lookup that was not served went upstream anyway (``near_miss.NearMissJudge``)."""
        assert self._near_miss is not None
        evidence = answer_id({}, ctx.tags.evidence) if ctx.tags.evidence else None
        self._near_miss(
            ctx, partition, candidate.entry_id, candidate.answer_id, candidate.score, response, evidence
        )

    def add_entry(self, entry: NewEntry) -> None:
        assert self._parts is not None and self._entries is not None
        parts = self._parts

        def index(entry_id: int) -> None:
            if parts.meta(entry_id) is None:  # a follower may have heard of it first
                self._index(entry_id, entry)

        self._entries.add(entry, index)

    def _index(self, entry_id: int, entry: NewEntry) -> None:
        assert self._parts is not None
        meta = EntryMeta(entry.query, entry.normalised_query, entry.answer_id, entry.expires_at)
        part = self._parts.add(entry.partition, entry_id, entry.embedding, meta)
        if part.wants_graph:
            self._grow(part)
        self._age[entry.route].append(entry_id)
        self._evict(entry.route)
        self._adds += 1
        if self._adds % _PURGE_EXPIRED_EVERY == 0 and self._entries is not None:
            self._entries.drop_expired(time.time())

    def _grow(self, part: Partition) -> None:
        """Exact search stops paying past EXACT_LIMIT entries: build an HNSW graph off the loop."""
        assert self._pool is not None and self._parts is not None
        future = asyncio.get_running_loop().run_in_executor(
            self._pool, build_graph, self._parts.dim, part.start_graph()
        )

        def swap(done: asyncio.Future[HnswIndex]) -> None:
            if done.cancelled() or done.exception() is not None:
                log.warning("semantic cache: graph build failed, exact search goes on: %r", done.exception())
                part.abort_graph()
            else:
                part.finish_graph(done.result())

        future.add_done_callback(swap)
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    def _evict(self, route: str) -> None:
        """Drop the route's oldest entries beyond its bound (expired ones leave the queue first)."""
        assert self._parts is not None
        age, limit = self._age[route], self._settings[route].max_entries
        evicted: list[int] = []
        while len(age) > limit:
            entry_id = age.popleft()
            self._parts.drop(entry_id)
            evicted.append(entry_id)
        if evicted and self._entries is not None:
            self._entries.delete(evicted)


class _Adder:
    """Stores the answer of a lookup that missed, once the upstream call has completed."""

    def __init__(
        self,
        stage: SemanticCacheStage,
        ctx: RequestContext,
        settings: SemanticCacheSettings,
        partition: str,
        system_hash: str,
        query: str,
        normalised: str,
        vector: npt.NDArray[np.float32],
        keep: bool = True,
        near_miss: _Candidate | None = None,
    ) -> None:
        self._stage, self._ctx, self._settings = stage, ctx, settings
        self._partition, self._system_hash = partition, system_hash
        self._query, self._normalised, self._vector = query, normalised, vector
        self._keep, self._near_miss = keep, near_miss

    def __call__(self, response: dict[str, Any]) -> None:
        ctx = self._ctx
        if self._near_miss is not None:
            self._stage.judge_near_miss(ctx, self._partition, self._near_miss, response)
        if not self._keep:
            return
        usage = usage_worth_keeping(ctx, response)
        if usage is None or ctx.cache != "miss" or ctx.deduplicated:
            return
        now = time.time()
        tags = ctx.tags
        entry = NewEntry(
            partition=self._partition,
            tenant_id=tags.tenant_id,
            route=ctx.route or "",
            user=tags.user if self._settings.per_user else None,
            prompt_version=tags.prompt_version,
            corpus_version=tags.corpus_version,
            model=ctx.requested_model,
            system_hash=self._system_hash,
            query=self._query,
            normalised_query=self._normalised,
            embedding_model=EMBEDDING_MODEL_ID,
            embedding=self._vector,
            answer_id=answer_id(response, tags.evidence),
            response=response,
            evidence=tags.evidence,
            safety_policy_version=self._settings.safety_policy_version,
            usage=usage,
            created_at=now,
            expires_at=now + self._settings.ttl_s,
        )
        self._stage.add_entry(entry)

    def on_stream_end(self, kept: list[StreamChunk] | None) -> None:
        if kept is not None:
            self(as_completion(kept))


__all__ = [
    "EMBEDDING_MODEL_ID",
    "SemanticCacheStage",
    "answer_id",
    "context_hash",
    "last_user_text",
    "load_params",
    "partition_key",
]
