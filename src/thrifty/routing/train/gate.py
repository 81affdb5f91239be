"""What the gate sees: task-agnostic features of cheap drafts and of a prompt, and a logistic model.

A draft's features say how it answered, not what about: whether its JSON parsed, whether it gave
an answer and of what shape, how long it reasoned (relative to the prompt), whether it hedged or
corrected itself, and whether its answer appears in its own reasoning. Two drafts add whether
their answers agree. None of this names a task, so a gate trained on maths and code still reads a
new task's drafts the same way; how far to trust it there is the calibration's job.

Inference is plain Python (a dot product), so the gateway needs no numeric library. Fitting uses
numpy, imported only when training.
"""

from __future__ import annotations

import difflib
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from thrifty.routing.train.extract import extract_answer, first_json_object, normalise

_HEDGES = re.compile(
    r"\b(wait|however|actually|mistake|re-?evaluate|re-?calculate|re-?check|reconsider|assum\w*|"
    r"unclear|ambiguous|not possible|impossible|cannot|can't|approximately|error|incorrect|"
    r"let me|let's re|again|instead|correction|seems)\b",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"^-?\$?\d[\d,]*(\.\d+)?%?$")
_WORD = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]")


@dataclass(frozen=True, slots=True)
class Parsed:
    """A draft read once: its raw answer, normalised answer, and reasoning text."""

    answer: str | None
    key: str | None
    reasoning: str
    json_ok: bool
    length: int


def parse(output: str, task: str | None) -> Parsed:
    obj = first_json_object(output)
    answer = extract_answer(output, obj)
    if obj is None:
        reasoning, json_ok = output, False
    else:
        r = obj.get("reasoning")
        reasoning, json_ok = (r if isinstance(r, str) else str(r or "")), "answer" in obj
    return Parsed(answer, normalise(answer, task or ""), reasoning, json_ok, len(output))


DRAFT_FEATURES = (
    "has_answer",
    "json_ok",
    "log_reasoning",
    "log_reasoning_over_prompt",
    "log_answer_len",
    "answer_numeric",
    "answer_integer",
    "hedges",
    "answer_in_reasoning",
    "answer_in_prompt",
)


def draft_features(d: Parsed, prompt: str) -> list[float]:
    answer = (d.answer or "").strip()
    numeric = bool(_NUMBER.match(answer))
    integer = numeric and "." not in answer.rstrip("0").rstrip(".")
    reasoning_len = len(d.reasoning)
    prompt_len = len(prompt)
    hedges = len(_HEDGES.findall(d.reasoning))
    return [
        float(d.key is not None),
        float(d.json_ok),
        math.log1p(reasoning_len),
        math.log1p(reasoning_len) - math.log1p(prompt_len),
        math.log1p(len(answer)),
        float(numeric),
        float(integer),
        math.log1p(hedges),
        float(bool(answer) and answer in d.reasoning),
        float(bool(answer) and answer in prompt),
    ]


def stage_features(drafts: Sequence[Parsed], prompt: str) -> list[float]:
    """Features for a gate that has seen `drafts` (one, two or three cheap ones, in ladder order)."""
    out = draft_features(drafts[0], prompt)
    if len(drafts) >= 2:
        a, b = drafts[0], drafts[1]
        agree = a.key is not None and a.key == b.key
        a_ans, b_ans = (a.answer or "").strip(), (b.answer or "").strip()
        out += draft_features(b, prompt)
        out += [
            float(agree),
            float(agree) * out[2],
            float(a.key is None and b.key is None),
            # Near-agreement, and each answer turning up in the other's reasoning.
            difflib.SequenceMatcher(None, a.key or "", b.key or "").ratio() if not agree else 1.0,
            float(bool(b_ans) and b_ans in a.reasoning),
            float(bool(a_ans) and a_ans in b.reasoning),
        ]
    if len(drafts) >= 3:  # a third opinion, asked when the first two agree
        c = drafts[2]
        out += draft_features(c, prompt)
        out += [float(c.key is not None and c.key == drafts[0].key)]
    return out


# Prompt features for the classifier (no call made yet): a few shape numbers and hashed words.
PROMPT_BUCKETS = 256


def prompt_features(prompt: str) -> list[float]:
    words = _WORD.findall(prompt.lower())
    dense = [
        math.log1p(len(prompt)),
        math.log1p(sum(w.isdigit() for w in words)),
        math.log1p(prompt.count("\n")),
        float("def " in prompt or "return " in prompt),
    ]
    sparse = [0.0] * PROMPT_BUCKETS
    for w1, w2 in zip(words, [*words[1:], ""], strict=True):
        for tok in (w1, w1 + " " + w2):
            sparse[zlib.crc32(tok.encode()) % PROMPT_BUCKETS] += 1.0
    return dense + [math.log1p(v) for v in sparse]


@dataclass(frozen=True, slots=True)
class Logistic:
    """P(y = 1 | x) = sigmoid(bias + w . (x - mean) / scale)."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    def prob(self, x: Sequence[float]) -> float:
        if len(x) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} features, got {len(x)}")
        z = self.bias
        for v, m, s, w in zip(x, self.mean, self.scale, self.weights, strict=True):
            z += w * (v - m) / s
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def to_json(self) -> dict[str, Any]:
        r = _round
        return {
            "mean": [r(v) for v in self.mean],
            "scale": [r(v) for v in self.scale],
            "weights": [r(v) for v in self.weights],
            "bias": r(self.bias),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Logistic:
        return cls(
            tuple(float(v) for v in obj["mean"]),
            tuple(float(v) for v in obj["scale"]),
            tuple(float(v) for v in obj["weights"]),
            float(obj["bias"]),
        )


def _round(v: float) -> float:
    return float(f"{v:.6g}")


def fit_logistic(
    xs: Sequence[Sequence[float]], ys: Sequence[float], *, l2: float = 1.0, iters: int = 50
) -> Logistic:
    """L2-regularised logistic regression by Newton's method on standardised features.

    The model is rounded as it will be stored, so a loaded artifact predicts exactly as trained."""
    import numpy as np

    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError("no training rows for the gate")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    # A constant column's std comes out as ~1e-15, not 0; dividing by it turns the rounding of the
    # stored mean into a huge feature value (P(right) of 0 or 1 for every draft).
    scale[scale <= 1e-9 * np.maximum(1.0, np.abs(mean))] = 1.0
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 1e-6  # the bias is not shrunk
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    model = Logistic(
        tuple(float(v) for v in mean),
        tuple(float(v) for v in scale),
        tuple(float(v) for v in w[:-1]),
        float(w[-1]),
    )
    return Logistic.from_json(model.to_json())
