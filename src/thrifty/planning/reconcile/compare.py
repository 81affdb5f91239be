"""Compare a provider's export with the ledger per day x model (x scope), and say why they differ.

Pure: the ledger's rows (as the LedgerReader port returns them) and the export's records in, one
row per key out. The ledger side counts upstream *attempts* (each one the provider bills: retries,
cascade drafts and escalations included), under the provider's model id (`upstream`), dated by the
UTC day of the request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from thrifty.planning.ledger_usage import attempts_of
from thrifty.planning.reconcile.exports import Export, ExportRecord, Tokens

Measure = Literal["cost_usd", "tokens"]
ANY_MODEL = "*"  # the export is not grouped by model: days are compared whole
NON_TOKEN = "(non-token charges)"
NO_MODEL = "(no model)"
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


@dataclass(slots=True)
class Side:
    cost_usd: Decimal = field(default_factory=Decimal)
    tokens: Tokens = field(default_factory=Tokens)
    calls: int = 0  # ledger: upstream attempts; export: records
    unpriced: int = 0  # ledger: attempts with tokens but no price
    batch: int = 0  # ledger: attempts of batch items; export: records marked batch
    cached_usd: Decimal = field(default_factory=Decimal)  # export: cost of cache read/write items
    non_token: bool = False
    models: set[str] = field(default_factory=set)  # the names as written (export) or aliases (ledger)

    @property
    def token_total(self) -> int:
        return self.tokens.input + self.tokens.output


Key = tuple[str, str, str | None]  # (day, model, scope)


@dataclass(frozen=True, slots=True)
class Difference:
    day: str
    model: str
    scope: str | None
    provider: Side
    ledger: Side
    measure: Measure
    share: Decimal | None  # |provider - ledger| / provider; None when the provider's is 0
    over: bool
    causes: tuple[str, ...]

    def value(self, side: Side) -> Decimal:
        return side.cost_usd if self.measure == "cost_usd" else Decimal(side.token_total)

    @property
    def difference(self) -> Decimal:
        return self.value(self.provider) - self.value(self.ledger)


def _base(model: str) -> str:
    return _DATE_SUFFIX.sub("", model.lower())


class ModelMatcher:
    """Export model names -> the ledger's: exact, else without a dated snapshot suffix
    (gpt-4o-mini-2024-07-18 is the ledger's gpt-4o-mini; claude-3-5-haiku-20241022 likewise)."""

    def __init__(self, ledger_models: Iterable[str]) -> None:
        self._known: dict[str, str] = {}
        for model in ledger_models:
            self._known.setdefault(model.lower(), model)
            self._known.setdefault(_base(model), model)

    def __call__(self, name: str) -> str:
        return self._known.get(name.lower()) or self._known.get(_base(name)) or name.lower()


@dataclass(frozen=True, slots=True)
class LedgerView:
    """How ledger attempts map onto the export's names: alias -> provider model id, provider name ->
    kind, and provider name -> the export scope (api key, project, workspace) its key bills to."""

    provider_kind: str
    model_ids: Mapping[str, str]
    provider_kinds: Mapping[str, str]
    scopes: Mapping[str, str]
    only: frozenset[str] | None = None  # the settings' providers to count (None: all of the kind)


def ledger_sides(rows: Iterable[tuple[Any, ...]], view: LedgerView, *, by_scope: bool) -> dict[Key, Side]:
    from datetime import UTC, datetime

    sides: dict[Key, Side] = {}
    # (ts, tenant, feature, model, cache, batch, status, cost, in, cached, out, retries, attempts)
    for ts, _t, _f, _m, _c, batch_flag, _s, _cost, _i, _ci, _o, _r, stored in rows:
        day = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")
        for attempt in attempts_of(stored):
            provider = str(attempt.get("provider"))
            if view.provider_kinds.get(provider, provider) != view.provider_kind:
                continue
            if view.only is not None and provider not in view.only:
                continue
            alias = str(attempt.get("model"))
            model = view.model_ids.get(alias, alias)
            scope = view.scopes.get(provider) if by_scope else None
            side = sides.setdefault((day, model, scope), Side())
            tokens = Tokens(
                input=int(attempt.get("input_tokens") or 0),
                cached_input=int(attempt.get("cached_input_tokens") or 0),
                cache_write=int(attempt.get("cache_write_tokens") or 0),
                output=int(attempt.get("output_tokens") or 0),
                requests=1,
            )
            side.tokens = side.tokens + tokens
            side.calls += 1
            side.models.add(alias)
            side.batch += bool(batch_flag)
            cost = attempt.get("cost_usd")
            if cost is not None:
                side.cost_usd += Decimal(str(cost))
            elif tokens.input or tokens.output:
                side.unpriced += 1
    return sides


def export_sides(export: Export, match: ModelMatcher, *, by_model: bool, by_scope: bool) -> dict[Key, Side]:
    sides: dict[Key, Side] = {}
    for record in export.records:
        model = _export_model(record, match, by_model)
        side = sides.setdefault((record.day, model, record.scope if by_scope else None), Side())
        side.calls += 1
        if record.model is not None:
            side.models.add(record.model)
        if record.cost_usd is not None:
            side.cost_usd += record.cost_usd
            if record.kind is not None and "cache" in record.kind.lower():
                side.cached_usd += record.cost_usd
        if record.tokens is not None:
            side.tokens = side.tokens + record.tokens
        side.batch += bool(record.batch)
        side.non_token = side.non_token or record.non_token
    return sides


def _export_model(record: ExportRecord, match: ModelMatcher, by_model: bool) -> str:
    if not by_model:
        return ANY_MODEL
    if record.non_token:
        return NON_TOKEN
    return NO_MODEL if record.model is None else match(record.model)


@dataclass(frozen=True, slots=True)
class Reconciliation:
    measure: Measure
    by_model: bool
    by_scope: bool
    tolerance: Decimal
    rows: tuple[Difference, ...]
    provider_total: Decimal
    ledger_total: Decimal

    @property
    def over(self) -> tuple[Difference, ...]:
        return tuple(r for r in self.rows if r.over)


def reconcile(
    export: Export,
    ledger_rows: Iterable[tuple[Any, ...]],
    view: LedgerView,
    *,
    tolerance: Decimal,
    min_diff_usd: Decimal,
) -> Reconciliation:
    rows = list(ledger_rows)
    by_model = any(r.model is not None or r.non_token for r in export.records)
    by_scope = bool(view.scopes) and any(r.scope is not None for r in export.records)
    ledger = ledger_sides(rows, view, by_scope=by_scope)
    if not by_model:
        ledger = _merge_models(ledger)
    match = ModelMatcher(model for _, model, _ in ledger)
    provider = export_sides(export, match, by_model=by_model, by_scope=by_scope)
    measure: Measure = "cost_usd" if export.measures_cost else "tokens"
    known_scopes = set(view.scopes.values())
    out = []
    for key in sorted(set(provider) | set(ledger), key=lambda k: (k[0], k[1], k[2] or "")):
        p, led = provider.get(key, Side()), ledger.get(key, Side())
        out.append(_difference(key, p, led, measure, tolerance, min_diff_usd, known_scopes, by_scope))
    value = (lambda s: s.cost_usd) if measure == "cost_usd" else (lambda s: Decimal(s.token_total))
    return Reconciliation(
        measure=measure,
        by_model=by_model,
        by_scope=by_scope,
        tolerance=tolerance,
        rows=tuple(out),
        provider_total=sum((value(s) for s in provider.values()), Decimal(0)),
        ledger_total=sum((value(s) for s in ledger.values()), Decimal(0)),
    )


def _merge_models(sides: dict[Key, Side]) -> dict[Key, Side]:
    merged: dict[Key, Side] = {}
    for (day, _model, scope), side in sides.items():
        into = merged.setdefault((day, ANY_MODEL, scope), Side())
        into.cost_usd += side.cost_usd
        into.tokens = into.tokens + side.tokens
        into.calls += side.calls
        into.unpriced += side.unpriced
        into.batch += side.batch
        into.models |= side.models
    return merged


def _difference(
    key: Key,
    p: Side,
    led: Side,
    measure: Measure,
    tolerance: Decimal,
    min_diff_usd: Decimal,
    known_scopes: set[str],
    by_scope: bool,
) -> Difference:
    day, model, scope = key
    pv = p.cost_usd if measure == "cost_usd" else Decimal(p.token_total)
    lv = led.cost_usd if measure == "cost_usd" else Decimal(led.token_total)
    diff = pv - lv
    share = abs(diff) / pv if pv else None
    big_enough = abs(diff) > min_diff_usd if measure == "cost_usd" else diff != 0
    relative = share is None or share > tolerance
    cached_off = measure == "tokens" and _off(p.tokens.cached_input, led.tokens.cached_input, tolerance)
    # For tokens, cache reads counted differently change the bill even when the totals agree.
    over = (big_enough and relative) or cached_off
    causes = _causes(p, led, measure, diff, scope, known_scopes, by_scope, tolerance) if over else ()
    return Difference(day, model, scope, p, led, measure, share, over, causes)


def _off(provider: int, ledger: int, tolerance: Decimal) -> bool:
    if provider == ledger:
        return False
    return provider == 0 or Decimal(abs(provider - ledger)) / provider > tolerance


def _causes(
    p: Side,
    led: Side,
    measure: Measure,
    diff: Decimal,
    scope: str | None,
    known_scopes: set[str],
    by_scope: bool,
    tolerance: Decimal,
) -> tuple[str, ...]:
    causes: list[str] = []
    if p.non_token:
        causes.append("non-token charges (web search, code execution, ...): the gateway prices tokens only")
    if by_scope and scope is not None and scope not in known_scopes:
        causes.append(
            f"{scope} is not a key/project/workspace of the gateway's providers (--scope): "
            "traffic that bypassed the gateway"
        )
    if led.unpriced:
        aliases = ", ".join(sorted(led.models))
        causes.append(
            f"unpriced model: {led.unpriced} gateway call{'s' if led.unpriced != 1 else ''} recorded with "
            f"cost NULL ({aliases}); give the model a price in the settings (models.NAME.price)"
        )
    if measure == "cost_usd" and p.cached_usd and not (led.tokens.cached_input or led.tokens.cache_write):
        causes.append(
            "cached-token pricing: the provider billed prompt-cache reads/writes the ledger has none of "
            "(usage without cache details is priced at the full input rate)"
        )
    if measure == "tokens" and _off(p.tokens.cached_input, led.tokens.cached_input, tolerance):
        causes.append(
            f"cached-token pricing: the provider counted {p.tokens.cached_input:,} cached input tokens, "
            f"the ledger {led.tokens.cached_input:,}"
        )
    if p.batch and not led.batch:
        causes.append("batch pricing: the provider billed batch-API work the gateway did not send")
    elif led.batch and not p.batch and measure == "cost_usd" and diff < 0:
        causes.append(
            f"batch pricing: the gateway priced {led.batch} batch call{'s' if led.batch != 1 else ''} at "
            "batch rates (a model without a known batch price: as the provider's batch_discount says)"
        )
    if diff > 0 and not led.calls and not p.non_token:
        causes.append(
            "no gateway calls to this model this day: traffic that bypassed the gateway (another app or key)"
        )
    elif diff > 0 and not led.unpriced and not p.non_token:
        causes.append(
            "the provider billed more than the gateway recorded: traffic that bypassed the gateway, or a "
            "price below the provider's (a price override)"
        )
    if diff < 0 and not p.calls:
        causes.append(
            "the export has nothing for this gateway traffic: is the export filtered to other projects or "
            "keys, or cut short?"
        )
    elif diff < 0 and not any("batch pricing" in c for c in causes):
        causes.append(
            "the gateway recorded more than the provider billed: a price override above the provider's "
            "price, or calls dated across a UTC day boundary"
        )
    return tuple(causes)
