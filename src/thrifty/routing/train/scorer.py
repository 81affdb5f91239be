"""A small learned answer scorer: P(the cheap models' majority answer is right | how they voted).

Features are deliberately task-agnostic (agreement counts, which model agreed, how long the
replies and the answer are) so that a scorer trained on one task still ranks prompts of another
sensibly. Logistic regression in plain Python: a few thousand rows and a dozen features need no
numeric library, and the artifact stays a handful of JSON numbers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from thrifty.routing.train.data import Row


def majority(row: Row, models: Sequence[str]) -> tuple[str | None, int]:
    """(most common answer, index of the first model giving it); ties go to the earlier model,
    so list the models most trusted first."""
    answers = [row.calls[m].answer for m in models]
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None, 0
    best = max(votes.values())
    for i, a in enumerate(answers):
        if a is not None and votes[a] == best:
            return a, i
    raise AssertionError("unreachable: a counted answer was not found")


def features(row: Row, models: Sequence[str], anchored: bool = False) -> list[float]:
    """Agreement features around the majority answer, or, `anchored`, around the first model's
    answer (to judge that one model's reply, as the weak/strong PGR ranking needs)."""
    answers = [row.calls[m].answer for m in models]
    top = answers[0] if anchored else majority(row, models)[0]
    n = len(models)
    agree = [1.0 if a is not None and a == top else 0.0 for a in answers]
    distinct = len({a for a in answers if a is not None})
    missing = sum(a is None for a in answers)
    out_tokens = [row.calls[m].output_tokens for m in models]
    return [
        sum(agree) / n,
        float(sum(agree) == n),
        distinct / n,
        missing / n,
        *agree,
        math.log1p(len(top or "")),
        # Long replies mean the models struggled; relative length keeps the feature task-agnostic.
        math.log1p(max(out_tokens)) - math.log1p(min(out_tokens)),
    ]


@dataclass(frozen=True, slots=True)
class Scorer:
    models: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    anchored: bool = False

    def score(self, row: Row) -> float:
        x = features(row, self.models, self.anchored)
        z = self.bias + sum(
            w * (v - m) / s for w, v, m, s in zip(self.weights, x, self.mean, self.scale, strict=True)
        )
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def to_json(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "bias": self.bias,
            "anchored": self.anchored,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Scorer:
        return cls(
            models=tuple(str(m) for m in obj["models"]),
            mean=tuple(float(v) for v in obj["mean"]),
            scale=tuple(float(v) for v in obj["scale"]),
            weights=tuple(float(v) for v in obj["weights"]),
            bias=float(obj["bias"]),
            anchored=bool(obj.get("anchored", False)),
        )


def fit_scorer(
    rows: Sequence[Row],
    models: Sequence[str],
    *,
    anchored: bool = False,
    l2: float = 1e-2,
    epochs: int = 300,
    lr: float = 0.5,
) -> Scorer:
    """Fit P(answer correct) by full-batch gradient descent on standardised features; the answer is
    the majority's, or the first model's when `anchored`."""
    xs = [features(r, models, anchored) for r in rows]
    ys = []
    for r in rows:
        top, idx = (r.calls[models[0]].answer, 0) if anchored else majority(r, models)
        ys.append(1.0 if top is not None and r.calls[models[idx]].correct else 0.0)
    dim = len(xs[0]) if xs else 4 + len(models) + 2
    mean = [sum(x[j] for x in xs) / max(1, len(xs)) for j in range(dim)]
    scale = []
    for j in range(dim):
        var = sum((x[j] - mean[j]) ** 2 for x in xs) / max(1, len(xs))
        scale.append(math.sqrt(var) or 1.0)  # a constant feature gets weight 0 anyway
    zs = [[(x[j] - mean[j]) / scale[j] for j in range(dim)] for x in xs]
    w = [0.0] * dim
    b = 0.0
    n = max(1, len(zs))
    for _ in range(epochs):
        gw = [l2 * wj for wj in w]
        gb = 0.0
        for z, y in zip(zs, ys, strict=True):
            t = b + sum(wj * zj for wj, zj in zip(w, z, strict=True))
            p = 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, t))))
            err = (p - y) / n
            gb += err
            for j in range(dim):
                gw[j] += err * z[j]
        w = [wj - lr * g for wj, g in zip(w, gw, strict=True)]
        b -= lr * gb
    return Scorer(tuple(models), tuple(mean), tuple(scale), tuple(w), b, anchored)
