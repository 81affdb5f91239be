"""`thrifty bench experiment` on the shared ZeroEval rows (small run), and the simulation's
vectorised stop rule against the gateway's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from rich.console import Console

from thrifty.bench.experiment import run_experiment_bench
from thrifty.errors import InvalidData
from thrifty.experiments.stoprule import decide, stops_along

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing" / "zeroeval"
RULE = {"margin": 0.0, "alpha": 0.05, "tau": 0.02, "min_requests": 100}


def test_vectorised_rule_is_the_gateways_rule() -> None:
    rng = np.random.default_rng(3)
    n_v = rng.integers(50, 5000, 2000)
    n_b = rng.integers(50, 50_000, 2000)
    f_v = (n_v * rng.uniform(0, 0.2, 2000)).astype(int)
    f_b = (n_b * rng.uniform(0, 0.1, 2000)).astype(int)
    fast = stops_along(f_v, n_v, f_b, n_b, **RULE)
    slow = [
        decide(int(a), int(b), int(c), int(d), **RULE).stop
        for a, b, c, d in zip(f_v, n_v, f_b, n_b, strict=True)
    ]
    assert fast.tolist() == slow and 100 < sum(slow) < 1900


@pytest.mark.skipif(not DATA.is_dir(), reason="the shared ZeroEval data is not on this machine")
def test_bench_experiment_small_run(tmp_path: Path) -> None:
    out = tmp_path / "experiment.json"
    found = run_experiment_bench(
        [DATA], baseline="gpt-4o-2024-08-06", variant="gpt-4o-mini-2024-07-18", share=0.1, drop=0.02,
        runs=20, horizon=40_000, seed=1, json_out=out, console=Console(width=200), **RULE,
    )  # fmt: skip
    assert orjson.loads(out.read_bytes()) == found
    aa, planted, recorded = found["scenarios"]
    assert aa["baseline_accuracy"] == aa["variant_accuracy"] and aa["stop_rate"] <= 0.1
    assert round(planted["baseline_accuracy"] - planted["variant_accuracy"], 3) == 0.02
    assert planted["stop_rate"] >= 0.7 and recorded["stop_rate"] == 1.0
    assert recorded["requests_to_stop_median"] < planted["requests_to_stop_median"]
    assert planted["requests_to_stop_median"] <= planted["requests_to_stop_p90"]
    with pytest.raises(InvalidData, match="--share"):
        run_experiment_bench(
            [DATA], baseline="a", variant="b", share=1.5, drop=0.02, runs=1, horizon=1000, seed=1,
            json_out=None, console=Console(), **RULE,
        )  # fmt: skip
    with pytest.raises(InvalidData, match="only 0 rows"):
        run_experiment_bench(
            [DATA], baseline="nope", variant="b", share=0.1, drop=0.02, runs=1, horizon=1000, seed=1,
            json_out=None, console=Console(), **RULE,
        )  # fmt: skip
