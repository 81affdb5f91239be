"""Tables that fit the terminal without cutting a name or an amount.

Rich shrinks a table that is too wide by truncating cells (`gpt-4o-m…`, `0.02…`). For money that is
wrong, so a table is fitted here instead: every column is as wide as its widest cell, and when the
whole is too wide for the terminal the least important columns are dropped until it fits (the
caption says which). Only if the essential columns alone do not fit do cells wrap, never end in `…`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    justify: Literal["left", "right"] = "right"
    # Lower is dropped first on a narrow terminal; None: never dropped.
    priority: int | None = None


def money_text(values: Sequence[Decimal | None]) -> list[str]:
    """Amounts of one column in one format: the same number of decimals for all of them, as many as
    the most precise one needs (2 to 10), so `0.0210` never stands next to `0.00472`."""
    places = 2
    for value in values:
        if value is not None and value != 0:
            exponent = value.normalize().as_tuple().exponent
            if isinstance(exponent, int):
                places = max(places, min(10, -exponent))
    quantum = Decimal(1).scaleb(-places)
    return ["" if v is None else f"{v.quantize(quantum):,.{places}f}" for v in values]


def fit_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    width: int,
    title: str | None = None,
    section_after: int | None = None,
) -> Any:
    """A rich Table of `rows` that fits `width` columns of terminal without truncating a cell."""
    from rich import box
    from rich.console import Console

    measure = Console(width=100_000)
    keep = list(range(len(columns)))
    droppable = sorted(
        (i for i, c in enumerate(columns) if c.priority is not None), key=lambda i: columns[i].priority or 0
    )
    dropped: list[str] = []

    def build(fits: bool) -> Any:
        from rich.table import Table

        caption = f"(narrow terminal: not shown: {', '.join(dropped)})" if dropped else None
        # Simple rules and collapsed padding: about two characters between columns, not three.
        table = Table(
            title=title,
            title_justify="left",
            caption=caption,
            caption_justify="left",
            box=box.SIMPLE_HEAD,
            collapse_padding=True,
        )
        for i in keep:
            column = columns[i]
            table.add_column(column.header, justify=column.justify, no_wrap=fits, overflow="fold")
        for n, row in enumerate(rows):
            table.add_row(
                *(row[i] for i in keep), end_section=section_after is not None and n == section_after
            )
        return table

    while measure.measure(build(True)).maximum > width and droppable:
        victim = droppable.pop(0)
        keep.remove(victim)
        dropped.append(columns[victim].header)
    fits = measure.measure(build(True)).maximum <= width
    return build(fits)
