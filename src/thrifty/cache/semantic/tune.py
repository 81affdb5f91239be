"""Learn ``DecisionParams`` from labelled ``text,category`` data for a target precision.

Texts that share a category are taken to share a cached answer. Every text is looked up as a
pseudo-query against a cache holding all the *other* texts (leave-one-out: the cache the policy
meets in production holds all of the data, and a thinner cross-validation cache would shift the
similarity features), so every label used for fitting comes from a query the cache did not contain.
A verbatim repeat of the query (same text, same vector) is left out of its own lookup: the exact
cache answers those before the semantic cache is asked.

A quadratic logistic model is fitted on the neighbour features of those lookups. The threshold is
chosen on *cross-fitted* scores (each fold scored by a model fitted without it), as the lowest score
whose hits (after the content guards) reach the target precision with a one-sided Wilson lower
confidence bound: a threshold picked where the in-sample precision just touches the target lands
below it on new data about half the time.

Density augmentation: a live cache, and each of its partitions, starts sparse, and there the
nearest entry is often a neighbouring question whose own answer is not cached yet, with nothing
nearby to disagree. So the texts are also looked up against random subsets of the *other* texts of
each size in ``DENSITY_SIZES``, and every size gets its own threshold, certified on its own
lookups (binomial and cluster-robust by random cache) and never lower than a denser size's. The
decision uses the threshold of the largest tuned size the cache reaches
(``decide(..., cache_size=)``); below the smallest certified size it never hits.

Everything here except ``learn_params`` (which embeds) is pure numpy over given vectors.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from thrifty.cache.semantic.decision import (
    DENSITY_FEATURES,
    FEATURE_NAMES,
    DecisionParams,
    Neighbour,
    assess,
)
from thrifty.cache.semantic.normalise import normalise
from thrifty.errors import InvalidData

# Neighbours fetched per lookup: the vote uses 20, the margin looks further for another answer.
SEARCH_K = 32
# What ``learn_from_vectors`` fits unless given a template: vote over the 20 nearest entries, all
# features, pairwise products (chosen by cross-validation on Banking77 train only: the quadratic
# model and the wider vote add ~3 points of hit rate at 99% precision over the four-feature linear
# one; the lexical features ~0.3). Not the density features: the model is fitted on the dense
# (leave-one-out) lookups, where they barely vary, so in a sparse cache their weights would
# extrapolate; the per-size thresholds carry the density instead (and, fitted on sparse lookups
# too, they gained nothing over the thresholds on Banking77 train).
TUNED_VOTE_K = 20
TUNED_FEATURES: tuple[str, ...] = tuple(f for f in FEATURE_NAMES if f not in DENSITY_FEATURES)
# One-sided z of the Wilson lower bound the threshold's precision must clear. A three-sigma bound:
# in nested cross-validation on Banking77 train (tune on 4/5, measure on the held-out 1/5 against
# a cache of the 4/5; two seeds, ten folds of ~2,000 queries) z = 1.645 held 99% on 7 of 10
# held-out folds (pooled 99.24% at 70.5% hits), z = 3 on 9 of 10 (pooled 99.46% at 65.6% hits).
# A precision target should hold on the next sample of traffic, not only on average.
CONFIDENCE_Z = 3.0
# Density augmentation: besides the whole data set (leave-one-out), every size here below it is a
# cache the pseudo-queries are looked up against, as random subsets of the *other* texts. A live
# cache, and each of its partitions, starts empty: the rule must learn, and certify its threshold
# for, sparse caches too, where the nearest entry is often a neighbouring question whose own answer
# is not cached yet. Each size gets its own threshold (``DecisionParams.size_steps``).
DENSITY_SIZES: tuple[int, ...] = (
    25,
    50,
    100,
    150,
    200,
    300,
    400,
    500,
    750,
    1000,
    1500,
    2000,
    3000,
    5000,
    7500,
)
# Lookups per size. Sparse caches hit rarely, so certifying a threshold there (z = 3) takes many.
LOOKUPS_PER_SIZE = 20_000
SPARSE_LOOKUPS = 60_000
SPARSE_UP_TO = 300
# Pseudo-queries per random subset: many subsets per size, so no one draw of the cache dominates.
QUERIES_PER_DRAW = 200
# Lookups per sparser size the model is fitted on, next to every leave-one-out lookup (the
# thresholds use all of them). 0: the sparse lookups only set the thresholds. On Banking77 train
# (tune on 8,000 texts, measure the other 2,000 against subsets of them) fitting on 12,000 per size
# let caches of 500 entries hit (8.7%) but the full cache lost 2-3 points of hit rate at 99%; the
# threshold schedule alone held 99% at every size either way.
FIT_ROWS_PER_SIZE = 0


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
class SizePoint:
    """The threshold chosen for one cache size and what it gave on that size's cross-fitted lookups."""

    size: int
    threshold: float
    lookups: int
    hit_rate: float
    precision: float


