"""Learn ``DecisionParams`` from labelled ``text,category`` data for a target precision.

Texts that share a category are taken to share a cached answer. The data is split into folds;
each fold's texts are looked up as pseudo-queries against a cache holding the other folds, so
every label used for fitting comes from a query the cache did not contain, as in production.
A logistic model is fitted on the neighbour features of those lookups, and the threshold is the
lowest score whose hits (after the content guards) reach the target precision.

Everything here except ``learn_params`` (which embeds) is pure numpy over given vectors.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from thrifty.cache.semantic.decision import DecisionParams, Neighbour, features, guard_mismatch, score
from thrifty.cache.semantic.normalise import normalise

# Neighbours fetched per lookup: the vote uses 10, the margin looks further for another answer.
SEARCH_K = 32


class Embedder(Protocol):
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True, slots=True)
class Labelled:
    texts: list[str]
    labels: list[str]


@dataclass(frozen=True, slots=True)
class CurvePoint:
    threshold: float
    hit_rate: float
    precision: float
    false_hit_rate: float


@dataclass(frozen=True, slots=True)
class TuneResult:
    params: DecisionParams
    # Measured on the pseudo-queries the parameters were fitted on: optimistic by construction.
    curve: list[CurvePoint]
    fit_hit_rate: float
    fit_precision: float


def load_labelled(path: Path) -> Labelled:
    texts: list[str] = []
    labels: list[str] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            texts.append(row["text"])
            labels.append(row["category"])
    return Labelled(texts, labels)


def exact_neighbours(
    queries: npt.NDArray[np.float32],
    entries: npt.NDArray[np.float32],
    entry_labels: Sequence[str],
    entry_texts: Sequence[str],
    k: int = SEARCH_K,
    chunk: int = 1024,
) -> list[list[Neighbour]]:
    """Exact top-``k`` neighbours of each query (blocked matrix product, for tuning and tests)."""
    out: list[list[Neighbour]] = []
    k = min(k, len(entries))
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ entries.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        top_sims = np.take_along_axis(top_sims, order, axis=1)
        for row_keys, row_sims in zip(top, top_sims, strict=True):
            out.append(
                [
                    Neighbour(float(s), entry_labels[j], entry_texts[j])
                    for j, s in zip(row_keys.tolist(), row_sims.tolist(), strict=True)
                ]
            )
    return out


def fit_logistic(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], l2: float = 1e-3, steps: int = 2000
) -> tuple[tuple[float, ...], float, tuple[float, ...], tuple[float, ...]]:
    """L2-regularised logistic regression on standardised features (full-batch gradient descent).

    Four features and ~10^4 rows: plain gradient descent converges in well under a second, and
    avoids a scikit-learn dependency for one small fit.
    """
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-9
    z = np.c_[(x - mean) / scale, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -60, 60)))
        grad = z.T @ (p - y) / len(y)
        grad[:-1] += l2 * w[:-1]
        w -= grad
    return (
        tuple(float(v) for v in w[:-1]),
        float(w[-1]),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in scale),
    )


def pick_threshold(scores: Sequence[float], correct: Sequence[bool], target_precision: float) -> float:
    """Lowest score threshold whose hits (score >= threshold) reach ``target_precision``.

    Returns +inf when no threshold reaches it (the cache then never hits). Ties are kept together:
    a threshold can only be placed between distinct scores.
    """
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    precision = np.cumsum(c) / np.arange(1, len(c) + 1)
    # Only the last index of a run of equal scores is a valid cut.
    last_of_run = np.r_[s[1:] != s[:-1], True]
    ok = np.flatnonzero(last_of_run & (precision >= target_precision))
    return float(s[ok.max()]) if len(ok) else float("inf")


def curve(
    scores: Sequence[float],
    served: Sequence[bool],
    correct: Sequence[bool],
    thresholds: Sequence[float],
) -> list[CurvePoint]:
    """Hit rate, precision and false-hit rate at each threshold; ``served`` is False where a guard blocks."""
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(served, dtype=bool)
    c = np.asarray(correct, dtype=bool)
    points = []
    for t in thresholds:
        hits = (s >= t) & g
        n_hits = int(hits.sum())
        good = int((hits & c).sum())
        points.append(
            CurvePoint(
                threshold=float(t),
                hit_rate=n_hits / len(s) if len(s) else 0.0,
                precision=good / n_hits if n_hits else 1.0,
                false_hit_rate=(n_hits - good) / len(s) if len(s) else 0.0,
            )
        )
    return points


def _guard_passes(query: str, neighbours: Sequence[Neighbour], answer_id: str, vote_k: int) -> bool:
    """Mirror of ``decide``'s guard step: some voter with the winning answer matches the content."""
    return any(
        n.answer_id == answer_id and guard_mismatch(query, n.text) is None
        for n in sorted(neighbours, key=lambda n: n.similarity, reverse=True)[:vote_k]
    )


