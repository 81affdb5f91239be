"""Labelled routing data: loading, per-call answers and costs, and deterministic splits.

A row is one prompt with every model's recorded reply and whether it was correct. Loading turns
each reply into what the router and the benchmark need: the normalised answer (for agreement), the
recorded correctness (the ground truth) and the cost of that call.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from thrifty.errors import InvalidData
from thrifty.routing.train.cost import CostModel
from thrifty.routing.train.extract import answer_key


@dataclass(frozen=True, slots=True)
class Call:
    answer: str | None
    correct: bool
    cost: Decimal
    output_tokens: int
    output: str = ""  # the raw reply, replayed as a draft through the router's step API


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    task: str
    prompt: str
    calls: dict[str, Call]


FORMAT_HINT = (
    'one JSON object a line: {"id", "task", "prompt", "reference", '
    '"responses": {MODEL: {"output": str, "correct": 0|1}}}'
)


def _files(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise InvalidData(f"{p}: no such file or directory")
        out.extend(sorted(p.glob("*.jsonl")) if p.is_dir() else [p])
    return out


def parse_row(obj: object, costs: CostModel) -> Row:
    if not isinstance(obj, dict):
        raise InvalidData(f"a row must be a JSON object; expected {FORMAT_HINT}")
    missing = [k for k in ("id", "task", "prompt", "responses") if k not in obj]
    if missing:
        raise InvalidData(f"row {obj.get('id')!r} lacks {', '.join(missing)}; expected {FORMAT_HINT}")
    task = str(obj["task"])
    prompt = str(obj["prompt"])
    responses = obj["responses"]
    if not isinstance(responses, dict):
        raise InvalidData(f"row {obj['id']!r}: responses must be an object; expected {FORMAT_HINT}")
    prompt_tokens = costs.tokens(prompt)
    calls: dict[str, Call] = {}
    for model, resp in responses.items():
        if not costs.priced(str(model)):
            continue  # a model the benchmark has no price for cannot be routed to or compared
        if not isinstance(resp, dict) or "output" not in resp or resp.get("correct") not in (0, 1):
            raise InvalidData(
                f"row {obj['id']!r}, model {model!r}: a response needs an output and correct 0 or 1"
            )
        output = str(resp["output"])
        out_tokens = costs.tokens(output)
        calls[str(model)] = Call(
            answer=answer_key(output, task),
            correct=bool(resp["correct"]),
            cost=costs.call_cost(str(model), prompt_tokens, out_tokens),
            output_tokens=out_tokens,
            output=output,
        )
    return Row(id=str(obj["id"]), task=task, prompt=prompt, calls=calls)


def load_rows(paths: Iterable[str | Path], costs: CostModel | None = None) -> list[Row]:
    """Rows from JSONL files or directories of them (every `*.jsonl` inside)."""
    costs = costs or CostModel()
    rows: list[Row] = []
    for path in _files(paths):
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(parse_row(json.loads(line), costs))
                except json.JSONDecodeError as exc:
                    raise InvalidData(f"{path}:{line_no}: not JSON: {exc}") from exc
                except InvalidData as exc:
                    raise InvalidData(f"{path}:{line_no}: {exc.message}") from exc
    return rows


def id_bucket(row_id: str, salt: str = "") -> float:
    """A stable number in [0, 1) from the id, so splits do not depend on file order or a seed."""
    digest = hashlib.sha256((salt + row_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_rows(rows: Sequence[Row], fraction: float, salt: str = "") -> tuple[list[Row], list[Row]]:
    """(rows whose id hashes below `fraction`, the rest)."""
    first = [r for r in rows if id_bucket(r.id, salt) < fraction]
    second = [r for r in rows if id_bucket(r.id, salt) >= fraction]
    return first, second
