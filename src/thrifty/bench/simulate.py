"""`thrifty bench simulate`: how long `thrifty simulate` takes on a day of the demo workload.

Builds the workload (`scripts/demo_workload.py`'s mix, `--requests` lines) unless one is given,
then runs the simulation as the command does (the candidate with every layer on, the labelled
ZeroEval outputs) and reports each phase's wall time, each step's requests per second and CPU,
the CPU of the whole run (this process and the step processes) and peak resident memory (this
process; the largest step process).
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import orjson
import yaml
from rich.console import Console
from rich.table import Table

from thrifty.settings import load_settings


def _cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _peak_mb() -> tuple[float, float]:
    # Linux reports ru_maxrss in KiB; RUSAGE_CHILDREN is the largest child waited for.
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_maxrss / 1024, kids.ru_maxrss / 1024


def run_simulate_bench(
    *,
    requests: int,
    workload: Path | None,
    shared: Path,
    workdir: Path,
    workers: int | None,
    json_out: Path | None,
    console: Console,
    progress: bool = True,
) -> dict[str, Any]:
    from thrifty.simulate.command import progress_bars
    from thrifty.simulate.engine import simulate
    from thrifty.simulate.render import stack_json
    from thrifty.simulate.traffic import read_traffic
    from thrifty.simulate.workload import build_workload, demo_settings

    phases: dict[str, float] = {}
    if workload is None:
        workload = workdir
        workload.mkdir(parents=True, exist_ok=True)
        clock = time.perf_counter()
        work = build_workload(workload / "traffic.jsonl", requests, shared=shared)
        outputs = [str(Path(o).resolve()) for o in work.outputs]
        (workload / "candidate.yaml").write_text(
            yaml.safe_dump(demo_settings(outputs, candidate=True), sort_keys=False)
        )
        phases["workload built"] = time.perf_counter() - clock
        described = work.description
    else:
        described = f"{workload / 'traffic.jsonl'} (given)"
    candidate = load_settings(workload / "candidate.yaml")
    outputs = [d for p in candidate.providers.values() if p.kind == "replay" for d in p.data]
    started_cpu = _cpu()
    clock = time.perf_counter()
    read = read_traffic([workload / "traffic.jsonl"])
    phases["traffic read"] = time.perf_counter() - clock
    clock = time.perf_counter()
    with progress_bars(progress) as bars:
        sim = simulate(candidate, read.lines, progress=bars, workers=workers)
    total_s = time.perf_counter() - clock
    phases.update(sim.timings)
    me, kids = _cpu()
    cpu_s = (me - started_cpu[0]) + (kids - started_cpu[1])
    peak_self, peak_child = _peak_mb()
    n = len(read.lines)
    steps = []
    for step, run in zip(sim.steps, sim.runs, strict=True):
        if not step.changed:
            continue
        steps.append(
            {
                "step": step.title,
                "requests": n,
                "seconds": round(run.seconds, 2),
                "requests_per_s": round(n / run.seconds, 1) if run.seconds else None,
                "cpu_seconds": round(run.cpu_seconds, 2),
                "cpu_us_per_request": round(run.cpu_seconds / n * 1e6) if n else None,
            }
        )
    report: dict[str, Any] = {
        "workload": described,
        "requests": n,
        "steps_replayed": len(steps),
        "requests_through_the_pipeline": n * len(steps),
        "workers": workers or os.cpu_count(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "simulate_wall_s": round(total_s, 2),
        "simulate_cpu_s": round(cpu_s, 2),
        "peak_rss_mb": {"this_process": round(peak_self), "largest_step_process": round(peak_child)},
        "steps": steps,
        "baseline_usd": str(sim.report.baseline_cost),
        "candidate_usd": str(sim.report.final_cost),
        "stack": stack_json(sim.report),  # what `thrifty simulate --json` writes
    }
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    _print(report, console)
    return report


def _print(report: dict[str, Any], console: Console) -> None:
    console.print(
        f"thrifty bench simulate: {report['workload']}; {report['cpus']} CPUs, "
        f"{report['workers']} step processes, load avg {report['load_average'][0]}",
        markup=False,
        highlight=False,
    )
    table = Table()
    for col in ("step", "requests", "wall s", "req/s", "CPU s", "CPU µs/req"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for s in report["steps"]:
        table.add_row(
            s["step"],
            f"{s['requests']:,}",
            f"{s['seconds']:.1f}",
            f"{s['requests_per_s']:,.0f}",
            f"{s['cpu_seconds']:.1f}",
            f"{s['cpu_us_per_request']:,}",
        )
    console.print(table)
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in report["phases_s"].items())
    console.print(f"phases (wall): {phases}", markup=False, highlight=False)
    peak = report["peak_rss_mb"]
    console.print(
        f"simulate: {report['requests']:,} requests x {report['steps_replayed']} steps in "
        f"{report['simulate_wall_s'] / 60:.1f} min wall, {report['simulate_cpu_s'] / 60:.1f} min CPU; "
        f"peak RSS {peak['this_process']:,} MB (this process), {peak['largest_step_process']:,} MB "
        f"(largest step process); baseline ${report['baseline_usd']} -> candidate ${report['candidate_usd']}",
        markup=False,
        highlight=False,
    )


__all__ = ["run_simulate_bench"]
