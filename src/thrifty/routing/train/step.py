"""The router's online step API: what the gateway hands in (drafts) and what it gets back (a step).

The gateway loops: ask `Router.next_step(task, prompt, drafts)`, make the call it names, append
the reply as a `Draft`, ask again, until the answer is `Accept`. The benchmark replays recorded
replies through the very same loop (`replay`), so what it measures is what the gateway does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Draft:
    model: str  # dataset model id, e.g. "gpt-4o-mini-2024-07-18"
    output: str  # the model's raw reply text (the assistant message content)


@dataclass(frozen=True, slots=True)
class CallModel:
    model: str
    reason: str  # why this call, e.g. "first tier", "mini and flash disagree"


@dataclass(frozen=True, slots=True)
class Accept:
    index: int  # which draft to return to the client
    reason: str  # the gate's verdict


Step = CallModel | Accept


@dataclass(frozen=True, slots=True)
class Trace:
    drafts: tuple[Draft, ...]
    accepted: int
    reasons: tuple[str, ...]


def replay(
    next_step: Callable[[str | None, str, Sequence[Draft]], Step],
    task: str | None,
    prompt: str,
    reply: Callable[[str], str],
    *,
    max_calls: int = 8,
) -> Trace:
    """Run the step loop with `reply(model)` standing in for the upstream call."""
    drafts: list[Draft] = []
    reasons: list[str] = []
    while True:
        step = next_step(task, prompt, drafts)
        reasons.append(step.reason)
        if isinstance(step, Accept):
            if not 0 <= step.index < len(drafts):
                raise ValueError(f"router accepted draft {step.index} of {len(drafts)}")
            return Trace(tuple(drafts), step.index, tuple(reasons))
        if len(drafts) >= max_calls:
            raise RuntimeError(f"router asked for more than {max_calls} calls")
        drafts.append(Draft(step.model, reply(step.model)))
