"""The regression gate: does a candidate's eval result fall short of the baseline's? Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from thrifty.errors import InvalidData
from thrifty.evals.stats import paired_difference


@dataclass(frozen=True, slots=True)
class GateVerdict:
    passed: bool
    reasons: tuple[str, ...]  # why it failed (empty when it passed)
    notes: tuple[str, ...]  # the measured numbers either way


def _pick(results: Mapping[str, Any], model: str | None, which: str) -> str:
    models = list(results["models"])
    if model is not None:
        if model not in results["models"]:
            raise InvalidData(f"{which} results have no model {model!r} (they have: {', '.join(models)})")
        return model
    if len(models) != 1:
        raise InvalidData(
            f"{which} results hold {len(models)} models ({', '.join(models)}); "
            f"choose one with --{which}-model"
        )
    return str(models[0])


def gate(
    baseline: Mapping[str, Any],
    candidate: Mapping[str, Any],
    *,
    max_drop: float,
    confidence: float = 0.95,
    max_cost_ratio: float | None = None,
    baseline_model: str | None = None,
    candidate_model: str | None = None,
) -> GateVerdict:
    """Fails when the candidate's accuracy is lower than the baseline's by more than `max_drop`
    (a fraction: 0.01 is 1 point) with `confidence` (one-sided, paired on the shared items), or its
    cost per successful task exceeds the baseline's by more than `max_cost_ratio`."""
    if baseline.get("set_fingerprint") != candidate.get("set_fingerprint"):
        raise InvalidData(
            f"the results are of different golden sets (baseline {baseline.get('set')} "
            f"[{baseline.get('set_fingerprint')}], candidate {candidate.get('set')} "
            f"[{candidate.get('set_fingerprint')}]); run both on the same set"
        )
    b_name = _pick(baseline, baseline_model, "baseline")
    c_name = _pick(candidate, candidate_model, "candidate")
    b_items, c_items = baseline["items"][b_name], candidate["items"][c_name]
    shared = sorted(set(b_items) & set(c_items))
    if not shared:
        raise InvalidData("the baseline and candidate results share no scored items")
    # One-sided at `confidence`: the two-sided interval at 2c-1 has its upper end there.
    mean, _, upper = paired_difference(
        [b_items[i] for i in shared], [c_items[i] for i in shared], 2 * confidence - 1
    )
    reasons: list[str] = []
    notes = [
        f"{len(shared)} shared items: baseline {b_name} {sum(b_items[i] for i in shared) / len(shared):.1%}, "
        f"candidate {c_name} {sum(c_items[i] for i in shared) / len(shared):.1%}; "
        f"change {mean * 100:+.2f} pp (at {confidence:.0%} confidence at most {upper * 100:+.2f} pp)"
    ]
    if upper < -max_drop:
        reasons.append(
            f"quality dropped by more than {max_drop * 100:g} pp with {confidence:.0%} confidence "
            f"(change {mean * 100:+.2f} pp, at best {upper * 100:+.2f} pp)"
        )
    if max_cost_ratio is not None:
        b_cps = baseline["models"][b_name].get("cost_per_success_usd")
        c_cps = candidate["models"][c_name].get("cost_per_success_usd")
        if b_cps is None or c_cps is None:
            notes.append("cost per success not compared: a side has no successful (or no priced) task")
            if c_cps is None and b_cps is not None:
                reasons.append("the candidate has no successful task, so no cost per success")
        elif Decimal(b_cps) > 0:
            ratio = Decimal(c_cps) / Decimal(b_cps)
            notes.append(f"cost per success ${Decimal(b_cps):.6f} -> ${Decimal(c_cps):.6f} (x{ratio:.3f})")
            if ratio > Decimal(str(max_cost_ratio)):
                reasons.append(f"cost per successful task rose x{ratio:.3f}, more than x{max_cost_ratio:g}")
    return GateVerdict(not reasons, tuple(reasons), tuple(notes))


@dataclass(frozen=True, slots=True)
class Drift:
    model: str
    items: int  # items both runs scored
    baseline_rate: float
    rate: float


def pass_rate_drops(baseline: Mapping[str, Any], results: Mapping[str, Any], threshold: float) -> list[Drift]:
    """Models of `results` whose pass rate on the items the baseline also scored is lower than the
    baseline's by more than `threshold` (a fraction): model drift on a scheduled run."""
    if baseline.get("set_fingerprint") != results.get("set_fingerprint"):
        raise InvalidData(
            f"the --baseline results are of another golden set ({baseline.get('set')}); "
            "compare runs of the same set"
        )
    found = []
    for model, items in results["items"].items():
        before = baseline["items"].get(model)
        shared = sorted(set(items) & set(before or {}))
        if before is None or not shared:
            continue
        old = sum(before[i] for i in shared) / len(shared)
        new = sum(items[i] for i in shared) / len(shared)
        if old - new > threshold:
            found.append(Drift(model, len(shared), old, new))
    return found


def parse_points(text: str, option: str = "--max-drop") -> float:
    """'1pp', '1', '0.5pp' -> a fraction (0.01); '2%' is points too."""
    raw = text.strip().lower().removesuffix("pp").removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError as err:
        raise InvalidData(f"{option} {text!r} is not a number of points (e.g. 1pp)") from err
    if value < 0 or value > 100:
        raise InvalidData(f"{option} {text!r} must be between 0 and 100 points")
    return value / 100
