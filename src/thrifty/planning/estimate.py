"""`thrifty estimate`: a feature spec and the price source in, the calculators' results out as one
report (a JSON document, and the tables made from it)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.planning import calculators as calc
from thrifty.planning.prices import ModelPrices, flag_prices, model_prices
from thrifty.planning.spec import FeatureSpec
from thrifty.settings import Settings
from thrifty.types import decimal_text

_MONEY_PLACES = Decimal("1e-12")


def money(value: Decimal | None) -> str | None:
    """Exact amounts to 12 decimals (pico-USD), the ledger's resolution, in plain notation."""
    if value is None:
        return None
    return decimal_text(value.quantize(_MONEY_PLACES).normalize() if value else Decimal(0))


def _ratio(value: Decimal | None) -> str | None:
    return None if value is None else decimal_text(value.quantize(Decimal("1e-6")).normalize())


@dataclass(frozen=True, slots=True)
class ForecastRow:
    tenant: str
    forecast: calc.Forecast


@dataclass(frozen=True, slots=True)
class EstimateReport:
    spec: FeatureSpec
    prices: ModelPrices
    monthly: calc.MonthlyEstimate
    cascade: calc.CascadeEstimate | None
    cheap_prices: ModelPrices | None
    break_even: tuple[calc.BreakEven, ...]
    payback: calc.Payback | None
    forecasts: tuple[ForecastRow, ...] = ()
    ledger_note: str | None = None

    @property
    def over_budget(self) -> bool:
        return any(f.forecast.over_budget for f in self.forecasts)

    def to_json(self) -> dict[str, Any]:
        spec = self.spec
        m = self.monthly
        out: dict[str, Any] = {
            "feature": spec.feature,
            "model": spec.model,
            "price_source": self.prices.source,
            "prices_usd_per_mtok": _prices_json(self.prices.realtime),
            "batch_prices_usd_per_mtok": None
            if self.prices.batch is None
            else {**_prices_json(self.prices.batch), "source": self.prices.batch_source},
            "avg_input_tokens": decimal_text(spec.avg_input_tokens),
            "avg_output_tokens": decimal_text(spec.avg_output_tokens),
            "requests_per_day": decimal_text(spec.requests_per_day),
            "days_per_month": decimal_text(spec.days_per_month),
            "latency_class": spec.latency_class,
            "cost_per_request_usd": money(m.cost_per_request),
            "daily_usd": money(m.daily_usd),
            "monthly_usd": money(m.monthly_usd),
            "adjustments": {
                "retry_factor": decimal_text(spec.retry_factor),
                "cache_hit_rate": decimal_text(spec.cache_hit_rate),
                "semantic_hit_rate": decimal_text(spec.semantic_hit_rate),
                "prompt_cache_share": decimal_text(spec.prompt_cache_share),
                "batch_share": decimal_text(spec.effective_batch_share),
            },
            "stack": [
                {"step": s.name, "monthly_usd": money(s.monthly_usd), "delta_usd": money(s.delta_usd)}
                for s in m.steps
            ],
            "adjusted_monthly_usd": money(m.adjusted_monthly_usd),
            "cascade": None,
            "self_hosting": [_break_even_json(b) for b in self.break_even] or None,
            "fine_tuning": None,
        }
        if self.cascade is not None and spec.cascade is not None:
            c = self.cascade
            out["cascade"] = {
                "cheap_model": spec.cascade.cheap_model,
                "cheap_success_rate": decimal_text(spec.cascade.cheap_success_rate),
                "cheap_cost_per_request_usd": money(c.cheap_cost_per_request),
                "escalation_cost_per_request_usd": money(c.escalation_cost_per_request),
                "blended_cost_per_request_usd": money(c.blended_cost_per_request),
                "strong_only_cost_per_request_usd": money(c.strong_only_cost_per_request),
                "blended_monthly_usd": money(c.blended_monthly_usd),
                "strong_only_monthly_usd": money(c.strong_only_monthly_usd),
                "saving_usd": money(c.saving_usd),
                "saving_share": _ratio(c.saving_share),
            }
        if self.payback is not None:
            p = self.payback
            out["fine_tuning"] = {
                "setup_usd": money(p.setup_usd),
                "cost_per_call_before_usd": money(p.cost_per_call_before),
                "cost_per_call_after_usd": money(p.cost_per_call_after),
                "saving_per_call_usd": money(p.saving_per_call),
                "monthly_saving_usd": money(p.monthly_saving_usd),
                "break_even_calls": None if p.break_even_calls is None else _ratio(p.break_even_calls),
                "payback_days": _ratio(p.payback_days),
                "payback_months": _ratio(p.payback_months),
            }
        if self.forecasts:
            out["forecast"] = [
                {
                    "tenant": f.tenant,
                    "month_to_date_usd": money(f.forecast.month_to_date_usd),
                    "elapsed_days": _ratio(f.forecast.elapsed_days),
                    "days_in_month": f.forecast.days_in_month,
                    "forecast_usd": money(f.forecast.forecast_usd),
                    "budget_usd": money(f.forecast.budget_usd),
                    "over_budget": f.forecast.over_budget,
                }
                for f in self.forecasts
            ]
            out["over_budget"] = self.over_budget
        if self.ledger_note:
            out["ledger_note"] = self.ledger_note
        return out


