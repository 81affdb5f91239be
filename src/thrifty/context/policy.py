"""The budgets of one route applied to one request (pure; the stage does the summary's I/O).

Order: system and developer are checked (reject or warn: thrifty never rewrites them), tool results
are shortened, evidence is packed, then history is trimmed or compacted with what is left, and the
output is clamped. Nothing is changed in a section within its budget (the evidence tags are always
removed). A section a policy cannot bring within its budget is a 400 that says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from thrifty.context.evidence import Candidate, Packed, pack
from thrifty.context.history import Conversation, Unit, conversation, history_tokens, keep_newest
from thrifty.context.sections import SECTIONS, CountCache, MessageView, Split, unmarked
from thrifty.context.tools import LEVELS, shorten
from thrifty.errors import InvalidRequest
from thrifty.guard.output import clamp_output
from thrifty.settings import ContextSettings

BREVITY = (
    "Plan a concise answer that fits in about {budget} tokens; a longer one will be cut off. "
    "Prefer the essential points over completeness."
)


class ContextBudgetExceeded(InvalidRequest):
    code = "context_budget_exceeded"


def over_budget(section: str, size: int, budget: int, hint: str) -> ContextBudgetExceeded:
    return ContextBudgetExceeded(
        f"the {section} section has {size} tokens, over this route's {section} budget of {budget}; {hint}",
        param="messages",
    )


@dataclass(slots=True)
class Rewrite:
    """What changes in the request, and the record for the ledger."""

    split: Split
    before: dict[str, int]
    replaced: dict[int, dict[str, Any]] = field(default_factory=dict)  # message index -> new message
    dropped: set[int] = field(default_factory=set)
    kept_blocks: dict[int, list[str | None]] = field(default_factory=dict)  # message -> its blocks' text
    inserted: list[tuple[int, dict[str, Any], str]] = field(
        default_factory=list
    )  # before index, msg, section
    actions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    packed: Packed | None = None
    output: int | None = None  # the new max_tokens, when clamped or set
    conversation: Conversation | None = None
    summary_wait_s: float = 0.0  # thread CPU time spent while the summary call was awaited

    def messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        inserts: dict[int, list[dict[str, Any]]] = {}
        for at, message, _ in self.inserted:
            inserts.setdefault(at, []).append(message)
        for view in self.split.messages:
            out.extend(inserts.get(view.index, ()))
            if view.index in self.dropped:
                continue
            out.append(self.message_of(view))
        out.extend(inserts.get(len(self.split.messages), ()))
        return out

    def message_of(self, view: MessageView) -> dict[str, Any]:
        message = self.replaced.get(view.index)
        if message is not None:
            return message
        return unmarked(view, self.kept_blocks.get(view.index))

    def changed(self) -> bool:
        return bool(
            self.replaced or self.dropped or self.inserted or self.output is not None or self.split.blocks
        )


def begin(split: Split, settings: ContextSettings) -> Rewrite:
    """System/developer checks, tool shortening and evidence packing; history is done after."""
    rw = Rewrite(split, dict(split.counts))
    counts = split.counts
    for section in ("system", "developer"):
        budget = getattr(settings, section)
        if budget is None or counts[section] <= budget.budget:
            continue
        if settings.policy(section) == "reject":
            raise over_budget(
                section,
                counts[section],
                budget.budget,
                "shorten it (thrifty never rewrites a system or developer prompt), or raise the budget",
            )
        rw.actions[section] = "warn"
        rw.notes.append(f"{section} prompt is {counts[section]} tokens, over its budget of {budget.budget}")
    return rw


def apply_tools(rw: Rewrite, settings: ContextSettings, count: CountCache) -> None:
    budget = settings.tools
    size = rw.split.counts["tools"]
    if budget is None or size <= budget.budget:
        return
    hint = "shorten the tool results or definitions, or raise the budget"
    if settings.policy("tools") == "reject":
        raise over_budget("tools", size, budget.budget, hint)
    results = [
        v
        for v in rw.split.messages
        if v.section == "tools" and isinstance(v.message.get("content"), str) and not v.marked
    ]
    sizes = {v.index: v.own for v in results}
    fixed = size - sum(sizes.values())
    if fixed > budget.budget:
        raise over_budget(
            "tools",
            size,
            budget.budget,
            f"the tool definitions alone are {rw.split.tool_definitions} tokens and thrifty does not rewrite "
            "them; send fewer tools or raise the budget",
        )
    for level in LEVELS:
        for view in results:  # oldest first
            if fixed + sum(sizes.values()) <= budget.budget:
                break
            short = shorten(str(view.message["content"]), level)
            if short != view.message["content"]:
                message = dict(view.message)
                message["content"] = short
                rw.replaced[view.index] = message
                sizes[view.index] = view.fixed + count(short)
    total = fixed + sum(sizes.values())
    if total > budget.budget:
        raise over_budget(
            "tools", size, budget.budget, f"even shortened as far as thrifty goes it is {total}; {hint}"
        )
    rw.actions["tools"] = "trim"


def retrieved_over(rw: Rewrite, settings: ContextSettings) -> bool:
    """Over its budget (a 400 under `reject`): evidence must be packed."""
    budget = settings.retrieved
    size = rw.split.counts["retrieved"]
    if budget is None or size <= budget.budget:
        return False
    if settings.policy("retrieved") == "reject":
        raise over_budget("retrieved", size, budget.budget, "send fewer or shorter evidence blocks")
    return True


def candidates_of(split: Split) -> tuple[list[Candidate], list[tuple[int, int]]]:
    """Every evidence block, and where it is: ordinal -> (message index, position in the message)."""
    candidates: list[Candidate] = []
    owner: list[tuple[int, int]] = []
    for view in split.messages:
        if not view.marked:
            continue
        for j, block in enumerate(view.blocks()):
            candidates.append(Candidate(len(candidates), block.id, block.score, block.text))
            owner.append((view.index, j))
    return candidates, owner


def apply_retrieved(
    rw: Rewrite, settings: ContextSettings, count: CountCache, similarity: dict[int, float] | None = None
) -> None:
    """Pack the evidence; `similarity` (ordinal -> similarity to the newest user turn, from the
    embedder) ranks blocks when some have no score."""
    if not retrieved_over(rw, settings):
        return
    assert settings.retrieved is not None
    candidates, owner = candidates_of(rw.split)
    packed = pack(candidates, settings.retrieved.budget, count, newest_user_text(rw.split), similarity)
    rw.packed = packed
    for view in rw.split.messages:
        if view.marked:
            rw.kept_blocks[view.index] = [None] * len(view.blocks())
    for ordinal, text in packed.kept.items():
        index, j = owner[ordinal]
        rw.kept_blocks[index][j] = text
    rw.actions["retrieved"] = "trim"


def newest_user_text(split: Split) -> str:
    if split.newest_user is None:
        return ""
    view = split.messages[split.newest_user]
    return " ".join(p for pieces in view.texts for p in pieces if isinstance(p, str))


def history_view(rw: Rewrite, count: CountCache) -> Conversation:
    conv = conversation(rw.split.messages, rw.split.newest_user, count)
    rw.conversation = conv
    return conv


def check_tail(conv: Conversation, budget: int) -> None:
    if conv.tail_tokens > budget:
        what = (
            "the newest user turn" if len(conv.tail) == 1 else "the newest user turn and the turns after it"
        )
        raise ContextBudgetExceeded(
            f"the history budget of {budget} tokens is smaller than {what} "
            f"({conv.tail_tokens} tokens), which are never cut; shorten the message or raise the "
            "route's history budget",
            param="messages",
        )


def trim_history(rw: Rewrite, conv: Conversation, budget: int) -> None:
    start = keep_newest(conv.units, budget - conv.tail_tokens)
    drop(rw, conv.units[:start])
    rw.actions["history"] = "trim"


def drop(rw: Rewrite, units: tuple[Unit, ...] | list[Unit]) -> None:
    for unit in units:
        rw.dropped.update(unit.indexes)


def history_over(conv: Conversation, budget: int) -> bool:
    return history_tokens(conv.units) + conv.tail_tokens > budget


def summary_message(summary: str, covered_messages: int) -> dict[str, Any]:
    return {
        "role": "system",
        "content": f"Summary of the {covered_messages} earlier messages of this conversation: {summary}",
    }


def apply_output(rw: Rewrite, settings: ContextSettings, *, client_asked: bool = True) -> None:
    """`client_asked`: the output cap in the body is the client's (not one the gateway set for it);
    only the client's own cap can be rejected."""
    budget = settings.output
    if budget is None:
        return
    asked = rw.split.output
    if asked is not None and asked > budget.budget:
        if settings.policy("output") == "reject" and client_asked:
            raise over_budget(
                "output", asked, budget.budget, f"ask for max_tokens of at most {budget.budget}"
            )
        rw.actions["output"] = "trim"
    if asked is None or asked > budget.budget:
        rw.output = budget.budget
    if budget.brevity:
        text = BREVITY if budget.brevity is True else str(budget.brevity)
        at = rw.split.newest_user if rw.split.newest_user is not None else len(rw.split.messages)
        rw.inserted.append(
            (at, {"role": "system", "content": text.replace("{budget}", str(budget.budget))}, "system")
        )


