"""The stop rule: a mixture sequential probability ratio test (mSPRT) on the difference of two
failure rates, valid however often it is looked at.

Johari, Koomen, Pekelis & Walsh, "Always Valid Inference: Continuous Monitoring of A/B Tests",
Operations Research 70(3), 2022 (the test Optimizely runs): with the estimated difference
d = p_variant - p_baseline, its variance V = p_v(1-p_v)/n_v + p_b(1-p_b)/n_b and a normal mixture
of scale tau over the alternative, the likelihood ratio against "the difference is the margin m" is

    L = sqrt(V / (V + tau^2)) * exp(tau^2 (d - m)^2 / (2 V (V + tau^2)))

and stopping the first time d > m and L >= 1/alpha stops a variant that is not worse than the
baseline by more than m with probability at most alpha, over the whole experiment (Ville's
inequality). Equivalently the always-valid confidence interval for the difference is
d +- sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V))), and the rule stops when
its lower end is above m. V is estimated (the test is asymptotically valid); rates are smoothed
by half a failure so an arm with none so far has a variance, and nothing is stopped before each
arm has `min_requests`. `thrifty bench experiment` measures the false-stop rate on real data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StopDecision:
    stop: bool
    difference: float  # p_variant - p_baseline
    low: float  # the always-valid confidence interval for the difference
    high: float
    log_lr: float  # log of the mixture likelihood ratio against "difference = margin"
    reason: str


def _rate(failures: int, n: int) -> float:
    return (failures + 0.5) / (n + 1.0)


def decide(
    failures_v: int,
    n_v: int,
    failures_b: int,
    n_b: int,
    *,
    margin: float,
    alpha: float,
    tau: float,
    min_requests: int,
) -> StopDecision:
    if n_v < min_requests or n_b < min_requests:
        return StopDecision(
            False,
            0.0,
            -1.0,
            1.0,
            0.0,
            f"waiting for {min_requests} requests in each arm (variant {n_v}, baseline {n_b})",
        )
    p_v, p_b = _rate(failures_v, n_v), _rate(failures_b, n_b)
    d = failures_v / n_v - failures_b / n_b
    var = p_v * (1 - p_v) / n_v + p_b * (1 - p_b) / n_b
    t2 = tau * tau
    log_lr = 0.5 * math.log(var / (var + t2)) + t2 * (d - margin) ** 2 / (2 * var * (var + t2))
    half = math.sqrt(var * (var + t2) / t2 * (2 * math.log(1 / alpha) + math.log((var + t2) / var)))
    stop = d > margin and log_lr >= math.log(1 / alpha)
    if stop:
        reason = (
            f"failure rate {failures_v / n_v:.2%} vs baseline {failures_b / n_b:.2%}: worse by more than "
            f"{margin:.2%} (always-valid {1 - alpha:.0%} interval {d - half:+.2%} to {d + half:+.2%})"
        )
    else:
        reason = f"not shown worse by more than {margin:.2%} (interval {d - half:+.2%} to {d + half:+.2%})"
    return StopDecision(stop, d, d - half, d + half, log_lr, reason)


def stops_along(
    failures_v: Any,
    n_v: Any,
    failures_b: Any,
    n_b: Any,
    *,
    margin: float,
    alpha: float,
    tau: float,
    min_requests: int,
) -> Any:
    """`decide(...).stop` over numpy arrays of running counts (the simulation's fast path; the same
    arithmetic, tested against `decide`)."""
    import numpy as np

    fv, nv, fb, nb = (np.asarray(a, dtype=np.float64) for a in (failures_v, n_v, failures_b, n_b))
    ready = (nv >= min_requests) & (nb >= min_requests)
    nv1, nb1 = np.maximum(nv, 1.0), np.maximum(nb, 1.0)
    p_v, p_b = (fv + 0.5) / (nv + 1.0), (fb + 0.5) / (nb + 1.0)
    d = fv / nv1 - fb / nb1
    var = p_v * (1 - p_v) / nv1 + p_b * (1 - p_b) / nb1
    t2 = tau * tau
    log_lr = 0.5 * np.log(var / (var + t2)) + t2 * (d - margin) ** 2 / (2 * var * (var + t2))
    return ready & (d > margin) & (log_lr >= math.log(1 / alpha))


__all__ = ["StopDecision", "decide", "stops_along"]
