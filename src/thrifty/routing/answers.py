"""When two final answers say the same thing: numbers, fractions, LaTeX, units, lists, choice letters.

Cheap-model agreement is only a signal if agreeing answers are recognised as agreeing: "0.5",
"1/2", "\\frac{1}{2}", "\\dfrac12" and "$\\boxed{\\frac12}$" are one answer; "(B)", "B." and
"Answer: B" are one choice. ``canonical`` maps an answer to a key such that equal keys mean
equivalent answers, and it is conservative, because a false "equal" accepts a wrong answer while
a missed one only costs an escalation:
- a value is exact (``exact.exact_value``): `0.5` = `1/2` = `2^{-1}`, `2\\frac{1}{2}` = `5/2`,
  `1,000` = `1000`, `-0` = `0`, `1.5 \\times 10^{3}` = `1500`; `0.50001` is not `1/2`;
- what has no exact value (`\\sqrt{2}`, `\\pi`, `x + 1`) compares as text after ``latex.clean``
  (one spelling: `\\sqrt2` = `\\sqrt{2}`, `\\dfrac{\\sqrt3}2` = `\\frac{\\sqrt{3}}{2}`), so two
  different expressions never share a key (`\\sqrt{2}` is not `1.41421`);
- a unit, a degree sign or `$` after or before a value is dropped (`12 cm` = `12`, `45^\\circ` = `45`)
  but a percent is kept (`10%` is not `10`, nor `0.1`: which one a question means is not known here);
- `x = 5` is `5` (one variable on the left);
- brackets keep order and kind: `(1, 2)` is not `(2, 1)` (a pair) nor `[1, 2)` (an interval);
  a bare list or a `\\{set\\}` is unordered (`1, 2` = `2, 1` = `\\{2, 1\\}`: the form
  competition answers list all solutions in), repeats counted;
- a base subscript stays (`1011_2` = `1011_{2}`, not `1011` nor `11`);
- a choice letter is a choice (capitals A-E only: `A cat` is not choice A).
Pure; no I/O.
"""

from __future__ import annotations

import re
from fractions import Fraction

from thrifty.routing.exact import exact_value
from thrifty.routing.latex import clean

_CHOICE_PREFIX = r"(?i:(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)\s*(?:is\s*)?:?\s*)?"
# A choice letter with its delimiter may be followed by the option's text ("(B) 42", "B. 42"); a
# bare letter may not ("A cat" is not choice A). Only capitals: a lowercase 'a' is a string.
_CHOICE_DELIMITED = re.compile(
    _CHOICE_PREFIX + r"(?:\(([A-E])\)|\[([A-E])\]|([A-E])[.):])(?:\s.*)?", re.DOTALL
)
_CHOICE_BARE = re.compile(_CHOICE_PREFIX + r"([A-E])")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_ASSIGNMENT = re.compile(r"^(?P<var>[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?\s*=\s*(?P<rhs>[^=<>]+)$")
_DEGREES = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree)\s*$")
# Units after a value: any word(s) after a space ("5 square units"), or a few known ones written
# on the number ("12cm"); letters on a number otherwise are a product (`2x`, `3i`), not a unit.
_UNIT_SPACED = re.compile(
    r"^(?P<v>.*?[\d}])\s+(?P<u>[A-Za-z]{2,}\.?(?:\s+[A-Za-z]{2,}\.?){0,2}(?:\^\{?[23]\}?)?)$"
)
_UNIT_ATTACHED = re.compile(
    r"^(?P<v>.*?\d)(?P<u>cm|mm|km|kg|mg|ml|mph|ft|sq|dollars?|cents?|degrees?|units?|inches|feet|meters?"
    r"|minutes?|hours?|seconds?|days?)(?:\^\{?[23]\}?)?$"
)
_NOT_UNITS = frozenset({"and", "or", "to", "pi", "infty", "is", "not", "none", "no", "yes", "of"})
_BASE = re.compile(r"^(?P<digits>[0-9A-Za-z]+)_\{?\(?(?P<base>\d+)\)?\}?$")
_CLOSERS = {"(": ")", "[": "]", "{": "}"}
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")  # a word of two letters or more, not a \command


def _split_top(text: str, sep: str = ",") -> list[str]:
    """`text` split at `sep` outside brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _one_group(text: str) -> bool:
    """Whether the bracket opening `text` closes at its last character (`(1,2)` yes, `(1)(2)` no);
    an interval may close with the other kind (`[1, 2)`)."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(text) - 1
    return False


