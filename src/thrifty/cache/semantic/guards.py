"""Content-token guards of the semantic cache: what an embedding averages away must match.

Numbers, negation, polar verbs (enable/disable, ...) and the order of named entities: two questions
that differ in these ask for different answers however close their embeddings are.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_NEGATIONS = frozenset(
    {"not", "no", "never", "without", "cannot", "nothing", "none", "nor", "neither", "nobody", "nowhere"}
)
# Verb pairs whose members embed close together but ask for opposite things.
_POLAR_PAIRS: tuple[tuple[str, str], ...] = (
    ("enable", "disable"),
    ("activate", "deactivate"),
    ("lock", "unlock"),
    ("freeze", "unfreeze"),
    ("block", "unblock"),
    ("subscribe", "unsubscribe"),
    ("increase", "decrease"),
    ("add", "remove"),
    ("open", "close"),
    ("buy", "sell"),
    ("deposit", "withdraw"),
    ("import", "export"),
    ("encrypt", "decrypt"),
    ("upload", "download"),
    ("install", "uninstall"),
    ("before", "after"),
    ("above", "below"),
    ("max", "min"),
    ("maximum", "minimum"),
    ("true", "false"),
    ("on", "off"),
)
_POLAR: dict[str, tuple[int, int]] = {}
for _i, (_a, _b) in enumerate(_POLAR_PAIRS):
    for _stem, _sign in ((_a, 1), (_b, -1)):
        for _form in (
            _stem,
            _stem + "s",
            _stem + "d",
            _stem + "ed",
            _stem + "ing",
            _stem.rstrip("e") + "ing",
        ):
            _POLAR.setdefault(_form, (_i, _sign))
# An entity is a capitalised word that does not start a sentence, or an acronym/code like "NY", "2FA".
_ENTITY = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][A-Za-z0-9]*[A-Za-z0-9]\b|\b[A-Z0-9]*[A-Z][A-Z0-9]+\b")
_NOT_ENTITIES = frozenset({"I", "I'M", "OK", "A"})


def numbers(text: str) -> tuple[str, ...]:
    """Numbers in order, with thousands separators dropped ("1,000" == "1000")."""
    return tuple(m.replace(",", "") for m in _NUMBER.findall(text))


def negation_count(text: str) -> int:
    words = _WORD.findall(text.lower())
    return sum(1 for w in words if w in _NEGATIONS or w.endswith("n't"))


def polarity(text: str) -> dict[int, int]:
    """Which polar verb of each pair the text uses (pair index -> +1/-1)."""
    found: dict[int, int] = {}
    for w in _WORD.findall(text.lower()):
        if w in _POLAR:
            pair, sign = _POLAR[w]
            found[pair] = sign
    return found


def entities(text: str) -> tuple[str, ...]:
    """Named things in order of appearance, case-folded."""
    out = []
    for m in _ENTITY.finditer(text.strip()):
        token = m.group(0)
        if token.upper() not in _NOT_ENTITIES:
            out.append(token.lower())
    return tuple(out)


def guard_mismatch(query: str, entry: str) -> str | None:
    """Why ``entry``'s answer must not be served for ``query``, or None when the content agrees."""
    if sorted(numbers(query)) != sorted(numbers(entry)):
        return f"numbers differ {numbers(query)} vs {numbers(entry)}"
    if negation_count(query) % 2 != negation_count(entry) % 2:
        return "negation differs"
    q_pol, e_pol = polarity(query), polarity(entry)
    for pair, sign in q_pol.items():
        if e_pol.get(pair, sign) != sign:
            a, b = _POLAR_PAIRS[pair]
            return f"opposite verbs ({a}/{b})"
    q_ent, e_ent = entities(query), entities(entry)
    # Only when both name things: "flights NY to Miami" vs "Miami to NY" is a miss; a query that
    # names nothing is judged by the other signals.
    if q_ent and e_ent and q_ent != e_ent:
        return f"entities differ {q_ent} vs {e_ent}"
    return None
