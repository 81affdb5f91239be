"""The trained router: a sequential, calibrated cascade over cheap drafts, with an online step API.

Cascade (the default strategy): call the first cheap model (mini); accept its lone draft if its
score clears the task's first threshold; else call the second (flash) and accept if the stage-2
score clears the second threshold; else call the strong model and return its answer. Easy prompts
cost one cheap call. Scores come from logistic gates over task-agnostic draft features (agreement
above all; gate.py), made cost-aware on known tasks: log(estimated escalation cost) - log P(wrong),
so a risk is taken more readily where escalating would cost more. At stage 2 every agreement
ranks above every split (AGREE_BONUS), so one threshold says "splits with score >= x" or
"agreements with score >= x". Training, by default, accepts every agreement and no split: which
agreement is wrong, or which side of a split is right, is barely predictable from the replies
(gate AUC ~0.5-0.6), and thresholds there fit calibration noise (`rank_agreements`,
`accept_splits` re-open those choices). The learned part that pays is the lone-draft gate.

Classifier (the other strategy): before any call, a logistic model over hashed prompt words
predicts whether mini will be right; the prompt goes to mini alone or to the strong model.

Calibration: gate scores are out-of-fold (k folds over the training rows); per-task thresholds
are the cheapest whose quality over all seen tasks is >= (target_quality + seen_margin) x the
reference's, each the median over bootstrap resamples. A task not in the artifact (or None) gets
the fallback: never a lone draft, never a split, agreements only above a P(right) bar chosen by
scoring each training task with gates fitted without it (worst case over those tasks), and
straight to the strong model if no bar is safe. So an unfamiliar task leans to the strong model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from thrifty.routing.train.cost import FLASH, GPT4O, MINI
from thrifty.routing.train.data import Row, id_bucket
from thrifty.routing.train.gate import (
    Logistic,
    Parsed,
    fit_logistic,
    parse,
    prompt_features,
    stage_features,
)
from thrifty.routing.train.policy import short_name
from thrifty.routing.train.step import Accept, CallModel, Draft, Step

FORMAT_VERSION = 2
NEVER = math.inf
STRATEGIES = ("cascade", "classifier")


@dataclass(frozen=True, slots=True)
class Gate:
    """Acceptance thresholds on P(right): after one cheap draft, after two, and for the
    classifier's pre-call choice. `NEVER` (inf; null in JSON) disables that acceptance."""

    first: float
    second: float
    classifier: float
    cost_aware: bool = True  # thresholds apply to `accept_score`, cost-aware or plain P(right)

    def to_json(self) -> dict[str, float | bool | None]:
        out: dict[str, float | bool | None] = {k: (None if math.isinf(v) else v) for k, v in _items(self)}
        out["cost_aware"] = self.cost_aware
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Gate:
        def val(k: str) -> float:
            v = obj[k]
            return NEVER if v is None else float(v)

        return cls(val("first"), val("second"), val("classifier"), bool(obj.get("cost_aware", True)))


def _items(g: Gate) -> list[tuple[str, float]]:
    return [("first", g.first), ("second", g.second), ("classifier", g.classifier)]


CAUTIOUS = Gate(NEVER, NEVER, NEVER)
# Stage-2 scores of agreeing drafts get this added, so every agreement ranks above every split.
AGREE_BONUS = 100.0


def accept_score(p: float, prompt_chars: int, draft_chars: int, *, cost_aware: bool) -> float:
    """How strongly to accept a cheap answer with P(right) = p; thresholds apply to this.

    Cost-aware, it is log(escalation cost) - log(P(wrong)): the same risk is worth taking where
    escalating would cost more. The strong call's cost is estimated from what is known before it
    is made, the prompt and the cheap draft's length (input and output priced 1:4, as most list
    prices are); only the ranking matters, so characters stand in for tokens."""
    if not cost_aware:
        return p
    return math.log(prompt_chars + 4.0 * draft_chars + 1.0) - math.log(max(1e-9, 1.0 - p))


