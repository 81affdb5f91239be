"""Objects the eval tests import by name: a pydantic model and a Python scorer for golden items."""

from __future__ import annotations

from typing import Any

import pydantic


class Invoice(pydantic.BaseModel):
    total: float
    currency: str


def ends_with_expected(output: str, item: Any) -> bool:
    return output.rstrip().endswith(str(item.expected))
