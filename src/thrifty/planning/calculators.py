"""The estimator's calculators: pure functions of Decimal inputs (no prices looked up, no I/O).

Every amount is exact Decimal arithmetic on the inputs, so a test can check each against a hand
computation to the last digit; rounding is left to the display.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

MILLION = Decimal(1_000_000)
_ZERO = Decimal(0)
_ONE = Decimal(1)
_SECONDS_PER_DAY = Decimal(86_400)
_HOURS_PER_DAY = Decimal(24)


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """USD per million tokens of one model (at one prompt length, for tiered prices)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal


def call_cost(
    prices: TokenPrices, input_tokens: Decimal, output_tokens: Decimal, cached_share: Decimal = _ZERO
) -> Decimal:
    """USD of one call; `cached_share` of the input is read from the provider's prompt cache."""
    cached = input_tokens * cached_share
    return (
        (input_tokens - cached) * prices.input + cached * prices.cached_input + output_tokens * prices.output
    ) / MILLION


@dataclass(frozen=True, slots=True)
class Workload:
    input_tokens: Decimal  # average per request
    output_tokens: Decimal
    requests_per_day: Decimal
    days_per_month: Decimal = Decimal(30)

    @property
    def requests_per_month(self) -> Decimal:
        return self.requests_per_day * self.days_per_month

    @property
    def tokens_per_request(self) -> Decimal:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Adjustments:
    retry_factor: Decimal = _ONE  # upstream calls per request that reaches the provider (>= 1)
    cache_hit_rate: Decimal = _ZERO  # requests the exact cache (or a deduplicated repeat) answers
    semantic_hit_rate: Decimal = _ZERO  # of the requests left, those the semantic cache answers
    prompt_cache_share: Decimal = _ZERO  # input tokens read from the provider's prompt cache
    batch_share: Decimal = _ZERO  # upstream calls sent through the provider's batch API


@dataclass(frozen=True, slots=True)
class StackStep:
    """One adjustment applied on top of the ones before it."""

    name: str
    monthly_usd: Decimal  # the month's cost with this and every earlier step
    delta_usd: Decimal  # what this step adds (retries) or takes off (negative)


@dataclass(frozen=True, slots=True)
class MonthlyEstimate:
    cost_per_request: Decimal  # one call at list price: no retries, caches or batch
    daily_usd: Decimal
    monthly_usd: Decimal
    steps: tuple[StackStep, ...]

    @property
    def adjusted_monthly_usd(self) -> Decimal:
        return self.steps[-1].monthly_usd if self.steps else self.monthly_usd


def monthly_cost(
    workload: Workload,
    prices: TokenPrices,
    adjustments: Adjustments = Adjustments(),
    batch_prices: TokenPrices | None = None,
) -> MonthlyEstimate:
    """List price of the month, then retries, exact and semantic cache hits, prompt caching and
    batch in that order, each step's saving measured on what the steps before it left."""
    adj = adjustments
    if adj.batch_share and batch_prices is None:
        raise ValueError("a batch share needs batch prices")
    per_call = call_cost(prices, workload.input_tokens, workload.output_tokens)
    monthly = per_call * workload.requests_per_month
    steps: list[StackStep] = []

    def step(name: str, value: Decimal) -> None:
        before = steps[-1].monthly_usd if steps else monthly
        steps.append(StackStep(name, value, value - before))

    calls = workload.requests_per_month
    if adj.retry_factor != _ONE:
        calls = calls * adj.retry_factor
        step("retries", per_call * calls)
    if adj.cache_hit_rate:
        calls = calls * (_ONE - adj.cache_hit_rate)
        step("exact cache hits", per_call * calls)
    if adj.semantic_hit_rate:
        calls = calls * (_ONE - adj.semantic_hit_rate)
        step("semantic cache hits", per_call * calls)
    realtime_call = per_call
    if adj.prompt_cache_share:
        realtime_call = call_cost(
            prices, workload.input_tokens, workload.output_tokens, adj.prompt_cache_share
        )
        step("provider prompt cache", realtime_call * calls)
    if adj.batch_share:
        assert batch_prices is not None
        batch_call = call_cost(
            batch_prices, workload.input_tokens, workload.output_tokens, adj.prompt_cache_share
        )
        blended = (_ONE - adj.batch_share) * realtime_call + adj.batch_share * batch_call
        step("batch API", blended * calls)
    return MonthlyEstimate(per_call, per_call * workload.requests_per_day, monthly, tuple(steps))


