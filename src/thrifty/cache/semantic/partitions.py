"""The in-process view of the semantic cache: one vector index per partition.

A partition holds the entries that may ever answer each other: same tenant, route, prompt and
corpus version, model, safety policy and conversation context (see ``stage.partition_key``), so a
lookup can never cross tenants or serve an answer made under another system prompt.

Every partition starts with exact search over a small array (most partitions stay small: one per
system prompt, or per user); one that grows past ``EXACT_LIMIT`` entries gets an HNSW graph, built
off the event loop from a snapshot and swapped in with whatever was added meanwhile. Removal
(expiry, eviction, a purge seen at serve time) marks an entry dead; searches skip dead entries,
and a partition whose dead entries outnumber its live ones is rebuilt, so memory stays
proportional to what is cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from thrifty.cache.semantic.decision import Neighbour
from thrifty.cache.semantic.index import EXACT_LIMIT, ExactIndex, HnswIndex

Vector = npt.NDArray[np.float32]
# Searches ask for this many extra results per dead entry still in the index, up to a cap: past it
# a rebuild is due anyway.
_MAX_EXTRA = 256


@dataclass(frozen=True, slots=True)
class EntryMeta:
    query: str
    normalised: str
    answer_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The live vectors of a partition at one moment, to build a graph from off the loop."""

    ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]


def build_graph(dim: int, snapshot: Snapshot) -> HnswIndex:
    """Pure CPU work on a private copy: safe to run in a worker thread."""
    index = HnswIndex(dim)
    if len(snapshot.ids):
        index.add(snapshot.ids, snapshot.vectors)
    return index


class Partition:
    def __init__(self, dim: int, graph_at: int = EXACT_LIMIT) -> None:
        self.dim = dim
        self._graph_at = graph_at
        self._index: ExactIndex | HnswIndex = ExactIndex(dim)
        self._meta: dict[int, EntryMeta] = {}
        self._vectors: dict[int, Vector] = {}
        self._dead = 0
        self.building = False  # a graph is being built off the loop
        self._added_while_building: list[int] = []

    def __len__(self) -> int:
        return len(self._meta)

    @property
    def wants_graph(self) -> bool:
        return not self.building and isinstance(self._index, ExactIndex) and len(self._meta) > self._graph_at

    def meta(self, entry_id: int) -> EntryMeta | None:
        return self._meta.get(entry_id)

    def vectors(self, entry_ids: list[int]) -> npt.NDArray[np.float32]:
        return np.stack([self._vectors[i] for i in entry_ids])

    def add(self, entry_id: int, vector: Vector, meta: EntryMeta) -> None:
        self._index.add(np.array([entry_id], dtype=np.int64), vector.reshape(1, self.dim))
        self._meta[entry_id] = meta
        self._vectors[entry_id] = vector
        if self.building:
            self._added_while_building.append(entry_id)

    def drop(self, entry_id: int) -> None:
        if self._meta.pop(entry_id, None) is None:
            return
        del self._vectors[entry_id]
        self._dead += 1
        if self._dead > max(64, len(self._meta)) and not self.building:
            self._rebuild()

    def snapshot(self) -> Snapshot:
        ids = np.fromiter(self._vectors, dtype=np.int64, count=len(self._vectors))
        vectors = (
            np.stack([self._vectors[int(i)] for i in ids])
            if len(ids)
            else np.empty((0, self.dim), np.float32)
        )
        return Snapshot(ids, vectors.astype(np.float32))

    def start_graph(self) -> Snapshot:
        self.building = True
        self._added_while_building = []
        return self.snapshot()

    def finish_graph(self, graph: HnswIndex) -> None:
        """Swap in a graph built from `start_graph`'s snapshot, with the entries added since."""
        late = [i for i in self._added_while_building if i in self._vectors]
        if late:
            graph.add(np.array(late, dtype=np.int64), np.stack([self._vectors[i] for i in late]))
        # Entries dropped meanwhile are in the graph but not in _meta: they count as dead.
        self._dead = len(graph) - len(self._meta)
        self._index, self.building, self._added_while_building = graph, False, []

    def abort_graph(self) -> None:
        self.building, self._added_while_building = False, []
        self._graph_at = 2 * max(self._graph_at, len(self._meta))  # don't retry on every add

    def _rebuild(self) -> None:
        snap = self.snapshot()
        if isinstance(self._index, HnswIndex):
            self._index = build_graph(self.dim, snap)  # rare: only after mass expiry or eviction
        else:
            index = ExactIndex(self.dim)
            if len(snap.ids):
                index.add(snap.ids, snap.vectors)
            self._index = index
        self._dead = 0

    def neighbours(self, vector: Vector, k: int, now: float) -> tuple[list[tuple[int, Neighbour]], list[int]]:
        """Up to `k` live, unexpired entries nearest to `vector`, best first, and the expired ones met."""
        if not self._meta:
            return [], []
        keys, sims = self._index.search(vector, k + min(self._dead, _MAX_EXTRA))
        found: list[tuple[int, Neighbour]] = []
        expired: list[int] = []
        for key, sim in zip(keys.tolist(), sims.tolist(), strict=True):
            meta = self._meta.get(key)
            if meta is None:
                continue
            if meta.expires_at <= now:
                expired.append(key)
                continue
            found.append((key, Neighbour(sim, meta.answer_id, meta.query)))
            if len(found) == k:
                break
        return found, expired


class Partitions:
    """All partitions of one gateway, and where each entry lives."""

    def __init__(self, dim: int, graph_at: int = EXACT_LIMIT) -> None:
        self.dim = dim
        self._graph_at = graph_at
        self._parts: dict[str, Partition] = {}
        self._where: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._where)

    def meta(self, entry_id: int) -> EntryMeta | None:
        partition = self._where.get(entry_id)
        return None if partition is None else self._parts[partition].meta(entry_id)

    def size(self, partition: str) -> int:
        part = self._parts.get(partition)
        return len(part) if part is not None else 0

    def search(self, partition: str, vector: Vector, k: int, now: float) -> list[tuple[int, Neighbour]]:
        part = self._parts.get(partition)
        if part is None:
            return []
        found, expired = part.neighbours(vector, k, now)
        for entry_id in expired:
            self.drop(entry_id)
        return found

    def vectors(self, entry_ids: list[int]) -> npt.NDArray[np.float32]:
        """The embeddings of entries of one partition (all known, e.g. just returned by ``search``)."""
        return self._parts[self._where[entry_ids[0]]].vectors(entry_ids)

    def add(self, partition: str, entry_id: int, vector: Vector, meta: EntryMeta) -> Partition:
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = Partition(self.dim, self._graph_at)
        part.add(entry_id, vector, meta)
        self._where[entry_id] = partition
        return part

    def large(self) -> list[Partition]:
        return [p for p in self._parts.values() if p.wants_graph]

    def drop(self, entry_id: int) -> None:
        partition = self._where.pop(entry_id, None)
        if partition is None:
            return
        part = self._parts[partition]
        part.drop(entry_id)
        if not len(part) and not part.building:
            del self._parts[partition]


__all__ = ["EntryMeta", "Partition", "Partitions", "Snapshot", "build_graph"]