def _rule(gate: Gate, score: float, agree: bool, passed: bool) -> str:
    """The stage-2 verdict in words: scores are compared within the agree or the split band."""
    t = gate.second
    name = "score" if gate.cost_aware else "p"
    if t >= AGREE_BONUS:
        if not agree:
            return "a split is never accepted here"
        if t == AGREE_BONUS:
            return "any agreement is accepted here"
        t -= AGREE_BONUS
    elif agree:
        return "any agreement is accepted here"
    return f"{name} {score:.3f} {'>=' if passed else '<'} {_fmt(t)}"


def _fmt(t: float) -> str:
    return "never" if math.isinf(t) else f"{t:.3f}"


@dataclass(frozen=True, slots=True)
class Router:
    reference: str
    target_quality: float
    ladder: tuple[str, str]  # the two cheap models, in call order
    strong: str
    first_gate: Logistic
    agree_gate: Logistic  # P(right) of an answer both cheap drafts give
    split_gate: Logistic  # P(the first draft is right) when the two disagree
    prompt_gate: Logistic
    gates: dict[str, Gate]
    fallback: Gate
    strategy: str = "cascade"
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- online API -------------------------------------------------------------------------
    def models(self) -> set[str]:
        """Every model id this router may ask the gateway to call."""
        return {*self.ladder, self.strong}

    def gate_for(self, task: str | None) -> Gate:
        return self.gates.get(task, self.fallback) if task is not None else self.fallback

    def known(self, task: str | None) -> bool:
        return task is not None and task in self.gates

    def draft_confidence(self, task: str | None, prompt: str, output: str) -> float:
        """P(a lone first-tier draft is right), from the prompt and the draft (a scorer gate)."""
        return self.first_gate.prob(stage_features([parse(output, task)], prompt))

    def next_step(self, task: str | None, prompt: str, drafts: Sequence[Draft]) -> Step:
        """The next call to make, or which draft to return. Pure: same inputs, same step."""
        gate = self.gate_for(task)
        where = f"task {task}" if self.known(task) else "unknown task, cautious"
        strong_at = [i for i, d in enumerate(drafts) if d.model == self.strong]
        parsed = {i: parse(d.output, task) for i, d in enumerate(drafts)}
        if strong_at:
            return self._final(strong_at[-1], parsed)
        if self.strategy == "classifier":
            return self._classify(gate, where, prompt, drafts)
        cheap = [next((i for i, d in enumerate(drafts) if d.model == m), None) for m in self.ladder]
        # Only a prefix of the ladder counts; a draft from elsewhere is kept but not voted.
        n = 0
        while n < len(cheap) and cheap[n] is not None:
            n += 1
        a, b = short_name(self.ladder[0]), short_name(self.ladder[1])
        if n == 0:
            if math.isinf(gate.first) and math.isinf(gate.second):
                # No cheap draft could ever be accepted here: asking for one would only add cost.
                return CallModel(self.strong, f"no cheap draft is trusted ({where})")
            return CallModel(self.ladder[0], f"first tier ({where})")
        if n == 1:
            i0 = cheap[0]
            assert i0 is not None
            p = self.first_gate.prob(stage_features([parsed[i0]], prompt))
            score = self._score(gate, p, prompt, parsed[i0])
            shown = f"p={p:.3f}" + (f", score {score:.3f}" if gate.cost_aware else "")
            if score >= gate.first:
                return Accept(i0, f"{a} draft trusted ({shown} >= {_fmt(gate.first)}, {where})")
            return CallModel(self.ladder[1], f"{a} unsure ({shown} < {_fmt(gate.first)}, {where}), ask {b}")
        i0, i1 = cheap[0], cheap[1]
        assert i0 is not None and i1 is not None
        d0, d1 = parsed[i0], parsed[i1]
        agree, p = self.second_p(d0, d1, prompt)
        score = self._score(gate, p, prompt, d0)
        verdict = f"{a} and {b} {'agree' if agree else 'disagree'}"
        if score + (AGREE_BONUS if agree else 0.0) >= gate.second:
            pick = i0 if d0.key is not None or d1.key is None else i1
            return Accept(pick, f"{verdict} (p={p:.3f}, {_rule(gate, score, agree, True)}, {where})")
        return CallModel(
            self.strong, f"{verdict} (p={p:.3f}, {_rule(gate, score, agree, False)}, {where}), escalate"
        )

    def second_p(self, d0: Parsed, d1: Parsed, prompt: str) -> tuple[bool, float]:
        """(do the two cheap drafts agree, P(the answer we would return is right))."""
        agree = d0.key is not None and d0.key == d1.key
        x = stage_features([d0, d1], prompt)
        return agree, (self.agree_gate if agree else self.split_gate).prob(x)

    @staticmethod
    def _score(gate: Gate, p: float, prompt: str, first: Parsed) -> float:
        return accept_score(p, len(prompt), first.length, cost_aware=gate.cost_aware)

    def _classify(self, gate: Gate, where: str, prompt: str, drafts: Sequence[Draft]) -> Step:
        if drafts:
            return Accept(len(drafts) - 1, f"classifier sent the prompt to {short_name(drafts[-1].model)}")
        p = self.prompt_gate.prob(prompt_features(prompt))
        if p >= gate.classifier:
            return CallModel(
                self.ladder[0], f"classifier: P({short_name(self.ladder[0])} right)={p:.3f} ({where})"
            )
        return CallModel(
            self.strong, f"classifier: P({short_name(self.ladder[0])} right)={p:.3f} too low ({where})"
        )

    def _final(self, strong_index: int, parsed: dict[int, Parsed]) -> Accept:
        """The strong model's draft, unless it gave no answer and a cheap draft did."""
        if parsed[strong_index].key is None:
            for i, d in parsed.items():
                if d.key is not None:
                    return Accept(i, f"{short_name(self.strong)} gave no answer; keep a cheap draft")
        return Accept(strong_index, f"escalated: {short_name(self.strong)} answers")

    def strong_score(self, row: Row) -> float:
        """How much the first cheap model's reply needs the strong model (1 - stage-1 P(right))."""
        d = parse(row.calls[self.ladder[0]].output, row.task)
        return 1.0 - self.first_gate.prob(stage_features([d], row.prompt))

    def with_strategy(self, strategy: str) -> Router:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}")
        return replace(self, strategy=strategy)

    def describe(self, task: str | None) -> str:
        g = self.gate_for(task)
        a, b, s = short_name(self.ladder[0]), short_name(self.ladder[1]), short_name(self.strong)
        name = "score" if g.cost_aware else "p"
        if math.isinf(g.second):
            second = "never"
        elif g.second == AGREE_BONUS:
            second = "any agreement"
        elif g.second > AGREE_BONUS:
            second = f"agreement with {name}>={_fmt(g.second - AGREE_BONUS)}"
        else:
            second = f"agreement, or a split with {name}>={_fmt(g.second)}"
        return (
            f"{a} alone if {name}>={_fmt(g.first)} → +{b}: {second} → {s}; "
            f"classifier: {a} if p>={_fmt(g.classifier)} else {s}"
        )

    # ---- artifact ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": "thrifty-router",
            "version": FORMAT_VERSION,
            "reference": self.reference,
            "target_quality": self.target_quality,
            "strategy": self.strategy,
            "ladder": list(self.ladder),
            "strong": self.strong,
            "gates": {t: g.to_json() for t, g in sorted(self.gates.items())},
            "fallback": self.fallback.to_json(),
            "first_gate": self.first_gate.to_json(),
            "agree_gate": self.agree_gate.to_json(),
            "split_gate": self.split_gate.to_json(),
            "prompt_gate": self.prompt_gate.to_json(),
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Router:
        if obj.get("format") != "thrifty-router" or obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a thrifty router artifact (version {FORMAT_VERSION})")
        ladder = tuple(str(m) for m in obj["ladder"])
        if len(ladder) != 2:
            raise ValueError("the router's ladder must name two cheap models")
        strategy = str(obj.get("strategy", "cascade"))
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        return cls(
            reference=str(obj["reference"]),
            target_quality=float(obj["target_quality"]),
            ladder=(ladder[0], ladder[1]),
            strong=str(obj["strong"]),
            first_gate=Logistic.from_json(obj["first_gate"]),
            agree_gate=Logistic.from_json(obj["agree_gate"]),
            split_gate=Logistic.from_json(obj["split_gate"]),
            prompt_gate=Logistic.from_json(obj["prompt_gate"]),
            gates={str(t): Gate.from_json(g) for t, g in obj["gates"].items()},
            fallback=Gate.from_json(obj["fallback"]),
            strategy=strategy,
            meta=dict(obj.get("meta", {})),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Router:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


# ---- training -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Prepared:
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


def _prepare(row: Row, ladder: tuple[str, str], strong: str, reference: str, folds: int) -> _Prepared:
    c0, c1, cs = row.calls[ladder[0]], row.calls[ladder[1]], row.calls[strong]
    d0, d1, ds = parse(c0.output, row.task), parse(c1.output, row.task), parse(cs.output, row.task)
    ok2 = c0.correct if d0.key is not None or d1.key is None else c1.correct
    ok_strong = cs.correct
    if ds.key is None and (d0.key is not None or d1.key is not None):
        ok_strong = c0.correct if d0.key is not None else c1.correct
    return _Prepared(
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
    )


def _second(
    rows: Sequence[_Prepared], train_i: Sequence[int], test_i: Sequence[int], l2: float
) -> list[float]:
    """Stage-2 P(right) of `test_i` from the agree and split gates fitted on `train_i`."""
    ag = _fit(rows, [i for i in train_i if rows[i].agree], "x2", "y2", l2)
    sp = _fit(rows, [i for i in train_i if not rows[i].agree], "x2", "y2", l2)
    return [(ag if rows[i].agree else sp).prob(rows[i].x2) for i in test_i]


def _oof2(rows: Sequence[_Prepared], folds: int, l2: float) -> list[float]:
    out = [0.0] * len(rows)
    for f in range(folds):
        train_i = [i for i, r in enumerate(rows) if r.fold != f]
        test_i = [i for i, r in enumerate(rows) if r.fold == f]
        for i, v in zip(test_i, _second(rows, train_i, test_i, l2), strict=True):
            out[i] = v
    return out


def _oof(rows: Sequence[_Prepared], xs: str, ys: str, folds: int, l2: float) -> list[float]:
    """Out-of-fold P(right): each row scored by a gate fitted without its fold."""
    out = [0.0] * len(rows)
    for f in range(folds):
        train_i = [i for i, r in enumerate(rows) if r.fold != f]
        test_i = [i for i, r in enumerate(rows) if r.fold == f]
        if not test_i:
            continue
        model = _fit(rows, train_i, xs, ys, l2)
        for i in test_i:
            out[i] = model.prob(getattr(rows[i], xs))
    return out


def _fit(rows: Sequence[_Prepared], idx: Sequence[int], xs: str, ys: str, l2: float) -> Logistic:
    x = [getattr(rows[i], xs) for i in idx]
    y = [getattr(rows[i], ys) for i in idx]
    if len(set(y)) < 2:  # one class only: a constant model at that class's (smoothed) rate
        y = [*y, 1.0 - y[0]] if y else [0.0, 1.0]
        x = [*x, x[0] if x else getattr(rows[0], xs)]
    return fit_logistic(x, y, l2=l2)


def _thresholds(ps: Sequence[float], n: int = 60) -> list[float]:
    vals = sorted(set(ps))
    if len(vals) > n:
        vals = [vals[round(k * (len(vals) - 1) / (n - 1))] for k in range(n)]
    return [*vals, NEVER]


@dataclass(frozen=True, slots=True)
class Point:
    """One threshold pair's outcome on calibration rows: cost in USD, quality in right answers."""

    cost: float
    quality: float
    first: float
    second: float


def frontier(
    rows: Sequence[_Prepared],
    p1: Sequence[float],
    p2: Sequence[float],
    *,
    first: bool,
    grid: int = 60,
    weights: Sequence[float] | None = None,
    min_second: float = -math.inf,
    max_second: float | None = None,
) -> list[Point]:
    """Every (first, second) threshold pair on a grid of score quantiles, with its cost and quality
    (each row counted `weights[i]` times, for bootstrap resamples)."""
    import numpy as np

    a1, a2 = np.asarray(p1, dtype=float), np.asarray(p2, dtype=float)
    w = np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=float)
    ok1 = np.array([r.ok1 for r in rows], dtype=float) * w
    ok2 = np.array([r.ok2 for r in rows], dtype=float) * w
    oks = np.array([r.ok_strong for r in rows], dtype=float) * w
    c1 = np.array([r.cost1 for r in rows]) * w
    c2 = np.array([r.cost2 for r in rows]) * w
    cs = np.array([r.cost_strong for r in rows]) * w
    out: list[Point] = []
    for t1 in _thresholds(p1, grid) if first else [NEVER]:
        acc1 = a1 >= t1
        for t2 in (
            [t for t in _thresholds(p2, grid) if t >= min_second] if max_second is None else [max_second]
        ):
            acc2 = ~acc1 & (a2 >= t2)
            esc = ~acc1 & ~acc2
            q = float((ok1 * acc1 + ok2 * acc2 + oks * esc).sum())
            c = float((c1 * acc1 + c2 * acc2 + cs * esc).sum())
            out.append(Point(c, q, t1, t2))
    return out


