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

Status = Literal["learning", "certified", "off"]


def bin_of(score: float) -> int:
    """The bin of a probability score (scores below the first bin's edge fall in bin 0)."""
    if score >= 1.0:
        return BINS - 1
    if score <= 0.0:
        return 0
    logit = math.log(score / (1.0 - score))
    return max(0, min(BINS - 1, int((logit - LOGIT_LOW) // LOGIT_STEP)))


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

    def observe(self, score: float, correct: bool) -> None:
        """A verified outcome at ``score``: a shadow call, a near miss's fresh answer or feedback."""
        b = bin_of(score)
        if correct:
            self.right[b] += 1
        else:
            self.wrong[b] += 1
            self.hits_since_error = 0


@dataclass(frozen=True, slots=True)
class Policy:
    """The route's verification settings, as the pure code needs them."""

    error_bound: float = 0.01
    z: float = 1.645
    min_rate: float = 0.02
    max_rate: float = 0.3
    # Verified observations in the served region at which the rate has halved.
    rate_half_at: float = 30.0


def estimate(state: PartitionState, b: int) -> tuple[float, float, float]:
    """Wrong rate of serving bins ``b`` and above: (estimate, variance, lookups weighing it)."""
    total = 0.0
    mean = 0.0
    var = 0.0
    weights: list[tuple[float, float, float]] = []
    for i in range(b, BINS):
        weight = state.lookups[i] + 1e-3  # a bin never looked up still carries its prior, barely
        n = state.right[i] + state.wrong[i]
        m = (PRIOR_STRENGTH * _prior_wrong(i) + state.wrong[i]) / (PRIOR_STRENGTH + n)
        v = m * (1 - m) / (PRIOR_STRENGTH + n + 1)
        weights.append((weight, m, v))
        total += weight
    for weight, m, v in weights:
        share = weight / total
        mean += share * m
        var += share * share * v
    return mean, var, total


def bound(state: PartitionState, shipped: float, policy: Policy) -> Bound:
    """Threshold and status of a partition whose shipped (learned, by size) threshold is ``shipped``."""
    cuts: list[tuple[int, float, float, float]] = []  # bin, estimate, lower, upper
    for b in range(BINS):
        mean, var, _ = estimate(state, b)
        n_eff = mean * (1 - mean) / var if var > 0 else 0.0
        low, high = wilson(mean, n_eff, policy.z)
        cuts.append((b, mean, low, high))
    certified = [c for c in cuts if c[3] <= policy.error_bound]
    if certified:
        b, mean, _, high = certified[0]
        return Bound("certified", cut_score(b), mean, high, _evidence(state, b))
    refuted = [c for c in cuts if c[2] > policy.error_bound]
    if refuted and refuted[-1][0] == BINS - 1:
        b, mean, _, high = cuts[-1]
        return Bound("off", math.inf, mean, high, _evidence(state, b))
    floor = cut_score(refuted[-1][0] + 1) if refuted else 0.0
    threshold = max(shipped, floor)
    b = bin_of(threshold) if not math.isinf(threshold) else BINS - 1
    _, mean, _, high = cuts[b]
    return Bound("learning", threshold, mean, high, _evidence(state, b))


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
    "bin_of",
    "bound",
    "cut_score",
    "estimate",
    "sample_rate",
    "wilson",
]
