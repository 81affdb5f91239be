"""The out-of-scope guard: a query must sit inside its answer's cluster, not just near it.

A question of a kind nobody cached lands among the entries of a neighbouring kind, and the vote
looks confident because nothing else is near. What gives it away is the local density: the served
answer's nearest entries are close to *each other* (a cluster of paraphrases), and a query of
another kind is markedly further from them than they are from one another. The gap

    mean cos(query, members) - mean pairwise cos(members)

over the served answer's nearest members (up to ``MEMBERS`` among the ``WITHIN`` nearest entries)
is near 0 or positive for a paraphrase and negative for an outsider. Below the learned
``cluster_margin`` the lookup misses. A lone member has no density to measure: the guard then
leaves the decision to the rule (whose size schedule keeps sparse caches from answering).

``tune_margin`` learns that margin the way the rule itself is tuned: intents held out of a cache
of labelled queries, their texts looked up against it, and the margin set where it gives up a
stated share of the right hits; what it costs on hits is its only parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from thrifty.cache.semantic.decision import DecisionParams, Neighbour, assess

MEMBERS = 5
WITHIN = 10
# Intents held out of the cache per draw, and draws, when tuning the margin.
HELD_OUT_SHARE = 0.2
DRAWS = 4
# Share of the right paraphrase hits the guard may give up (chosen on train folds).
GIVE_UP = 0.02

Vector = npt.NDArray[np.float32]


def cluster_gap(query: Vector, members: npt.NDArray[np.float32]) -> float | None:
    """The query's mean cosine to ``members`` (rows, nearest first) minus theirs to each other;
    None for fewer than two members."""
    n = len(members)
    if n < 2:
        return None
    to_query = float(np.mean(members @ query))
    gram = members @ members.T
    pairwise = (float(gram.sum()) - float(np.trace(gram))) / (n * (n - 1))
    return to_query - pairwise


def member_rows(neighbours: Sequence[Neighbour], answer_id: str) -> list[int]:
    """Positions (in ``neighbours``, nearest first) of the served answer's members to compare."""
    ranked = sorted(range(len(neighbours)), key=lambda i: neighbours[i].similarity, reverse=True)
    return [i for i in ranked[:WITHIN] if neighbours[i].answer_id == answer_id][:MEMBERS]


def outside_cluster(gap: float | None, params: DecisionParams) -> bool:
    return params.cluster_margin is not None and gap is not None and gap < params.cluster_margin


def tune_margin(
    vectors: npt.NDArray[np.float32],
    labels: Sequence[str],
    texts: Sequence[str],
    params: DecisionParams,
    seed: int = 0,
    give_up: float = GIVE_UP,
    cache_size: int | None = None,
) -> float | None:
    """The margin below which ``give_up`` of the right hits fall, over draws of held-out intents
    (each draw: a fifth of the intents out of the cache, a fifth of the rest's queries looked up
    against the other four fifths). None when no right hit was seen."""
    from thrifty.cache.semantic.tune import exact_neighbours

    rng = np.random.default_rng(seed)
    intents = sorted(set(labels))
    label_arr = np.asarray(labels)
    right_gaps: list[float] = []
    for _ in range(DRAWS):
        held = rng.choice(intents, max(1, round(HELD_OUT_SHARE * len(intents))), replace=False)
        inside = np.flatnonzero(~np.isin(label_arr, held))
        order = rng.permutation(inside)
        asked, cache = order[: len(order) // 5], order[len(order) // 5 :]
        threshold = params.threshold_for(cache_size if cache_size is not None else len(cache))
        lists = exact_neighbours(
            vectors[asked], vectors[cache], [labels[i] for i in cache], [texts[i] for i in cache]
        )
        by_text = {texts[i]: i for i in cache}
        for q, found in zip(asked, lists, strict=True):
            a = assess(texts[q], found, params)
            if a.served is None or a.score < threshold or a.served.answer_id != labels[q]:
                continue
            rows = [by_text[found[i].text] for i in member_rows(found, a.served.answer_id)]
            gap = cluster_gap(vectors[q], vectors[rows])
            if gap is not None:
                right_gaps.append(gap)
    if not right_gaps:
        return None
    return float(np.quantile(right_gaps, give_up))


__all__ = ["GIVE_UP", "MEMBERS", "WITHIN", "cluster_gap", "member_rows", "outside_cluster", "tune_margin"]
