"""Per-partition thresholds that hold a stated wrong-hit bound on traffic the rule was never tuned on.

The shipped rule (``decision``) scores a lookup with a probability learned on Banking77; on another
domain that probability is miscalibrated, so a threshold fitted once offline cannot promise a
precision there. Each partition therefore keeps what live traffic says about its own scores:

* every lookup with a candidate answer counts in the score bin it fell in (``lookups``);
* verified outcomes per bin: sampled shadow calls on hits (``verify``), the free comparison of a
  miss's fresh answer with the candidate it was not served (a near miss), and user feedback.

Per bin the wrong rate has a Beta posterior (a weak prior centred on the shipped score's own
estimate). The wrong rate of serving everything at or above a cut is the lookup-weighted mix of the
bins above it; its variance gives an effective sample size and so a one-sided Wilson bound at the
route's confidence. Then, as vCache does per entry (Schroeder et al., ICLR 2026) but per partition
and over the rule's score instead of the raw cosine:

* **certified**: the lowest cut whose upper bound is within the error bound is the threshold. It may
  be below the shipped one (the threshold loosens after verified right answers) or above it;
* **learning**: no cut is certified yet: the shipped threshold, raised past every cut whose *lower*
  bound already exceeds the error bound (planted or detected wrong hits tighten it at once);
* **off**: even the highest cut is refuted: the partition stops answering paraphrases (repeats of a
  cached question are still served) and says so in ``thrifty cache stats``.

The sampling rate of verifications falls as the served region's evidence grows and jumps back up
after a detected wrong hit; a new corpus or prompt version is a new partition and starts afresh.

Pure: no I/O, no clock, no randomness (the caller draws).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

# Score bins on the logit of the rule's probability: scores that matter sit between 0.88 and 0.9995.
LOGIT_LOW = 2.0
LOGIT_STEP = 0.25
BINS = 28  # logit 2.0 .. 9.0; the last bin is open above
# Strength of the per-bin prior, in pseudo-observations: weak, so that evidence decides.
PRIOR_STRENGTH = 2.0
# After a detected wrong hit the sampling rate is back at its maximum, halving every this many hits.
ERROR_HALF_LIFE_HITS = 25.0

# Answers whose verified outcomes are kept per partition (those with the least evidence go first).
MAX_ANSWERS = 2000
# Pseudo-observations of an answer's prior (the partition's bound) in ``answer_threshold``.
ANSWER_PRIOR = 4.0

Status = Literal["learning", "certified", "off"]


def bin_of(score: float) -> int:
    """The bin of a probability score (scores below the first bin's edge fall in bin 0)."""
    if score >= 1.0:
        return BINS - 1
    if score <= 0.0:
        return 0
    logit = math.log(score / (1.0 - score))
    # The epsilon keeps a cut (``cut_score``) in the bin it opens despite rounding.
    return max(0, min(BINS - 1, math.floor((logit - LOGIT_LOW) / LOGIT_STEP + 1e-9)))


def cut_score(b: int) -> float:
    """The lowest probability score in bin ``b`` (the threshold that serves bins b and above)."""
    if b <= 0:
        return 0.0
    return 1.0 / (1.0 + math.exp(-(LOGIT_LOW + b * LOGIT_STEP)))


def _prior_wrong(b: int) -> float:
    """The shipped rule's own estimate of the wrong rate in bin ``b`` (its midpoint), bounded."""
    mid = LOGIT_LOW + (b + 0.5) * LOGIT_STEP
    return min(0.5, max(0.001, 1.0 / (1.0 + math.exp(mid))))


def wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Two one-sided Wilson bounds of a proportion ``p`` seen in ``n`` (effective) observations."""
    if n <= 0:
        return 0.0, 1.0
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n)))
    denom = 1 + z * z / n
    return max(0.0, (centre - spread) / denom), min(1.0, (centre + spread) / denom)


@dataclass(frozen=True, slots=True)
class Bound:
    """The verdict over one partition: what to serve above, how sure, how often to verify."""

    status: Status
    threshold: float  # probability score; +inf when paraphrases are off
    wrong_rate: float  # estimated wrong-hit share of the region served
    wrong_upper: float  # its upper confidence bound
    evidence: float  # effective observations behind the estimate


@dataclass(slots=True)
class PartitionState:
    """Counters of one partition; ``to_dict``/``from_dict`` for the store."""

    tenant_id: str
    route: str
    lookups: list[int] = field(default_factory=lambda: [0] * BINS)
    right: list[int] = field(default_factory=lambda: [0] * BINS)
    wrong: list[int] = field(default_factory=lambda: [0] * BINS)
    # For the stats.
    semantic_lookups: int = 0
    paraphrase_hits: int = 0
    repeat_hits: int = 0
    verifications: int = 0  # sampled shadow verifications that came back with a verdict
    verified_wrong: int = 0
    near_miss_checks: int = 0
    feedback: int = 0
    feedback_wrong: int = 0
    verify_cost_usd: Decimal = Decimal(0)
    saved_usd: Decimal = Decimal(0)
    hits_since_error: int = 10_000
    # Verified outcomes per served answer: [outcomes, wrong, wrong the scores expected] (see
    # ``answer_threshold``).
    answers: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "route": self.route,
            "lookups": self.lookups,
            "right": self.right,
            "wrong": self.wrong,
            "semantic_lookups": self.semantic_lookups,
            "paraphrase_hits": self.paraphrase_hits,
            "repeat_hits": self.repeat_hits,
            "verifications": self.verifications,
            "verified_wrong": self.verified_wrong,
            "near_miss_checks": self.near_miss_checks,
            "feedback": self.feedback,
            "feedback_wrong": self.feedback_wrong,
            "verify_cost_usd": str(self.verify_cost_usd),
            "saved_usd": str(self.saved_usd),
            "hits_since_error": self.hits_since_error,
            "answers": self.answers,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartitionState:
        def bins(key: str) -> list[int]:
            values = [int(v) for v in data.get(key, ())]
            return (values + [0] * BINS)[:BINS]

        return cls(
            tenant_id=str(data["tenant_id"]),
            route=str(data["route"]),
            lookups=bins("lookups"),
            right=bins("right"),
            wrong=bins("wrong"),
            semantic_lookups=int(data.get("semantic_lookups", 0)),
            paraphrase_hits=int(data.get("paraphrase_hits", 0)),
            repeat_hits=int(data.get("repeat_hits", 0)),
            verifications=int(data.get("verifications", 0)),
            verified_wrong=int(data.get("verified_wrong", 0)),
            near_miss_checks=int(data.get("near_miss_checks", 0)),
            feedback=int(data.get("feedback", 0)),
            feedback_wrong=int(data.get("feedback_wrong", 0)),
            verify_cost_usd=Decimal(str(data.get("verify_cost_usd", "0"))),
            saved_usd=Decimal(str(data.get("saved_usd", "0"))),
            hits_since_error=int(data.get("hits_since_error", 10_000)),
            answers={str(k): [float(x) for x in v] for k, v in dict(data.get("answers", {})).items()},
        )

    # -- what happened ------------------------------------------------------------------

    def looked_up(self, score: float) -> None:
        """A lookup whose best candidate scored ``score`` (hit or not)."""
        self.lookups[bin_of(score)] += 1

    def served(self, *, repeat: bool, saved: Decimal | None) -> None:
        if repeat:
            self.repeat_hits += 1
        else:
            self.paraphrase_hits += 1
            self.hits_since_error += 1
        if saved is not None:
            self.saved_usd += saved

    def observe(self, score: float, correct: bool, answer_id: str | None = None) -> None:
        """A verified outcome at ``score``: a shadow call, a near miss's fresh answer or feedback;
        ``answer_id``: the cached answer that was (or would have been) served."""
        b = bin_of(score)
        if correct:
            self.right[b] += 1
        else:
            self.wrong[b] += 1
            self.hits_since_error = 0
        if answer_id is not None:
            counts = self.answers.get(answer_id)
            if counts is None:
                if len(self.answers) >= MAX_ANSWERS:
                    # Bounded: forget the answer with the least evidence.
                    del self.answers[min(self.answers, key=lambda a: self.answers[a][0])]
                counts = self.answers[answer_id] = [0.0, 0.0, 0.0]
            counts[0] += 1
            counts[1] += not correct
            counts[2] += 1.0 - score


_COUNTERS = (
    "semantic_lookups",
    "paraphrase_hits",
    "repeat_hits",
    "verifications",
    "verified_wrong",
    "near_miss_checks",
    "feedback",
    "feedback_wrong",
    "verify_cost_usd",
    "saved_usd",
)


def merged(stored: PartitionState, local: PartitionState, base: PartitionState) -> PartitionState:
    """What several replicas learned of one partition, as one state: ``stored`` (the shared row)
    plus what this replica added since ``base`` (the row as it last read it). Every counter is a
    sum, so adding deltas loses nothing another replica wrote meanwhile; hits since the last error
    is the fewer of the stored count grown by this replica's hits and this replica's own."""
    out = PartitionState.from_dict(stored.to_dict())
    for name in ("lookups", "right", "wrong"):
        ours, was, into = getattr(local, name), getattr(base, name), getattr(out, name)
        for b in range(BINS):
            into[b] += ours[b] - was[b]
    for name in _COUNTERS:
        setattr(out, name, getattr(out, name) + getattr(local, name) - getattr(base, name))
    for answer, counts in local.answers.items():
        was_counts = base.answers.get(answer, [0.0, 0.0, 0.0])
        into_counts = out.answers.setdefault(answer, [0.0, 0.0, 0.0])
        for i in range(3):
            into_counts[i] += counts[i] - was_counts[i]
    while len(out.answers) > MAX_ANSWERS:
        del out.answers[min(out.answers, key=lambda a: out.answers[a][0])]
    grown = stored.hits_since_error + max(0, local.paraphrase_hits - base.paraphrase_hits)
    out.hits_since_error = min(grown, local.hits_since_error)
    return out


@dataclass(frozen=True, slots=True)
class Policy:
    """The route's verification settings, as the pure code needs them."""

    error_bound: float = 0.01
    z: float = 1.645
    min_rate: float = 0.02
    max_rate: float = 0.1
    # Verified observations in the served region at which the rate has halved.
    rate_half_at: float = 30.0


def estimate(state: PartitionState, b: int) -> tuple[float, float, float]:
    """What the verified outcomes say of serving bins ``b`` and above: (wrong rate, its variance,
    the share of the region's lookups that fell in bins without any verified outcome).

    Only bins with outcomes count, each weighted by its lookups: a bin never verified has nothing
    to say (its prior alone would let many empty bins look like evidence).
    """
    total = unseen = 0.0
    parts: list[tuple[float, float, float]] = []
    for i in range(b, BINS):
        weight = state.lookups[i] + 1e-3  # a bin never looked up weighs (almost) nothing
        total += weight
        n = state.right[i] + state.wrong[i]
        if not n:
            unseen += weight
            continue
        m = (PRIOR_STRENGTH * _prior_wrong(i) + state.wrong[i]) / (PRIOR_STRENGTH + n)
        parts.append((weight, m, m * (1 - m) / (PRIOR_STRENGTH + n + 1)))
    seen = total - unseen
    if not parts:
        return 0.0, 0.0, 1.0
    mean = sum(w * m for w, m, _ in parts) / seen
    var = sum((w / seen) ** 2 * v for w, _, v in parts)
    return mean, var, unseen / total


# The wrong rate assumed, for the bound, of the lookups in bins no verification has reached.
UNSEEN_WRONG = 0.5


def _cuts(state: PartitionState, z: float) -> list[tuple[float, float, float]]:
    """``(estimate, lower, upper)`` of the wrong rate of serving bins ``b`` and above, for every cut
    ``b`` at once (one pass from the top, as ``estimate`` per cut would give); the upper bound counts
    the unverified share at ``UNSEEN_WRONG``, the lower bound at nothing."""
    out: list[tuple[float, float, float]] = [(0.0, 0.0, 1.0)] * BINS
    total = unseen = sum_wm = sum_wwv = 0.0
    for i in range(BINS - 1, -1, -1):
        weight = state.lookups[i] + 1e-3
        total += weight
        n = state.right[i] + state.wrong[i]
        if n:
            m = (PRIOR_STRENGTH * _prior_wrong(i) + state.wrong[i]) / (PRIOR_STRENGTH + n)
            sum_wm += weight * m
            sum_wwv += weight * weight * m * (1 - m) / (PRIOR_STRENGTH + n + 1)
        else:
            unseen += weight
        seen = total - unseen
        if seen <= 0:
            continue
        mean, var, share = sum_wm / seen, sum_wwv / (seen * seen), unseen / total
        n_eff = mean * (1 - mean) / var if var > 0 else 0.0
        low, high = wilson(mean, n_eff, z)
        out[i] = (mean, low * (1 - share), high * (1 - share) + UNSEEN_WRONG * share)
    return out


def bound(state: PartitionState, shipped: float, policy: Policy) -> Bound:
    """Threshold and status of a partition whose shipped (learned, by size) threshold is ``shipped``."""
    top_observed = max((i for i in range(BINS) if state.right[i] + state.wrong[i]), default=-1)
    cuts = _cuts(state, policy.z)
    certified: int | None = None
    refuted: int | None = None  # the highest refuted cut
    for b in range(top_observed + 1):
        _, low, high = cuts[b]
        if certified is None and high <= policy.error_bound:
            certified = b
        if low > policy.error_bound:
            refuted = b
    if certified is not None:
        return _verdict(state, cuts, "certified", certified)
    if refuted is not None and refuted >= top_observed:
        # Even the best-scored hits verified are wrong too often: no cut can hold the bound.
        return _verdict(state, cuts, "off", refuted, math.inf)
    floor = cut_score(refuted + 1) if refuted is not None else 0.0
    threshold = max(shipped, floor)
    b = bin_of(threshold) if math.isfinite(threshold) else BINS - 1
    return _verdict(state, cuts, "learning", b, threshold)


def _verdict(
    state: PartitionState,
    cuts: list[tuple[float, float, float]],
    status: Status,
    b: int,
    threshold: float | None = None,
) -> Bound:
    mean, _, upper = cuts[b]
    return Bound(status, cut_score(b) if threshold is None else threshold, mean, upper, _evidence(state, b))


def answer_threshold(state: PartitionState, answer_id: str, threshold: float, policy: Policy) -> float:
    """The partition's threshold, raised for an answer whose verified outcomes are wrong far more
    often than their scores promised (the vCache idea, per answer rather than per entry).

    The questions near one cached answer can be of a neighbouring type nobody cached: the near
    misses and verifications attributed to that answer reveal it. The wrong outcomes are compared
    with the number its scores expected (the rule's own probability); when they exceed it beyond
    chance (a one-sided Poisson z bound), the odds the answer needs rise by their ratio.
    """
    counts = state.answers.get(answer_id)
    if counts is None or not math.isfinite(threshold) or not 0 < threshold < 1:
        return threshold
    _, wrong, expected = counts
    if wrong < 2 or wrong <= expected + policy.z * math.sqrt(expected) + 1:
        return threshold
    shift = math.log((wrong + 1) / (expected + 1))
    z = math.log(threshold / (1 - threshold)) + shift
    return 1.0 / (1.0 + math.exp(-z))


def _evidence(state: PartitionState, b: int) -> float:
    return float(sum(state.right[b:]) + sum(state.wrong[b:]))


def sample_rate(state: PartitionState, verdict: Bound, policy: Policy) -> float:
    """Share of paraphrase hits to verify now: high while little is known or after an error."""
    if verdict.status == "certified" and verdict.wrong_upper <= policy.error_bound / 2:
        base = policy.min_rate
    else:
        base = policy.max_rate * policy.rate_half_at / (policy.rate_half_at + verdict.evidence)
    after_error = policy.max_rate * 0.5 ** (state.hits_since_error / ERROR_HALF_LIFE_HITS)
    return float(max(policy.min_rate, min(policy.max_rate, max(base, after_error))))


__all__ = [
    "BINS",
    "Bound",
    "PartitionState",
    "Policy",
    "answer_threshold",
    "bin_of",
    "bound",
    "cut_score",
    "estimate",
    "merged",
    "sample_rate",
    "wilson",
]
