"""The steps of a simulation side by side: each in a process of its own, as many at once as CPUs.

Steps share nothing (each is its own gateway over its own stores), so running them apart changes
no result; within a step the requests go in recorded order, one at a time, because what a layer
does to a request depends on what came before it (cache entries, idempotency records, a chat's
history, the batch queue). Once the stores are in memory a step is CPU work in one interpreter,
and concurrency inside it would only interleave that work: processes are what use a second core.

The children are forked, so the traffic, the recorded answers and the embedded queries are not
copied or pickled on the way in; each child sends progress ticks and finally its `StepRun` back
through a pipe. Where fork is not available (or with one worker) the steps run here, in turn.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.providers.replay import RecordingIndex
from thrifty.simulate.layers import Step
from thrifty.simulate.run import BatchedEmbedder, MemoTokenCounter, StepRun, prepare_step, run_prepared
from thrifty.simulate.traffic import TrafficLine
from thrifty.tokens import TokenCounter

Tick = Callable[[int], None]
_TICK_EVERY = 250  # lines between progress messages from a child


class SimulationFailed(ThriftyError):
    """A step's replay died (its process was killed, or the pipeline raised)."""


@dataclass
class ReplayJob:
    steps: Sequence[Step]
    lines: Sequence[TrafficLine]
    index: RecordingIndex
    embedder: BatchedEmbedder | None
    labels: Mapping[str, str]  # recorded answer text -> label
    workdir: Path
    first: int  # the step whose start-up warnings are said (the others would repeat them)
    counter: TokenCounter = field(default_factory=MemoTokenCounter)  # the replay providers' counts


def replay_one(job: ReplayJob, k: int, tick: Tick | None) -> StepRun:
    """Step `k`'s replay in this process."""
    folder = job.workdir / f"step-{k}"
    folder.mkdir(exist_ok=True)
    step = job.steps[k]
    if k != job.first:  # every step builds and starts a gateway: the first says its warnings
        logging.disable(logging.WARNING)
    try:
        prepared = prepare_step(
            step.settings,
            job.lines,
            index=job.index,
            workdir=folder,
            send_keys=step.send_idempotency_keys,
            counter=job.counter,
            embedder=job.embedder,
        )
        advance = (lambda: tick(1)) if tick is not None else None
        return asyncio.run(run_prepared(prepared, job.lines, advance, job.labels))
    finally:
        logging.disable(logging.NOTSET)


def _child(job: ReplayJob, k: int, conn: Connection) -> None:
    seen = 0

    def tick(n: int) -> None:
        nonlocal seen
        seen += n
        if seen >= _TICK_EVERY:
            conn.send(("tick", seen))
            seen = 0

    try:
        run = replay_one(job, k, tick)
        if seen:
            conn.send(("tick", seen))
        conn.send(("done", run))
    except BaseException:  # noqa: BLE001 - said to the parent, which fails the simulation
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _fork() -> Any:
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def replay_steps(
    job: ReplayJob, todo: Sequence[int], ticks: Mapping[int, Tick | None], workers: int | None = None
) -> dict[int, StepRun]:
    """Each step of `todo` replayed; at most `workers` at once (default: the CPUs)."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    ctx = _fork()
    if workers == 1 or ctx is None:
        return {k: replay_one(job, k, ticks.get(k)) for k in todo}
    results: dict[int, StepRun] = {}
    waiting = list(todo)
    running: dict[Connection, tuple[int, Any]] = {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                k = waiting.pop(0)
                reader, writer = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_child, args=(job, k, writer), name=f"thrifty-simulate-{k}")
                process.start()
                writer.close()
                running[reader] = (k, process)
            for reader in wait(list(running)):
                assert isinstance(reader, Connection)
                k, process = running[reader]
                try:
                    kind, value = reader.recv()
                except EOFError:
                    process.join()
                    raise SimulationFailed(
                        f"the replay of step {job.steps[k].title!r} ended without a result "
                        f"(exit code {process.exitcode}; out of memory?)"
                    ) from None
                if kind == "tick":
                    tick = ticks.get(k)
                    if tick is not None:
                        tick(value)
                    continue
                del running[reader]
                reader.close()
                process.join()
                if kind == "error":
                    raise SimulationFailed(f"the replay of step {job.steps[k].title!r} failed:\n{value}")
                results[k] = value
    finally:
        for reader, (_, process) in running.items():
            process.terminate()
            process.join()
            reader.close()
    return results


__all__ = ["ReplayJob", "SimulationFailed", "replay_one", "replay_steps"]
