"""Splitting a chat request into the sections budgets apply to, with their token counts.

- system: `system` messages; developer: `developer` messages (policy);
- history: the conversation (`user` and `assistant` messages, tool calls included), the newest user
  turn among them (it is never trimmed: a budget smaller than it is a 400);
- retrieved: evidence blocks marked up in any message (see markup.py), wherever they sit;
- tools: tool definitions (`tools`, `functions`) and tool results (`tool` / `function` messages);
- output: the completion's max_tokens.

Counts follow the tokenizer's chat framing (tokens.py): each message's framing, role and name go to
the message's own section. A text's evidence is counted block by block, so a section's count may
differ from a count of the joined text by a token where pieces meet.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from thrifty.context.markup import MARK, EvidenceBlock, Piece, has_markup, parse, render
from thrifty.tokens import TokenCounter

SECTIONS = ("system", "developer", "history", "retrieved", "tools", "output")
_ROLE_SECTION = {"system": "system", "developer": "developer", "tool": "tools", "function": "tools"}
_FRAMING = 3  # tokens per message (tokens.py)
_NAME = 1
_IMAGE = 85


class CountCache:
    """Token counts of texts, remembered (bounded by characters held): a chat resends its whole
    history with every turn, so only the newest messages are ever tokenized."""

    def __init__(
        self, counter: TokenCounter, encoding: str = "o200k_base", max_chars: int = 8_000_000
    ) -> None:
        self._counter = counter
        self._encoding = encoding
        self._max_chars = max_chars
        self._chars = 0
        self._known: OrderedDict[str, int] = OrderedDict()

    def __call__(self, text: str) -> int:
        if not text:
            return 0
        known = self._known.get(text)
        if known is not None:
            self._known.move_to_end(text)
            return known
        n = self._counter.count_text(text, self._encoding)
        self._known[text] = n
        self._chars += len(text) + 64  # short texts cost their entry, not their characters
        while self._chars > self._max_chars and self._known:
            old, _ = self._known.popitem(last=False)
            self._chars -= len(old) + 64
        return n


class DigestCache:
    """Digests of message texts, remembered like their counts (the prefix keys hash every message)."""

    def __init__(self, max_chars: int = 8_000_000) -> None:
        self._max_chars = max_chars
        self._chars = 0
        self._known: OrderedDict[str, bytes] = OrderedDict()

    def __call__(self, text: str) -> bytes:
        known = self._known.get(text)
        if known is not None:
            self._known.move_to_end(text)
            return known
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        self._known[text] = digest
        self._chars += len(text) + 64
        while self._chars > self._max_chars and self._known:
            old, _ = self._known.popitem(last=False)
            self._chars -= len(old) + 64
        return digest


@dataclass(slots=True)
class MessageView:
    """One message and where its tokens belong."""

    index: int
    message: dict[str, Any]
    section: str  # system | developer | history | tools
    # Text pieces of the content: one list for a string content, one per text part of a list.
    texts: list[list[Piece]]
    fixed: int  # framing, role, name, tool calls, images: tokens that are always the message's own
    marked: bool  # evidence markup inside
    own: int = 0  # tokens in the message's own section
    retrieved: int = 0  # tokens of its evidence blocks

    @property
    def role(self) -> str:
        return str(self.message.get("role"))

    def blocks(self) -> list[EvidenceBlock]:
        return [p for pieces in self.texts for p in pieces if isinstance(p, EvidenceBlock)]


@dataclass(slots=True)
class Split:
    messages: list[MessageView]
    tool_definitions: int  # tokens
    output: int | None  # max_tokens asked (after the route's clamp); None when unset
    newest_user: int | None  # index of the newest user message
    blocks: int = 0  # evidence blocks in the request
    counts: dict[str, int] = field(default_factory=dict)


def split(
    body: Mapping[str, Any], count: CountCache, output: int | None, *, evidence_section: bool = True
) -> Split:
    """Read the request into sections. Raises InvalidRequest on evidence markup that does not parse.

    Without `evidence_section` (a route with no retrieved budget) evidence counts in the section of
    the message it sits in, so markup cannot take a system prompt out of the system budget."""
    views: list[MessageView] = []
    newest_user = None
    blocks = 0
    for i, message in enumerate(body.get("messages") or ()):
        role = message.get("role")
        section = _ROLE_SECTION.get(role, "history")
        if role == "user":
            newest_user = i
        fixed = _FRAMING + count(str(role))
        name = message.get("name")
        if isinstance(name, str):
            fixed += count(name) + _NAME
        if message.get("tool_calls"):
            fixed += count(orjson.dumps(message["tool_calls"]).decode())
        texts: list[list[Piece]] = []
        marked = False
        plain = 0  # tokens of text without markup
        content = message.get("content")
        if isinstance(content, str):
            marked = MARK in content and has_markup(content)
            if marked:
                texts.append(parse(content, f"messages[{i}].content"))
            else:
                texts.append([content])
                plain = count(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, Mapping):
                    continue
                if part.get("type") == "text":
                    text = str(part.get("text", ""))
                    part_marked = has_markup(text)
                    marked = marked or part_marked
                    if part_marked:
                        texts.append(parse(text, f"messages[{i}].content[{j}].text"))
                    else:
                        texts.append([text])
                        plain += count(text)
                else:
                    fixed += _IMAGE
        view = MessageView(i, message, section, texts, fixed, marked)
        if marked:
            # Rare: every plain piece counted here (the texts read above are remembered by `count`).
            view.own = fixed + sum(count(p) for pieces in texts for p in pieces if isinstance(p, str))
            found = view.blocks()
            view.retrieved = sum(count(b.text) for b in found)
            if not evidence_section:
                view.own, view.retrieved = view.own + view.retrieved, 0
            blocks += len(found)
        else:
            view.own = fixed + plain
        views.append(view)
    tool_defs = 0
    for key in ("tools", "functions"):
        if body.get(key):
            tool_defs += count(orjson.dumps(body[key]).decode())
    result = Split(views, tool_defs, output, newest_user, blocks)
    result.counts = tally(result, count)
    return result


def tally(s: Split, count: CountCache) -> dict[str, int]:
    counts = dict.fromkeys(SECTIONS, 0)
    for view in s.messages:
        counts[view.section] += view.own
        if view.marked:
            counts["retrieved"] += view.retrieved
    counts["tools"] += s.tool_definitions
    counts["output"] = s.output or 0
    return counts


def message_with(view: MessageView, texts: list[str]) -> dict[str, Any]:
    """A copy of the message with its text pieces replaced (in order: the string content, or each
    text part of a content list)."""
    message = dict(view.message)
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = texts[0]
    elif isinstance(content, list):
        parts: list[Any] = []
        k = 0
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append({**part, "text": texts[k]})
                k += 1
            else:
                parts.append(part)
        message["content"] = parts
    return message


def unmarked(view: MessageView, kept: list[str | None] | None = None) -> dict[str, Any]:
    """The message as sent upstream: evidence tags removed, dropped blocks gone (`kept`: the text of
    each of the message's blocks in order, None for a dropped one; None keeps all)."""
    if not view.marked:
        return view.message
    texts: list[str] = []
    offset = 0
    for pieces in view.texts:
        n = sum(1 for p in pieces if isinstance(p, EvidenceBlock))
        texts.append(render(pieces, None if kept is None else kept[offset : offset + n]))
        offset += n
    return message_with(view, texts)
