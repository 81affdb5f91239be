"""Which ladders are worth training: the pool's models, the plain agreement cascades ranked by
their measured cost at the target, and each ladder's third opinion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from thrifty.errors import InvalidData
from thrifty.routing.train.data import Row


def pool_models(rows: Sequence[Row]) -> list[str]:
    """The models every row has a (priced) reply from: the pool a router may be built over."""
    if not rows:
        return []
    common = set(rows[0].calls)
    for r in rows[1:]:
        common &= set(r.calls)
    return sorted(common)


@dataclass(frozen=True, slots=True)
class LadderOption:
    ladder: tuple[str, str]
    strong: str
    cost: float  # the agreement cascade's cost on the training rows (no learned gate yet)
    quality: float
    third: str | None = None  # the third opinion asked when the two drafts agree


def pick_third(option: LadderOption, rows: Sequence[Row], reference: str, target: float) -> str | None:
    """The third cheap model for a ladder: the one whose plain three-way cascade (ask it when the
    two drafts agree, accept when all three agree, else the strong model) is cheapest at the
    target on the training rows, else the best such cascade; None if no model is cheap enough or
    agrees often enough to save anything."""
    import numpy as np

    a, b = option.ladder
    strong = option.strong
    every = pool_models(rows)
    if any(m not in every for m in (a, b, strong, reference)):
        return None  # training names what is missing
    pool = [m for m in every if m not in (a, b, strong, reference)]
    cost = {m: np.array([float(r.calls[m].cost) for r in rows]) for m in [*pool, a, b, strong]}
    ref_q = sum(r.calls[reference].correct for r in rows)
    ka, kb = [r.calls[a].answer for r in rows], [r.calls[b].answer for r in rows]
    pair = np.array([x is not None and x == y for x, y in zip(ka, kb, strict=True)])
    right_a = np.array([r.calls[a].correct for r in rows], dtype=float)
    right_s = np.array([r.calls[strong].correct for r in rows], dtype=float)
    scored: list[tuple[float, float, str]] = []
    for m in pool:
        if cost[m].sum() >= 0.25 * cost[strong].sum():
            continue  # a third opinion that costs a quarter of the strong call saves little
        all3 = pair & np.array([r.calls[m].answer == x for r, x in zip(rows, ka, strict=True)])
        q = float(np.where(all3, right_a, right_s).sum())
        c = float((cost[a] + cost[b] + cost[m] * pair + cost[strong] * ~all3).sum())
        scored.append((q, c, m))
    # A third opinion is worth asking only if it saves on what it replaces: escalating every
    # agreement the gate is unsure of (a model that never agrees with the pair only adds its cost).
    escalate_all = float((cost[a] + cost[b] + cost[strong]).sum())
    scored = [t for t in scored if t[1] < escalate_all]
    if not scored:
        return None
    feasible = [t for t in scored if t[0] >= target * ref_q]
    return min(feasible, key=lambda t: t[1])[2] if feasible else max(scored, key=lambda t: (t[0], -t[1]))[2]


def candidate_ladders(rows: Sequence[Row], reference: str, target: float, limit: int) -> list[LadderOption]:
    """Ladders worth training, cheapest first: (draft, voter) -> strong, ranked by the plain
    agreement cascade (accept when the two cheap answers agree, else call the strong model) on the
    training rows. The learned gates only add cheaper acceptances on top, so a ladder whose plain
    cascade misses the target by much is not worth the folds. Strong candidates: the reference
    and any cheaper model at least as good as it on these rows."""
    import itertools

    import numpy as np

    pool = pool_models(rows)
    if reference not in pool:
        raise InvalidData(f"every training row needs a reply from the reference model {reference!r}")
    right = {m: np.array([r.calls[m].correct for r in rows], dtype=float) for m in pool}
    cost = {m: np.array([float(r.calls[m].cost) for r in rows]) for m in pool}
    keys = {m: [r.calls[m].answer for r in rows] for m in pool}
    ref_q, ref_c = right[reference].sum(), cost[reference].sum()
    strongs = [reference] + [
        m for m in pool if m != reference and right[m].sum() >= ref_q and cost[m].sum() < ref_c
    ]
    options: list[LadderOption] = []
    for strong in strongs:
        for a, b in itertools.permutations([m for m in pool if m != strong], 2):
            if cost[a].sum() + cost[b].sum() >= 0.5 * cost[strong].sum():
                continue  # two cheap calls that cost half the strong one cannot save much
            agree = np.array([x is not None and x == y for x, y in zip(keys[a], keys[b], strict=True)])
            q = float(np.where(agree, right[a], right[strong]).sum())
            c = float((cost[a] + cost[b]).sum() + cost[strong][~agree].sum())
            options.append(LadderOption((a, b), strong, c, q))
    if not options:
        raise InvalidData(
            "no two models in the training data are cheap enough next to a strong one to cascade; "
            f"the pool is {', '.join(pool)}"
        )
    feasible = sorted((o for o in options if o.quality >= target * ref_q), key=lambda o: o.cost)
    ranked = (feasible or sorted(options, key=lambda o: -o.quality))[:limit]
    if all(o.strong != reference for o in ranked):
        # A strong model other than the reference is only as good as it on these rows; keep the
        # cheapest ladder that ends on the reference itself, whose promise can always be certified.
        own = [o for o in (feasible or options) if o.strong == reference]
        ranked = [*ranked[: limit - 1], min(own, key=lambda o: o.cost)] if own else ranked
    return ranked