def after_counts(rw: Rewrite, count: CountCache) -> dict[str, int]:
    counts = dict.fromkeys(SECTIONS, 0)
    for view in rw.split.messages:
        if view.index in rw.dropped:
            continue
        replaced = rw.replaced.get(view.index)
        if replaced is not None and view.section == "tools":
            counts["tools"] += view.fixed + count(str(replaced.get("content") or ""))
        else:
            counts[view.section] += view.own
        if view.marked:
            kept = rw.kept_blocks.get(view.index)
            if kept is None:
                counts["retrieved"] += view.retrieved
            else:
                counts["retrieved"] += sum(count(t) for t in kept if t is not None)
    for _, message, section in rw.inserted:
        counts[section] += 3 + count(str(message["role"])) + count(str(message["content"]))
    counts["tools"] += rw.split.tool_definitions
    counts["output"] = rw.output if rw.output is not None else (rw.split.output or 0)
    return counts


def report(rw: Rewrite, after: dict[str, int]) -> dict[str, Any]:
    """The ledger's record: tokens per section before and after, and what was done."""
    inputs = [s for s in SECTIONS if s != "output"]
    saved = sum(rw.before[s] for s in inputs) - sum(after[s] for s in inputs)
    record: dict[str, Any] = {"before": rw.before, "after": after, "saved": saved}
    if rw.actions:
        record["actions"] = rw.actions
    if rw.notes:
        record["notes"] = rw.notes
    if rw.packed is not None:
        record["evidence"] = {
            "kept": rw.packed.kept_ids,
            "cut": rw.packed.cut,
            "duplicates": rw.packed.duplicates,
            "dropped": rw.packed.dropped,
            "ranked_by": rw.packed.ranked_by,
        }
    return record


def body_with(body: dict[str, Any], rw: Rewrite) -> dict[str, Any]:
    new = dict(body)
    new["messages"] = rw.messages()
    if rw.output is not None:
        clamp_output(new, rw.output)  # every output field the client sent, or max_tokens
    return new
