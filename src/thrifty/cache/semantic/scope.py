"""Out-of-scope lookups for tuning: questions of a kind the cache holds no answer for must miss.

Leave-one-out lookups always find the query's own intent in the cache, so a rule tuned on them
alone never sees the commonest wrong hit in a new domain: a question unlike any cached question
type that lands among the entries of a neighbouring one, with nothing nearby to disagree. Here a
random share of the intents is held out of the cache and their texts are looked up against the
rest; every served answer is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from thrifty.cache.semantic.decision import DecisionParams

if TYPE_CHECKING:
    from thrifty.cache.semantic.tune import Lookup

# Intents held out of the cache per draw, as a share of all intents.
HELD_OUT_SHARE = 0.2
QUERIES_PER_DRAW = 400


def out_of_scope_lookups(
    vectors: npt.NDArray[np.float32],
    labels: Sequence[str],
    texts: Sequence[str],
    count: int,
    rng: np.random.Generator,
    params: DecisionParams,
) -> list[tuple[int, Lookup]]:
    """``count`` lookups (query index, ``tune.Lookup``) of texts whose intent is held out of the cache."""
    from thrifty.cache.semantic.tune import _assess_rows, exact_neighbours

    intents = sorted(set(labels))
    label_arr = np.asarray(labels)
    out: list[tuple[int, Lookup]] = []
    if len(intents) < 3 or count <= 0:
        return out
    n_out = max(1, round(HELD_OUT_SHARE * len(intents)))
    while len(out) < count:
        held = set(rng.choice(intents, n_out, replace=False).tolist())
        is_held = np.isin(label_arr, list(held))
        cache = np.flatnonzero(~is_held)
        asked = rng.permutation(np.flatnonzero(is_held))[: min(QUERIES_PER_DRAW, count - len(out))]
        lists = exact_neighbours(
            vectors[asked], vectors[cache], [labels[int(i)] for i in cache], [texts[int(i)] for i in cache]
        )
        for i, lk in _assess_rows(
            [texts[int(i)] for i in asked], [labels[int(i)] for i in asked], lists, params
        ):
            out.append((int(asked[i]), lk))
    return out


__all__ = ["HELD_OUT_SHARE", "out_of_scope_lookups"]
