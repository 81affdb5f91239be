"""Vector index wrappers: add/search/save/load round trips for the exact and HNSW indexes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from thrifty.cache.semantic.index import ExactIndex, HnswIndex, load_index, make_index


def _unit(rng: np.random.Generator, n: int, dim: int) -> npt.NDArray[np.float32]:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    unit: npt.NDArray[np.float32] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return unit


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_add_search_save_load(kind: str, tmp_path: Path) -> None:
    if kind == "hnsw":
        pytest.importorskip("usearch", reason="usearch not installed")
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 500, 32)
    keys = np.arange(1000, 1500, dtype=np.int64)
    index = ExactIndex(32) if kind == "exact" else HnswIndex(32)
    index.add(keys[:200], vectors[:200])
    index.add(keys[200:], vectors[200:])
    assert len(index) == 500
    found, sims = index.search(vectors[42], 5)
    assert int(found[0]) == 1042
    assert sims[0] == pytest.approx(1.0, abs=1e-2)
    assert list(sims) == sorted(sims, reverse=True)

    path = tmp_path / f"{kind}.idx"
    index.save(path)
    loaded = load_index(path)
    assert type(loaded) is type(index)
    assert len(loaded) == 500
    again, _ = loaded.search(vectors[42], 5)
    assert int(again[0]) == 1042


def test_exact_index_empty_and_small_k() -> None:
    index = ExactIndex(4)
    keys, sims = index.search(np.full(4, 0.5, dtype=np.float32), 3)
    assert len(keys) == 0 and len(sims) == 0
    index.add(np.array([7], dtype=np.int64), np.array([[1, 0, 0, 0]], dtype=np.float32))
    keys, sims = index.search(np.array([1, 0, 0, 0], dtype=np.float32), 10)
    assert keys.tolist() == [7]


def test_make_index_picks_exact_for_small_caches() -> None:
    assert isinstance(make_index(8, 1000), ExactIndex)