@dataclass(frozen=True, slots=True)
class TuneResult:
    params: DecisionParams
    # Measured on the cross-fitted scores of the pseudo-queries the threshold was chosen on.
    curve: list[CurvePoint]
    fit_hit_rate: float
    fit_precision: float
    # One row per cache size tuned on (the whole data set last).
    by_size: list[SizePoint] = dataclasses.field(default_factory=list)


def load_labelled(path: Path) -> Labelled:
    """A `text,category` CSV (header row first), as Banking77 ships it."""
    if not path.is_file():
        raise InvalidData(f"{path}: no such file")
    texts: list[str] = []
    labels: list[str] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"text", "category"} <= set(reader.fieldnames or ()):
            raise InvalidData(f"{path}: expected a CSV with a header row text,category")
        for line_no, row in enumerate(reader, 2):
            text, label = row["text"], row["category"]
            if not text or not label:
                raise InvalidData(f"{path}:{line_no}: a row needs both text and category")
            texts.append(text)
            labels.append(label)
    if len(texts) < 2:
        raise InvalidData(f"{path}: needs at least 2 labelled rows, found {len(texts)}")
    return Labelled(texts, labels)


def exact_neighbours(
    queries: npt.NDArray[np.float32],
    entries: npt.NDArray[np.float32],
    entry_labels: Sequence[str],
    entry_texts: Sequence[str],
    k: int = SEARCH_K,
    chunk: int = 1024,
    leave_one_out: bool = False,
    query_texts: Sequence[str] | None = None,
) -> list[list[Neighbour]]:
    """Exact top-``k`` neighbours of each query (blocked matrix product, for tuning and tests).

    With ``leave_one_out`` the queries *are* the entries (same order): each query's own row and any
    verbatim repeat of it (same text, cosine ~1) are left out of its neighbours.
    """
    out: list[list[Neighbour]] = []
    k = min(k, len(entries) - (1 if leave_one_out else 0))
    if k <= 0:
        return [[] for _ in range(len(queries))]
    if leave_one_out:
        ids = {t: i for i, t in enumerate(dict.fromkeys(entry_texts))}
        text_id = np.asarray([ids[t] for t in entry_texts])
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ entries.T
        if leave_one_out:
            rows = np.arange(len(sims))
            sims[rows, start + rows] = -np.inf
            repeat = (text_id[start : start + chunk, None] == text_id[None, :]) & (sims > 0.9999)
            sims[repeat] = -np.inf
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
                    if s > -np.inf
                ]
            )
    return out


def fit_logistic(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], l2: float = 1e-3, steps: int = 50
) -> tuple[tuple[float, ...], float, tuple[float, ...], tuple[float, ...]]:
    """L2-regularised logistic regression on standardised features (Newton's method).

    Tens of features and ~10^4 rows: a few Newton steps converge to machine precision in well under
    a second, and avoid a scikit-learn dependency for one small fit.
    """
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-9
    z = np.c_[(x - mean) / scale, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    ridge = l2 * np.eye(len(w))
    ridge[-1, -1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -60, 60)))
        grad = z.T @ (p - y) / len(y) + ridge @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z / len(y) + ridge + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    return (
        tuple(float(v) for v in w[:-1]),
        float(w[-1]),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in scale),
    )


def _logit(
    x: npt.NDArray[np.float64], fit: tuple[tuple[float, ...], float, tuple[float, ...], tuple[float, ...]]
) -> npt.NDArray[np.float64]:
    weights, bias, mean, scale = fit
    z = bias + ((x - np.asarray(mean)) / np.asarray(scale)) @ np.asarray(weights)
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))
    return out


def wilson_lower(
    good: npt.NDArray[np.float64], n: npt.NDArray[np.float64], z: float
) -> npt.NDArray[np.float64]:
    """One-sided Wilson lower confidence bound of a proportion ``good / n``."""
    p = good / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    out: npt.NDArray[np.float64] = (centre - spread) / (1 + z * z / n)
    return out


