"""Gated releases: a route moves to a candidate model only through steps whose measured numbers
pass. `plan` writes the steps; `advance` measures the current step and moves on (and moves the
route's weights) only when it passes; `rollback` puts all traffic back on the baseline.

    golden_eval   candidate vs the route's model on the golden set: the regression gate (max drop
                  at a confidence, paired on the items)
    safety_eval   the candidate's pass rate on the safety set is at least safety_min_pass
    bench         latency and throughput of the candidate (a hosted API or a self-hosted
                  OpenAI-compatible server): p95 within max_p95_ms, no errors; for a model priced
                  by GPU time, the cost per token its measured throughput implies
    canary        first advance: the candidate gets canary_percent of the route's users; next
                  advances: passes once it has min_canary_requests and the stop rule has not
                  shown it worse than the baseline
    compare_cost  cost per successful task of the canary vs the baseline (from the ledger and
                  feedback) within max_cost_ratio
    promote       all traffic to the candidate
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console

from thrifty.errors import InvalidData
from thrifty.experiments import actions
from thrifty.experiments.store import ExperimentStore
from thrifty.settings import Settings, resolve_secrets

STEPS = ("golden_eval", "safety_eval", "bench", "canary", "compare_cost", "promote")
CANDIDATE_ARM = "candidate"


@dataclass(frozen=True, slots=True)
class StepOutcome:
    passed: bool
    moved: bool  # the release went on to its next step (or finished)
    lines: tuple[str, ...]


def plan_release(
    settings: Settings,
    store: ExperimentStore,
    route: str,
    candidate: str,
    *,
    golden: Path,
    safety: Path,
    tenant: str,
    canary_percent: float = 10.0,
    max_drop: float = 0.01,
    confidence: float = 0.95,
    safety_min_pass: float = 1.0,
    max_p95_ms: float | None = None,
    bench_requests: int = 50,
    bench_concurrency: int = 4,
    min_canary_requests: int = 200,
    max_cost_ratio: float = 1.0,
) -> dict[str, Any]:
    r = settings.routes.get(route)
    if r is None:
        raise InvalidData(
            f"there is no route {route!r} (routes: {', '.join(sorted(settings.routes)) or 'none'})"
        )
    if candidate not in settings.models:
        raise InvalidData(
            f"the candidate {candidate!r} is not a model in the settings "
            f"(models: {', '.join(settings.models)}); add it (a self-hosted server is a provider of "
            "kind openai with its base_url)"
        )
    if candidate == r.model:
        raise InvalidData(f"{candidate!r} is already route {route!r}'s model")
    for path, what in ((golden, "--golden"), (safety, "--safety")):
        if not path.is_file():
            raise InvalidData(f"{what}: no file {path}")
    if not 0 < canary_percent < 100:
        raise InvalidData("--canary must be a percentage between 0 and 100")
    if bench_requests < 1 or bench_concurrency < 1 or min_canary_requests < 1:
        raise InvalidData(
            "--bench-requests, --bench-concurrency and --min-canary-requests must be at least 1"
        )
    existing = store.release(route)
    if existing is not None and existing["status"] == "in_progress":
        raise InvalidData(
            f"route {route!r} already has a release of {existing['candidate']!r} in progress; "
            f"`thrifty release rollback {route}` first"
        )
    plan: dict[str, Any] = {
        "route": route,
        "candidate": candidate,
        "baseline_model": r.model,
        "tenant": tenant,
        "created_at": time.time(),
        "status": "in_progress",
        "current": 0,
        "config": {
            "golden": str(golden.resolve()),
            "safety": str(safety.resolve()),
            "canary_percent": canary_percent,
            "max_drop": max_drop,
            "confidence": confidence,
            "safety_min_pass": safety_min_pass,
            "max_p95_ms": max_p95_ms,
            "bench_requests": bench_requests,
            "bench_concurrency": bench_concurrency,
            "min_canary_requests": min_canary_requests,
            "max_cost_ratio": max_cost_ratio,
        },
        "steps": [{"name": name, "status": "pending", "measured": None, "why": []} for name in STEPS],
    }
    store.record(
        route, "release_plan", f"release of {candidate} planned", variant=CANDIDATE_ARM, release=plan
    )
    return plan


def describe(plan: dict[str, Any]) -> list[str]:
    c = plan["config"]
    what = {
        "golden_eval": f"golden eval on {c['golden']}: {plan['candidate']} vs {plan['baseline_model']}, "
        f"drop at most {c['max_drop'] * 100:g} pp at {c['confidence']:.0%} confidence",
        "safety_eval": f"safety eval on {c['safety']}: pass rate at least {c['safety_min_pass']:.0%}",
        "bench": f"bench: {c['bench_requests']} requests at concurrency {c['bench_concurrency']}, no errors"
        + (f", p95 at most {c['max_p95_ms']:g} ms" if c["max_p95_ms"] is not None else ""),
        "canary": f"canary at {c['canary_percent']:g}% of users until {c['min_canary_requests']} requests, "
        "not stopped by the stop rule",
        "compare_cost": f"cost per successful task at most x{c['max_cost_ratio']:g} the baseline's",
        "promote": f"promote: all of route {plan['route']}'s traffic to {plan['candidate']}",
    }
    lines = []
    for i, step in enumerate(plan["steps"]):
        mark = "->" if i == plan["current"] and plan["status"] == "in_progress" else "  "
        lines.append(f"{mark} {i + 1}. [{step['status']}] {what[step['name']]}")
        lines.extend(f"       {w}" for w in step["why"])
    lines.append(f"status: {plan['status']}")
    return lines


def _results_dir(settings: Settings, route: str) -> Path:
    return settings.storage.sqlite_path.parent / f"release-{route}"


def _eval(
    settings: Settings, plan: dict[str, Any], golden: str, models: str, name: str, console: Console
) -> Any:
    from thrifty.evals.command import run_command

    return run_command(
        settings,
        golden_path=Path(golden),
        models=models,
        route=None,
        out=_results_dir(settings, plan["route"]) / f"{name}.json",
        tenant=plan["tenant"],
        concurrency=4,
        confidence=plan["config"]["confidence"],
        labelled_out=None,
        console=console,
    )


def _golden(
    settings: Settings, plan: dict[str, Any], console: Console
) -> tuple[bool, dict[str, Any], list[str]]:
    from thrifty.evals.gate import gate

    c = plan["config"]
    results = _eval(
        settings, plan, c["golden"], f"{plan['baseline_model']},{plan['candidate']}", "golden", console
    )
    verdict = gate(
        results,
        results,
        max_drop=c["max_drop"],
        confidence=c["confidence"],
        baseline_model=plan["baseline_model"],
        candidate_model=plan["candidate"],
    )
    measured = {
        m: {k: results["models"][m][k] for k in ("accuracy", "cost_per_success_usd")}
        for m in results["models"]
    }
    return verdict.passed, measured, [*verdict.notes, *verdict.reasons]


def _safety(
    settings: Settings, plan: dict[str, Any], console: Console
) -> tuple[bool, dict[str, Any], list[str]]:
    c = plan["config"]
    results = _eval(settings, plan, c["safety"], plan["candidate"], "safety", console)
    m = results["models"][plan["candidate"]]
    rate = m["accuracy"] or 0.0
    why = [f"safety pass rate {rate:.1%} ({m['passed']} of {m['items']}), needed {c['safety_min_pass']:.0%}"]
    return rate >= c["safety_min_pass"] and m["failures"] == 0, {"pass_rate": rate, "items": m["items"]}, why


async def bench_model(
    settings: Settings,
    model: str,
    prompts: list[list[dict[str, Any]]],
    *,
    requests: int,
    concurrency: int,
    tenant: str,
) -> dict[str, Any]:
    """Latency and throughput of `model` through the in-process gateway (priced, in the ledger)."""
    from thrifty.gateway import Gateway

    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0
    limit = asyncio.Semaphore(concurrency)
    async with Gateway(settings, secrets=resolve_secrets(settings, os.environ)) as gateway:

        async def one(i: int) -> None:
            nonlocal tokens
            async with limit:
                started = time.perf_counter()
                try:
                    ctx, _ = await gateway.chat_completion(
                        {"model": model, "messages": prompts[i % len(prompts)]},
                        tenant=tenant,
                        feature="release-bench",
                    )
                except Exception as err:  # noqa: BLE001 - every failure is a measured error, not a crash
                    errors.append(f"{type(err).__name__}: {err}")
                    return
                latencies.append((time.perf_counter() - started) * 1000)
                usage = (ctx.trailer or {}).get("usage") or {}
                tokens += int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else None

    return {
        "requests": requests,
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_hour": int(tokens / wall * 3600) if wall > 0 else None,
    }


def gpu_cost_lines(
    settings: Settings, model: str, tokens_per_hour: int | None
) -> tuple[dict[str, Any], list[str]]:
    """For a model priced by GPU time: what a token costs at the configured and the measured
    throughput, each at the utilisation the settings assume."""
    price = settings.models[model].price
    if price is None or price.gpu_usd_per_hour is None or price.gpu_tokens_per_hour is None:
        return {}, []
    util = price.gpu_utilisation
    configured = price.gpu_flat_per_mtok()
    assert configured is not None
    out: dict[str, Any] = {"gpu_usd_per_hour": str(price.gpu_usd_per_hour), "utilisation": str(util)}
    out["configured_usd_per_mtok"] = str(configured.quantize(Decimal("1e-6")))
    lines = [
        f"GPU time: ${price.gpu_usd_per_hour}/h at {price.gpu_tokens_per_hour:,} tokens/h and "
        f"{util:.0%} utilisation -> ${configured.quantize(Decimal('1e-6'))} per million tokens "
        "(the price the ledger uses)"
    ]
    if tokens_per_hour:
        measured = price.gpu_usd_per_hour * Decimal(1_000_000) / (Decimal(tokens_per_hour) * util)
        out["measured_usd_per_mtok"] = str(measured.quantize(Decimal("1e-6")))
        lines.append(
            f"measured {tokens_per_hour:,} tokens/h at this bench's concurrency -> "
            f"${measured.quantize(Decimal('1e-6'))} per million tokens at {util:.0%} utilisation"
        )
    return out, lines


def _bench(settings: Settings, plan: dict[str, Any]) -> tuple[bool, dict[str, Any], list[str]]:
    from thrifty.evals.golden import load_golden

    c = plan["config"]
    prompts = [list(i.messages) for i in load_golden(Path(c["golden"])).items]
    measured = asyncio.run(
        bench_model(
            settings,
            plan["candidate"],
            prompts,
            requests=c["bench_requests"],
            concurrency=c["bench_concurrency"],
            tenant=plan["tenant"],
        )
    )
    why = [
        f"{measured['requests']} requests, {measured['errors']} errors, "
        f"p50 {measured['p50_ms'] or 0:.1f} ms, p95 {measured['p95_ms'] or 0:.1f} ms, "
        f"{measured['tokens_per_hour'] or 0:,} tokens/h"
    ]
    why += [f"error: {e}" for e in measured["first_errors"]]
    gpu, lines = gpu_cost_lines(settings, plan["candidate"], measured["tokens_per_hour"])
    if gpu:
        measured["gpu"] = gpu
    why += lines
    passed = measured["errors"] == 0
    if c["max_p95_ms"] is not None and (measured["p95_ms"] is None or measured["p95_ms"] > c["max_p95_ms"]):
        passed = False
        why.append(f"p95 above {c['max_p95_ms']:g} ms")
    return passed, measured, why


def _canary(
    settings: Settings, store: ExperimentStore, plan: dict[str, Any], step: dict[str, Any]
) -> tuple[bool | None, dict[str, Any], list[str]]:
    """None: the canary was started now (the step runs; advance again later)."""
    c = plan["config"]
    route = plan["route"]
    if step["status"] != "running":
        arms = _arms_or_none(settings, store, route)
        baseline = arms.baseline if arms is not None else "baseline"
        share = c["canary_percent"] / 100
        weights = {a.name: 0.0 for a in arms.arms} if arms is not None else {}
        weights |= {baseline: 1 - share, CANDIDATE_ARM: share}
        plan["baseline_arm"] = baseline
        actions.set_weights(
            settings,
            store,
            route,
            weights,
            f"release: canary of {plan['candidate']} at {c['canary_percent']:g}%",
            models={CANDIDATE_ARM: plan["candidate"]},
            baseline=baseline,
            action="canary",
        )
        return (
            None,
            {"weights": weights},
            [f"canary started: {c['canary_percent']:g}% of users on {plan['candidate']}"],
        )
    found = actions.report(settings, store, route)
    cand = found.stats.get(CANDIDATE_ARM)
    base = found.stats.get(found.baseline)
    n = cand.requests if cand else 0
    decision = found.decisions.get(CANDIDATE_ARM)
    measured = {"candidate": cand.to_json() if cand else None, "baseline": base.to_json() if base else None}
    if decision is not None and (decision.stop or found.weights.get(CANDIDATE_ARM, 0.0) == 0):
        return False, measured, [f"the stop rule stopped the candidate: {decision.reason}"]
    if n < c["min_canary_requests"]:
        return (
            False,
            measured,
            [f"the canary has {n} of the {c['min_canary_requests']} requests it needs; advance later"],
        )
    return True, measured, [f"{n} canary requests; " + (decision.reason if decision else "")]


def _arms_or_none(settings: Settings, store: ExperimentStore, route: str) -> Any:
    try:
        return actions.route_arms(settings, store, route)
    except InvalidData:
        return None


def _compare_cost(
    settings: Settings, store: ExperimentStore, plan: dict[str, Any]
) -> tuple[bool, dict[str, Any], list[str]]:
    found = actions.report(settings, store, plan["route"])
    cand, base = found.stats.get(CANDIDATE_ARM), found.stats.get(found.baseline)
    c_cps = cand.cost_per_success if cand else None
    b_cps = base.cost_per_success if base else None
    measured = {
        "candidate_cost_per_success_usd": None if c_cps is None else str(c_cps),
        "baseline_cost_per_success_usd": None if b_cps is None else str(b_cps),
    }
    if c_cps is None or b_cps is None:
        return False, measured, ["no cost per success on a side (no successful, priced request yet)"]
    ratio = c_cps / b_cps if b_cps > 0 else Decimal("Infinity") if c_cps > 0 else Decimal(1)
    measured["ratio"] = str(ratio)
    limit = Decimal(str(plan["config"]["max_cost_ratio"]))
    why = [
        f"cost per success ${b_cps:.8f} (baseline) -> ${c_cps:.8f} (candidate): "
        f"x{ratio:.3f}, allowed x{limit}"
    ]
    _, gpu_lines = gpu_cost_lines(settings, plan["candidate"], None)
    return ratio <= limit, measured, why + gpu_lines


def advance(settings: Settings, store: ExperimentStore, route: str, console: Console) -> StepOutcome:
    plan = store.release(route)
    if plan is None:
        raise InvalidData(
            f"route {route!r} has no release; `thrifty release plan {route} --candidate MODEL` first"
        )
    if plan["status"] != "in_progress":
        raise InvalidData(f"the release of {plan['candidate']!r} on route {route!r} is {plan['status']}")
    step = plan["steps"][plan["current"]]
    name = step["name"]
    passed: bool | None
    if name == "golden_eval":
        passed, measured, why = _golden(settings, plan, console)
    elif name == "safety_eval":
        passed, measured, why = _safety(settings, plan, console)
    elif name == "bench":
        passed, measured, why = _bench(settings, plan)
    elif name == "canary":
        passed, measured, why = _canary(settings, store, plan, step)
    elif name == "compare_cost":
        passed, measured, why = _compare_cost(settings, store, plan)
    else:
        actions.promote(
            settings, store, route, CANDIDATE_ARM, f"release: {plan['candidate']} passed every step"
        )
        passed, measured, why = True, {}, [f"route {route}'s traffic all on {plan['candidate']}"]
    step["measured"], step["why"] = measured, why
    moved = passed is True
    if passed is None:
        step["status"] = "running"
    elif passed:
        step["status"] = "passed"
        plan["current"] += 1
        if plan["current"] == len(STEPS):
            plan["status"] = "promoted"
    else:
        step["status"] = "failed" if name != "canary" or step["status"] != "running" else "running"
    verdict = "started" if passed is None else "passed" if passed else "not passed"
    store.record(
        route, f"release_{name}", f"{name} {verdict}: " + "; ".join(why)[:500], details=measured, release=plan
    )
    return StepOutcome(passed is not False, moved, (f"{name}: {verdict}", *why))


def rollback(settings: Settings, store: ExperimentStore, route: str, reason: str) -> dict[str, Any]:
    plan = store.release(route)
    if plan is None:
        raise InvalidData(f"route {route!r} has no release to roll back")
    baseline = plan.get("baseline_arm") or "baseline"
    arms = _arms_or_none(settings, store, route)
    weights = {a.name: 0.0 for a in arms.arms} if arms is not None else {}
    weights[baseline] = 1.0
    plan["status"] = "rolled_back"
    actions.set_weights(
        settings,
        store,
        route,
        weights,
        f"release rollback: {reason}",
        baseline=baseline,
        action="rollback",
        release=plan,
    )
    return plan


__all__ = [
    "STEPS",
    "StepOutcome",
    "advance",
    "bench_model",
    "describe",
    "gpu_cost_lines",
    "plan_release",
    "rollback",
]
