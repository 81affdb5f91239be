"""Demo phase: the savings stack. A day of the demo workload (scaled down) replayed offline through
every layer of a candidate's settings with `thrifty simulate`'s engine, layer by layer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from thrifty.settings import settings_from_mapping
from thrifty.simulate.engine import Progress, simulate
from thrifty.simulate.render import stack_notes, stack_table
from thrifty.simulate.stack import StackReport
from thrifty.simulate.traffic import read_traffic
from thrifty.simulate.workload import build_workload, demo_settings


def run_stack(
    workdir: Path,
    requests: int,
    shared: Path,
    print_fn: Callable[[Any], None],
    *,
    semantic: bool,
    progress: Progress | None = None,
) -> StackReport:
    work = build_workload(workdir / "traffic.jsonl", requests, shared=shared)
    print_fn(f"savings stack on the demo workload: {work.description}")
    config = demo_settings(work.outputs, candidate=True)
    if not semantic:
        config["routes"]["support"].pop("semantic_cache")
        print_fn("(semantic cache left out of the stack: the semantic extra is not installed)")
    read = read_traffic([work.path])
    report = simulate(
        settings_from_mapping(config, source="demo candidate"), read.lines, progress=progress
    ).report
    print_fn(
        stack_table(report, f"savings stack: {report.requests:,} requests through the candidate's pipeline")
    )
    for line in stack_notes(report):
        print_fn(f"  {line}")
    return report


__all__ = ["run_stack"]
