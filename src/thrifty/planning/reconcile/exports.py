"""Provider usage and cost exports, read into one record shape. Pure: text in, records out.

Accepted formats (detected from the content; the README shows each):

- `openai-costs`: pages of OpenAI's organization Costs API (`GET /v1/organization/costs`):
  `{"object": "page", "data": [{"object": "bucket", "start_time", "end_time", "results":
  [{"object": "organization.costs.result", "amount": {"value", "currency"}, "line_item",
  "project_id", "api_key_id"}]}]}`. `line_item` (with `group_by=line_item`) reads "MODEL, KIND"
  (e.g. "gpt-4o-mini-2024-07-18, input"); the text before the first comma is taken as the model.
- `openai-costs-csv`: the usage dashboard's Cost export as CSV: `start_time, end_time,
  amount_value, amount_currency, line_item, project_id, ...` (unix seconds; further columns such
  as organization_id or project_name are ignored).
- `openai-usage`: pages of the Completions Usage API (`GET /v1/organization/usage/completions`):
  results `"organization.usage.completions.result"` with `input_tokens` (cached included),
  `input_cached_tokens`, `output_tokens`, `num_model_requests`, `model`, `batch`, `project_id`,
  `api_key_id`.
- `anthropic-costs`: Anthropic's Cost Report (`GET /v1/organizations/cost_report`):
  `{"data": [{"starting_at", "ending_at", "results": [{"amount", "currency", "model",
  "cost_type", "token_type", "service_tier", "workspace_id", "description", "context_window"}]}],
  "has_more", "next_page"}`; `amount` is a decimal string in cents ("123.45" is $1.2345).
- `anthropic-usage`: Anthropic's Messages Usage Report (`GET /v1/organizations/usage_report/
  messages`): results with `uncached_input_tokens`, `cache_read_input_tokens`, `cache_creation:
  {ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}`, `output_tokens`, `model`,
  `service_tier`, `workspace_id`, `api_key_id`.

A JSON export is one page, a JSON array of pages, or one page per line (JSONL), as a script paging
through the API saves them. A result that cannot be read is a `BadRow` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from thrifty.errors import InvalidData

Provider = Literal["openai", "anthropic"]
FORMATS: dict[str, Provider] = {
    "openai-costs": "openai",
    "openai-costs-csv": "openai",
    "openai-usage": "openai",
    "anthropic-costs": "anthropic",
    "anthropic-usage": "anthropic",
}
_OPENAI_COST = "organization.costs.result"
_OPENAI_USAGE = "organization.usage.completions.result"
_CENTS = Decimal(100)


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token counts in the gateway's convention: `input` includes cache reads and writes."""

    input: int = 0
    cached_input: int = 0
    cache_write: int = 0
    output: int = 0
    requests: int = 0

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(
            self.input + other.input,
            self.cached_input + other.cached_input,
            self.cache_write + other.cache_write,
            self.output + other.output,
            self.requests + other.requests,
        )


@dataclass(frozen=True, slots=True)
class ExportRecord:
    day: str  # the bucket's UTC day, YYYY-MM-DD
    model: str | None  # None: the export was not grouped by model (or a non-token charge)
    scope: str | None  # api key, project or workspace, when the export was grouped by one
    cost_usd: Decimal | None = None  # cost exports
    tokens: Tokens | None = None  # usage exports
    kind: str | None = None  # the line item's or token type's kind: "input", "cached input", ...
    batch: bool | None = None
    non_token: bool = False  # a charge that is not for tokens (web search, code execution)


@dataclass(frozen=True, slots=True)
class BadRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(slots=True)
class Export:
    file: str
    format: str
    records: list[ExportRecord] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    # The days the export covers: its buckets' (an empty bucket is a day billed nothing).
    bucket_days: set[str] = field(default_factory=set)

    @property
    def days(self) -> list[str]:
        return sorted(self.bucket_days | {r.day for r in self.records})

    @property
    def measures_cost(self) -> bool:
        return self.format in ("openai-costs", "openai-costs-csv", "anthropic-costs")


class _RowError(ValueError):
    pass


# -- JSON pages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Document:
    value: Any
    text: str
    first_line: int  # 1-based line of the document's first character in the file


def _documents(text: str, file: str) -> list[_Document]:
    try:
        return [_Document(json.loads(text, parse_float=Decimal), text, 1)]
    except json.JSONDecodeError as whole:
        docs: list[_Document] = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                docs.append(_Document(json.loads(line, parse_float=Decimal), line, n))
            except json.JSONDecodeError:
                if n == 1 or not docs:
                    raise InvalidData(
                        f"{file}: not JSON (line {whole.lineno}, column {whole.colno}: {whole.msg}) "
                        "nor JSON lines; give the export as the API returned it"
                    ) from None
                raise InvalidData(f"{file}:{n}: not JSON (one page per line expected)") from None
        return docs


class _Lines:
    """JSON pointer -> 1-based line, computed only when a row is bad (large exports parse fast)."""

    def __init__(self, doc: _Document) -> None:
        self._doc = doc
        self._map: dict[str, Any] | None = None

    def line(self, pointer: str) -> int:
        if self._map is None:
            from json_source_map import calculate  # type: ignore[import-untyped]

            self._map = calculate(self._doc.text)
        entry = self._map.get(pointer)
        return self._doc.first_line + (entry.value_start.line if entry is not None else 0)


