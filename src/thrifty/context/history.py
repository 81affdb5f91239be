"""History within its budget: which turns stay verbatim, which are summarised (pure policy).

The conversation is cut into units that move together: one message, or an assistant message with
tool calls plus the tool results that answer it (a tool call is never separated from its result).
The tail, from the newest user message to the end, always stays; a budget smaller than it is a 400.

Trim keeps the newest units that fit. Compact replaces the oldest units by a summary. Summaries are
keyed by the conversation's prefix (a hash chained unit by unit), so a summary is made once; as the
chat grows, the stored summary of the longest known prefix is reused while it still fits, and
extended with the turns aged out since when it does not. A new summary ages out enough turns that
the next few turns fit too: at most `verbatim_share` of the room stays verbatim, and less when the
chat's turns are long, so that `turns_per_summary` turns of its average size fit before the next
summary is due. A long chat is summarised every few turns, not every turn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from thrifty.context.sections import CountCache, DigestCache, MessageView


@dataclass(frozen=True, slots=True)
class Unit:
    views: tuple[MessageView, ...]
    history_tokens: int  # what the unit counts in the history section (tool results count in tools)
    other_tokens: int  # tool results and evidence inside the unit

    @property
    def indexes(self) -> list[int]:
        return [v.index for v in self.views]


@dataclass(frozen=True, slots=True)
class Conversation:
    units: tuple[Unit, ...]  # trimmable, oldest first
    tail: tuple[MessageView, ...]  # from the newest user message on: always kept
    tail_tokens: int  # history tokens of the tail


def conversation(views: Sequence[MessageView], newest_user: int | None, count: CountCache) -> Conversation:
    turns = [v for v in views if v.section in ("history", "tools")]
    if newest_user is None:
        # No user message: the last unit is the turn in progress.
        cut = _last_unit_start(turns)
    else:
        cut = next(i for i, v in enumerate(turns) if v.index == newest_user)
    units: list[Unit] = []
    group: list[MessageView] = []
    for view in turns[:cut]:
        if group and view.section == "tools":
            group.append(view)  # a tool result stays with the call before it
            continue
        if group:
            units.append(_unit(group, count))
        group = [view]
    if group:
        units.append(_unit(group, count))
    tail = tuple(turns[cut:])
    tail_tokens = sum(v.own for v in tail if v.section == "history")
    return Conversation(tuple(units), tail, tail_tokens)


def _last_unit_start(turns: Sequence[MessageView]) -> int:
    i = len(turns)
    while i > 0 and turns[i - 1].section == "tools":
        i -= 1
    return max(i - 1, 0)


def _unit(group: list[MessageView], count: CountCache) -> Unit:
    history = other = 0
    for view in group:
        if view.section == "history":
            history += view.own
        else:
            other += view.own
        other += view.retrieved
    return Unit(tuple(group), history, other)


def keep_newest(units: Sequence[Unit], room: int) -> int:
    """Index of the first unit kept: the newest units whose history tokens fit in `room`."""
    used = 0
    start = len(units)
    while start > 0 and used + units[start - 1].history_tokens <= room:
        used += units[start - 1].history_tokens
        start -= 1
    return start


def history_tokens(units: Sequence[Unit]) -> int:
    return sum(u.history_tokens for u in units)


def prefix_keys(units: Sequence[Unit], salt: str, digest: DigestCache) -> list[str]:
    """keys[b-1] identifies the conversation's first b units (with `salt`: tenant and settings)."""
    hasher = hashlib.blake2b(salt.encode(), digest_size=20)
    keys = []
    for unit in units:
        for view in unit.views:
            message = view.message
            content = message.get("content")
            if isinstance(content, str) and len(message) == 2:  # {role, content}: most messages
                hasher.update(str(message.get("role")).encode() + b"\x1f" + digest(content))
            else:
                hasher.update(b"\x1d" + digest(orjson.dumps(message, option=orjson.OPT_SORT_KEYS).decode()))
            hasher.update(b"\x1e")
        keys.append(hasher.copy().hexdigest())
    return keys


@dataclass(frozen=True, slots=True)
class CompactionStep:
    """What compaction does: reuse the summary of the first `covered` units as it is, or extend it
    (None: start one) with units[covered:boundary]; units[boundary:] stay verbatim."""

    covered: int
    boundary: int

    @property
    def needs_call(self) -> bool:
        return self.boundary > self.covered


def plan_compaction(
    units: Sequence[Unit],
    tail_tokens: int,
    budget: int,
    summary_budget: int,
    known: dict[int, int],
    verbatim_share: float = 0.5,
    headroom: int = 0,
) -> CompactionStep:
    """`known`: units covered -> tokens of a stored summary of that prefix; `headroom`: tokens a new
    summary leaves free for the turns to come."""
    for covered in sorted(known, reverse=True):
        if known[covered] + history_tokens(units[covered:]) + tail_tokens <= budget:
            return CompactionStep(covered, covered)
        break  # an older summary covers less and would leave more verbatim
    covered = max(known, default=0)
    room = budget - summary_budget - tail_tokens
    boundary = keep_newest(units, min(int(room * verbatim_share), max(room - headroom, 0)))
    return CompactionStep(covered, max(boundary, min(covered + 1, len(units))))


def turn_growth(conv: Conversation) -> int:
    """Average history tokens a chat grows by per user turn (a question and its answer)."""
    views = [v for u in conv.units for v in u.views] + list(conv.tail)
    turns = sum(1 for v in views if v.message.get("role") == "user")
    return (history_tokens(conv.units) + conv.tail_tokens) // max(turns, 1)
