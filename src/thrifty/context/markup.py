"""The markup an app uses to mark retrieved evidence inside a message, and its removal.

    <thrifty-evidence id="kb-12" score="0.83">Returns are accepted within 30 days.</thrifty-evidence>

`id` is required (letters, digits and `_ . : / -`), `score` is optional (a number, higher is more
relevant). Blocks may sit in any message whose content is text (or in text parts of a content
list); they cannot nest. thrifty removes the tags before the request goes upstream: a kept block
becomes its text, a dropped one disappears. Markup that does not parse is a 400 naming it, never
passed on half-read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from thrifty.errors import InvalidRequest

MARK = "thrifty-evidence"  # in both tags: one substring search tells a text without markup
OPEN = "<thrifty-evidence"
CLOSE = "</thrifty-evidence>"
_TAG = re.compile(r"<thrifty-evidence\b([^<>]*)>|</thrifty-evidence\s*>")
_ATTR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_-]*)\s*=\s*"([^"]*)"\s*')
_ID = re.compile(r"[A-Za-z0-9_.:/-]{1,200}")


@dataclass(frozen=True, slots=True)
class EvidenceBlock:
    id: str
    score: float | None
    text: str


# A text is a sequence of plain strings and evidence blocks, in order.
Piece = str | EvidenceBlock


def has_markup(text: str) -> bool:
    return OPEN in text or CLOSE in text


def parse(text: str, where: str) -> list[Piece]:
    """Split a text into plain pieces and evidence blocks; `where` names it in errors."""
    if not has_markup(text):
        return [text]
    pieces: list[Piece] = []
    pos = 0
    open_at: int | None = None
    attrs: tuple[str, float | None] | None = None
    for match in _TAG.finditer(text):
        is_open = match.group(0).startswith(OPEN)
        if is_open:
            if open_at is not None:
                raise _bad(where, "a <thrifty-evidence> block opens inside another; blocks cannot nest")
            if match.start() > pos:
                pieces.append(text[pos : match.start()])
            attrs = _attributes(match.group(1), where)
            open_at = match.end()
        else:
            if open_at is None or attrs is None:
                raise _bad(where, "</thrifty-evidence> closes a block that was never opened")
            pieces.append(EvidenceBlock(attrs[0], attrs[1], text[open_at : match.start()]))
            open_at, attrs = None, None
        pos = match.end()
    if open_at is not None:
        raise _bad(where, "a <thrifty-evidence> block is never closed with </thrifty-evidence>")
    if pos < len(text):
        pieces.append(text[pos:])
    if OPEN in "".join(p for p in pieces if isinstance(p, str)):
        raise _bad(where, "a <thrifty-evidence tag is not closed with '>'")
    return pieces


def _attributes(raw: str, where: str) -> tuple[str, float | None]:
    found: dict[str, str] = {}
    pos = 0
    while pos < len(raw):
        match = _ATTR.match(raw, pos)
        if match is None or match.end() == pos:
            if raw[pos:].strip():
                raise _bad(where, f'cannot read the attributes {raw.strip()!r}; write id="..." score="..."')
            break
        name, value = match.group(1), match.group(2)
        if name not in ("id", "score"):
            raise _bad(where, f"unknown attribute {name!r} (only id and score)")
        if name in found:
            raise _bad(where, f"attribute {name!r} given twice")
        found[name] = value
        pos = match.end()
    evidence_id = found.get("id")
    if evidence_id is None or not _ID.fullmatch(evidence_id):
        raise _bad(where, 'every block needs id="..." (letters, digits and _ . : / -, at most 200)')
    score: float | None = None
    if "score" in found:
        try:
            score = float(found["score"])
        except ValueError:
            raise _bad(where, f"score {found['score']!r} of {evidence_id!r} is not a number") from None
        if score != score or score in (float("inf"), float("-inf")):
            raise _bad(where, f"score of {evidence_id!r} must be a finite number")
    return evidence_id, score


def _bad(where: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: evidence markup does not parse: {why}", param=where, code="bad_markup")


def render(pieces: list[Piece], kept: list[str | None] | None = None) -> str:
    """The text sent upstream: plain pieces as they are, the i-th block as `kept[i]` (its text, maybe
    cut, or None when it was dropped); every block keeps its whole text when `kept` is None."""
    out: list[str] = []
    i = 0
    for piece in pieces:
        if isinstance(piece, str):
            out.append(piece)
            continue
        text = piece.text if kept is None else kept[i]
        i += 1
        if text is not None:
            out.append(text)
    return "".join(out)