def clustered_lower(
    correct: npt.NDArray[np.bool_], clusters: npt.NDArray[np.int64], z: float
) -> npt.NDArray[np.float64]:
    """Lower confidence bound of the precision of every prefix of ``correct`` (hits in order),
    with a cluster-robust (ratio-estimator) variance: hits from one cluster (one random cache) are
    not independent (an intent missing from that cache turns all its queries into errors), so a
    binomial bound is overconfident about how the precision varies from one cache to the next."""
    n_clusters = int(clusters.max()) + 1 if len(clusters) else 1
    hits = np.zeros(n_clusters)
    good = np.zeros(n_clusters)
    s_gg = s_gh = s_hh = 0.0
    out = np.empty(len(correct))
    total_h = total_g = 0.0
    for i, (c, d) in enumerate(zip(correct.tolist(), clusters.tolist(), strict=True)):
        g = 1.0 if c else 0.0
        s_hh += 2 * hits[d] + 1
        s_gh += good[d] + g * (hits[d] + 1)
        s_gg += g * (2 * good[d] + 1)
        hits[d] += 1
        good[d] += g
        total_h += 1
        total_g += g
        p = total_g / total_h
        var = max(0.0, s_gg - 2 * p * s_gh + p * p * s_hh) / (total_h * total_h)
        var *= n_clusters / max(1, n_clusters - 1)
        out[i] = p - z * math.sqrt(var)
    return out


def pick_threshold(
    scores: Sequence[float],
    correct: Sequence[bool],
    target_precision: float,
    z: float = 0.0,
    clusters: Sequence[int] | None = None,
) -> float:
    """Lowest score threshold whose hits (score >= threshold) reach ``target_precision``.

    With ``z`` > 0 the precision's Wilson lower bound at that confidence must reach the target, not
    the point estimate; with ``clusters`` (which random cache each lookup went to) the
    cluster-robust bound must too. Returns +inf when no threshold reaches it (the cache then never
    hits). Ties are kept together: a threshold can only be placed between distinct scores; -inf
    scores (lookups a guard blocked) are never hits.
    """
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    n = np.arange(1, len(c) + 1, dtype=np.float64)
    good = np.cumsum(c).astype(np.float64)
    precision = wilson_lower(good, n, z) if z > 0 else good / n
    if clusters is not None and z > 0 and len(c):
        finite = np.isfinite(s)  # blocked lookups sort last and are never hits
        robust = np.full(len(c), -np.inf)
        robust[finite] = clustered_lower(c[finite], np.asarray(clusters, dtype=np.int64)[order][finite], z)
        precision = np.minimum(precision, robust)
    # Only the last index of a run of equal scores is a valid cut.
    last_of_run = np.r_[s[1:] != s[:-1], True]
    ok = np.flatnonzero(last_of_run & (precision >= target_precision) & np.isfinite(s))
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


@dataclass(frozen=True, slots=True)
class Lookup:
    """One pseudo-query's assessment: feature row, whether an entry would be served, correctness."""

    values: tuple[float, ...]
    served: bool
    correct: bool
    # The nearest entry is within ``min_similarity`` (otherwise a miss before any score).
    near: bool = True


def assess_lookups(
    texts: Sequence[str],
    labels: Sequence[str],
    neighbour_lists: Sequence[Sequence[Neighbour]],
    params: DecisionParams,
) -> list[Lookup]:
    """Assess every lookup with ``params``' features, guards and vote (its weights are not used)."""
    return [lk for _, lk in _assess_rows(texts, labels, neighbour_lists, params)]


def _assess_rows(
    texts: Sequence[str],
    labels: Sequence[str],
    neighbour_lists: Sequence[Sequence[Neighbour]],
    params: DecisionParams,
) -> list[tuple[int, Lookup]]:
    """``assess_lookups`` keeping each lookup's position (lookups of an empty cache are dropped)."""
    out = []
    for i, (text, label, neigh) in enumerate(zip(texts, labels, neighbour_lists, strict=True)):
        a = assess(text, neigh, params)
        if a.features is None:
            continue
        near = a.features.entry.similarity >= params.min_similarity
        out.append((i, Lookup(a.features.values, a.served is not None, a.features.answer_id == label, near)))
    return out


