"""`thrifty bench cache-index`: what the HNSW graph of a large cache costs in recall and decisions.

`thrifty bench cache` pads the index with random unit vectors: they lie far from every query, so
the true neighbours are always the real entries and the graph's recall looks perfect. A real cache
of a million questions is made of clusters of paraphrases. ``--pad clustered`` pads with copies of
the real entries plus noise (cosine 0.46-0.93 to their source), so that most of a query's nearest
entries are pads packed around the real ones, where a graph search is most easily misled.

For every setting of the search's breadth (``expansion_search``), each TEST query is searched in
the graph (one thread, as the gateway does; one pass per setting, so that no setting inherits
another's warm cache lines) and exactly (float32 brute force over the same vectors), and the
shipped decision rule is run on both neighbour lists. Reported: search and lookup (search +
decision) p50/p99, recall of the exact top-1 and top-k, and how often the decision (miss, or the
answer served) is the one exact search gives.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.progress import track
from rich.table import Table

from thrifty.cache.semantic.decision import DecisionParams, Neighbour, decide, default_params
from thrifty.cache.semantic.embedder import OnnxMiniLM
from thrifty.cache.semantic.index import HnswIndex
from thrifty.cache.semantic.normalise import normalise
from thrifty.cache.semantic.tune import SEARCH_K, load_labelled

PAD_KINDS = ("random", "clustered")
_NOISE = (0.02, 0.1)  # per-dimension noise of a clustered pad: cosine 0.93 to 0.46 to its source
_EXACT_CHUNK = 128


def _padded(
    train: npt.NDArray[np.float32], size: int, kind: str, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    n, dim = train.shape
    if kind == "random":
        pad = rng.standard_normal((size - n, dim)).astype(np.float32)
    else:
        source = rng.integers(0, n, size - n)
        sigma = rng.uniform(*_NOISE, size - n).astype(np.float32)[:, None]
        pad = train[source] + sigma * rng.standard_normal((size - n, dim)).astype(np.float32)
    pad /= np.linalg.norm(pad, axis=1, keepdims=True)
    return np.concatenate([train, pad])


def _exact_top(
    vectors: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int
) -> npt.NDArray[np.int64]:
    top = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), _EXACT_CHUNK):
        sims = queries[start : start + _EXACT_CHUNK] @ vectors.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.take_along_axis(sims, part, 1).argsort(axis=1)[:, ::-1]
        top[start : start + _EXACT_CHUNK] = np.take_along_axis(part, order, 1)
    return top


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run_index_bench(
    train_csv: Path,
    test_csv: Path,
    console: Console,
    *,
    size: int = 1_000_000,
    pad: str = "clustered",
    connectivity: int = 16,
    expansion_add: int = 64,
    expansion_search: Sequence[int] = (32, 64, 128),
    dtype: str = "f16",
    json_out: Path | None = None,
    seed: int = 7,
    params: DecisionParams | None = None,
) -> dict[str, Any]:
    train, test = load_labelled(train_csv), load_labelled(test_csv)
    embedder = OnnxMiniLM(threads=os.cpu_count() or 1)
    train_vectors = embedder.embed([normalise(t) for t in train.texts])
    queries = embedder.embed([normalise(t) for t in test.texts])
    query_texts = [normalise(t) for t in test.texts]
    rule = params or default_params()
    vectors = _padded(train_vectors, size, pad, np.random.default_rng(seed))
    n_real = len(train.labels)

    def served(q: int, keys: Sequence[int], sims: Sequence[float]) -> str | None:
        """The answer the shipped rule serves (None: a miss), the cache holding ``size`` entries."""
        neighbours = [
            Neighbour(s, train.labels[k], train.texts[k]) if k < n_real else Neighbour(s, f"pad:{k}", "")
            for k, s in zip(keys, sims, strict=True)
        ]
        decision = decide(query_texts[q], neighbours, rule, cache_size=size)
        return decision.answer_id if decision.hit else None

    started = time.perf_counter()
    index = HnswIndex(vectors.shape[1], connectivity=connectivity, expansion_add=expansion_add, dtype=dtype)
    index.add(np.arange(size, dtype=np.int64), vectors)
    build_s = time.perf_counter() - started
    truth = _exact_top(vectors, queries, SEARCH_K)
    exact = [
        served(q, truth[q].tolist(), (vectors[truth[q]] @ queries[q]).tolist()) for q in range(len(queries))
    ]
    rows: list[dict[str, Any]] = []
    for ef in expansion_search:
        index.set_expansion_search(ef)
        search, lookup, top1, topk, same, same_miss = [], [], 0, 0, 0, 0
        for q in track(range(len(queries)), description=f"expansion_search {ef}", console=console):
            t0 = time.perf_counter()
            keys, sims = index.search(queries[q], SEARCH_K)
            t1 = time.perf_counter()
            answer = served(q, keys.tolist(), sims.tolist())
            t2 = time.perf_counter()
            search.append((t1 - t0) * 1e3)
            lookup.append((t2 - t0) * 1e3)
            top1 += int(len(keys) > 0 and keys[0] == truth[q][0])
            topk += len(set(keys.tolist()) & set(truth[q].tolist()))
            same += int(answer == exact[q])
            same_miss += int((answer is None) == (exact[q] is None))
        count = len(queries)
        rows.append(
            {
                "expansion_search": ef,
                "search_p50_ms": _percentile(search, 50),
                "search_p99_ms": _percentile(search, 99),
                "lookup_p50_ms": _percentile(lookup, 50),
                "lookup_p99_ms": _percentile(lookup, 99),
                "recall_at_1": top1 / count,
                f"recall_at_{SEARCH_K}": topk / (count * SEARCH_K),
                "decision_agreement": same / count,
                "hit_or_miss_agreement": same_miss / count,
            }
        )
    result = {
        "entries": size,
        "pad": pad,
        "connectivity": connectivity,
        "expansion_add": expansion_add,
        "dtype": dtype,
        "k": SEARCH_K,
        "queries": len(queries),
        "build_s": build_s,
        "exact_hit_rate": sum(e is not None for e in exact) / len(exact),
        "load_average": list(os.getloadavg()),
        "rows": rows,
    }
    console.print(index_table(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def index_table(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"HNSW over {result['entries']:,} entries ({result['pad']} padding, connectivity "
        f"{result['connectivity']}, expansion_add {result['expansion_add']}, {result['dtype']}; built in "
        f"{result['build_s']:.0f} s; load {result['load_average'][0]:.1f}) vs exact search"
    )
    columns = ("expansion_search", "search p50/p99 ms", "lookup p50/p99 ms", "recall@1")
    for col in (*columns, f"recall@{result['k']}", "same decision", "same hit/miss"):
        table.add_column(col, justify="right")
    topk = f"recall_at_{result['k']}"
    for row in result["rows"]:
        table.add_row(
            str(row["expansion_search"]),
            f"{row['search_p50_ms']:.2f} / {row['search_p99_ms']:.2f}",
            f"{row['lookup_p50_ms']:.2f} / {row['lookup_p99_ms']:.2f}",
            f"{row['recall_at_1']:.1%}",
            f"{row[topk]:.1%}",
            f"{row['decision_agreement']:.1%}",
            f"{row['hit_or_miss_agreement']:.1%}",
        )
    return table


__all__ = ["PAD_KINDS", "index_table", "run_index_bench"]