def _pages(doc: _Document, file: str) -> Iterator[tuple[Any, str]]:
    value = doc.value
    if isinstance(value, list):
        for i, page in enumerate(value):
            yield page, f"/{i}"
    else:
        yield value, ""


def _bucket_day(bucket: Any) -> str | None:
    if not isinstance(bucket, dict):
        return None
    try:
        if "starting_at" in bucket:
            return _day_from_rfc3339(bucket["starting_at"])
        return _day_from_unix(bucket.get("start_time"))
    except _RowError:
        return None  # its results say so, row by row


def _results(
    doc: _Document, file: str, bad: list[BadRow], days: set[str]
) -> Iterator[tuple[Any, Any, str, _Lines]]:
    """(bucket, result, JSON pointer of the result, lines) of every result in a document."""
    lines = _Lines(doc)
    for page, base in _pages(doc, file):
        buckets = page.get("data") if isinstance(page, dict) else None
        if not isinstance(buckets, list):
            bad.append(BadRow(file, lines.line(base), 'not a page of buckets (no "data" list)'))
            continue
        for b, bucket in enumerate(buckets):
            results = bucket.get("results") if isinstance(bucket, dict) else None
            where = f"{base}/data/{b}"
            day = _bucket_day(bucket)
            if day is not None:
                days.add(day)
            if not isinstance(results, list):
                bad.append(BadRow(file, lines.line(where), 'a bucket without a "results" list'))
                continue
            for r, result in enumerate(results):
                yield bucket, result, f"{where}/results/{r}", lines


def _detect_json(docs: list[_Document]) -> str | None:
    for doc in docs:
        for page, _ in _pages(doc, ""):
            for bucket in page.get("data") or [] if isinstance(page, dict) else []:
                for result in (bucket.get("results") or []) if isinstance(bucket, dict) else []:
                    if not isinstance(result, dict):
                        continue
                    kind = result.get("object")
                    if kind == _OPENAI_COST:
                        return "openai-costs"
                    if kind == _OPENAI_USAGE:
                        return "openai-usage"
                    if "uncached_input_tokens" in result or "cache_read_input_tokens" in result:
                        return "anthropic-usage"
                    if "amount" in result and ("cost_type" in result or "token_type" in result):
                        return "anthropic-costs"
                    if "amount" in result and "starting_at" in bucket:
                        return "anthropic-costs"
                    if "amount" in result:
                        return "openai-costs"
                    if "num_model_requests" in result:
                        return "openai-usage"
    return None