def cheapest(points: Sequence[Point], need: float) -> Point:
    """The cheapest point with quality >= need; if none, the best quality (cheapest among equals)."""
    ok = [p for p in points if p.quality >= need - 1e-9]
    if ok:
        return min(ok, key=lambda p: (p.cost, -p.quality))
    return max(points, key=lambda p: (p.quality, -p.cost))


def pareto(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both cost and quality, by increasing cost."""
    out: list[Point] = []
    for p in sorted(points, key=lambda p: (p.cost, -p.quality)):
        if not out or p.quality > out[-1].quality:
            out.append(p)
    return out


def calibrate_joint(frontiers: dict[str, list[Point]], need: float) -> dict[str, Point]:
    """One point per task, minimising total cost subject to total quality >= need (the metric is
    quality over the mixture of seen tasks): an exact merge of the tasks' Pareto fronts. If no
    combination reaches `need`, each task's best-quality point (cheapest among equals)."""
    combos: list[tuple[float, float, dict[str, Point]]] = [(0.0, 0.0, {})]  # (cost, quality, pick)
    for task, points in sorted(frontiers.items()):
        merged = [
            (c + p.cost, q + p.quality, {**sel, task: p}) for c, q, sel in combos for p in pareto(points)
        ]
        merged.sort(key=lambda m: (m[0], -m[1]))
        combos = []
        for m in merged:
            if not combos or m[1] > combos[-1][1]:
                combos.append(m)
    ok = [m for m in combos if m[1] >= need - 1e-9]
    if not ok:
        return {t: cheapest(ps, math.inf) for t, ps in frontiers.items()}
    return min(ok, key=lambda m: m[0])[2]


def calibrate_bagged(
    rows: dict[str, list[_Prepared]],
    s1: dict[str, list[float]],
    s2: dict[str, list[float]],
    target: float,
    *,
    grid: int = 60,
    rounds: int = 0,
    min_second: float = -math.inf,
    max_second: float | None = None,
) -> dict[str, tuple[float, float]]:
    """Per-task (first, second) thresholds meeting `target` x the reference's quality over all
    tasks at the least cost. With `rounds` > 0, the choice is repeated on bootstrap resamples of
    the rows (seeded, so training is deterministic) and each threshold is the median choice: the
    frontier is flat (a right answer more or less can move the cheapest point a long way), and
    the median is far steadier than one noisy argmin."""
    import numpy as np

    def once(weights: dict[str, list[float]] | None) -> dict[str, Point]:
        fronts = {
            t: frontier(
                rs,
                s1[t],
                s2[t],
                first=True,
                grid=grid,
                weights=None if weights is None else weights[t],
                min_second=min_second,
                max_second=max_second,
            )
            for t, rs in rows.items()
        }
        need = target * sum(
            float(np.dot([r.ok_ref for r in rs], weights[t]))
            if weights is not None
            else sum(r.ok_ref for r in rs)
            for t, rs in rows.items()
        )
        return calibrate_joint(fronts, need)

    if rounds <= 0:
        return {t: (p.first, p.second) for t, p in once(None).items()}
    rng = np.random.default_rng(7)
    picks = [
        once({t: [float(v) for v in rng.poisson(1.0, len(rs))] for t, rs in rows.items()})
        for _ in range(rounds)
    ]
    return {
        t: (float(np.median([p[t].first for p in picks])), float(np.median([p[t].second for p in picks])))
        for t in rows
    }


UNSEEN_GRID = (0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995)


def calibrate_unseen(
    held_out: Sequence[tuple[Sequence[_Prepared], Sequence[float]]], need: float, tolerance: float
) -> float:
    """The fallback's agreement threshold on P(right), from tasks each scored as if unseen.

    Worst case over those tasks: the cheapest threshold whose worst relative quality reaches
    `need`; if none does, the cheapest within `tolerance` of the best worst-case quality (chasing
    the last tenth of a point on one task can multiply the cost on another). NEVER if even
    escalating every prompt is not within reach."""
    options: list[tuple[float, float, float]] = []  # (threshold, worst quality, worst cost)
    for t in (*UNSEEN_GRID, NEVER):
        worst_q, worst_c = math.inf, 0.0
        for rows, ps in held_out:
            q = sum(r.ok2 if r.agree and p >= t else r.ok_strong for r, p in zip(rows, ps, strict=True))
            c = sum(r.cost2 if r.agree and p >= t else r.cost_strong for r, p in zip(rows, ps, strict=True))
            ref_q = sum(r.ok_ref for r in rows) or 1
            ref_c = sum(r.cost_ref for r in rows) or 1.0
            worst_q, worst_c = min(worst_q, q / ref_q), max(worst_c, c / ref_c)
        options.append((t, worst_q, worst_c))
    best = max(q for _, q, _ in options)
    floor = min(need, best - tolerance)
    return min((o for o in options if o[1] >= floor - 1e-12), key=lambda o: (o[2], -o[1]))[0]


def calibrate_classifier(rows: Sequence[_Prepared], p: Sequence[float], target: float) -> float:
    """The lowest P(cheap right) threshold (cheapest routing) reaching the target, else NEVER."""
    need = target * sum(r.ok_ref for r in rows)
    best = NEVER
    for t in sorted(_thresholds(p), reverse=True):
        q = sum(r.ok1 if pi >= t else r.ok_ref for r, pi in zip(rows, p, strict=True))
        if q >= need - 1e-9:
            best = t
    return best


def train(
    rows: Sequence[Row],
    *,
    reference: str = GPT4O,
    target_quality: float = 0.995,
    seen_margin: float = 0.005,
    unseen_target: float = 1.0,
    unseen_margin: float = 0.01,
    unseen_tolerance: float = 0.02,
    ladder: tuple[str, str] = (MINI, FLASH),
    strong: str | None = None,
    folds: int = 5,
    l2: float = 10.0,
    cost_aware: bool = True,
    grid: int = 60,
    bootstrap: int = 30,
    accept_splits: bool = False,
    rank_agreements: bool = False,
) -> Router:
    """Fit the gates on all rows; calibrate thresholds on out-of-fold scores, per task and across
    tasks for the unseen-task fallback."""
    if not rows:
        raise ValueError("no training rows")
    strong = strong or reference
    prep = [_prepare(r, ladder, strong, reference, folds) for r in rows]
    tasks = sorted({p.task for p in prep})
    by_task = {t: [i for i, p in enumerate(prep) if p.task == t] for t in tasks}

    def first_scores(idx: Sequence[int], ps: Sequence[float], aware: bool = cost_aware) -> list[float]:
        return [
            accept_score(p, prep[i].prompt_chars, prep[i].draft_chars, cost_aware=aware)
            for i, p in zip(idx, ps, strict=True)
        ]

    def second_scores(idx: Sequence[int], ps: Sequence[float], aware: bool = cost_aware) -> list[float]:
        return [
            s + (AGREE_BONUS if prep[i].agree else 0.0)
            for i, s in zip(idx, first_scores(idx, ps, aware), strict=True)
        ]

    every = range(len(prep))
    o1 = first_scores(every, _oof(prep, "x1", "y1", folds, l2))
    o2p = _oof2(prep, folds, l2)
    o2 = second_scores(every, o2p)
    op = _oof(prep, "xp", "y1", folds, l2 * 30)
    seen_need = target_quality + seen_margin
    chosen = calibrate_bagged(
        {t: [prep[i] for i in idx] for t, idx in by_task.items()},
        {t: [o1[i] for i in idx] for t, idx in by_task.items()},
        {t: [o2[i] for i in idx] for t, idx in by_task.items()},
        seen_need,
        grid=grid,
        rounds=bootstrap,
        min_second=-math.inf if accept_splits else AGREE_BONUS,
        max_second=None if rank_agreements else AGREE_BONUS,
    )
    gates: dict[str, Gate] = {}
    for t, idx in by_task.items():
        sub = [prep[i] for i in idx]
        tc = calibrate_classifier(sub, [op[i] for i in idx], seen_need)
        gates[t] = Gate(chosen[t][0], chosen[t][1], tc, cost_aware)
    # The fallback: each task scored by gates that never saw it (if there are other tasks).
    held_out: list[tuple[Sequence[_Prepared], Sequence[float]]] = []
    strictest_cls = 0.0
    unseen_need = unseen_target + unseen_margin
    for t, idx in by_task.items():
        others = [i for i, p in enumerate(prep) if p.task != t]
        sub = [prep[i] for i in idx]
        if not others:
            strictest_cls = NEVER
            continue
        gp = _fit(prep, others, "xp", "y1", l2 * 30)
        held_out.append((sub, _second(prep, others, idx, l2)))
        strictest_cls = max(
            strictest_cls, calibrate_classifier(sub, [gp.prob(p.xp) for p in sub], unseen_need)
        )
    # An unknown task never takes a lone draft, nor one the other cheap model contradicts; its
    # scores are plain P(right), as a new task's cost scale is unknown. With a single training
    # task there is no evidence of how a gate transfers, so any agreement is accepted: the one
    # rule that needs no calibration.
    agree_p = calibrate_unseen(held_out, unseen_need, unseen_tolerance) if held_out else 0.0
    fallback = Gate(NEVER, AGREE_BONUS + agree_p, strictest_cls, cost_aware=False)
    all_i = list(range(len(prep)))
    return Router(
        reference=reference,
        target_quality=target_quality,
        ladder=ladder,
        strong=strong,
        first_gate=_fit(prep, all_i, "x1", "y1", l2),
        agree_gate=_fit(prep, [i for i in all_i if prep[i].agree], "x2", "y2", l2),
        split_gate=_fit(prep, [i for i in all_i if not prep[i].agree], "x2", "y2", l2),
        prompt_gate=_fit(prep, all_i, "xp", "y1", l2 * 30),
        gates=gates,
        fallback=fallback,
        meta={"rows": {t: len(i) for t, i in by_task.items()}, "folds": folds},
    )
