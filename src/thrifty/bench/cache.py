"""`thrifty bench cache`: hit rate, precision and lookup latency of the semantic cache, in one run.

Every training query becomes a cache entry answered "for" its category; every test query is
looked up, and a hit is correct when the served entry's category equals the query's (so a test
query whose category no training query has, e.g. CLINC150's ``oos``, must miss). The learned
policy is tuned on leave-one-out and density-augmented lookups of TRAIN only
(``tune.learn_from_vectors``: a threshold per cache size), never on
test, or given (``--params``: a tuned file, or ``default`` to measure ``default_params()`` on other
data), and is compared in the same run with the fixed cosine thresholds other gateways ship. The index is
then padded with random unit vectors to 100,000 and 1,000,000 entries to measure lookup latency
(and any recall loss of the ANN index) at scale; the rule is told the number of *real* entries
(``cache_size``), as the gateway tells it its partition's entry count.

A live cache, and each partition of it, starts sparse, so the rule is also measured by cache size:
test queries against random subsamples of TRAIN of each size (several per size; mean and worst).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

from thrifty.cache.semantic.decision import DecisionParams, Neighbour, assess, decide
from thrifty.cache.semantic.density import cluster_gap, member_rows, outside_cluster, tune_margin
from thrifty.cache.semantic.embedder import OnnxMiniLM
from thrifty.cache.semantic.index import ExactIndex, HnswIndex
from thrifty.cache.semantic.normalise import normalise
from thrifty.cache.semantic.tune import (
    CONFIDENCE_Z,
    DENSITY_SIZES,
    SEARCH_K,
    CurvePoint,
    TuneResult,
    curve,
    exact_neighbours,
    learn_from_vectors,
    load_labelled,
)

# Fixed thresholds others ship: GPTCache 0.8, RedisVL 0.9, Portkey 0.95.
COSINE_BASELINES: tuple[tuple[str, float], ...] = (("GPTCache", 0.80), ("RedisVL", 0.90), ("Portkey", 0.95))
COSINE_SWEEP = (0.70, 0.75, 0.80, 0.85, 0.90, 0.92, 0.95, 0.97)
SCORE_SWEEP = (0.50, 0.70, 0.80, 0.85, 0.90, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
# Single-query embedding latency is measured over this many test queries.
EMBED_SAMPLE = 1000
PAD_CHUNK = 100_000
# Cache sizes of the by-size table (random subsamples of TRAIN; the whole of TRAIN is added last).
BY_SIZE: tuple[int, ...] = (25, 50, 100, 200, 500, 1000, 3000)
SUBSAMPLES = 5


@dataclasses.dataclass(frozen=True, slots=True)
class Lookups:
    """Per test query: learned score, guard outcome, correctness, and the cosine rule's inputs."""

    size: int
    scores: list[float]
    served: list[bool]
    correct: list[bool]
    top_sim: list[float]
    top_correct: list[bool]
    latency_ms: list[float]


def tune_cache(
    data_csv: Path,
    target_precision: float,
    embed_threads: int = 1,
    z: float = CONFIDENCE_Z,
    density: bool = True,
    scope_share: float = 0.1,
) -> TuneResult:
    """Learn decision parameters from labelled ``text,category`` data (``thrifty cache tune``).

    ``density``: also tune on sparse caches (random subsets of the data; a threshold per size).
    ``scope_share``: out-of-scope lookups (``scope``) as that share of the dense lookups.
    """
    data = load_labelled(data_csv)
    embedder = OnnxMiniLM(threads=embed_threads)
    vectors = embedder.embed([normalise(t) for t in data.texts])
    sizes = DENSITY_SIZES if density else ()
    tuned = learn_from_vectors(
        vectors, data.labels, data.texts, target_precision, z=z, sizes=sizes, scope_share=scope_share
    )
    # The out-of-scope guard's margin, learned on the same data for the rule just fitted.
    margin = tune_margin(vectors, data.labels, data.texts, tuned.params)
    return dataclasses.replace(tuned, params=dataclasses.replace(tuned.params, cluster_margin=margin))


