"""`thrifty bench route` and `thrifty route train`: train a router on recorded replies and replay
strategies over held-out recorded replies (no network), priced by a `--prices` file or genai-prices."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from thrifty.errors import InvalidData
from thrifty.routing.train.bound import Bound, hindsight_bound
from thrifty.routing.train.cost import CostModel, load_prices
from thrifty.routing.train.data import Row, load_rows
from thrifty.routing.train.fit import train
from thrifty.routing.train.gap import Gap, decompose, uncertified_router
from thrifty.routing.train.ladders import pool_models
from thrifty.routing.train.metrics import PairMetrics, Summary, pair_metrics, random_at_cost, summarise
from thrifty.routing.train.policy import (
    CascadePolicy,
    Outcome,
    run_oracle,
    run_policy,
    run_single,
    short_name,
)
from thrifty.routing.train.router import Gate, Router
from thrifty.routing.train.step import replay

DEFAULT_REFERENCE = "gpt-4o-2024-08-06"


def load_priced(
    paths: Sequence[str | Path], prices: str | Path | None, console: Console | None = None
) -> list[Row]:
    """Rows priced from the `--prices` file or genai-prices; models with no price are left out
    (and named), as nothing can be routed to a model whose cost is unknown."""
    costs = CostModel(load_prices(prices) if prices is not None else None)
    rows = load_rows(paths, costs)
    if costs.unpriced() and console is not None:
        console.print(
            f"left out, no price (give them in --prices): {', '.join(costs.unpriced())}", highlight=False
        )
    return rows


def train_router(
    data_paths: Sequence[str | Path],
    out_path: str | Path,
    *,
    reference: str = DEFAULT_REFERENCE,
    target_quality: float = 0.99,
    confidence: float = 0.95,
    prices: str | Path | None = None,
    console: Console | None = None,
    vote_ordering: str = "same",
) -> Router:
    """Train on every row of `data_paths` (ladder searched, thresholds certified out-of-fold);
    write the artifact."""
    rows = load_priced(data_paths, prices, console)
    router = train(
        rows,
        reference=reference,
        target_quality=target_quality,
        confidence=confidence,
        vote_ordering=vote_ordering,
    )
    router.save(out_path)
    return router


def certificate_line(router: Router) -> str:
    """What the router promises, in words: the certified lower bound of its quality."""
    cert = router.meta.get("certificate", {})
    if not cert:
        return "no certificate (an artifact from before certified thresholds)"
    conf, target = float(cert["confidence"]), float(cert["target"])
    bound, cost = float(cert["bound"]), float(cert["rel_cost"])
    third = [f"{short_name(router.third)} if they agree"] if router.third else []
    ladder = " → ".join([*(short_name(m) for m in router.ladder), *third, short_name(router.strong)])
    head = f"ladder {ladder}; "
    if router.votes:
        head = (
            "vote cascades "
            + "; ".join(f"{t}: {p.describe()}" for t, p in sorted(router.votes.items()))
            + "; "
        )
    if not cert["certified"]:
        return head + (
            f"NOT certified: even escalating every prompt is not certified ≥ {target:.1%} of "
            f"{short_name(router.reference)} at {conf:.1%} confidence; "
            f"everything goes to {short_name(router.strong)}"
        )
    return (
        head
        + (
            f"certified: quality ≥ {bound:.2%} of {short_name(router.reference)} on new prompts of the seen "
            f"tasks at {conf:.1%} confidence (target {target:.1%}); out-of-fold cost {cost:.1%}"
        )
        + _labels_line(cert)
    )


def _labels_line(cert: dict[str, Any]) -> str:
    """What the certainty costs in labels: the same path's cheapest rule that merely measures the
    target out of fold, and the cost more labelled prompts would certify (projected)."""
    rule, projection = cert.get("uncertified_path_rule"), cert.get("projection")
    if not rule or not projection:
        return ""
    need = rule["prompts_needed"]
    needs = "no amount of data certifies it" if need is None else f"certifying it needs ~{need:,} prompts"
    more = ", ".join(f"{p['prompts']:,} → {p['rel_cost']:.1%}" for p in projection)
    return (
        f"\nuncertified, the same path reaches {rule['quality']:.2%} at {rule['rel_cost']:.1%} on "
        f"{cert['prompts']:,} prompts ({needs}); certified cost with more labelled prompts "
        f"like these (projected from their variance): {more}"
    )


def with_median_gates(router: Router) -> Router | None:
    """The same router with the median (uncertified) thresholds, to show what certainty costs."""
    median = router.meta.get("median_gates")
    if not median:
        return None
    return replace(router, gates={t: Gate.from_json(g) for t, g in median.items()})


def evaluate_router(router: Router, rows: Sequence[Row], reference: str) -> tuple[list[Summary], PairMetrics]:
    ref = run_single(rows, reference)
    weak, strong = router.ladder[0], reference
    naive = CascadePolicy(router.ladder, min_votes=2, max_dissent=0, strong=router.strong)
    # Single models and the all-model oracle over the priced models every test row has replies of.
    every = tuple(pool_models(rows))
    results: list[Summary] = [summarise(m, run_single(rows, m), ref) for m in every]
    ours = run_policy_router(router.with_strategy("cascade"), rows)
    ours_summary = summarise("thrifty-cascade", ours, ref)
    classifier = summarise(
        "thrifty-classifier", run_policy_router(router.with_strategy("classifier"), rows), ref
    )
    results.append(
        random_at_cost(
            f"random {short_name(weak)}/{short_name(strong)} @ matched cost",
            ours_summary.cost_usd,
            run_single(rows, weak),
            run_single(rows, strong),
            ref,
        )
    )
    results.append(
        summarise(f"oracle {short_name(weak)}+{short_name(strong)}", run_oracle(rows, (weak, strong)), ref)
    )
    results.append(summarise(f"oracle all {len(every)}", run_oracle(rows, every), ref))
    results.append(summarise(f"naive cascade {naive.describe()}", run_policy(rows, naive), ref))
    results.append(classifier)
    median = uncertified_router(router)
    if median is not None:
        median_runs = run_policy_router(median.with_strategy("cascade"), rows)
        name = "uncertified vote choice" if router.votes else "median thresholds"
        results.append(summarise(f"thrifty-cascade, {name}", median_runs, ref))
    results.append(ours_summary)
    pair = pair_metrics(
        [router.strong_score(r) for r in rows],
        [r.calls[weak].correct for r in rows],
        [r.calls[strong].correct for r in rows],
    )
    return results, pair


def replay_row(router: Router, row: Row, task: str | None) -> Outcome:
    """One prompt through the router's online step loop, recorded replies standing in for calls:
    every call it asks for is paid, and the accepted draft's recorded correctness is the outcome."""
    trace = replay(router.next_step, task, row.prompt, lambda m: row.calls[m].output)
    cost = sum((row.calls[d.model].cost for d in trace.drafts), Decimal(0))
    chosen = row.calls[trace.drafts[trace.accepted].model]
    escalated = any(d.model == router.strong for d in trace.drafts)
    return Outcome(chosen.correct, cost, escalated=escalated, calls=len(trace.drafts))