def _number_key(value: Fraction) -> str:
    return f"num:{value.numerator}/{value.denominator}"


def _value(text: str) -> Fraction | None:
    t = text.strip()
    t = t[1:] if t.startswith("$") else t
    if _THOUSANDS.match(t):  # 1,000 (a comma and a space is a list: "1, 234")
        t = t.replace(",", "")
    return exact_value(t)


def _scalar(text: str) -> str:
    """The key of one answer that is not a list: a value, a percent, a base-b numeral, or text."""
    text = text.strip()
    if text.startswith("$"):
        text = text[1:].strip()
    if text.endswith("%"):
        value = _value(text[:-1].strip())
        return f"pct:{value.numerator}/{value.denominator}" if value is not None else "text:" + _text(text)
    value = _value(text)
    if value is not None:
        return _number_key(value)
    stripped = _DEGREES.sub("", text)
    if stripped != text and (value := _value(stripped)) is not None:
        return _number_key(value)
    unit = _UNIT_SPACED.match(text) or _UNIT_ATTACHED.match(text)
    if unit is not None and not (set(unit.group("u").lower().rstrip(".").split()) & _NOT_UNITS):
        inner = _DEGREES.sub("", unit.group("v"))
        if (value := _value(inner)) is not None:
            return _number_key(value)
    if (base := _BASE.match(text)) is not None and _numeral(base.group("digits"), int(base.group("base"))):
        return f"base{int(base.group('base'))}:{base.group('digits').upper()}"
    return "text:" + _text(text)


def _numeral(digits: str, base: int) -> bool:
    """Whether `digits` is a numeral in `base` (`1011` in base 2, `1A` in 16; `x` in base 1 is a
    variable's subscript, not a numeral)."""
    if not 2 <= base <= 36:
        return False
    try:
        int(digits, base)
    except ValueError:
        return False
    return True


def _text(text: str) -> str:
    # Spaces around symbols do not matter in a formula ("x + 1" = "x+1"); in words they may: a
    # string answer "h / grateful k" is not "h/grateful k" (crux grades strings exactly).
    if not _WORD.search(text):
        text = re.sub(r"\s*([^\w\s])\s*", r"\1", text)
    return re.sub(r"\s+", " ", text)


def _unassigned(parts: list[str]) -> list[str]:
    """`x = 1, x = 2` -> `1, 2` when every part assigns the same single variable; unchanged else
    (`x = 1, y = 2` stays, or it would equal `x = 2, y = 1`)."""
    matches = [_ASSIGNMENT.match(p) for p in parts]
    if all(matches) and len({m.group("var") for m in matches if m}) == 1:
        return [m.group("rhs").strip() for m in matches if m]
    return parts


def _key(text: str) -> str:
    if text.startswith("\\{") and text.endswith("\\}"):
        inner = text[2:-2].strip()
        return "set:" + "|".join(sorted(_key(p) for p in _unassigned(_split_top(inner)) if p))
    if text[:1] in _CLOSERS and text[-1:] in ")]}" and _one_group(text):
        parts = _split_top(text[1:-1])
        if len(parts) == 1 and text[0] == "(" and text[-1] == ")":
            return _key(parts[0])  # (5) is 5: brackets around one value only group it
        if text[0] == "{" and text[-1] == "}" and len(parts) == 1:
            return _key(parts[0])
        return "seq" + text[0] + "|".join(_key(p) for p in parts) + text[-1]
    if not _THOUSANDS.match(text):
        parts = _split_top(text)
        if len(parts) > 1 and all(parts):
            return "set:" + "|".join(sorted(_key(p) for p in _unassigned(parts)))
    return _scalar(text)


def canonical(answer: str | None) -> str | None:
    """A key for `answer`: equal keys mean equivalent answers. None for no answer."""
    if answer is None:
        return None
    text = clean(answer)
    if not text:
        return ""
    choice = _CHOICE_DELIMITED.fullmatch(text) or _CHOICE_BARE.fullmatch(text)
    if choice is not None:
        return "choice:" + next(g for g in choice.groups() if g)
    assigned = _ASSIGNMENT.match(text)
    if assigned is not None and "," not in assigned.group("rhs"):
        text = assigned.group("rhs").strip()
    return _key(text)


def equivalent(a: str | None, b: str | None) -> bool:
    """Whether two answers are the same answer (None, no answer, agrees with nothing)."""
    ka, kb = canonical(a), canonical(b)
    return ka is not None and ka == kb