def by_size(
    train_vectors: npt.NDArray[np.float32],
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    test_vectors: npt.NDArray[np.float32],
    test_texts: Sequence[str],
    test_labels: Sequence[str],
    params: DecisionParams,
    sizes: Sequence[int] = BY_SIZE,
    subsamples: int = SUBSAMPLES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Hit rate and precision of ``params`` with caches of each size (random subsamples of TRAIN).

    One row per size below TRAIN's, then TRAIN whole: mean and worst over ``subsamples`` random
    subsamples (the whole set is one). A subsample with no hits has no precision; the precision
    columns cover the subsamples that hit (None when none did).
    """
    rng = np.random.default_rng(seed)
    n_train = len(train_texts)
    rows: list[dict[str, Any]] = []
    for size in [*sorted({s for s in sizes if 0 < s < n_train}), n_train]:
        hit_rates: list[float] = []
        precisions: list[float] = []
        for _ in range(subsamples if size < n_train else 1):
            idx = rng.permutation(n_train)[:size]
            lists = exact_neighbours(
                test_vectors,
                train_vectors[idx],
                [train_labels[i] for i in idx],
                [train_texts[i] for i in idx],
            )
            hits = good = 0
            for text, label, neighbours in zip(test_texts, test_labels, lists, strict=True):
                d = decide(text, neighbours, params, cache_size=size)
                if d.hit:
                    hits += 1
                    good += d.answer_id == label
            hit_rates.append(hits / len(test_texts) if test_texts else 0.0)
            if hits:
                precisions.append(good / hits)
        rows.append(
            {
                "entries": size,
                "subsamples": len(hit_rates),
                "threshold": "inf" if math.isinf(t := params.threshold_for(size)) else t,
                "hit_rate_mean": float(np.mean(hit_rates)),
                "hit_rate_min": float(np.min(hit_rates)),
                "precision_mean": float(np.mean(precisions)) if precisions else None,
                "precision_worst": float(np.min(precisions)) if precisions else None,
            }
        )
    return rows


def _by_size_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for col in (
        "entries",
        "subsamples",
        "threshold",
        "hit rate mean",
        "hit rate min",
        "precision mean",
        "precision worst",
    ):
        table.add_column(col, justify="right")

    def pct(v: float | None, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}%}"

    for r in rows:
        table.add_row(
            f"{r['entries']:,}",
            str(r["subsamples"]),
            "never" if r["threshold"] == "inf" else f"{r['threshold']:.4f}",
            pct(r["hit_rate_mean"], 1),
            pct(r["hit_rate_min"], 1),
            pct(r["precision_mean"], 2),
            pct(r["precision_worst"], 2),
        )
    return table


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _build_index(
    train: npt.NDArray[np.float32], size: int | None, rng: np.random.Generator
) -> ExactIndex | HnswIndex:
    n = len(train)
    if size is None:
        exact = ExactIndex(train.shape[1])
        exact.add(np.arange(n, dtype=np.int64), train)
        return exact
    index = HnswIndex(train.shape[1])
    index.add(np.arange(n, dtype=np.int64), train)
    for start in range(n, size, PAD_CHUNK):
        count = min(PAD_CHUNK, size - start)
        pad = rng.standard_normal((count, train.shape[1])).astype(np.float32)
        pad /= np.linalg.norm(pad, axis=1, keepdims=True)
        index.add(np.arange(start, start + count, dtype=np.int64), pad)
    return index


def _lookup_all(
    index: ExactIndex | HnswIndex,
    test_vectors: npt.NDArray[np.float32],
    test_texts: Sequence[str],
    test_labels: Sequence[str],
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    params: DecisionParams,
    train_vectors: npt.NDArray[np.float32] | None = None,
) -> Lookups:
    """Every test query looked up, timed as the gateway does it: search, the rule and (with
    ``train_vectors`` and a ``cluster_margin``) the out-of-scope guard, which then also decides."""
    n_train = len(train_labels)
    scores: list[float] = []
    served: list[bool] = []
    correct: list[bool] = []
    top_sim: list[float] = []
    top_correct: list[bool] = []
    latency: list[float] = []
    for vector, text, label in zip(test_vectors, test_texts, test_labels, strict=True):
        started = time.perf_counter()
        keys, sims = index.search(vector, SEARCH_K)
        # Padding entries (keys past the training set) each stand for a distinct unrelated answer.
        neighbours = [
            Neighbour(float(s), train_labels[k], train_texts[k])
            if k < n_train
            else Neighbour(float(s), f"pad:{k}", "")
            for k, s in zip(keys.tolist(), sims.tolist(), strict=True)
        ]
        a = assess(text, neighbours, params)
        feats = a.features
        p = a.score
        ok = a.served is not None
        if ok and a.served is not None and train_vectors is not None and params.cluster_margin is not None:
            rows = [keys[i] for i in member_rows(neighbours, a.served.answer_id) if keys[i] < n_train]
            ok = len(rows) < 2 or not outside_cluster(cluster_gap(vector, train_vectors[rows]), params)
        latency.append((time.perf_counter() - started) * 1e3)
        scores.append(p)
        served.append(ok)
        correct.append(feats is not None and feats.answer_id == label)
        top_sim.append(neighbours[0].similarity if neighbours else -1.0)
        top_correct.append(bool(neighbours) and neighbours[0].answer_id == label)
    return Lookups(len(index), scores, served, correct, top_sim, top_correct, latency)


def _point_dict(point: CurvePoint, **extra: Any) -> dict[str, Any]:
    data = {**extra, **dataclasses.asdict(point)}
    if math.isinf(point.threshold):  # JSON has no infinity (never hits at this size)
        data["threshold"] = "inf"
    return data


def _curve_table(title: str, rows: list[tuple[str, CurvePoint]]) -> Table:
    table = Table(title=title)
    for col in ("rule", "threshold", "hit rate", "precision", "false-hit rate"):
        table.add_column(col, justify="right")
    for name, p in rows:
        table.add_row(
            name, f"{p.threshold:.3f}", f"{p.hit_rate:.1%}", f"{p.precision:.2%}", f"{p.false_hit_rate:.2%}"
        )
    return table


def run_cache_bench(
    train_csv: Path,
    test_csv: Path,
    json_out: Path | None,
    console: Console,
    sizes: Sequence[int | None] = (None, 100_000, 1_000_000),
    target_precision: float = 0.99,
    embed_threads: int = 1,
    seed: int = 0,
    params: DecisionParams | None = None,
    name: str | None = None,
    by_size_sizes: Sequence[int] = BY_SIZE,
    subsamples: int = SUBSAMPLES,
) -> dict[str, Any]:
    """Run the benchmark, print its tables to ``console`` and return (and optionally write) the JSON.

    With ``params`` the given decision rule is measured as it is (e.g. ``default_params()`` on data
    it was not tuned on); otherwise it is tuned on TRAIN for ``target_precision`` first.
    """
    name = name or train_csv.parent.name
    train = load_labelled(train_csv)
    test = load_labelled(test_csv)
    embedder = OnnxMiniLM(threads=embed_threads)

    started = time.perf_counter()
    train_vectors = embedder.embed([normalise(t) for t in train.texts])
    test_vectors = embedder.embed([normalise(t) for t in test.texts])
    console.print(
        f"embedded {len(train.texts)} train + {len(test.texts)} test queries in "
        f"{time.perf_counter() - started:.1f} s (batched, {embed_threads} thread(s))"
    )

    # One query at a time, as the gateway embeds the last user turn of one request.
    single: list[float] = []
    for text in test.texts[:EMBED_SAMPLE]:
        t0 = time.perf_counter()
        embedder.embed([normalise(text)])
        single.append((time.perf_counter() - t0) * 1e3)
    embedding = {
        "threads": embed_threads,
        "p50_ms": _percentile(single, 50),
        "p99_ms": _percentile(single, 99),
    }
    console.print(
        f"query embedding ({embed_threads} thread): p50 {embedding['p50_ms']:.2f} ms, "
        f"p99 {embedding['p99_ms']:.2f} ms over {len(single)} queries"
    )

    if params is None:
        started = time.perf_counter()
        tuned = learn_from_vectors(train_vectors, train.labels, train.texts, target_precision, seed=seed)
        params = tuned.params
        console.print(
            f"tuned on TRAIN only (leave-one-out + sparse-cache lookups, cross-fitted thresholds) in "
            f"{time.perf_counter() - started:.1f} s: dense score threshold {params.threshold:.4f}, "
            f"hits from {params.size_steps[0] if params.size_steps else 1} entries "
            f"(fit hit rate {tuned.fit_hit_rate:.1%}, fit precision {tuned.fit_precision:.2%})"
        )
        rule = "learned TUNED"
    else:
        console.print(f"given decision parameters, not tuned on this data: threshold {params.threshold:.4f}")
        rule = "learned GIVEN"

    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {
        "params": params.to_dict(),
        "embedding": embedding,
        "thresholds": [],
        "cosine": [],
        "latency": [],
    }
    for size in sizes:
        started = time.perf_counter()
        index = _build_index(train_vectors, size, rng)
        build_s = time.perf_counter() - started
        look = _lookup_all(
            index, test_vectors, test.texts, test.labels, train.texts, train.labels, params, train_vectors
        )
        label = f"{look.size:,} entries ({type(index).__name__})"
        learned = curve(look.scores, look.served, look.correct, SCORE_SWEEP)
        # The rule is told the real entries (the padding stands for no cached question).
        tuned_point = curve(look.scores, look.served, look.correct, [params.threshold_for(len(train.texts))])[
            0
        ]
        cosine = curve(look.top_sim, [True] * len(look.top_sim), look.top_correct, COSINE_SWEEP)
        baselines = [
            (f"{name} cos>={t}", curve(look.top_sim, [True] * len(look.top_sim), look.top_correct, [t])[0])
            for name, t in COSINE_BASELINES
        ]
        rows = (
            [("learned", p) for p in learned]
            + [(rule, tuned_point)]
            + [("cosine", p) for p in cosine]
            + baselines
        )
        console.print(_curve_table(f"{name} test vs train, index {label}", rows))
        lat = {
            "entries": look.size,
            "index": type(index).__name__,
            "build_s": build_s,
            "p50_ms": _percentile(look.latency_ms, 50),
            "p99_ms": _percentile(look.latency_ms, 99),
        }
        console.print(
            f"lookup (search k={SEARCH_K} + decision, 1 thread) at {look.size:,} entries: "
            f"p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms; index build {build_s:.1f} s"
        )
        result["latency"].append(lat)
        result["thresholds"].extend(_point_dict(p, rule="learned", entries=look.size) for p in learned)
        result["cosine"].extend(_point_dict(p, rule="cosine", entries=look.size) for p in cosine)
        result["cosine"].extend(_point_dict(p, rule=name, entries=look.size) for name, p in baselines)
        if size is None:
            result["tuned"] = _point_dict(tuned_point, rule="learned", entries=look.size)
        else:
            result.setdefault("tuned_at_size", []).append(
                _point_dict(tuned_point, rule="learned", entries=look.size)
            )
        del index
    started = time.perf_counter()
    result["by_size"] = by_size(
        train_vectors,
        train.texts,
        train.labels,
        test_vectors,
        test.texts,
        test.labels,
        params,
        by_size_sizes,
        subsamples,
        seed,
    )
    console.print(
        _by_size_table(
            f"{name} test vs random subsamples of train, by cache size ({rule}, told the size; "
            f"{time.perf_counter() - started:.0f} s)",
            result["by_size"],
        )
    )
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
