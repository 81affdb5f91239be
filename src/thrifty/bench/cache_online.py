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

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from thrifty.cache.semantic.adaptive import PartitionState, Policy, bound, sample_rate
from thrifty.cache.semantic.decision import DecisionParams, Neighbour, assess
from thrifty.cache.semantic.normalise import normalise
from thrifty.cache.semantic.tune import exact_neighbours

OOS_LABEL = "\x00out-of-scope"
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
    verifications: int = 0
    wrong_found: int = 0

    def row(self) -> dict[str, Any]:
        in_scope = self.lookups - self.oos_lookups
        in_scope_hits = self.hits - self.oos_hits
        return {
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
            "in_scope_hit_rate": in_scope_hits / in_scope if in_scope else 0.0,
            "precision": self.good_hits / self.hits if self.hits else 1.0,
            "in_scope_precision": self.good_hits / in_scope_hits if in_scope_hits else 1.0,
            "oos_false_hit_rate": self.oos_hits / self.oos_lookups if self.oos_lookups else 0.0,
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
) -> StreamResult:
    """Stream the lookups in the given order; ``policy`` None: the static rule, never verified."""
    state = PartitionState("bench", "bench")
    shipped = params.threshold_for(cache_size)
    tally = Tally()
    every = max(1, math.ceil(len(texts) / curve_points))
    result = StreamResult(name, {})
    for i, (found, text, label) in enumerate(zip(neighbours, texts, labels, strict=True)):
        tally.lookups += 1
        oos = label == OOS_LABEL
        tally.oos_lookups += oos
        norm = normalise(text)
        repeat = next((n for n in found if normalise(n.text) == norm), None)
        if repeat is not None:
            _hit(tally, repeat.answer_id == label, oos)
        else:
            a = assess(text, found, params)
            if a.features is not None and a.score > 0:
                state.looked_up(a.score)
            verdict = bound(state, shipped, policy) if policy is not None else None
            threshold = verdict.threshold if verdict is not None else shipped
            if a.served is not None and a.score >= threshold:
                correct = a.served.answer_id == label
                _hit(tally, correct, oos)
                if policy is not None and verdict is not None:
                    state.served(repeat=False, saved=None)
                    if rng.random() < sample_rate(state, verdict, policy):
                        tally.verifications += 1
                        tally.wrong_found += not correct
                        state.observe(a.score, correct)
            elif a.served is not None and policy is not None:
                state.observe(a.score, a.served.answer_id == label)  # near miss: the fetched answer
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


def _hit(tally: Tally, correct: bool, oos: bool) -> None:
    tally.hits += 1
    tally.good_hits += correct
    tally.oos_hits += oos


def neighbours_for(
    query_vectors: npt.NDArray[np.float32],
    cache_vectors: npt.NDArray[np.float32],
    cache_labels: Sequence[str],
    cache_texts: Sequence[str],
) -> list[list[Neighbour]]:
    return exact_neighbours(query_vectors, cache_vectors, cache_labels, cache_texts)


__all__ = ["OOS_LABEL", "Split", "StreamResult", "Tally", "intent_disjoint", "neighbours_for", "stream"]
