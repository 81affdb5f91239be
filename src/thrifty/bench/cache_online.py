"""`thrifty bench cache --online`: the adaptive cache streamed queries of a domain it was not tuned on.

A cache is built from TRAIN queries; TEST queries are streamed in random order. Each lookup goes
through the same pure code as the gateway (``decision.assess``, ``adaptive.bound``,
``adaptive.sample_rate``): a repeat of a cached question is served; otherwise the rule's score is
compared with the partition's current threshold. A sampled share of paraphrase hits is verified
(here the labels are the comparison: a shadow call's fresh answer "differs" when the served entry's
intent is not the query's), and a miss with a candidate it did not serve compares that candidate
with the answer it had to fetch anyway (free). Out-of-scope queries (an intent no cached query has)
are wrong whenever they hit and are reported on their own.

One upstream call is the unit of cost: a hit saves one, a verification spends one, so the net saving
is (hits - verifications) / lookups of calls. The static rule is streamed beside it in the same run.

A simulated new domain inside one labelled set (``intent_disjoint``): the intents are split in
halves; the rule may be tuned on one half and is measured on the other, where a share of the
intents is left out of the cache entirely and their queries are the out-of-scope ones.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console

from thrifty.bench.cache_online_tables import curve_svg, curve_table, finite, online_table
from thrifty.cache.semantic.adaptive import PartitionState, Policy, answer_threshold, bound, sample_rate
from thrifty.cache.semantic.decision import DecisionParams, Neighbour, assess
from thrifty.cache.semantic.density import cluster_gap, member_rows, outside_cluster
from thrifty.cache.semantic.normalise import normalise
from thrifty.cache.semantic.tune import Labelled, exact_neighbours
from thrifty.settings import CacheVerifySettings

OOS_LABEL = "\x00out-of-scope"
FAR_LABEL = "\x00far"  # out of scope and of no cached kind at all (--far-oos), counted apart too
# Out-of-scope lookups in the tuning half's rule, as a share of its dense lookups (as the shipped rule).
SCOPE_SHARE = 0.1
CURVE_POINTS = 20


@dataclass(frozen=True, slots=True)
class Split:
    """One simulated domain: what the rule may be tuned on, what is cached, what is streamed."""

    tune: list[int]  # indices into TRAIN (the tuning half's intents)
    cache: list[int]  # indices into TRAIN (the measured half's in-scope intents)
    stream_train: list[int]  # TRAIN rows streamed as out-of-scope (their intent is not cached)
    stream_test: list[int]  # TEST rows streamed (in-scope and out-of-scope intents of the measured half)
    tune_intents: list[str]
    cached_intents: list[str]
    oos_intents: list[str]


def intent_disjoint(
    train_labels: Sequence[str],
    test_labels: Sequence[str],
    seed: int = 0,
    oos_share: float = 0.2,
) -> Split:
    """Half the intents to tune on; of the other half, ``oos_share`` of the intents are not cached."""
    intents = sorted(set(train_labels))
    rng = np.random.default_rng(seed)
    order = [intents[i] for i in rng.permutation(len(intents))]
    half = len(order) // 2
    tune_intents, measured = sorted(order[:half]), order[half:]
    n_oos = max(1, round(oos_share * len(measured)))
    oos, cached = sorted(measured[:n_oos]), sorted(measured[n_oos:])
    tune_set, cached_set, oos_set = set(tune_intents), set(cached), set(oos)
    return Split(
        tune=[i for i, lab in enumerate(train_labels) if lab in tune_set],
        cache=[i for i, lab in enumerate(train_labels) if lab in cached_set],
        stream_train=[i for i, lab in enumerate(train_labels) if lab in oos_set],
        stream_test=[i for i, lab in enumerate(test_labels) if lab in cached_set or lab in oos_set],
        tune_intents=tune_intents,
        cached_intents=cached,
        oos_intents=oos,
    )


@dataclass(slots=True)
class Tally:
    lookups: int = 0
    hits: int = 0
    good_hits: int = 0
    oos_lookups: int = 0
    oos_hits: int = 0
    far_lookups: int = 0
    far_hits: int = 0
    verifications: int = 0
    wrong_found: int = 0

    def row(self) -> dict[str, Any]:
        in_scope = self.lookups - self.oos_lookups
        in_scope_hits = self.hits - self.oos_hits
        return {
            "lookups": self.lookups,
            "hits": self.hits,
            "good_hits": self.good_hits,
            "oos_lookups": self.oos_lookups,
            "oos_hits": self.oos_hits,
            "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
            "in_scope_hit_rate": in_scope_hits / in_scope if in_scope else 0.0,
            "precision": self.good_hits / self.hits if self.hits else 1.0,
            "in_scope_precision": self.good_hits / in_scope_hits if in_scope_hits else 1.0,
            "oos_false_hit_rate": self.oos_hits / self.oos_lookups if self.oos_lookups else 0.0,
            "far_lookups": self.far_lookups,
            "far_hits": self.far_hits,
            "far_false_hit_rate": self.far_hits / self.far_lookups if self.far_lookups else 0.0,
            "verifications": self.verifications,
            "verification_rate": self.verifications / self.hits if self.hits else 0.0,
            "wrong_found": self.wrong_found,
            "net_saving": (self.hits - self.verifications) / self.lookups if self.lookups else 0.0,
        }


@dataclass(slots=True)
class StreamResult:
    name: str
    total: dict[str, Any]
    curve: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


def stream(
    name: str,
    neighbours: Sequence[Sequence[Neighbour]],
    texts: Sequence[str],
    labels: Sequence[str],
    params: DecisionParams,
    cache_size: int,
    policy: Policy | None,
    rng: np.random.Generator,
    curve_points: int = CURVE_POINTS,
    per_answer: bool = True,
    space: Space | None = None,
) -> StreamResult:
    """Stream the lookups in the given order; ``policy`` None: the static rule, never verified.
    ``space`` (the vectors): the out-of-scope guard applies when ``params.cluster_margin`` is set."""
    state = PartitionState("bench", "bench")
    shipped = params.threshold_for(cache_size)
    tally = Tally()
    every = max(1, math.ceil(len(texts) / curve_points))
    result = StreamResult(name, {})
    for i, (found, text, label) in enumerate(zip(neighbours, texts, labels, strict=True)):
        tally.lookups += 1
        oos, far = label in (OOS_LABEL, FAR_LABEL), label == FAR_LABEL
        tally.oos_lookups += oos
        tally.far_lookups += far
        norm = normalise(text)
        repeat = next((n for n in found if normalise(n.text) == norm), None)
        if repeat is not None:
            _hit(tally, repeat.answer_id == label, oos, far)
        else:
            a = assess(text, found, params)
            if a.features is not None and a.score > 0:
                state.looked_up(a.score)
            verdict = bound(state, shipped, policy) if policy is not None else None
            threshold = verdict.threshold if verdict is not None else shipped
            if policy is not None and a.served is not None and per_answer:
                threshold = answer_threshold(state, a.served.answer_id, threshold, policy)
            if (
                a.served is not None
                and a.score >= threshold
                and space is not None
                and outside_cluster(space.gap(i, found, a.served.answer_id), params)
            ):
                threshold = math.inf  # outside its answer's cluster: a miss (and a near-miss verdict)
            if a.served is not None and a.score >= threshold:
                correct = a.served.answer_id == label
                _hit(tally, correct, oos, far)
                if policy is not None and verdict is not None:
                    state.served(repeat=False, saved=None)
                    if rng.random() < sample_rate(state, verdict, policy):
                        tally.verifications += 1
                        tally.wrong_found += not correct
                        state.observe(a.score, correct, a.served.answer_id)
            elif a.served is not None and policy is not None:
                # A near miss: the answer fetched upstream anyway, compared with the candidate.
                state.observe(a.score, a.served.answer_id == label, a.served.answer_id)
        if (i + 1) % every == 0 or i + 1 == len(texts):
            point = {"queries": i + 1, **tally.row()}
            if policy is not None:
                v = bound(state, shipped, policy)
                point["threshold"] = v.threshold if not math.isinf(v.threshold) else "off"
                point["status"] = v.status
            result.curve.append(point)
    result.total = tally.row()
    if policy is not None:
        v = bound(state, shipped, policy)
        result.final = {**asdict(v), "threshold": v.threshold if not math.isinf(v.threshold) else "off"}
    return result


def _hit(tally: Tally, correct: bool, oos: bool, far: bool) -> None:
    tally.hits += 1
    tally.good_hits += correct
    tally.oos_hits += oos
    tally.far_hits += far


@dataclass(frozen=True, slots=True)
class Space:
    """The stream's query vectors and the cache's, for the out-of-scope guard."""

    queries: npt.NDArray[np.float32]
    cache: npt.NDArray[np.float32]
    row_of: dict[str, int]  # cached text -> its row

    @classmethod
    def of(
        cls, queries: npt.NDArray[np.float32], cache: npt.NDArray[np.float32], texts: Sequence[str]
    ) -> Space:
        return cls(queries, cache, {t: i for i, t in enumerate(texts)})

    def gap(self, i: int, found: Sequence[Neighbour], answer_id: str) -> float | None:
        rows = [self.row_of[found[j].text] for j in member_rows(found, answer_id)]
        return cluster_gap(self.queries[i], self.cache[rows])


def neighbours_for(
    query_vectors: npt.NDArray[np.float32],
    cache_vectors: npt.NDArray[np.float32],
    cache_labels: Sequence[str],
    cache_texts: Sequence[str],
) -> list[list[Neighbour]]:
    return exact_neighbours(query_vectors, cache_vectors, cache_labels, cache_texts)


@dataclass(frozen=True, slots=True)
class Stream:
    """One stream to run: the cache and the lookups, in their random order."""

    name: str
    cache_vectors: npt.NDArray[np.float32]
    cache_texts: list[str]
    cache_labels: list[str]
    vectors: npt.NDArray[np.float32]
    texts: list[str]
    labels: list[str]  # OOS_LABEL for out-of-scope lookups
    params: DecisionParams
    rule: str  # how the rule was obtained (shipped, given, tuned on the other half)


def held_out_stream(
    train: Labelled,
    test: Labelled,
    train_vectors: npt.NDArray[np.float32],
    test_vectors: npt.NDArray[np.float32],
    params: DecisionParams,
    rule: str,
    oos_label: str,
    seed: int,
) -> Stream:
    """TRAIN cached (its ``oos_label`` rows left out), TEST streamed; a TEST query whose category is
    ``oos_label`` or absent from the cache is out of scope."""
    keep = [i for i, lab in enumerate(train.labels) if lab != oos_label]
    cached = {train.labels[i] for i in keep}
    order = np.random.default_rng(seed).permutation(len(test.texts))
    return Stream(
        "held-out",
        train_vectors[keep],
        [train.texts[i] for i in keep],
        [train.labels[i] for i in keep],
        test_vectors[order],
        [test.texts[i] for i in order],
        [test.labels[i] if test.labels[i] in cached else OOS_LABEL for i in order],
        params,
        rule,
    )


def with_far_questions(
    stream: Stream, texts: Sequence[str], vectors: npt.NDArray[np.float32], seed: int
) -> Stream:
    """``stream`` with ``texts`` (questions of no cached kind, e.g. ShareGPT's) mixed in at random
    places as out-of-scope lookups."""
    n = len(stream.texts) + len(texts)
    order = np.random.default_rng(seed).permutation(n)
    all_vectors = np.concatenate([stream.vectors, vectors])[order]
    all_texts = [*stream.texts, *texts]
    all_labels = [*stream.labels, *([FAR_LABEL] * len(texts))]
    return replace(
        stream,
        name=f"{stream.name} + {len(texts)} far",
        vectors=all_vectors,
        texts=[all_texts[i] for i in order],
        labels=[all_labels[i] for i in order],
    )


def disjoint_stream(
    train: Labelled,
    test: Labelled,
    train_vectors: npt.NDArray[np.float32],
    test_vectors: npt.NDArray[np.float32],
    seed: int,
    params: DecisionParams | None,
    scope_share: float,
    density: bool,
    guard: bool = True,
) -> Stream:
    """``intent_disjoint`` split ``seed``: the rule tuned on the tuning half's TRAIN (unless given), the
    measured half's in-scope TRAIN cached, its TEST streamed (out-of-scope intents included)."""
    split = intent_disjoint(train.labels, test.labels, seed=seed)
    rule = "given (not intent-disjoint)"
    if params is None:
        from thrifty.cache.semantic.tune import DENSITY_SIZES, learn_from_vectors

        tuned = learn_from_vectors(
            train_vectors[split.tune],
            [train.labels[i] for i in split.tune],
            [train.texts[i] for i in split.tune],
            0.99,
            seed=seed,
            sizes=DENSITY_SIZES if density else (),
            scope_share=scope_share,
        )
        params, rule = tuned.params, f"tuned on the other {len(split.tune_intents)} intents"
        if guard:
            from thrifty.cache.semantic.density import tune_margin

            margin = tune_margin(
                train_vectors[split.tune],
                [train.labels[i] for i in split.tune],
                [train.texts[i] for i in split.tune],
                params,
                seed=seed,
            )
            params = replace(params, cluster_margin=margin)
            rule += f", cluster margin {margin:.3f}" if margin is not None else ", no cluster margin"
    oos = set(split.oos_intents)
    order = np.random.default_rng(seed).permutation(split.stream_test)
    return Stream(
        f"split {seed}",
        train_vectors[split.cache],
        [train.texts[i] for i in split.cache],
        [train.labels[i] for i in split.cache],
        test_vectors[order],
        [test.texts[i] for i in order],
        [OOS_LABEL if test.labels[i] in oos else test.labels[i] for i in order],
        params,
        rule,
    )


def run_stream(spec: Stream, policy: Policy, seed: int) -> dict[str, Any]:
    """The static rule and the adaptive one over the same stream, side by side."""
    found = neighbours_for(spec.vectors, spec.cache_vectors, spec.cache_labels, spec.cache_texts)
    size = len(spec.cache_texts)
    space = Space.of(spec.vectors, spec.cache_vectors, spec.cache_texts)
    static = stream(
        "static",
        found,
        spec.texts,
        spec.labels,
        spec.params,
        size,
        None,
        np.random.default_rng(seed),
        space=space,
    )
    online = stream(
        "online",
        found,
        spec.texts,
        spec.labels,
        spec.params,
        size,
        policy,
        np.random.default_rng(seed),
        space=space,
    )
    unguarded = stream(
        "static, no guard",
        found,
        spec.texts,
        spec.labels,
        spec.params,
        size,
        None,
        np.random.default_rng(seed),
    )
    return {
        "name": spec.name,
        "rule": spec.rule,
        "cache_entries": size,
        "lookups": len(spec.texts),
        "out_of_scope_lookups": sum(1 for lab in spec.labels if lab in (OOS_LABEL, FAR_LABEL)),
        "far_lookups": sum(1 for lab in spec.labels if lab == FAR_LABEL),
        "shipped_threshold": finite(spec.params.threshold_for(size)),
        "static": static.total,
        "online": online.total,
        "static_no_guard": unguarded.total,
        "cluster_margin": spec.params.cluster_margin,
        "online_final": online.final,
        "curve": {"static": static.curve, "online": online.curve},
    }


def run_online_bench(
    train_csv: Path,
    test_csv: Path,
    console: Console,
    *,
    json_out: Path | None = None,
    svg_out: Path | None = None,
    params: DecisionParams | None = None,
    verify: CacheVerifySettings | None = None,
    disjoint: bool = False,
    splits: int = 3,
    oos_label: str = "oos",
    far_questions: Sequence[str] = (),
    scope_share: float = SCOPE_SHARE,
    density: bool = False,
    seed: int = 0,
    embed_threads: int = 1,
) -> dict[str, Any]:
    """``thrifty bench cache --online``: print the tables, write the JSON and the SVG curve.

    Without ``disjoint``: TRAIN cached, TEST streamed, ``params`` (default: the shipped rule).
    ``far_questions`` are added to every stream as out-of-scope lookups of no cached kind.
    With it: ``splits`` intent-disjoint splits of the one data set, the rule tuned on each split's
    other half (``params`` given: measured as is, which is not intent-disjoint if it saw them).
    """
    from thrifty.cache.semantic.decision import default_params
    from thrifty.cache.semantic.embedder import OnnxMiniLM
    from thrifty.cache.semantic.tune import load_labelled
    from thrifty.cache.semantic.verify import policy_of

    train, test = load_labelled(train_csv), load_labelled(test_csv)
    embedder = OnnxMiniLM(threads=embed_threads)
    started = time.perf_counter()
    train_vectors = embedder.embed([normalise(t) for t in train.texts])
    test_vectors = embedder.embed([normalise(t) for t in test.texts])
    console.print(
        f"embedded {len(train.texts)} train + {len(test.texts)} test queries in "
        f"{time.perf_counter() - started:.1f} s"
    )
    settings = verify or CacheVerifySettings()
    policy = policy_of(settings)
    if disjoint:
        specs = []
        for k in range(splits):
            started = time.perf_counter()
            specs.append(
                disjoint_stream(
                    train, test, train_vectors, test_vectors, seed + k, params, scope_share, density
                )
            )
            console.print(f"split {seed + k}: {specs[-1].rule} in {time.perf_counter() - started:.0f} s")
    else:
        rule = "given" if params is not None else "shipped"
        specs = [
            held_out_stream(
                train, test, train_vectors, test_vectors, params or default_params(), rule, oos_label, seed
            )
        ]
    if far_questions:
        far_vectors = embedder.embed([normalise(t) for t in far_questions])
        specs = [
            with_far_questions(spec, far_questions, far_vectors, seed + k) for k, spec in enumerate(specs)
        ]
    runs = [run_stream(spec, policy, seed) for spec in specs]
    console.print(
        online_table(
            f"semantic cache online, error bound {settings.error_bound:.1%} at {settings.confidence:.0%} "
            f"confidence, verification {settings.min_rate:.0%}-{settings.max_rate:.0%} of hits",
            runs,
        )
    )
    for run in runs:
        console.print(curve_table(run))
    result = {
        "data": {"train": str(train_csv), "test": str(test_csv), "intent_disjoint": disjoint},
        "verify": settings.model_dump(),
        "runs": runs,
    }
    if len(runs) > 1:
        result["pooled"] = {kind: _pooled(runs, kind) for kind in ("static_no_guard", "static", "online")}
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if svg_out is not None:
        svg_out.write_text(curve_svg(runs), encoding="utf-8")
    return result


def _pooled(runs: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The splits' streams as one: counts summed."""
    tally = Tally()
    for run in runs:
        t = run[kind]
        tally.lookups += t["lookups"]
        tally.hits += t["hits"]
        tally.good_hits += t["good_hits"]
        tally.oos_lookups += t["oos_lookups"]
        tally.oos_hits += t["oos_hits"]
        tally.far_lookups += t["far_lookups"]
        tally.far_hits += t["far_hits"]
        tally.verifications += t["verifications"]
        tally.wrong_found += t["wrong_found"]
    return tally.row()


__all__ = [
    "OOS_LABEL",
    "Split",
    "Stream",
    "StreamResult",
    "Tally",
    "curve_svg",
    "curve_table",
    "disjoint_stream",
    "held_out_stream",
    "intent_disjoint",
    "neighbours_for",
    "online_table",
    "run_online_bench",
    "run_stream",
    "stream",
]
