"""The exact rational value of a small arithmetic answer, or None when it has none we can be sure of.

Reads what ``latex.clean`` leaves: numbers (`0.5`, `1e3`), `+ - * /`, `\\cdot`, `\\times`,
`\\frac{a}{b}`, integer powers (`1.5 \\times 10^{3}`), brackets and braces, `\\sqrt{}` of a perfect
square, and mixed numbers (`2\\frac{1}{2}` = 5/2, as competition answers write them). Values are
`Fraction`s, so `0.5` equals `1/2` and `0.50001` does not; anything else (`\\pi`, `\\sqrt{2}`, a
variable, implied products like `2\\sqrt{4}`, a zero divisor) gives None, and the caller compares
the text instead: "not sure" never becomes "equal". Pure; no I/O.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)|(?P<cmd>\\(?:frac|sqrt|cdot|times)(?![A-Za-z]))"
    r"|(?P<op>[-+*/^(){}\[\]]))"
)
_MAX_EXPONENT = 64  # 10^64 is a big answer; larger powers are not worth the arithmetic


class _Unsure(Exception):
    """The text is not an expression this reader can value exactly."""


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None or m.end() == i:
            if text[i:].strip() == "":
                break
            raise _Unsure
        out.append(m.group(m.lastgroup or "op"))
        i = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.toks = tokens
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _Unsure
        self.i += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/", "\\cdot", "\\times"):
            op = self.take()
            rhs = self.unary()
            if op == "/":
                if rhs == 0:
                    raise _Unsure
                value = value / rhs
            else:
                value = value * rhs
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            return -self.unary() if self.take() == "-" else self.unary()
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take("^")
        exponent = self.group() if self.peek() == "{" else self._digit()
        if exponent.denominator != 1 or abs(exponent) > _MAX_EXPONENT or (base == 0 and exponent < 0):
            raise _Unsure
        return base ** int(exponent)

    def _digit(self) -> Fraction:
        # `10^3`: TeX takes one character as the exponent, so `10^23` is 10^2 followed by 3.
        tok = self.take()
        if not tok.isdigit():
            raise _Unsure
        if len(tok) > 1:
            raise _Unsure  # `10^23` means (10^2)3 to TeX and 10^23 to a reader: unsure
        return Fraction(int(tok))

    def group(self) -> Fraction:
        self.take("{")
        value = self.expr()
        self.take("}")
        return value

    def atom(self) -> Fraction:
        tok = self.peek()
        if tok is None:
            raise _Unsure
        if tok == "(":
            self.take()
            value = self.expr()
            self.take(")")
            return value
        if tok == "{":
            return self.group()
        if tok == "\\frac":
            return self.frac()
        if tok == "\\sqrt":
            self.take()
            return _exact_sqrt(self.group())
        if tok[0].isdigit() or tok[0] == ".":
            self.take()
            value = Fraction(tok)
            if self.peek() == "\\frac" and tok.isdigit():
                return self.mixed(value)
            return value
        raise _Unsure

    def frac(self) -> Fraction:
        self.take("\\frac")
        num, den = self.group(), self.group()
        if den == 0:
            raise _Unsure
        return num / den

    def mixed(self, whole: Fraction) -> Fraction:
        # 2\frac{1}{2} is two and a half only for a proper fraction of whole numbers; anything
        # else (2\frac{3}{2}, 2\frac{x}{2}) is read as a product by some and a sum by others.
        start = self.i
        self.take("\\frac")
        self.take("{")
        num = self.take()
        self.take("}")
        self.take("{")
        den = self.take()
        self.take("}")
        if not (num.isdigit() and den.isdigit()) or not 0 < int(num) < int(den):
            self.i = start
            raise _Unsure
        return whole + Fraction(int(num), int(den))


def _exact_sqrt(value: Fraction) -> Fraction:
    if value < 0:
        raise _Unsure
    num, den = math.isqrt(value.numerator), math.isqrt(value.denominator)
    if num * num != value.numerator or den * den != value.denominator:
        raise _Unsure  # irrational: compared as text by the caller
    return Fraction(num, den)


def exact_value(text: str) -> Fraction | None:
    """The exact value of `text` (already ``latex.clean``-ed), or None; see the module docstring."""
    if not text or len(text) > 200:
        return None
    try:
        parser = _Parser(_tokens(text))
        value = parser.expr()
        if parser.peek() is not None:
            return None
    except (_Unsure, ValueError, ZeroDivisionError, OverflowError):
        return None
    return value
