"""Exact money inside SQLite: SQL functions for decimal sums, and amounts split for the rollups.

SQLite has only binary floats; amounts are stored as decimal text, and the rollups keep a sum as
whole pico-USD (an integer SQLite adds exactly) plus a decimal rest for what lies below 1e-12.
"""

from __future__ import annotations

import sqlite3
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from typing import Any

# Additions and subtractions of money that never round (the default context keeps 28 digits).
EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)


def _dec_add(a: str | None, b: str | None) -> str | None:
    """Exact sum of two decimal texts (NULL is nothing): SQLite itself has only binary floats."""
    if a is None:
        return b
    if b is None:
        return a
    return format(Decimal(a) + Decimal(b), "f")


class _DecSum:
    def __init__(self) -> None:
        self.total: Decimal | None = None

    def step(self, value: Any, /) -> None:
        if value is not None:
            self.total = Decimal(value) if self.total is None else self.total + Decimal(value)

    def finalize(self) -> str | None:
        return None if self.total is None else format(self.total, "f")


_PICO_LIMIT = 2**62


def split_money(value: Decimal | None) -> tuple[int, int, str | None]:
    """An exact amount as (whole pico-USD, decimal exponent, the rest below 1e-12 as text or None)."""
    if value is None:
        return 0, 0, None
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int), "amounts are finite"
    pico = int(value.scaleb(12))  # toward zero
    if exponent >= -12 and abs(pico) < _PICO_LIMIT:
        return pico, min(exponent, 0), None  # the common case: a whole number of pico-USD
    if abs(pico) >= _PICO_LIMIT:
        # Over $4.6M in one batch and key: all of it as text, so SQLite's integers never overflow.
        return 0, min(exponent, 0), format(value, "f")
    rest = value - Decimal(pico).scaleb(-12)
    return pico, min(exponent, 0), None if rest.is_zero() else format(rest, "f")


def join_money(pico: int | str | None, exponent: int | None, rest: str | None) -> Decimal:
    """The inverse of split_money over a sum: the exact amount, written with the smallest exponent."""
    value = Decimal(int(pico or 0)).scaleb(-12)
    if rest is not None:
        value += Decimal(rest)
    return value.quantize(Decimal(1).scaleb(min(exponent or 0, 0)))


class _IntSum:
    """SUM over integers without SQLite's 64-bit overflow (returned as text)."""

    def __init__(self) -> None:
        self.total = 0

    def step(self, value: Any, /) -> None:
        if value is not None:
            self.total += int(value)

    def finalize(self) -> str:
        return str(self.total)


class _MoneyRun:
    """Running exact sum of (whole pico-USD, decimal rest) as decimal text (a window function)."""

    def __init__(self) -> None:
        self.pico = 0
        self.rest = Decimal(0)

    def step(self, pico: Any, rest: Any, /) -> None:
        self.pico += int(pico or 0)
        if rest is not None:
            self.rest += Decimal(rest)

    def inverse(self, pico: Any, rest: Any, /) -> None:
        self.pico -= int(pico or 0)
        if rest is not None:
            self.rest -= Decimal(rest)

    def value(self) -> str:
        return format(EXACT.add(Decimal(self.pico).scaleb(-12), self.rest), "f")

    def finalize(self) -> str:
        return self.value()


def _split_text(index: int) -> Any:
    def part(text: str | None) -> Any:
        return split_money(None if text is None else Decimal(text))[index]

    return part


def register_functions(conn: sqlite3.Connection) -> None:
    """SQL functions thrifty's statements use: exact decimal sums, and money split for the rollups."""
    conn.create_function("thrifty_dec_add", 2, _dec_add, deterministic=True)
    conn.create_aggregate("thrifty_dec_sum", 1, _DecSum)  # type: ignore[arg-type]  # typeshed: int only
    conn.create_aggregate("thrifty_int_sum", 1, _IntSum)  # type: ignore[arg-type]
    conn.create_window_function("thrifty_money_run", 2, _MoneyRun)  # type: ignore[arg-type]
    for index, name in enumerate(("thrifty_pico", "thrifty_exp", "thrifty_rest")):
        conn.create_function(name, 1, _split_text(index), deterministic=True)
