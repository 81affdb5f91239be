"""Out-of-fold gate scores: each training row scored by gates fitted on the other folds, so the
calibration sees scores like those of new prompts. Pure numpy-free Python over prepared rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from thrifty.routing.train.data import Row, id_bucket
from thrifty.routing.train.gate import Logistic, fit_logistic, parse, prompt_features, stage_features


@dataclass(frozen=True, slots=True)
class Prepared:
    """One training row as the gates and the calibration see it."""

    task: str
    x1: list[float]
    x2: list[float]
    xp: list[float]
    y1: float  # first cheap draft right
    y2: float  # the stage-2 accepted draft right
    agree: bool
    prompt_chars: int
    draft_chars: int
    ok1: bool
    ok2: bool
    ok_strong: bool  # the escalated answer right
    ok_ref: bool
    cost1: float
    cost2: float  # both cheap calls
    cost_strong: float  # both cheap calls and the strong one
    cost_ref: float
    fold: int
    ok_alone: bool = False  # the strong model's answer when it is called first and alone
    cost_alone: float = 0.0
    # The third cheap opinion (asked when the two drafts agree), if the ladder has one.
    x3: tuple[float, ...] = ()
    agree3: bool = False  # all three cheap drafts give one answer
    cost3: float = 0.0  # all three cheap calls
    cost_esc3: float = 0.0  # all three cheap calls and the strong one


def prepare(
    row: Row, ladder: tuple[str, str], strong: str, reference: str, folds: int, third: str | None = None
) -> Prepared:
    """A row as the gates see it: parsed drafts, features, what each outcome would be and cost."""
    c0, c1, cs = row.calls[ladder[0]], row.calls[ladder[1]], row.calls[strong]
    d0, d1, ds = parse(c0.output, row.task), parse(c1.output, row.task), parse(cs.output, row.task)
    x3: tuple[float, ...] = ()
    agree3, cost3 = False, 0.0
    if third is not None:
        c2 = row.calls[third]
        d2 = parse(c2.output, row.task)
        x3 = tuple(stage_features([d0, d1, d2], row.prompt))
        agree3 = d0.key is not None and d0.key == d1.key == d2.key
        cost3 = float(c0.cost + c1.cost + c2.cost)
    ok2 = c0.correct if d0.key is not None or d1.key is None else c1.correct
    ok_strong = cs.correct
    if ds.key is None and (d0.key is not None or d1.key is not None):
        ok_strong = c0.correct if d0.key is not None else c1.correct
    return Prepared(
        task=row.task,
        x1=stage_features([d0], row.prompt),
        x2=stage_features([d0, d1], row.prompt),
        xp=prompt_features(row.prompt),
        y1=float(c0.correct),
        y2=float(ok2),
        agree=d0.key is not None and d0.key == d1.key,
        prompt_chars=len(row.prompt),
        draft_chars=d0.length,
        ok1=c0.correct,
        ok2=ok2,
        ok_strong=ok_strong,
        ok_ref=row.calls[reference].correct,
        cost1=float(c0.cost),
        cost2=float(c0.cost + c1.cost),
        cost_strong=float(c0.cost + c1.cost + cs.cost),
        cost_ref=float(row.calls[reference].cost),
        fold=min(folds - 1, int(id_bucket(row.id, "gate-fold") * folds)),
        ok_alone=cs.correct,
        cost_alone=float(cs.cost),
        x3=x3,
        agree3=agree3,
        cost3=cost3,
        cost_esc3=cost3 + float(cs.cost),
    )


def second_scores(
    rows: Sequence[Prepared], train_i: Sequence[int], test_i: Sequence[int], l2: float
) -> list[float]:
    """Stage-2 P(right) of `test_i` from the agree and split gates fitted on `train_i`."""
    ag = fit_gate(rows, [i for i in train_i if rows[i].agree], "x2", "y2", l2)
    sp = fit_gate(rows, [i for i in train_i if not rows[i].agree], "x2", "y2", l2)
    return [(ag if rows[i].agree else sp).prob(rows[i].x2) for i in test_i]


def oof_second(rows: Sequence[Prepared], folds: int, l2: float) -> list[float]:
    """Out-of-fold stage-2 P(right): agree and split gates fitted without each row's fold."""
    out = [0.0] * len(rows)
    for f in range(folds):
        train_i = [i for i, r in enumerate(rows) if r.fold != f]
        test_i = [i for i, r in enumerate(rows) if r.fold == f]
        for i, v in zip(test_i, second_scores(rows, train_i, test_i, l2), strict=True):
            out[i] = v
    return out


def oof(rows: Sequence[Prepared], xs: str, ys: str, folds: int, l2: float) -> list[float]:
    """Out-of-fold P(right): each row scored by a gate fitted without its fold."""
    out = [0.0] * len(rows)
    for f in range(folds):
        train_i = [i for i, r in enumerate(rows) if r.fold != f]
        test_i = [i for i, r in enumerate(rows) if r.fold == f]
        if not test_i:
            continue
        model = fit_gate(rows, train_i, xs, ys, l2)
        for i in test_i:
            out[i] = model.prob(getattr(rows[i], xs))
    return out


def fit_gate(rows: Sequence[Prepared], idx: Sequence[int], xs: str, ys: str, l2: float) -> Logistic:
    x = [getattr(rows[i], xs) for i in idx]
    y = [getattr(rows[i], ys) for i in idx]
    if not y:  # e.g. no split at all in the data: an uninformed gate, P = 1/2
        x, y = [getattr(rows[0], xs)] * 2, [0.0, 1.0]
    elif len(set(y)) < 2:  # one class only: a constant model at that class's (smoothed) rate
        x, y = [*x, x[0]], [*y, 1.0 - y[0]]
    return fit_logistic(x, y, l2=l2)


def oof_subset(
    rows: Sequence[Prepared], idx: Sequence[int], xs: str, ys: str, folds: int, l2: float
) -> dict[int, float]:
    """Out-of-fold P(right) of the rows `idx`, each scored by a gate fitted on the others of `idx`
    outside its fold."""
    out: dict[int, float] = {}
    for f in range(folds):
        train_i = [i for i in idx if rows[i].fold != f]
        test_i = [i for i in idx if rows[i].fold == f]
        if not test_i or not train_i:
            continue
        model = fit_gate(rows, train_i, xs, ys, l2)
        out.update({i: model.prob(getattr(rows[i], xs)) for i in test_i})
    return out
