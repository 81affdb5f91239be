"""The in-process view of the semantic cache: one vector index per partition.

A partition holds the entries that may ever answer each other: same tenant, route, prompt and
corpus version, model, safety policy and conversation context (see ``stage.partition_key``), so a
lookup can never cross tenants or serve an answer made under another system prompt.

Removal (expiry, eviction, purge seen at serve time) marks an entry dead; searches skip dead
entries, and a partition whose dead entries outnumber its live ones is rebuilt from its live
vectors, so memory stays proportional to what is cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from thrifty.cache.semantic.decision import Neighbour
from thrifty.cache.semantic.index import EXACT_LIMIT, ExactIndex, HnswIndex

Vector = npt.NDArray[np.float32]
# Searches ask for this many extra results per dead entry still in the graph, up to a cap: past it a
# rebuild is due anyway.
_MAX_EXTRA = 256


@dataclass(frozen=True, slots=True)
class EntryMeta:
    query: str
    normalised: str
    answer_id: str
    expires_at: float


class Partition:
    def __init__(self, dim: int, expected_size: int) -> None:
        self.dim = dim
        self._hnsw = expected_size > EXACT_LIMIT
        self._index: ExactIndex | HnswIndex = self._new_index()
        self._meta: dict[int, EntryMeta] = {}
        self._vectors: dict[int, Vector] = {}
        self._dead = 0

    def _new_index(self) -> ExactIndex | HnswIndex:
        return HnswIndex(self.dim) if self._hnsw else ExactIndex(self.dim)

    def __len__(self) -> int:
        return len(self._meta)

    def add(self, entry_id: int, vector: Vector, meta: EntryMeta) -> None:
        self._index.add(np.array([entry_id], dtype=np.int64), vector.reshape(1, self.dim))
        self._meta[entry_id] = meta
        self._vectors[entry_id] = vector

    def drop(self, entry_id: int) -> None:
        if self._meta.pop(entry_id, None) is None:
            return
        del self._vectors[entry_id]
        self._dead += 1
        if self._dead > max(64, len(self._meta)):
            self._rebuild()

    def _rebuild(self) -> None:
        index = self._new_index()
        if self._vectors:
            ids = np.fromiter(self._vectors, dtype=np.int64, count=len(self._vectors))
            index.add(ids, np.stack([self._vectors[int(i)] for i in ids]))
        self._index, self._dead = index, 0

    def meta(self, entry_id: int) -> EntryMeta | None:
        return self._meta.get(entry_id)

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
    """All partitions of one gateway, with each route's entry ids in age order for eviction."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._parts: dict[str, Partition] = {}
        self._where: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._where)

    def search(self, partition: str, vector: Vector, k: int, now: float) -> list[tuple[int, Neighbour]]:
        part = self._parts.get(partition)
        if part is None:
            return []
        found, expired = part.neighbours(vector, k, now)
        for entry_id in expired:
            self.drop(entry_id)
        return found

    def add(self, partition: str, expected_size: int, entry_id: int, vector: Vector, meta: EntryMeta) -> None:
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = Partition(self.dim, expected_size)
        part.add(entry_id, vector, meta)
        self._where[entry_id] = partition

    def meta(self, entry_id: int) -> EntryMeta | None:
        partition = self._where.get(entry_id)
        return None if partition is None else self._parts[partition].meta(entry_id)

    def drop(self, entry_id: int) -> None:
        partition = self._where.pop(entry_id, None)
        if partition is None:
            return
        part = self._parts[partition]
        part.drop(entry_id)
        if not len(part):
            del self._parts[partition]


__all__ = ["EntryMeta", "Partition", "Partitions"]
