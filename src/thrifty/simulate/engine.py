"""`thrifty simulate` as a library call: traffic and settings in, the savings stack out."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from thrifty.providers.replay import _jsonl_files
from thrifty.settings import Settings
from thrifty.simulate.layers import Step, stack_steps
from thrifty.simulate.parallel import ReplayJob, replay_steps
from thrifty.simulate.run import BatchedEmbedder, StepRun, build_index
from thrifty.simulate.stack import StackReport, answer_labels, build_stack
from thrifty.simulate.traffic import TrafficLine

Progress = Callable[[str, int], Callable[[int], None]]  # (task name, total) -> advance(n)


def load_correctness(paths: Iterable[str]) -> dict[str, dict[str, bool]]:
    """Labelled per-model outputs (ZeroEval rows): prompt -> upstream model -> answer correct."""
    found: dict[str, dict[str, bool]] = {}
    for file in _jsonl_files(paths, "--outputs"):
        with file.open("rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                row = orjson.loads(line)
                responses = row.get("responses") if isinstance(row, dict) else None
                if not isinstance(responses, dict) or not isinstance(row.get("prompt"), str):
                    continue
                marks = found.setdefault(row["prompt"], {})
                for model, rec in responses.items():
                    if isinstance(rec, dict) and rec.get("correct") in (0, 1, True, False):
                        marks[model] = bool(rec["correct"])
    return found


def _replay_data(settings: Settings) -> list[str]:
    """The candidate's own replay providers' data files: recorded outputs the replay may use too."""
    return [d for p in settings.providers.values() if p.kind == "replay" for d in p.data]


def _route_of(line: TrafficLine) -> str | None:
    if line.route:
        return line.route
    model = orjson.loads(line.request).get("model")
    return model.removeprefix("route:") if isinstance(model, str) and model.startswith("route:") else None


def _semantic_queries(steps: Sequence[Step], lines: Sequence[TrafficLine]) -> list[str] | None:
    from thrifty.cache.semantic.normalise import normalise
    from thrifty.cache.semantic.stage import last_user_text

    routes = {
        n
        for s in steps
        for n, r in s.settings.routes.items()
        if r.semantic_cache and r.semantic_cache.enabled
    }
    if not routes:
        return None
    texts = []
    for line in lines:
        if _route_of(line) in routes:
            text = last_user_text(orjson.loads(line.request))
            if text is not None:
                texts.append(normalise(text))
    return texts


@dataclass
class Simulation:
    steps: list[Step]
    runs: list[StepRun]
    report: StackReport
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds of each phase


def simulate(
    candidate: Settings,
    lines: Sequence[TrafficLine],
    *,
    baseline: Settings | None = None,
    outputs: Sequence[str] = (),
    progress: Progress | None = None,
    workdir: Path | None = None,
    workers: int | None = None,
) -> Simulation:
    """`workers`: how many steps replay at once, each in a process of its own (default: one per
    CPU; 1 replays them one after another in this process)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    steps = stack_steps(candidate, baseline)
    data = [*outputs, *_replay_data(candidate)]
    index = build_index(lines, data)
    timings["recorded answers indexed"] = time.perf_counter() - clock
    embedder = None
    queries = _semantic_queries(steps, lines)
    if queries is not None:
        clock = time.perf_counter()
        from thrifty.cache.semantic.stage import _default_embedder

        embedder = BatchedEmbedder(_default_embedder(), _default_embedder)
        advance = progress("embedding queries (batched)", len(set(queries))) if progress else None
        embedder.prepare(queries, advance)
        timings["queries embedded (batched)"] = time.perf_counter() - clock
    todo = [k for k, step in enumerate(steps) if step.changed or k == 0]
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="thrifty-simulate-", dir=workdir or _scratch()) as tmp:
        job = ReplayJob(steps, lines, index, embedder, answer_labels(lines), Path(tmp), todo[0])
        ticks = {k: progress(steps[k].title, len(lines)) if progress else None for k in todo}
        done = replay_steps(job, todo, ticks, workers)
    timings["steps replayed"] = time.perf_counter() - clock
    runs: list[StepRun] = []
    for k in range(len(steps)):
        runs.append(done[k] if k in done else runs[-1])
    report = build_stack(steps, runs, lines, correct_by_prompt=load_correctness(data) if data else None)
    report.seconds = {s.title: r.seconds for s, r in zip(steps, runs, strict=True) if s.changed}
    report.ledger_totals = {s.title: str(r.ledger_total) for s, r in zip(steps, runs, strict=True)}
    report.notes.extend(_caveats(candidate, lines, runs))
    return Simulation(steps, runs, report, timings)


def _scratch() -> Path | None:
    """Memory-backed scratch space where there is one: each step's batch store is thrown away."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def _caveats(candidate: Settings, lines: Sequence[TrafficLine], runs: Sequence[StepRun]) -> list[str]:
    notes = ["budgets and rate limits are left out: the replay measures cost, not limits"]
    if len(lines) > 1:
        span = lines[-1].ts - lines[0].ts
        ttls = [
            (f"routes.{n}.cache.ttl_s", r.cache.ttl_s)
            for n, r in candidate.routes.items()
            if r.cache is not None
        ] + [
            (f"routes.{n}.semantic_cache.ttl_s", r.semantic_cache.ttl_s)
            for n, r in candidate.routes.items()
            if r.semantic_cache is not None
        ]
        ttls.append(("idempotency.ttl_s", candidate.idempotency.ttl_s))
        short = [f"{name} = {ttl:g} s" for name, ttl in ttls if ttl < span]
        if short:
            notes.append(
                f"the traffic spans {span:,.0f} s, longer than {', '.join(short)}: the replay runs in "
                "minutes and does not expire entries by the recorded times, so those savings are upper bounds"
            )
    left = max((r.open_batch_items for r in runs), default=0)
    if left:
        notes.append(f"{left} deferred items were still open when the replay ended")
    return notes


__all__ = ["Simulation", "load_correctness", "simulate"]