def run_policy_router(router: Router, rows: Sequence[Row]) -> list[Outcome]:
    """Replay `rows`, each under its own task name (a task the router does not know gets its
    cautious fallback, exactly as the gateway would)."""
    return [replay_row(router, r, r.task) for r in rows]


def held_out_check(router: Router, rows: Sequence[Row], reference: str) -> dict[str, object] | None:
    """Whether the certified promise held on the test rows of the seen tasks: their quality under
    the router vs the reference's, against the target the certificate was for."""
    cert = router.meta.get("certificate")
    seen = [r for r in rows if router.known(r.task)]
    if not cert or not seen:
        return None
    runs = run_policy_router(router.with_strategy("cascade"), seen)
    ours = summarise("seen", runs, run_single(seen, reference))
    target = float(cert["target"])
    return {
        "target": target,
        "confidence": float(cert["confidence"]),
        "certified_bound": float(cert["bound"]),
        "held_out_quality": float(ours.rel_quality),
        "held_out_cost": float(ours.rel_cost),
        "met": bool(cert["certified"]) and float(ours.rel_quality) >= target - 1e-12,
        "prompts": len(seen),
    }


def run_route_bench(
    train_paths: Sequence[str | Path],
    test_paths: Sequence[str | Path],
    reference: str = DEFAULT_REFERENCE,
    json_out: str | Path | None = None,
    console: Console | None = None,
    *,
    target_quality: float = 0.99,
    confidence: float = 0.95,
    prices: str | Path | None = None,
    gap_report: bool = True,
) -> list[Summary]:
    """Train on `train_paths`, replay on `test_paths`, print the table, optionally write JSON;
    with `gap_report`, where the cost between the hindsight bound and the certified rule goes."""
    console = console or Console()
    train_rows = load_priced(train_paths, prices, console)
    router = train(train_rows, reference=reference, target_quality=target_quality, confidence=confidence)
    test_rows = load_priced(test_paths, prices)
    if not test_rows:
        raise InvalidData("no test rows")
    needed = (*router.models(), reference)
    missing = {m for r in test_rows for m in needed if m not in r.calls}
    if missing:
        raise InvalidData(f"test rows lack replies from: {', '.join(sorted(missing))}")
    results, pair = evaluate_router(router, test_rows, reference)
    per_task = evaluate_by_task(router, test_rows, reference)
    console.print(certificate_line(router), highlight=False)
    print_results(console, router, test_rows, results, pair, reference)
    if per_task:
        print_by_task(console, router, per_task)
    check = held_out_check(router, test_rows, reference)
    if check is not None:
        console.print(
            f"held-out seen tasks ({check['prompts']} prompts): quality {check['held_out_quality']:.2%} at "
            f"cost {check['held_out_cost']:.1%}; certified target {check['target']:.1%} "
            f"{'MET' if check['met'] else 'NOT met'}",
            highlight=False,
        )
    gap = None
    if check is not None and gap_report:
        gap = decompose(
            router,
            train_rows,
            test_rows,
            reference=reference,
            target=target_quality,
            replay=run_policy_router,
            bound_cost=lambda rs: _bound_cost(rs, reference, target_quality),
        )
        print_gap(console, gap, target_quality)
    if json_out is not None:
        payload = [s.to_json() for s in [*results, *per_task]]
        if check is not None:
            payload.append({"strategy": "certificate", **check})
        if gap is not None:
            payload.append({"strategy": "gap", **gap.to_json()})
        Path(json_out).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return [*results, *per_task]


