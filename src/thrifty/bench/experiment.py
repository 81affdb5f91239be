"""`thrifty bench experiment`: canaries simulated from recorded labelled outputs, to measure the
stop rule (experiments/stoprule.py) on real failure patterns.

Each simulated request is a prompt drawn from the recorded rows and a user hashed to the canary
with probability `share`; its outcome is the recorded label of the arm's model on that prompt.
The stop rule is looked at after every request (the most often anyone could look). Scenarios:

  no difference     the canary is the baseline model itself (A/A): every stop is a false stop
  planted drop      the baseline's labels with `drop` of all prompts (ones it got right) marked
                    wrong, chosen afresh each run: exactly `drop` points worse
  recorded variant  the variant model's own recorded labels (its real difference on these rows)

Reported per scenario: the share of runs stopped within the horizon (the false-stop rate for the
A/A scenario; target <= alpha) and the requests needed to stop (route total and canary only,
median and p90, over the runs that stopped).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from thrifty.errors import InvalidData
from thrifty.experiments.stoprule import stops_along


def load_labels(paths: Sequence[Path], baseline: str, variant: str) -> tuple[Any, Any]:
    """Per prompt (rows with both models): failure (1) or success (0) of each model."""
    import numpy as np

    base: list[int] = []
    var: list[int] = []
    files = [f for p in paths for f in (sorted(p.glob("*.jsonl")) if p.is_dir() else [p])]
    if not files:
        raise InvalidData(f"no ZeroEval JSONL files in {', '.join(map(str, paths))}")
    for f in files:
        for n, line in enumerate(f.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                responses = orjson.loads(line)["responses"]
                b, v = responses.get(baseline), responses.get(variant)
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise InvalidData(f"{f}:{n}: not a ZeroEval row ({err})") from err
            if b is not None and v is not None:
                base.append(0 if b["correct"] else 1)
                var.append(0 if v["correct"] else 1)
    if len(base) < 100:
        raise InvalidData(f"only {len(base)} rows have both {baseline!r} and {variant!r}; need 100 or more")
    return np.array(base, dtype=np.int8), np.array(var, dtype=np.int8)


def simulate(
    base_fail: Any,
    var_fail: Any | None,
    *,
    drop: float,
    share: float,
    runs: int,
    horizon: int,
    seed: int,
    rule: dict[str, Any],
) -> dict[str, Any]:
    """`var_fail` None: the planted scenario (`drop` > 0) or A/A (`drop` == 0) on the baseline."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = len(base_fail)
    right = np.flatnonzero(base_fail == 0)
    planted = round(drop * prompts)
    stopped_at: list[int] = []
    canary_at: list[int] = []
    for _ in range(runs):
        if var_fail is None:
            variant = base_fail.copy()
            if planted:
                variant[rng.choice(right, size=planted, replace=False)] = 1
        else:
            variant = var_fail
        on_canary = rng.random(horizon) < share
        asked = rng.integers(0, prompts, horizon)
        failed = np.where(on_canary, variant[asked], base_fail[asked]).astype(bool)
        n_v = np.cumsum(on_canary)
        n_b = np.arange(1, horizon + 1) - n_v
        f_v = np.cumsum(on_canary & failed)
        f_b = np.cumsum(~on_canary & failed)
        stop = stops_along(f_v, n_v, f_b, n_b, **rule)
        first = int(np.argmax(stop)) if stop.any() else -1
        if first >= 0:
            stopped_at.append(first + 1)
            canary_at.append(int(n_v[first]))

    def pct(values: list[int], p: float) -> int | None:
        return int(np.percentile(values, p, method="lower")) if values else None

    return {
        "runs": runs,
        "stopped": len(stopped_at),
        "stop_rate": len(stopped_at) / runs,
        "requests_to_stop_median": pct(stopped_at, 50),
        "requests_to_stop_p90": pct(stopped_at, 90),
        "canary_requests_to_stop_median": pct(canary_at, 50),
        "canary_requests_to_stop_p90": pct(canary_at, 90),
    }


def run_experiment_bench(
    data: Sequence[Path],
    *,
    baseline: str,
    variant: str,
    share: float,
    drop: float,
    runs: int,
    horizon: int,
    margin: float,
    alpha: float,
    tau: float,
    min_requests: int,
    seed: int,
    json_out: Path | None,
    console: Console,
) -> dict[str, Any]:
    from rich.table import Table

    if not 0 < share < 1:
        raise InvalidData("--share must be between 0 and 1 (0.1: a 10% canary)")
    if runs < 1 or horizon < min_requests * 2:
        raise InvalidData("--runs must be at least 1 and --horizon at least twice --min-requests")
    base_fail, var_fail = load_labels(data, baseline, variant)
    rule = {"margin": margin, "alpha": alpha, "tau": tau, "min_requests": min_requests}
    accuracy = 1 - float(base_fail.mean())
    scenarios = [
        ("no difference (A/A)", None, 0.0, 1 - float(base_fail.mean())),
        (
            f"planted {drop * 100:g}-point drop",
            None,
            drop,
            accuracy - round(drop * len(base_fail)) / len(base_fail),
        ),
        (f"recorded {variant}", var_fail, 0.0, 1 - float(var_fail.mean())),
    ]
    results = []
    for i, (name, fails, planted, var_accuracy) in enumerate(scenarios):
        found = simulate(
            base_fail, fails, drop=planted, share=share, runs=runs, horizon=horizon, seed=seed + i, rule=rule
        )
        results.append(
            {"scenario": name, "baseline_accuracy": accuracy, "variant_accuracy": var_accuracy, **found}
        )
    out = {
        "data": [str(p) for p in data],
        "prompts": len(base_fail),
        "baseline": baseline,
        "variant": variant,
        "share": share,
        "horizon": horizon,
        "rule": {**rule, "test": "mSPRT, normal mixture (Johari et al. 2022)", "looked_at": "every request"},
        "false_stop_rate": results[0]["stop_rate"],
        "false_stop_target": alpha,
        "scenarios": results,
    }
    table = Table(
        "scenario", "baseline acc", "variant acc", "stopped", "requests to stop (median / p90)",
        "canary requests (median / p90)",
        title=f"stop rule on {len(base_fail):,} recorded prompts, {share:.0%} canary, {runs} runs of "
        f"{horizon:,} requests (margin {margin * 100:g} pp, alpha {alpha:g})",
    )  # fmt: skip
    for r in results:
        table.add_row(
            r["scenario"],
            f"{r['baseline_accuracy']:.2%}",
            f"{r['variant_accuracy']:.2%}",
            f"{r['stop_rate']:.1%} of runs",
            _pair(r["requests_to_stop_median"], r["requests_to_stop_p90"]),
            _pair(r["canary_requests_to_stop_median"], r["canary_requests_to_stop_p90"]),
        )
    console.print(table)
    verdict = "within" if out["false_stop_rate"] <= alpha else "ABOVE"
    console.print(f"false-stop rate {out['false_stop_rate']:.1%} ({verdict} the target of {alpha:.0%})")
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
        console.print(f"results written to {json_out}")
    return out


def _pair(a: int | None, b: int | None) -> str:
    return "-" if a is None or b is None else f"{a:,} / {b:,}"


__all__ = ["load_labels", "run_experiment_bench", "simulate"]
