"""Training the router: learn its ladder, fit its gates, certify its thresholds.

The ladder (draft model, voter, strong model) is searched over every model the training data has
(``candidate_ladders``, then each candidate trained). Gate scores are out-of-fold (k folds over the
training rows); the lone-draft threshold is the cheapest rule whose quality over all seen tasks is
certified >= target_quality x the reference's at the stated confidence (``certify``); the median
choice of the old calibration (bootstrap medians, no certainty) is kept in the artifact's meta for
comparison. The fallback for unknown tasks is calibrated by scoring each training task with gates
fitted without it (see ``router`` for how the thresholds are used).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from thrifty.errors import InvalidData
from thrifty.routing.train.calibrate import (
    HeldOut,
    calibrate_bagged,
    calibrate_classifier,
    calibrate_unseen,
)
from thrifty.routing.train.candidates import Calibrated, finite_or_none, plain_rules, vote_cascades
from thrifty.routing.train.certify import (
    certified_ratio,
    certify_path,
    projected_costs,
    prompts_needed,
    z_score,
)
from thrifty.routing.train.data import Row
from thrifty.routing.train.ladders import LadderOption, candidate_ladders, pick_third, pool_models
from thrifty.routing.train.oof import Prepared, fit_gate, oof, oof_second, oof_subset, prepare, second_scores
from thrifty.routing.train.router import AGREE_BONUS, NEVER, Gate, Router, accept_score
from thrifty.routing.train.votes import ORDERINGS


def train(
    rows: Sequence[Row],
    *,
    reference: str = "gpt-4o-2024-08-06",
    target_quality: float = 0.99,
    confidence: float = 0.95,
    unseen_target: float = 1.0,
    unseen_margin: float = 0.01,
    unseen_tolerance: float = 0.02,
    ladder: tuple[str, str] | None = None,
    strong: str | None = None,
    candidates: int = 3,
    folds: int = 5,
    l2: float = 10.0,
    cost_aware: bool = True,
    grid: int = 60,
    bootstrap: int = 30,
    third: str | None = None,
    ask_third: bool = True,
    votes: bool | None = None,
    vote_share: float = 0.5,
    vote_ordering: str = "same",
) -> Router:
    """Learn the ladder and fit its gates on all rows; certify thresholds on out-of-fold scores.

    Without `ladder`, the `candidates` cheapest plain agreement cascades over the pool are each
    trained and certified, and the one whose certified rule is cheapest wins; each is certified at
    1 - (1 - confidence) / candidates, so that picking the best of them keeps the stated confidence.
    With `ask_third`, each ladder gets a third opinion (`third`, or ``pick_third``'s choice).
    With `votes` (default: when no `ladder` is given), per-task vote cascades
    (``votes.choose_votes``) compete too, at 1 - (1 - confidence) x `vote_share`; the ladders
    share the rest of the error budget. `vote_ordering` says which rows order their path
    ("same", "split", "crossfit": ``votes.choose_votes``)."""
    if not rows:
        raise InvalidData("no training rows")
    z_score(confidence)  # a bad confidence is refused before any work
    if vote_ordering not in ORDERINGS:
        raise InvalidData(f"vote ordering must be one of {', '.join(ORDERINGS)}, not {vote_ordering!r}")
    if ladder is not None:
        options = [LadderOption(ladder, strong or reference, 0.0, 0.0)]
    else:
        options = candidate_ladders(rows, reference, target_quality, candidates)
    if ask_third:
        options = [replace(o, third=third or pick_third(o, rows, reference, target_quality)) for o in options]
    # One more candidate: the plain agreement rules (no learned score) on the first ladder; and,
    # with `votes`, per-task vote cascades over the pool's cheap models. The error budget
    # 1 - confidence is split in advance (weighted Bonferroni): `vote_share` of it to the vote
    # cascades, the rest evenly over the ladders, so picking the cheapest keeps the confidence.
    alpha = 1.0 - confidence
    votes = ladder is None if votes is None else votes
    learned_alpha = alpha * (1.0 - vote_share) if votes else alpha
    level = 1.0 - learned_alpha / (len(options) + 1)
    fits = [
        _train_ladder(
            rows,
            o.ladder,
            o.strong,
            o.third,
            reference=reference,
            target_quality=target_quality,
            confidence=level,
            unseen_target=unseen_target,
            unseen_margin=unseen_margin,
            unseen_tolerance=unseen_tolerance,
            folds=folds,
            l2=l2,
            cost_aware=cost_aware,
            grid=grid,
            bootstrap=bootstrap,
        )
        for o in options
    ]
    fits.append(plain_rules(rows, fits[0].router, target_quality, level, folds))
    if votes:
        # The vote cascades end on the reference; the router under them (its unseen-task fallback
        # and classifier) is the best certified ladder that ends there too: a final model that is
        # only as good as the reference on the seen tasks may be far worse on an unseen one.
        own = [f for f in fits if f.router.strong == reference] or fits
        base = min(own, key=lambda f: (not f.certified, f.rel_cost if f.certified else -f.bound))
        fits.append(vote_cascades(rows, base.router, target_quality, 1.0 - alpha * vote_share, vote_ordering))
    best = min(fits, key=lambda f: (not f.certified, f.rel_cost if f.certified else -f.bound))
    searched = [
        {
            "rule": f.router.meta["certificate"].get("rule", "learned"),
            "ladder": list(f.router.ladder),
            "third": f.router.third,
            "strong": f.router.strong,
            "rel_cost": f.rel_cost,
            "bound": f.bound,
        }
        for f in fits
    ]
    meta = dict(best.router.meta)
    # The promise is at the confidence asked for; each candidate was tested at `level`.
    meta["certificate"] = {**meta["certificate"], "confidence": confidence, "per_ladder_level": level}
    meta["ladders_searched"] = searched
    meta["pool"] = pool_models(rows)
    return replace(best.router, meta=meta)


def _train_ladder(
    rows: Sequence[Row],
    ladder: tuple[str, str],
    strong: str,
    third: str | None,
    *,
    reference: str,
    target_quality: float,
    confidence: float,
    unseen_target: float,
    unseen_margin: float,
    unseen_tolerance: float,
    folds: int,
    l2: float,
    cost_aware: bool,
    grid: int,
    bootstrap: int,
) -> Calibrated:
    needed = (*ladder, strong, reference, *([third] if third else []))
    for row in rows:
        lacking = [m for m in needed if m not in row.calls]
        if lacking:
            raise InvalidData(
                f"training row {row.id!r} has no reply from {', '.join(lacking)}; every row needs "
                f"the cascade's models ({', '.join(dict.fromkeys(needed))})"
            )
    prep = [prepare(r, ladder, strong, reference, folds, third) for r in rows]
    tasks = sorted({p.task for p in prep})
    by_task = {t: [i for i, p in enumerate(prep) if p.task == t] for t in tasks}

    def first_scores(idx: Sequence[int], ps: Sequence[float], aware: bool = cost_aware) -> list[float]:
        return [
            accept_score(p, prep[i].prompt_chars, prep[i].draft_chars, cost_aware=aware)
            for i, p in zip(idx, ps, strict=True)
        ]

    every = range(len(prep))
    o1 = first_scores(every, oof(prep, "x1", "y1", folds, l2))
    op = oof(prep, "xp", "y1", folds, l2 * 30)
    # The certified rule: one path over every seen task's rows (cost-aware scores are comparable
    # across tasks), as the promise is quality over the mixture of seen tasks.
    o2p = oof_second(prep, folds, l2)
    o2_agree = [
        s if prep[i].agree else -math.inf for i, s in zip(every, first_scores(every, o2p), strict=True)
    ]
    # The third opinion: P(right) of an answer all three cheap drafts give, fitted on the rows where
    # the two drafts agree (the only ones that ask the third model), out of fold.
    agreeing = [i for i in every if prep[i].agree]
    o3 = [-math.inf] * len(prep)
    if third is not None:
        o3p = oof_subset(prep, agreeing, "x3", "y2", folds, l2)
        for i, s in zip(agreeing, first_scores(agreeing, [o3p[i] for i in agreeing]), strict=True):
            o3[i] = s if prep[i].agree3 else -math.inf
    third_stage = (
        (
            [p.agree for p in prep],
            o3,
            [p.ok2 for p in prep],
            [p.cost3 for p in prep],
            [p.cost_esc3 for p in prep],
        )
        if third is not None
        else None
    )
    points, chosen = certify_path(
        o1,
        o2_agree,
        [p.ok1 for p in prep],
        [p.ok2 for p in prep],
        [p.ok_strong for p in prep],
        [p.ok_alone for p in prep],
        [p.ok_ref for p in prep],
        [p.cost1 for p in prep],
        [p.cost2 for p in prep],
        [p.cost_strong for p in prep],
        [p.cost_alone for p in prep],
        target=target_quality,
        confidence=confidence,
        third=third_stage,
    )
    point = points[max(chosen, 0)]
    first = point.threshold if point.step >= 1 else NEVER
    # Agreements need the same score as lone drafts (AGREE_BONUS puts them in their own band).
    second = AGREE_BONUS + point.threshold if point.step >= 1 else NEVER
    n, ref_q = len(prep), float(sum(p.ok_ref for p in prep))
    ref_c = float(sum(p.cost_ref for p in prep)) or 1.0
    bound = certified_ratio(point.quality, point.both, ref_q, n, z_score(confidence))
    # What the promise costs in labels: the cheapest rule on the same path that measures the target
    # out of fold, how many prompts its certificate would need, and what 2x, 4x, 10x the labels
    # would let the path certify (projected from these rows' variance).
    z = z_score(confidence)
    reaching = [p for p in points if p.quality >= target_quality * ref_q - 1e-9]
    cheapest_point = min(reaching, key=lambda p: p.cost) if reaching else points[0]
    projection = [
        {"prompts": round(m), "rel_cost": c / ref_c, "quality": q / ref_q if ref_q else 0.0}
        for m, c, q in projected_costs(points, ref_q, n, target_quality, z, (2.0, 4.0, 10.0))
    ]
    # The median choice, for comparison: per-task thresholds, each the median over bootstrap
    # resamples of the cheapest pair reaching the target on the point estimate (no certainty).
    o2 = [
        s + (AGREE_BONUS if prep[i].agree else 0.0)
        for i, s in zip(every, first_scores(every, o2p), strict=True)
    ]
    median = calibrate_bagged(
        {t: [prep[i] for i in idx] for t, idx in by_task.items()},
        {t: [o1[i] for i in idx] for t, idx in by_task.items()},
        {t: [o2[i] for i in idx] for t, idx in by_task.items()},
        target_quality,
        grid=grid,
        rounds=bootstrap,
        min_second=AGREE_BONUS,
        max_second=AGREE_BONUS,
    )
    gates: dict[str, Gate] = {}
    escalation: dict[str, float] = {}
    for t, idx in by_task.items():
        sub = [prep[i] for i in idx]
        tc = calibrate_classifier(sub, [op[i] for i in idx], target_quality)
        gates[t] = Gate(first, second, tc, cost_aware, third=first if third is not None else NEVER)
        escalation[t] = _escalation_rate(
            [max(o1[i], o2_agree[i], o3[i]) for i in idx], point.threshold if point.step >= 1 else None
        )
    fallback, held_out_tasks = _fallback(
        prep, by_task, unseen_target + unseen_margin, unseen_tolerance, l2, third is not None
    )
    all_i = list(range(len(prep)))
    router = Router(
        reference=reference,
        target_quality=target_quality,
        ladder=ladder,
        strong=strong,
        first_gate=fit_gate(prep, all_i, "x1", "y1", l2),
        agree_gate=fit_gate(prep, [i for i in all_i if prep[i].agree], "x2", "y2", l2),
        split_gate=fit_gate(prep, [i for i in all_i if not prep[i].agree], "x2", "y2", l2),
        prompt_gate=fit_gate(prep, all_i, "xp", "y1", l2 * 30),
        gates=gates,
        fallback=fallback,
        third=third,
        third_gate=fit_gate(prep, agreeing, "x3", "y2", l2) if third is not None and agreeing else None,
        meta={
            "rows": {t: len(i) for t, i in by_task.items()},
            "folds": folds,
            "certificate": {
                "confidence": confidence,
                "target": target_quality,
                "certified": chosen >= 0,
                "bound": bound,
                "quality": point.quality / ref_q if ref_q else 0.0,
                "rel_cost": point.cost / ref_c,
                "prompts": n,
                "uncertified_path_rule": {
                    "rel_cost": cheapest_point.cost / ref_c,
                    "quality": cheapest_point.quality / ref_q if ref_q else 0.0,
                    "prompts_needed": finite_or_none(
                        prompts_needed(cheapest_point, ref_q, n, target_quality, z)
                    ),
                },
                "projection": projection,
            },
            # What each seen task escalated out of fold under the certified rule: the drift watch's
            # baseline (a live rate far from it means the traffic no longer looks like the labels).
            "escalation_rate": escalation,
            "median_gates": {
                t: Gate(m[0], m[1], gates[t].classifier, cost_aware).to_json() for t, m in median.items()
            },
            "unseen_calibrated_on": held_out_tasks,
        },
    )
    return Calibrated(router, point.cost / ref_c, bound, chosen >= 0 and bound >= target_quality - 1e-9)


def _escalation_rate(best: Sequence[float], threshold: float | None) -> float:
    """The share of rows the certified rule sends to the strong model (all, when threshold is None):
    those whose best score over the stages they reach is below the threshold."""
    if not best:
        return 0.0
    if threshold is None:
        return 1.0
    return sum(1 for b in best if b < threshold) / len(best)


def _fallback(
    prep: Sequence[Prepared],
    by_task: dict[str, list[int]],
    need: float,
    tolerance: float,
    l2: float,
    has_third: bool,
) -> tuple[Gate, list[str]]:
    """The gate for a task the router was not trained on: each training task scored by gates
    that never saw it (if there are other tasks)."""
    held_out: list[HeldOut] = []
    strictest_cls = 0.0
    names: list[str] = []
    for t, idx in by_task.items():
        others = [i for i, p in enumerate(prep) if p.task != t]
        sub = [prep[i] for i in idx]
        if not others:
            strictest_cls = NEVER
            continue
        names.append(t)
        gp = fit_gate(prep, others, "xp", "y1", l2 * 30)
        p3: list[float] | None = None
        if has_third:
            g3 = fit_gate(prep, [i for i in others if prep[i].agree], "x3", "y2", l2)
            p3 = [g3.prob(p.x3) for p in sub]
        held_out.append(HeldOut(sub, second_scores(prep, others, idx, l2), p3))
        strictest_cls = max(strictest_cls, calibrate_classifier(sub, [gp.prob(p.xp) for p in sub], need))
    # An unknown task never takes a lone draft, nor one the other cheap model contradicts; its
    # scores are plain P(right), as a new task's cost scale is unknown. With a single training
    # task there is no evidence of how a gate transfers, so the rule is one that needs no
    # calibration: any three-way agreement of the cheap models if there is a third opinion (cheap
    # models that agree in pairs are often wrong together on a task unlike the training one), else
    # any agreement.
    if not held_out:
        if has_third:
            return Gate(NEVER, NEVER, strictest_cls, cost_aware=False, third=0.0), names
        return Gate(NEVER, AGREE_BONUS, strictest_cls, cost_aware=False), names
    pair_p, third_p = calibrate_unseen(held_out, need, tolerance)
    second = NEVER if math.isinf(pair_p) else AGREE_BONUS + pair_p
    return Gate(NEVER, second, strictest_cls, cost_aware=False, third=third_p), names