@dataclass(frozen=True, slots=True)
class CascadeEstimate:
    cheap_cost_per_request: Decimal  # every request tries the cheap tier
    escalation_cost_per_request: Decimal  # the strong tier with the escalation's extra tokens
    blended_cost_per_request: Decimal
    strong_only_cost_per_request: Decimal
    blended_monthly_usd: Decimal
    strong_only_monthly_usd: Decimal

    @property
    def saving_usd(self) -> Decimal:
        return self.strong_only_monthly_usd - self.blended_monthly_usd

    @property
    def saving_share(self) -> Decimal | None:
        if not self.strong_only_monthly_usd:
            return None
        return self.saving_usd / self.strong_only_monthly_usd


def cascade_cost(
    workload: Workload,
    cheap: TokenPrices,
    strong: TokenPrices,
    cheap_success_rate: Decimal,
    extra_input_tokens: Decimal = _ZERO,
    extra_output_tokens: Decimal = _ZERO,
) -> CascadeEstimate:
    """Every request goes to the cheap tier; the (1 - success rate) it fails go on to the strong tier,
    whose prompt grows by the escalation's extra tokens (the draft, the gate's verdict)."""
    cheap_call = call_cost(cheap, workload.input_tokens, workload.output_tokens)
    escalation = call_cost(
        strong, workload.input_tokens + extra_input_tokens, workload.output_tokens + extra_output_tokens
    )
    strong_only = call_cost(strong, workload.input_tokens, workload.output_tokens)
    blended = cheap_call + (_ONE - cheap_success_rate) * escalation
    return CascadeEstimate(
        cheap_cost_per_request=cheap_call,
        escalation_cost_per_request=escalation,
        blended_cost_per_request=blended,
        strong_only_cost_per_request=strong_only,
        blended_monthly_usd=blended * workload.requests_per_month,
        strong_only_monthly_usd=strong_only * workload.requests_per_month,
    )


@dataclass(frozen=True, slots=True)
class SelfHosting:
    gpu_usd_per_hour: Decimal
    tokens_per_second: Decimal  # input + output tokens one GPU processes per second at full load
    utilisation: Decimal  # the share of that throughput sustained over the month (0 < u <= 1)
    ops_usd_per_month: Decimal = _ZERO  # people, monitoring, storage: paid whatever the volume

    def gpu_month_usd(self, days: Decimal) -> Decimal:
        return self.gpu_usd_per_hour * _HOURS_PER_DAY * days

    def gpu_month_tokens(self, days: Decimal) -> Decimal:
        return self.tokens_per_second * self.utilisation * _SECONDS_PER_DAY * days


@dataclass(frozen=True, slots=True)
class BreakEven:
    model: str
    api_usd_per_mtok: Decimal  # the API's price per million tokens of this feature's in/out mix
    api_monthly_usd: Decimal  # at the feature's volume
    self_hosted_gpus: int  # GPUs the feature's volume needs (at least one)
    self_hosted_monthly_usd: Decimal
    # None: never (one GPU's month costs more than the API charges for what it can serve).
    break_even_tokens_per_month: Decimal | None
    break_even_requests_per_day: Decimal | None
    break_even_gpus: int | None