def _bound_cost(rows: Sequence[Row], reference: str, target: float) -> float | None:
    b = hindsight_bound(rows, (target,), reference=reference).rows[0]
    return b.rel_cost if b.reachable else None


def print_gap(console: Console, gap: Gap, target: float) -> None:
    """The decomposition (``gap``): each rule at the target, then the differences."""
    table = Table(title=f"from the hindsight bound to the certified rule, at {target:.1%} (seen tasks)")
    for col in ("rule", "rel quality", "rel cost"):
        table.add_column(col, justify="left" if col == "rule" else "right")
    for line in gap.lines:
        q = "—" if line.rel_quality is None else f"{line.rel_quality:.1%}"
        c = "—" if line.rel_cost is None else f"{line.rel_cost:.1%}"
        table.add_row(
            line.name, q if line.rel_quality is not None or line.rel_cost is None else f"≥ {target:.1%}", c
        )
    console.print(table)
    parts = [f"{k} {v * 100:+.1f}" for k, v in gap.terms.items() if v is not None]
    console.print("points of cost: " + ", ".join(parts), highlight=False)


def evaluate_by_task(router: Router, rows: Sequence[Row], reference: str) -> list[Summary]:
    """With more than one task in the test rows, the main strategies on each task alone, named
    "STRATEGY @ TASK": seen and unseen tasks have different targets, and a mixture hides which
    one a result comes from."""
    tasks = sorted({r.task for r in rows})
    if len(tasks) < 2:
        return []
    cascade, classifier = router.with_strategy("cascade"), router.with_strategy("classifier")
    naive = CascadePolicy(router.ladder, min_votes=2, max_dissent=0, strong=router.strong)
    out: list[Summary] = []
    for task in tasks:
        sub = [r for r in rows if r.task == task]
        ref = run_single(sub, reference)
        out += [
            summarise(f"{short_name(reference)} @ {task}", ref, ref),
            summarise(f"naive cascade @ {task}", run_policy(sub, naive), ref),
            summarise(f"thrifty-classifier @ {task}", run_policy_router(classifier, sub), ref),
            summarise(f"thrifty-cascade @ {task}", run_policy_router(cascade, sub), ref),
        ]
    return out


def print_by_task(console: Console, router: Router, per_task: Sequence[Summary]) -> None:
    table = Table(title="by task (seen: calibrated on its training rows; unseen: the cautious fallback)")
    for col in ("strategy", "task", "accuracy", "rel quality", "rel cost", "escalation"):
        table.add_column(col, justify="left" if col in ("strategy", "task") else "right")
    for s in per_task:
        name, task = s.strategy.rsplit(" @ ", 1)
        table.add_row(
            name,
            f"{task} ({'seen' if router.known(task) else 'unseen'})",
            f"{float(s.accuracy):.4f}",
            f"{float(s.rel_quality):.1%}",
            f"{float(s.rel_cost):.1%}",
            f"{float(s.escalation_rate):.1%}",
        )
    console.print(table)