def _prices_json(prices: calc.TokenPrices) -> dict[str, str]:
    return {
        "input": decimal_text(prices.input),
        "cached_input": decimal_text(prices.cached_input),
        "output": decimal_text(prices.output),
    }


def _break_even_json(b: calc.BreakEven) -> dict[str, Any]:
    return {
        "model": b.model,
        "api_usd_per_mtok": money(b.api_usd_per_mtok),
        "api_monthly_usd": money(b.api_monthly_usd),
        "self_hosted_gpus": b.self_hosted_gpus,
        "self_hosted_monthly_usd": money(b.self_hosted_monthly_usd),
        "break_even_tokens_per_month": _ratio(b.break_even_tokens_per_month),
        "break_even_requests_per_day": _ratio(b.break_even_requests_per_day),
        "break_even_gpus": b.break_even_gpus,
    }


def _prices(
    model: str, spec: FeatureSpec, settings: Settings | None, *, prompt_tokens: Decimal
) -> ModelPrices:
    return model_prices(model, settings, prompt_tokens=int(prompt_tokens), batch_discount=spec.batch_discount)


def build_estimate(spec: FeatureSpec, settings: Settings | None) -> EstimateReport:
    if spec.price is not None:
        given = spec.price
        cached = (
            given.cached_input_per_mtok if given.cached_input_per_mtok is not None else given.input_per_mtok
        )
        prices = flag_prices(
            spec.model,
            calc.TokenPrices(given.input_per_mtok, given.output_per_mtok, cached),
            spec.batch_discount,
        )
    else:
        prices = _prices(spec.model, spec, settings, prompt_tokens=spec.avg_input_tokens)
    batch_share = spec.effective_batch_share
    if batch_share and prices.batch is None:
        raise ThriftyError(
            f"no batch price is known for {spec.model!r}: give batch_discount (--batch-discount 0.5 for "
            "half price) or set batch_share to 0"
        )
    workload = calc.Workload(
        spec.avg_input_tokens, spec.avg_output_tokens, spec.requests_per_day, spec.days_per_month
    )
    adjustments = calc.Adjustments(
        retry_factor=spec.retry_factor,
        cache_hit_rate=spec.cache_hit_rate,
        semantic_hit_rate=spec.semantic_hit_rate,
        prompt_cache_share=spec.prompt_cache_share,
        batch_share=batch_share,
    )
    monthly = calc.monthly_cost(workload, prices.realtime, adjustments, prices.batch)

    cascade = cheap = None
    if spec.cascade is not None:
        cheap = _prices(spec.cascade.cheap_model, spec, settings, prompt_tokens=spec.avg_input_tokens)
        cascade = calc.cascade_cost(
            workload,
            cheap.realtime,
            prices.realtime,
            spec.cascade.cheap_success_rate,
            spec.cascade.escalation_extra_input_tokens,
            spec.cascade.escalation_extra_output_tokens,
        )

    break_evens: list[calc.BreakEven] = []
    if spec.self_hosting is not None:
        if workload.tokens_per_request <= 0:
            raise ThriftyError("self-hosting break-even needs requests with tokens (avg_input_tokens > 0)")
        host = calc.SelfHosting(
            spec.self_hosting.gpu_usd_per_hour,
            spec.self_hosting.gpu_tokens_per_second,
            spec.self_hosting.utilisation,
            spec.self_hosting.ops_usd_per_month,
        )
        break_evens.append(calc.break_even(spec.model, workload, monthly.cost_per_request, host))
        for other in dict.fromkeys(spec.self_hosting.compare):
            if other == spec.model:
                continue
            other_prices = _prices(other, spec, settings, prompt_tokens=spec.avg_input_tokens)
            per_call = calc.call_cost(other_prices.realtime, workload.input_tokens, workload.output_tokens)
            break_evens.append(calc.break_even(other, workload, per_call, host))

    payback = None
    if spec.fine_tuning is not None:
        ft = spec.fine_tuning
        if ft.usd_per_call is not None:
            after = ft.usd_per_call
        else:
            assert ft.model is not None
            ft_in = ft.avg_input_tokens if ft.avg_input_tokens is not None else spec.avg_input_tokens
            ft_out = ft.avg_output_tokens if ft.avg_output_tokens is not None else spec.avg_output_tokens
            ft_prices = _prices(ft.model, spec, settings, prompt_tokens=ft_in)
            after = calc.call_cost(ft_prices.realtime, ft_in, ft_out)
        payback = calc.fine_tuning_payback(workload, monthly.cost_per_request, after, ft.setup_usd)

    return EstimateReport(spec, prices, monthly, cascade, cheap, tuple(break_evens), payback)