def _ceil(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def break_even(model: str, workload: Workload, api_cost_per_request: Decimal, host: SelfHosting) -> BreakEven:
    """The monthly volume above which whole GPUs (each a fixed month of rent) plus ops cost less
    than the API. With n GPUs the self-hosted month is ops + n * gpu_month for up to n * capacity
    tokens; the first n whose range holds the crossing is n* = max(1, ceil(ops / (p * capacity -
    gpu_month))), and the crossing is (ops + n* * gpu_month) / p tokens (p: API USD per token)."""
    days = workload.days_per_month
    tokens = workload.tokens_per_request
    if tokens <= 0:
        raise ValueError("a request needs tokens for a per-token comparison")
    per_token = api_cost_per_request / tokens
    gpu_month = host.gpu_month_usd(days)
    capacity = host.gpu_month_tokens(days)
    volume = workload.requests_per_month * tokens
    gpus_now = max(1, _ceil(volume / capacity))
    margin = per_token * capacity - gpu_month
    be_tokens: Decimal | None = None
    be_gpus: int | None = None
    if margin > 0:
        be_gpus = max(1, _ceil(host.ops_usd_per_month / margin))
        be_tokens = (host.ops_usd_per_month + be_gpus * gpu_month) / per_token
    return BreakEven(
        model=model,
        api_usd_per_mtok=per_token * MILLION,
        api_monthly_usd=api_cost_per_request * workload.requests_per_month,
        self_hosted_gpus=gpus_now,
        self_hosted_monthly_usd=host.ops_usd_per_month + gpus_now * gpu_month,
        break_even_tokens_per_month=be_tokens,
        break_even_requests_per_day=None if be_tokens is None else be_tokens / tokens / days,
        break_even_gpus=be_gpus,
    )


@dataclass(frozen=True, slots=True)
class Payback:
    cost_per_call_before: Decimal
    cost_per_call_after: Decimal
    setup_usd: Decimal
    saving_per_call: Decimal
    monthly_saving_usd: Decimal
    # None: the fine-tuned model does not cost less per call, so the setup is never paid back.
    break_even_calls: Decimal | None
    payback_days: Decimal | None

    @property
    def payback_months(self) -> Decimal | None:
        return None if self.payback_days is None else self.payback_days / Decimal(30)


def fine_tuning_payback(
    workload: Workload, cost_per_call_before: Decimal, cost_per_call_after: Decimal, setup_usd: Decimal
) -> Payback:
    saving = cost_per_call_before - cost_per_call_after
    daily = saving * workload.requests_per_day
    paid_back = saving > 0 and daily > 0
    return Payback(
        cost_per_call_before=cost_per_call_before,
        cost_per_call_after=cost_per_call_after,
        setup_usd=setup_usd,
        saving_per_call=saving,
        monthly_saving_usd=saving * workload.requests_per_month,
        break_even_calls=setup_usd / saving if saving > 0 else None,
        payback_days=setup_usd / daily if paid_back else None,
    )


@dataclass(frozen=True, slots=True)
class Forecast:
    month_to_date_usd: Decimal
    elapsed_days: Decimal
    days_in_month: int
    forecast_usd: Decimal
    budget_usd: Decimal | None
    over_budget: bool  # forecast above the budget by more than the margin

    @property
    def budget_share(self) -> Decimal | None:
        return None if not self.budget_usd else self.forecast_usd / self.budget_usd


FORECAST_MARGIN = Decimal("0.2")  # flag a month forecast more than 20% above its budget


def month_forecast(
    month_to_date_usd: Decimal,
    elapsed_days: Decimal,
    days_in_month: int,
    budget_usd: Decimal | None,
    margin: Decimal = FORECAST_MARGIN,
) -> Forecast:
    """The month at the month-to-date's daily rate."""
    if elapsed_days <= 0:
        raise ValueError("the month has not started")
    forecast = month_to_date_usd / elapsed_days * days_in_month
    over = budget_usd is not None and forecast > budget_usd * (_ONE + margin)
    return Forecast(month_to_date_usd, elapsed_days, days_in_month, forecast, budget_usd, over)