def subset_lookups(
    vectors: npt.NDArray[np.float32],
    labels: Sequence[str],
    texts: Sequence[str],
    size: int,
    count: int,
    rng: np.random.Generator,
    params: DecisionParams,
    per_draw: int = QUERIES_PER_DRAW,
) -> tuple[list[Lookup], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``count`` lookups of random texts against random caches of ``size`` *other* texts.

    Each draw shuffles the data, caches the first ``size`` texts and looks up the next
    ``per_draw``; a verbatim repeat of the query in the cache is left out of its neighbours (the
    exact cache answers those). Returns the lookups, the index of each one's query and the number
    of the draw (random cache) it went to.
    """
    n = len(vectors)
    per_draw = max(1, min(per_draw, n - size))
    lookups: list[Lookup] = []
    queries: list[int] = []
    draws: list[int] = []
    draw = 0
    while len(lookups) < count and n > size:
        order = rng.permutation(n)
        cache, asked = order[:size], order[size : size + min(per_draw, count - len(lookups))]
        lists = exact_neighbours(
            vectors[asked], vectors[cache], [labels[i] for i in cache], [texts[i] for i in cache]
        )
        q_texts = [texts[i] for i in asked]
        lists = [
            [nb for nb in row if not (nb.similarity > 0.9999 and nb.text == q)]
            for q, row in zip(q_texts, lists, strict=True)
        ]
        for i, lk in _assess_rows(q_texts, [labels[i] for i in asked], lists, params):
            lookups.append(lk)
            queries.append(int(asked[i]))
            draws.append(draw)
        draw += 1
    return lookups, np.asarray(queries, dtype=np.int64), np.asarray(draws, dtype=np.int64)


def expand_matrix(values: npt.NDArray[np.float64], interactions: bool) -> npt.NDArray[np.float64]:
    """``decision.expand`` of every row at once (same column order)."""
    if not interactions:
        return values
    i, j = np.triu_indices(values.shape[1])
    out: npt.NDArray[np.float64] = np.c_[values, values[:, i] * values[:, j]]
    return out


def learn_from_vectors(
    vectors: npt.NDArray[np.float32],
    labels: Sequence[str],
    texts: Sequence[str],
    target_precision: float,
    folds: int = 5,
    seed: int = 0,
    guards: bool = True,
    base: DecisionParams | None = None,
    z: float = CONFIDENCE_Z,
    sizes: Sequence[int] | None = DENSITY_SIZES,
    lookups_per_size: int = LOOKUPS_PER_SIZE,
    sparse_lookups: int = SPARSE_LOOKUPS,
    fit_rows_per_size: int = FIT_ROWS_PER_SIZE,
    scope_share: float = 0.0,
) -> TuneResult:
    """Fit the policy on leave-one-out and density-augmented lookups of one labelled set.

    ``folds`` is the number of cross-fitting folds (by query) the thresholds are chosen on; ``z``
    the one-sided confidence of the precision bound (0 picks on the point estimate). ``sizes``
    (those below the data set's size) are the sparse caches of the density augmentation; each gets
    its own threshold, certified on its own lookups, and no sparser cache gets a lower threshold
    than a denser one. ``sizes=None`` or ``()``: leave-one-out only, one threshold.

    ``scope_share`` > 0 adds out-of-scope lookups (``scope.out_of_scope_lookups``) to the dense
    group, that share of its lookups: queries whose intent the cache does not hold, every hit on
    which is wrong. They are fitted on and their threshold must hold with them.
    """
    template = base or DecisionParams(
        weights=(),
        bias=0.0,
        mean=(),
        scale=(),
        threshold=0.5,
        vote_k=TUNED_VOTE_K,
        guards=guards,
        features=TUNED_FEATURES,
        interactions=True,
    )
    template = dataclasses.replace(template, size_steps=(), size_thresholds=())
    n = len(vectors)
    rng = np.random.default_rng(seed)
    # (cache size, lookups, query index of each lookup, random cache of each lookup); the whole data
    # set (leave-one-out: one cache, so no clusters) last.
    groups: list[tuple[int, list[Lookup], npt.NDArray[np.int64], npt.NDArray[np.int64] | None]] = []
    for size in sorted({s for s in (sizes or ()) if 0 < s < n - 1}):
        count = sparse_lookups if size <= SPARSE_UP_TO else lookups_per_size
        groups.append((size, *subset_lookups(vectors, labels, texts, size, count, rng, template)))
    lists = exact_neighbours(vectors, vectors, labels, texts, leave_one_out=True)
    rows = _assess_rows(texts, labels, lists, template)
    if scope_share > 0:
        from thrifty.cache.semantic.scope import out_of_scope_lookups

        count = round(len(rows) * scope_share / (1 - scope_share))
        rows += out_of_scope_lookups(vectors, labels, texts, count, rng, template)
    groups.append((n - 1, [lk for _, lk in rows], np.asarray([i for i, _ in rows], dtype=np.int64), None))

    lookups = [lk for _, group, _, _ in groups for lk in group]
    group_of = np.concatenate([np.full(len(g), k) for k, (_, g, _, _) in enumerate(groups)])
    query_of = np.concatenate([q for _, _, q, _ in groups])
    raw = np.asarray([lk.values for lk in lookups], dtype=np.float64).reshape(len(lookups), -1)
    y = np.asarray([lk.correct for lk in lookups], dtype=np.float64)
    served = np.asarray([lk.served for lk in lookups], dtype=bool)
    near = np.asarray([lk.near for lk in lookups], dtype=bool)
    # Fit on every leave-one-out lookup and up to ``fit_rows_per_size`` of each sparser size, whose
    # nearest entry is near enough to be scored at all (the rest miss before the model is asked).
    in_fit = np.zeros(len(y), dtype=bool)
    for k in range(len(groups)):
        members = np.flatnonzero(group_of == k)
        take = len(members) if k == len(groups) - 1 else min(fit_rows_per_size, len(members))
        in_fit[rng.choice(members, take, replace=False)] = True
    in_fit &= near
    x_fit = expand_matrix(raw[in_fit], template.interactions)
    fit = fit_logistic(x_fit, y[in_fit]) if len(x_fit) else ((), 0.0, (), ())
    # Cross-fitted scores: folds by query, so no lookup is scored by a model that saw its query
    # (at any size), and the thresholds are not placed on scores the model has memorised.
    fold_of = rng.integers(0, folds, size=n)[query_of]
    oof = np.zeros(len(y))
    for f in range(folds):
        held = fold_of == f
        train_rows = in_fit & ~held
        fold_fit = (
            fit_logistic(expand_matrix(raw[train_rows], template.interactions), y[train_rows])
            if (train_rows.any() and held.any())
            else fit
        )
        for start in range(0, int(held.sum()), 50_000):
            idx = np.flatnonzero(held)[start : start + 50_000]
            if fold_fit[0]:
                oof[idx] = _logit(expand_matrix(raw[idx], template.interactions), fold_fit)
    # A blocked or too-far lookup is a miss whatever its score, so it must not count toward precision.
    served_scores = np.where(served & near, oof, -np.inf)
    correct = y.astype(bool)
    # Per size: the lowest threshold whose precision bound reaches the target, binomial (Wilson) and,
    # for the random caches, cluster-robust by cache: precision must hold on the next cache drawn
    # at that size, not only pooled over many.
    thresholds = [
        pick_threshold(
            served_scores[group_of == k].tolist(),
            correct[group_of == k].tolist(),
            target_precision,
            z,
            clusters=draws.tolist() if draws is not None else None,
        )
        for k, (_, _, _, draws) in enumerate(groups)
    ]
    # Precision rises with density: a sparser cache never gets a lower threshold than a denser one.
    thresholds = np.maximum.accumulate(np.asarray(thresholds)[::-1])[::-1].tolist()
    by_size = []
    for k, (size, group, _, _) in enumerate(groups):
        m = group_of == k
        [at] = curve(oof[m].tolist(), (served & near)[m].tolist(), correct[m].tolist(), [thresholds[k]])
        by_size.append(SizePoint(size, thresholds[k], len(group), at.hit_rate, at.precision))
    # Leading sizes with no certifiable threshold need no step: below the first step nothing hits.
    first = next((k for k, t in enumerate(thresholds) if np.isfinite(t)), len(thresholds) - 1)
    steps = tuple(size for size, _, _, _ in groups[first:]) if len(groups) > 1 else ()
    weights, bias, mean, scale = fit
    params = dataclasses.replace(
        template,
        weights=weights,
        bias=bias,
        mean=mean,
        scale=scale,
        threshold=thresholds[-1],
        size_steps=steps,
        size_thresholds=tuple(thresholds[first:]) if steps else (),
    )
    full = group_of == len(groups) - 1
    grid = sorted({*np.round(np.linspace(0.5, 0.99, 50), 3).tolist(), thresholds[-1]})
    g_oof, g_served, g_correct = oof[full].tolist(), (served & near)[full].tolist(), correct[full].tolist()
    points = curve(g_oof, g_served, g_correct, grid)
    at = curve(g_oof, g_served, g_correct, [thresholds[-1]])[0]
    return TuneResult(params, points, at.hit_rate, at.precision, by_size)


def learn_params(
    data: Labelled, embedder: Embedder, target_precision: float, folds: int = 5, guards: bool = True
) -> TuneResult:
    """Embed ``data`` (normalised) and fit the policy on held-out folds of it."""
    vectors = embedder.embed([normalise(t) for t in data.texts])
    return learn_from_vectors(vectors, data.labels, data.texts, target_precision, folds=folds, guards=guards)
