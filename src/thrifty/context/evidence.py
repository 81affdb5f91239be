"""Packing retrieved evidence into its budget: best first, near-duplicates dropped, cut at sentences.

Blocks are ranked by the app's score (higher first; ties keep the app's order). When a block has no
score, every block is ranked by similarity to the newest user turn instead (scores of some blocks
and not others cannot be compared): the semantic cache's embedder when the gateway has it loaded,
word overlap otherwise. A block whose words mostly repeat a better one (word
3-gram Jaccard >= 0.8) is dropped. Blocks are taken while they fit; the first that does not is cut
at the last sentence boundary that fits (dropped if not even its first sentence does), and packing
stops there. Kept blocks stay where the app put them; only the choice is best-first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

NEAR_DUPLICATE = 0.8
_WORD = re.compile(r"\w+", re.UNICODE)
_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|\n\s*\n")
_STOP = frozenset(
    [
        "the",
        "a",
        "an",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "for",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "it",
        "this",
        "that",
        "with",
        "as",
        "at",
        "by",
        "from",
        "what",
        "how",
        "why",
        "when",
        "which",
        "who",
        "do",
        "does",
        "did",
        "can",
        "could",
        "would",
        "should",
        "i",
        "you",
        "we",
        "they",
        "my",
        "your",
        "our",
        "me",
    ]
)


@dataclass(frozen=True, slots=True)
class Candidate:
    ordinal: int  # position among the request's blocks
    id: str
    score: float | None
    text: str


@dataclass(slots=True)
class Packed:
    kept: dict[int, str] = field(default_factory=dict)  # ordinal -> text sent (maybe cut)
    kept_ids: list[str] = field(default_factory=list)  # best first
    duplicates: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    ranked_by: str = "score"


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _shingles(words: list[str]) -> set[tuple[str, ...]]:
    if len(words) < 3:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def overlap_score(query: str, text: str) -> float:
    """Share of the query's content words found in the text."""
    wanted = {w for w in _words(query) if w not in _STOP and len(w) > 1}
    if not wanted:
        return 0.0
    have = set(_words(text))
    return len(wanted & have) / len(wanted)


def sentences(text: str) -> list[str]:
    """The text cut after each sentence end, separators kept, so the pieces join back to the text."""
    out: list[str] = []
    pos = 0
    for match in _SENTENCE_END.finditer(text):
        out.append(text[pos : match.end()])
        pos = match.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def cut_to(text: str, room: int, count: Callable[[str], int]) -> str | None:
    """The longest run of whole sentences from the start of `text` within `room` tokens."""
    kept: list[str] = []
    used = 0
    for sentence in sentences(text):
        n = count(sentence)
        if used + n > room:
            break
        kept.append(sentence)
        used += n
    # Sentences counted apart may merge into fewer or more tokens joined: check the joined text.
    while kept and count("".join(kept).rstrip()) > room:
        kept.pop()
    return "".join(kept).rstrip() if kept else None


def pack(
    candidates: Sequence[Candidate],
    budget: int,
    count: Callable[[str], int],
    query: str,
    similarity: Mapping[int, float] | None = None,
) -> Packed:
    """`similarity`: ordinal -> embedding similarity to the newest user turn, used when a block has no
    score (word overlap otherwise)."""
    packed = Packed()
    if any(c.score is None for c in candidates) and similarity is not None:
        packed.ranked_by = "embedding similarity to the newest user turn"
        scores = {c.ordinal: similarity.get(c.ordinal, 0.0) for c in candidates}
    elif any(c.score is None for c in candidates):
        packed.ranked_by = "overlap with the newest user turn"
        scores = {c.ordinal: overlap_score(query, c.text) for c in candidates}
    else:
        scores = {c.ordinal: c.score or 0.0 for c in candidates}
    ranked = sorted(candidates, key=lambda c: (-scores[c.ordinal], c.ordinal))
    seen: list[set[tuple[str, ...]]] = []
    room = budget
    stopped = False
    for cand in ranked:
        if stopped:
            packed.dropped.append(cand.id)
            continue
        shingles = _shingles(_words(cand.text))
        if shingles and any(_jaccard(shingles, other) >= NEAR_DUPLICATE for other in seen):
            packed.duplicates.append(cand.id)
            continue
        n = count(cand.text)
        if n <= room:
            packed.kept[cand.ordinal] = cand.text
            packed.kept_ids.append(cand.id)
            seen.append(shingles)
            room -= n
            continue
        stopped = True
        part = cut_to(cand.text, room, count)
        if part is None:
            packed.dropped.append(cand.id)
            continue
        packed.kept[cand.ordinal] = part
        packed.kept_ids.append(cand.id)
        packed.cut.append(cand.id)
    return packed


def _jaccard(a: set[tuple[str, ...]], b: set[tuple[str, ...]]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)
