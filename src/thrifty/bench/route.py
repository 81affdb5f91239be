"""`thrifty bench route` and `thrifty route train`: train a router on recorded replies and replay
strategies over held-out recorded replies (no network), priced at the benchmark's list prices."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from rich.console import Console
from rich.table import Table

from thrifty.errors import InvalidData
from thrifty.routing.train.bound import Bound, hindsight_bound
from thrifty.routing.train.cost import FLASH, GPT4O, MINI, PRICES
from thrifty.routing.train.data import Row, load_rows
from thrifty.routing.train.fit import train
from thrifty.routing.train.metrics import PairMetrics, Summary, pair_metrics, random_at_cost, summarise
from thrifty.routing.train.policy import (
    CascadePolicy,
    Outcome,
    run_oracle,
    run_policy,
    run_single,
    short_name,
)
from thrifty.routing.train.router import Router
from thrifty.routing.train.step import replay

WEAK, STRONG = MINI, GPT4O
NAIVE = CascadePolicy((MINI, FLASH), min_votes=2, max_dissent=0, strong=GPT4O)


def train_router(
    data_paths: Sequence[str | Path],
    out_path: str | Path,
    *,
    reference: str = GPT4O,
    target_quality: float = 0.995,
) -> Router:
    """Train on every row of `data_paths` (thresholds from out-of-fold scores); write the artifact."""
    router = train(load_rows(data_paths), reference=reference, target_quality=target_quality)
    router.save(out_path)
    return router


def evaluate_router(router: Router, rows: Sequence[Row], reference: str) -> tuple[list[Summary], PairMetrics]:
    ref = run_single(rows, reference)
    # Single models and the all-model oracle over the priced models every test row has replies of.
    every = tuple(m for m in PRICES if all(m in r.calls for r in rows))
    results: list[Summary] = [summarise(m, run_single(rows, m), ref) for m in every]
    ours = run_policy_router(router.with_strategy("cascade"), rows)
    ours_summary = summarise("thrifty-cascade", ours, ref)
    classifier = summarise(
        "thrifty-classifier", run_policy_router(router.with_strategy("classifier"), rows), ref
    )
    results.append(
        random_at_cost(
            f"random {short_name(WEAK)}/{short_name(STRONG)} @ matched cost",
            ours_summary.cost_usd,
            run_single(rows, WEAK),
            run_single(rows, STRONG),
            ref,
        )
    )
    results.append(
        summarise(f"oracle {short_name(WEAK)}+{short_name(STRONG)}", run_oracle(rows, (WEAK, STRONG)), ref)
    )
    results.append(
        summarise(
            "oracle all six" if len(every) == 6 else f"oracle all {len(every)}", run_oracle(rows, every), ref
        )
    )
    results.append(summarise("naive cascade mini=flash else 4o", run_policy(rows, NAIVE), ref))
    results.append(classifier)
    results.append(ours_summary)
    pair = pair_metrics(
        [router.strong_score(r) for r in rows],
        [r.calls[WEAK].correct for r in rows],
        [r.calls[STRONG].correct for r in rows],
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


def run_route_bench(
    train_paths: Sequence[str | Path],
    test_paths: Sequence[str | Path],
    reference: str = GPT4O,
    json_out: str | Path | None = None,
    console: Console | None = None,
    *,
    target_quality: float = 0.995,
) -> list[Summary]:
    """Train on `train_paths`, replay on `test_paths`, print the table, optionally write JSON."""
    console = console or Console()
    router = train(load_rows(train_paths), reference=reference, target_quality=target_quality)
    test_rows = load_rows(test_paths)
    if not test_rows:
        raise InvalidData("no test rows")
    needed = (*router.models(), reference, WEAK, STRONG, *NAIVE.cheap)
    missing = {m for r in test_rows for m in needed if m not in r.calls}
    if missing:
        raise InvalidData(f"test rows lack replies from: {', '.join(sorted(missing))}")
    results, pair = evaluate_router(router, test_rows, reference)
    per_task = evaluate_by_task(router, test_rows, reference)
    print_results(console, router, test_rows, results, pair, reference)
    if per_task:
        print_by_task(console, router, per_task)
    if json_out is not None:
        Path(json_out).write_text(
            json.dumps([s.to_json() for s in [*results, *per_task]], indent=2) + "\n", encoding="utf-8"
        )
    return [*results, *per_task]


def evaluate_by_task(router: Router, rows: Sequence[Row], reference: str) -> list[Summary]:
    """With more than one task in the test rows, the main strategies on each task alone, named
    "STRATEGY @ TASK": seen and unseen tasks have different targets, and a mixture hides which
    one a result comes from."""
    tasks = sorted({r.task for r in rows})
    if len(tasks) < 2:
        return []
    cascade, classifier = router.with_strategy("cascade"), router.with_strategy("classifier")
    out: list[Summary] = []
    for task in tasks:
        sub = [r for r in rows if r.task == task]
        ref = run_single(sub, reference)
        out += [
            summarise(f"{short_name(reference)} @ {task}", ref, ref),
            summarise(f"naive cascade @ {task}", run_policy(sub, NAIVE), ref),
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
        f"pair {short_name(WEAK)} ({pair.weak_acc:.3f}) / {short_name(STRONG)} ({pair.strong_acc:.3f}), "
        f"router ranking = 1 - stage-1 gate P({short_name(WEAK)} right)"
    )
    console.print(f"  PGR by strong-call rate: {pgr}")
    console.print(f"  APGR {pair.apgr:.3f}  CPT(50%) {_pct(pair.cpt50)}  CPT(80%) {_pct(pair.cpt80)}")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def run_route_bound(
    data_paths: Sequence[str | Path],
    reference: str = GPT4O,
    json_out: str | Path | None = None,
    console: Console | None = None,
    targets: Sequence[float] = (0.98, 0.99, 0.995, 1.0),
) -> Bound:
    """Print (and optionally write) the hindsight bound of our routing rules on `data_paths`."""
    console = console or Console()
    rows = load_rows(data_paths)
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
