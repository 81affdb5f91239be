"""When two final answers say the same thing: numbers, fractions, LaTeX, units, choice letters.

Cheap-model agreement is only a signal if agreeing answers are recognised as agreeing: "0.5",
"1/2", "\\frac{1}{2}", "\\dfrac12" and "$\\boxed{\\frac12}$" are one answer; "(B)", "B." and
"Answer: B" are one choice. ``canonical`` maps an answer to a key such that equal keys mean
equivalent answers, and it is conservative: what it cannot read as a number or a choice is
compared as text with whitespace, outer quotes, `$` delimiters and `\\boxed{}` removed, so two
different expressions never share a key by accident (the first-number rule would make
"\\frac{1}{2}" agree with "\\frac{1}{3}"). Pure; no I/O.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)")
_TEXT_CMD = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|~")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)\b")
_CHOICE_PREFIX = r"(?i:(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)\s*(?:is\s*)?:?\s*)?"
# A choice letter with its delimiter may be followed by the option's text ("(B) 42", "B. 42"); a
# bare letter may not ("A cat" is not choice A). Only capitals: a lowercase 'a' is a string.
_CHOICE_DELIMITED = re.compile(
    _CHOICE_PREFIX + r"(?:\(([A-E])\)|\[([A-E])\]|([A-E])[.):])(?:\s.*)?", re.DOTALL
)
_CHOICE_BARE = re.compile(_CHOICE_PREFIX + r"([A-E])")
_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?$", re.IGNORECASE)
_FRACTION = re.compile(r"^([-+]?\d+)\s*/\s*(\d+)$")
# A trailing unit or currency word after a number: "12 cm", "$5", "5 dollars", "30%", "45^\circ".
_UNIT_TAIL = re.compile(
    r"^(?P<num>[-+]?[\d.,/]+)\s*(?:\^\s*\{?\\circ\}?|°|%|\\%|[A-Za-z]+(?:[/^][A-Za-z\d]+)?\.?)$"
)
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _unbox(text: str) -> str:
    """The content of the last \\boxed{...} (balanced braces), or the text unchanged."""
    boxes = list(_BOXED.finditer(text))
    if not boxes:
        return text
    depth, start = 1, boxes[-1].end()
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return text


def _strip(answer: str) -> str:
    text = answer.strip()
    text = _unbox(text)
    text = text.strip().strip("$").strip()
    if (text.startswith("\\(") and text.endswith("\\)")) or (text.startswith("\\[") and text.endswith("\\]")):
        text = text[2:-2].strip()
    text = _TEXT_CMD.sub(r"\1", text)
    text = _SPACING.sub("", text)
    text = _LEFT_RIGHT.sub("", text)
    text = text.replace("\\!", "").replace("\\$", "")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text.strip().rstrip(".").strip()


def _brace(group: str) -> str:
    return group[1:-1] if group.startswith("{") else group


def _number(text: str) -> Fraction | None:
    """The exact value of a plain number, a/b, or \\frac{a}{b} (with a sign), else None."""
    t = text.replace(" ", "")
    if _THOUSANDS.match(t):
        t = t.replace(",", "")
    t = t.lstrip("$")
    neg = t.startswith("-")
    body = t[1:] if neg or t.startswith("+") else t
    value: Fraction | None = None
    frac = _FRAC.fullmatch(body)
    if frac is not None:
        num, den = _number(_brace(frac.group(1))), _number(_brace(frac.group(2)))
        if num is not None and den not in (None, 0):
            assert den is not None
            value = num / den
    elif (m := _FRACTION.match(body)) is not None and int(m.group(2)) != 0:
        value = Fraction(int(m.group(1)), int(m.group(2)))
    elif _NUMBER.match(body):
        try:
            value = Fraction(body)
        except (ValueError, ZeroDivisionError):
            value = None
    if value is None:
        return None
    return -value if neg else value


def canonical(answer: str | None) -> str | None:
    """A key for `answer`: equal keys mean equivalent answers. None for no answer."""
    if answer is None:
        return None
    text = _strip(answer)
    if not text:
        return ""
    value = _number(text)
    if value is None and (unit := _UNIT_TAIL.match(text)) is not None:
        value = _number(unit.group("num").rstrip("."))
    if value is None and text.endswith(("%", "\\%")):
        value = _number(text.rstrip("%").rstrip("\\"))
    if value is not None:
        return f"num:{value.numerator}/{value.denominator}"
    choice = _CHOICE_DELIMITED.fullmatch(text) or _CHOICE_BARE.fullmatch(text)
    if choice is not None:
        return "choice:" + next(g for g in choice.groups() if g)
    return "text:" + re.sub(r"\s+", " ", text)


def equivalent(a: str | None, b: str | None) -> bool:
    """Whether two answers are the same answer (None, no answer, agrees with nothing)."""
    ka, kb = canonical(a), canonical(b)
    return ka is not None and ka == kb