def _day_from_unix(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise _RowError("start_time is not unix seconds")
    try:
        seconds = int(Decimal(str(value)))
    except InvalidOperation:
        raise _RowError(f"start_time {value!r} is not unix seconds") from None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


def _day_from_rfc3339(value: Any) -> str:
    if not isinstance(value, str):
        raise _RowError("starting_at is not an RFC 3339 time")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _RowError(f"starting_at {value!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d")


def _decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise _RowError(f"{name} is missing or not a number")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise _RowError(f"{name} {value!r} is not a number") from None
    if not amount.is_finite():
        raise _RowError(f"{name} {value!r} is not a number")
    return amount


def _count(result: dict[str, Any], name: str, *, required: bool = False) -> int:
    value = result.get(name)
    if value is None and not required:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _RowError(f"{name} is {'missing' if value is None else repr(value)}, not a token count")
    return value


def _text(result: dict[str, Any], name: str) -> str | None:
    value = result.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _RowError(f"{name} {value!r} is not text")
    return value


def _usd(currency: Any) -> None:
    if currency is not None and str(currency).lower() != "usd":
        raise _RowError(f"currency {currency!r}: only USD amounts can be compared with the ledger")


def split_line_item(line_item: str | None) -> tuple[str | None, str | None]:
    """ "gpt-4o-2024-08-06, input" -> ("gpt-4o-2024-08-06", "input"); no comma: all model."""
    if line_item is None or not line_item.strip():
        return None, None
    model, sep, kind = line_item.partition(",")
    return model.strip(), (kind.strip() or None) if sep else None


def _openai_cost(bucket: dict[str, Any], result: dict[str, Any]) -> ExportRecord:
    amount = result.get("amount")
    if not isinstance(amount, dict):
        raise _RowError("amount is missing (an object with value and currency)")
    _usd(amount.get("currency"))
    model, kind = split_line_item(_text(result, "line_item"))
    return ExportRecord(
        day=_day_from_unix(bucket.get("start_time")),
        model=model,
        scope=_text(result, "api_key_id") or _text(result, "project_id"),
        cost_usd=_decimal(amount.get("value"), "amount.value"),
        kind=kind,
        batch=True if kind is not None and "batch" in kind.lower() else None,
    )


def _openai_usage(bucket: dict[str, Any], result: dict[str, Any]) -> ExportRecord:
    batch = result.get("batch")
    if batch is not None and not isinstance(batch, bool):
        raise _RowError(f"batch {batch!r} is not true, false or null")
    return ExportRecord(
        day=_day_from_unix(bucket.get("start_time")),
        model=_text(result, "model"),
        scope=_text(result, "api_key_id") or _text(result, "project_id"),
        tokens=Tokens(
            input=_count(result, "input_tokens", required=True),
            cached_input=_count(result, "input_cached_tokens"),
            output=_count(result, "output_tokens", required=True),
            requests=_count(result, "num_model_requests"),
        ),
        batch=batch,
    )


def _anthropic_cost(bucket: dict[str, Any], result: dict[str, Any]) -> ExportRecord:
    _usd(result.get("currency"))
    cost_type = _text(result, "cost_type")
    token_type = _text(result, "token_type")
    tier = _text(result, "service_tier")
    return ExportRecord(
        day=_day_from_rfc3339(bucket.get("starting_at")),
        model=_text(result, "model"),
        scope=_text(result, "workspace_id"),
        cost_usd=_decimal(result.get("amount"), "amount") / _CENTS,
        kind=token_type or cost_type,
        batch=None if tier is None else tier == "batch",
        non_token=cost_type is not None and cost_type != "tokens",
    )


def _anthropic_usage(bucket: dict[str, Any], result: dict[str, Any]) -> ExportRecord:
    creation = result.get("cache_creation") or {}
    if not isinstance(creation, dict):
        raise _RowError("cache_creation is not an object")
    writes = _count(creation, "ephemeral_5m_input_tokens") + _count(creation, "ephemeral_1h_input_tokens")
    uncached = _count(result, "uncached_input_tokens", required=True)
    cached = _count(result, "cache_read_input_tokens")
    tier = _text(result, "service_tier")
    return ExportRecord(
        day=_day_from_rfc3339(bucket.get("starting_at")),
        model=_text(result, "model"),
        scope=_text(result, "api_key_id") or _text(result, "workspace_id"),
        tokens=Tokens(
            input=uncached + cached + writes,
            cached_input=cached,
            cache_write=writes,
            output=_count(result, "output_tokens", required=True),
        ),
        batch=None if tier is None else tier == "batch",
    )


_READERS = {
    "openai-costs": _openai_cost,
    "openai-usage": _openai_usage,
    "anthropic-costs": _anthropic_cost,
    "anthropic-usage": _anthropic_usage,
}


# -- CSV --------------------------------------------------------------------------------------------

_CSV_REQUIRED = ("start_time", "amount_value", "line_item")


def _read_csv(text: str, file: str, export: Export) -> None:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in _CSV_REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise InvalidData(
            f"{file}:1: a cost CSV needs the columns {', '.join(_CSV_REQUIRED)} (missing: "
            f"{', '.join(missing)}); export Cost data grouped by line item from the usage dashboard"
        )
    for row in reader:
        line = reader.line_num
        try:
            if None in row:
                raise _RowError("more cells than the header has columns")
            _usd(row.get("amount_currency") or None)
            model, kind = split_line_item(row.get("line_item") or None)
            export.records.append(
                ExportRecord(
                    day=_day_from_unix((row.get("start_time") or "").strip() or None),
                    model=model,
                    scope=(row.get("api_key_id") or row.get("project_id") or None),
                    cost_usd=_decimal((row.get("amount_value") or "").strip() or None, "amount_value"),
                    kind=kind,
                    batch=True if kind is not None and "batch" in kind.lower() else None,
                )
            )
        except _RowError as err:
            export.bad.append(BadRow(file, line, str(err)))


# -- entry point ----------------------------------------------------------------------------------


def read_export(text: str, file: str, provider: Provider) -> Export:
    """Every record of one export file; rows that cannot be read are in `bad`, never dropped."""
    stripped = text.lstrip("\ufeff").strip()
    if not stripped:
        raise InvalidData(f"{file}: the export is empty")
    if stripped[0] not in "{[":
        export = Export(file, "openai-costs-csv")
        _check_provider(export.format, provider, file)
        _read_csv(text.lstrip("\ufeff"), file, export)
        return export
    docs = _documents(stripped, file)
    fmt = _detect_json(docs)
    if fmt is None:
        raise InvalidData(
            f"{file}: no usage or cost results found; give an OpenAI Costs/Usage API page or an "
            "Anthropic cost_report/usage_report page (see `thrifty reconcile --help`)"
        )
    _check_provider(fmt, provider, file)
    export = Export(file, fmt)
    read = _READERS[fmt]
    for doc in docs:
        for bucket, result, pointer, lines in _results(doc, file, export.bad, export.bucket_days):
            try:
                if not isinstance(result, dict):
                    raise _RowError("a result that is not an object")
                export.records.append(read(bucket, result))
            except _RowError as err:
                export.bad.append(BadRow(file, lines.line(pointer), str(err)))
    return export


def _check_provider(fmt: str, provider: Provider, file: str) -> None:
    if FORMATS[fmt] != provider:
        raise InvalidData(f"{file} is an {FORMATS[fmt]} export ({fmt}); pass --provider {FORMATS[fmt]}")