def learn_from_vectors(
    vectors: npt.NDArray[np.float32],
    labels: Sequence[str],
    texts: Sequence[str],
    target_precision: float,
    folds: int = 5,
    seed: int = 0,
    guards: bool = True,
    base: DecisionParams | None = None,
) -> TuneResult:
    """Fit the policy on ``folds`` held-out splits of one labelled set (see module docstring)."""
    template = base or DecisionParams(weights=(), bias=0.0, mean=(), scale=(), threshold=0.5, guards=guards)
    rng = np.random.default_rng(seed)
    fold_of = rng.integers(0, folds, size=len(labels))
    rows: list[tuple[float, ...]] = []
    correct: list[bool] = []
    served: list[bool] = []
    for f in range(folds):
        q_idx = np.flatnonzero(fold_of == f)
        e_idx = np.flatnonzero(fold_of != f)
        if len(q_idx) == 0 or len(e_idx) == 0:
            continue
        e_labels = [labels[i] for i in e_idx.tolist()]
        e_texts = [texts[i] for i in e_idx.tolist()]
        lists = exact_neighbours(vectors[q_idx], vectors[e_idx], e_labels, e_texts)
        for qi, neigh in zip(q_idx.tolist(), lists, strict=True):
            feats = features(neigh, template.temperature, template.vote_k)
            if feats is None:
                continue
            rows.append(feats.values)
            correct.append(feats.answer_id == labels[qi])
            served.append(
                feats.entry.similarity >= template.min_similarity
                and (not guards or _guard_passes(texts[qi], neigh, feats.answer_id, template.vote_k))
            )
    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    weights, bias, mean, scale = fit_logistic(x, y)
    fitted = DecisionParams(
        weights=weights,
        bias=bias,
        mean=mean,
        scale=scale,
        threshold=0.5,
        temperature=template.temperature,
        vote_k=template.vote_k,
        min_similarity=template.min_similarity,
        guards=guards,
    )
    scores = [score(r, fitted) for r in rows]
    # A blocked lookup is a miss whatever its score, so it must not count toward precision.
    served_scores = [s if ok else float("-inf") for s, ok in zip(scores, served, strict=True)]
    threshold = pick_threshold(served_scores, correct, target_precision)
    params = DecisionParams(
        weights=weights,
        bias=bias,
        mean=mean,
        scale=scale,
        threshold=threshold,
        temperature=template.temperature,
        vote_k=template.vote_k,
        min_similarity=template.min_similarity,
        guards=guards,
    )
    grid = sorted({*np.round(np.linspace(0.5, 0.99, 50), 3).tolist(), threshold})
    points = curve(scores, served, correct, grid)
    at = curve(scores, served, correct, [threshold])[0]
    return TuneResult(params, points, at.hit_rate, at.precision)


def learn_params(
    data: Labelled, embedder: Embedder, target_precision: float, folds: int = 5, guards: bool = True
) -> TuneResult:
    """Embed ``data`` (normalised) and fit the policy on held-out folds of it."""
    vectors = embedder.embed([normalise(t) for t in data.texts])
    return learn_from_vectors(vectors, data.labels, data.texts, target_precision, folds=folds, guards=guards)
