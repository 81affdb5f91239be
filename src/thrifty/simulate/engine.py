"""`thrifty simulate` as a library call: traffic and settings in, the savings stack out."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from thrifty.providers.replay import _jsonl_files
from thrifty.settings import Settings
from thrifty.simulate.layers import Step, stack_steps
from thrifty.simulate.run import (
    BatchedEmbedder,
    PreparedStep,
    StepRun,
    build_index,
    prepare_step,
    run_prepared,
)
from thrifty.simulate.stack import StackReport, build_stack
from thrifty.simulate.traffic import TrafficLine
from thrifty.tokens import TokenCounter

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


def simulate(
    candidate: Settings,
    lines: Sequence[TrafficLine],
    *,
    baseline: Settings | None = None,
    outputs: Sequence[str] = (),
    progress: Progress | None = None,
    workdir: Path | None = None,
) -> Simulation:
    steps = stack_steps(candidate, baseline)
    data = [*outputs, *_replay_data(candidate)]
    index = build_index(lines, data)
    embedder = None
    queries = _semantic_queries(steps, lines)
    if queries is not None:
        from thrifty.cache.semantic.stage import _default_embedder

        embedder = BatchedEmbedder(_default_embedder())
        advance = progress("embedding queries (batched)", len(set(queries))) if progress else None
        embedder.prepare(queries, advance)
    counter = TokenCounter()
    with tempfile.TemporaryDirectory(prefix="thrifty-simulate-", dir=workdir or _scratch()) as tmp:
        prepared: dict[int, PreparedStep] = {}
        for k, step in enumerate(steps):
            if not step.changed and k > 0:
                continue
            folder = Path(tmp) / f"step-{k}"
            folder.mkdir()
            if prepared:  # every step builds a gateway: its start-up warnings were said by the first
                logging.disable(logging.WARNING)
            try:
                prepared[k] = prepare_step(
                    step.settings,
                    lines,
                    index=index,
                    workdir=folder,
                    send_keys=step.send_idempotency_keys,
                    counter=counter,
                    embedder=embedder,
                )
            finally:
                logging.disable(logging.NOTSET)
        ticks = {k: progress(steps[k].title, len(lines)) if progress else None for k in prepared}
        done = asyncio.run(_run_all(prepared, lines, ticks))
    runs: list[StepRun] = []
    for k in range(len(steps)):
        runs.append(done[k] if k in done else runs[-1])
    report = build_stack(steps, runs, lines, correct_by_prompt=load_correctness(data) if data else None)
    report.seconds = {s.title: r.seconds for s, r in zip(steps, runs, strict=True) if s.changed}
    report.ledger_totals = {s.title: str(r.ledger_total) for s, r in zip(steps, runs, strict=True)}
    report.notes.extend(_caveats(candidate, lines, runs))
    return Simulation(steps, runs, report)


async def _run_all(
    prepared: dict[int, PreparedStep],
    lines: Sequence[TrafficLine],
    ticks: dict[int, Callable[[int], None] | None],
) -> dict[int, StepRun]:
    """The steps side by side on one event loop: each is sequential in itself (requests in recorded
    order), and while one waits on its store's threads the others go on."""

    def advance(k: int) -> Callable[[], None] | None:
        tick = ticks[k]
        return (lambda: tick(1)) if tick is not None else None

    results = await asyncio.gather(*(run_prepared(step, lines, advance(k)) for k, step in prepared.items()))
    return dict(zip(prepared, results, strict=True))


def _scratch() -> Path | None:
    """Memory-backed scratch space where there is one: each step's store is thrown away after it,
    and a replay makes several SQLite commits per request."""
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