def print_results(
    console: Console,
    router: Router,
    rows: Sequence[Row],
    results: Sequence[Summary],
    pair: PairMetrics,
    reference: str,
) -> None:
    tasks = sorted({r.task for r in rows})
    for task in tasks:
        known = "calibrated" if router.known(task) else "UNSEEN → cautious fallback"
        console.print(f"[bold]{task}[/] ({known}): {router.describe(task)}")
    table = Table(title=f"route bench: {len(rows)} test prompts, reference {reference}")
    for col in ("strategy", "accuracy", "cost $", "rel quality", "rel cost", "escalation"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for s in results:
        table.add_row(
            s.strategy,
            f"{float(s.accuracy):.4f}",
            f"{s.cost_usd.quantize(Decimal('0.0001'))}",
            f"{float(s.rel_quality):.1%}",
            f"{float(s.rel_cost):.1%}",
            f"{float(s.escalation_rate):.1%}",
        )
    console.print(table)
    pgr = "  ".join(f"{rate:.0%}:{v:.2f}" for rate, v in pair.pgr.items())
    console.print(
        f"pair {short_name(router.ladder[0])} ({pair.weak_acc:.3f}) / {short_name(reference)} "
        f"({pair.strong_acc:.3f}), router ranking = 1 - stage-1 gate P({short_name(router.ladder[0])} right)"
    )
    console.print(f"  PGR by strong-call rate: {pgr}")
    console.print(f"  APGR {pair.apgr:.3f}  CPT(50%) {_pct(pair.cpt50)}  CPT(80%) {_pct(pair.cpt80)}")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def run_route_bound(
    data_paths: Sequence[str | Path],
    reference: str = DEFAULT_REFERENCE,
    json_out: str | Path | None = None,
    console: Console | None = None,
    targets: Sequence[float] = (0.98, 0.99, 0.995, 1.0),
    *,
    prices: str | Path | None = None,
) -> Bound:
    """Print (and optionally write) the hindsight bound of our routing rules on `data_paths`."""
    console = console or Console()
    rows = load_priced(data_paths, prices, console)
    if not rows:
        raise InvalidData("no rows")
    bound = hindsight_bound(rows, targets, reference=reference)
    tasks = sorted(bound.task_alone)
    table = Table(
        title=f"hindsight bound on {len(rows)} prompts: the cheapest rule chosen WITH the answers "
        f"(learned-gate thresholds or vote cascades), reference {reference}"
    )
    table.add_column("target quality", justify="right")
    table.add_column("mixture: least rel cost", justify="right")
    for t in tasks:
        table.add_column(f"{t} in that mix (q / c)", justify="right")
        table.add_column(f"{t} alone: least rel cost", justify="right")
    for b in bound.rows:
        cells = [f"{b.target:.1%}", f"{b.rel_cost:.1%}" if b.reachable else "unreachable"]
        for t in tasks:
            q, c = b.per_task[t]
            alone = bound.task_alone[t][b.target]
            cells += [f"{q:.1%} / {c:.1%}", "unreachable" if alone is None else f"{alone:.1%}"]
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"gates on {' → '.join(short_name(m) for m in bound.ladder)}; vote cascades over "
        f"{', '.join(short_name(m) for m in bound.cheap)}",
        highlight=False,
    )
    for t in tasks:
        console.print(
            f"{t}: gate AUC within splits {_auc(bound.split_auc[t])}, "
            f"within agreements {_auc(bound.agree_auc[t])} (0.5 = no better than chance)"
        )
    if json_out is not None:
        Path(json_out).write_text(json.dumps(bound_to_json(bound), indent=2) + "\n", encoding="utf-8")
    return bound


def bound_to_json(bound: Bound) -> dict[str, object]:
    return {
        "ladder": list(bound.ladder),
        "cheap": list(bound.cheap),
        "targets": [
            {
                "target": b.target,
                "reachable": b.reachable,
                "rel_quality": b.rel_quality,
                "rel_cost": b.rel_cost,
                "per_task": {t: {"rel_quality": q, "rel_cost": c} for t, (q, c) in b.per_task.items()},
            }
            for b in bound.rows
        ],
        "task_alone": {t: {str(k): v for k, v in m.items()} for t, m in bound.task_alone.items()},
        "split_auc": {t: _nan_none(v) for t, v in bound.split_auc.items()},
        "agree_auc": {t: _nan_none(v) for t, v in bound.agree_auc.items()},
    }


def _nan_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def _auc(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2f}"
