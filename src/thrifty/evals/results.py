"""Per-model summaries of an eval run, the results file, and the labelled outputs in ZeroEval form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from thrifty.errors import InvalidData
from thrifty.evals.stats import percentile, wilson

if TYPE_CHECKING:
    from thrifty.evals.golden import GoldenSet

RESULTS_VERSION = 1


def _dec(value: object) -> Decimal:
    return Decimal(str(value)) if value is not None else Decimal(0)


def summarise(
    golden: GoldenSet,
    systems: Sequence[str],
    records: Mapping[tuple[str, str], Mapping[str, Any]],
    confidence: float = 0.95,
) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for system in systems:
        recs = [records[(system, i.id)] for i in golden.items if (system, i.id) in records]
        n = len(recs)
        passed = sum(1 for r in recs if r["passed"])
        low, high = wilson(passed, n, confidence)
        cost = sum((_dec(r.get("cost_usd")) for r in recs), Decimal(0))
        judge = sum((_dec(r.get("judge_cost_usd")) for r in recs), Decimal(0))
        latencies = [float(r["latency_ms"]) for r in recs if r.get("error") is None and "latency_ms" in r]
        total = cost + judge
        models[system] = {
            "items": n,
            "passed": passed,
            "accuracy": passed / n if n else None,
            "ci": [low, high],
            "cost_usd": str(cost),
            "judge_cost_usd": str(judge),
            "eval_cost_usd": str(total),
            "cost_per_success_usd": str(cost / passed) if passed else None,
            "unpriced_calls": sum(1 for r in recs if r.get("cost_usd") is None and r.get("error") is None),
            "p50_latency_ms": percentile(latencies, 50),
            "p95_latency_ms": percentile(latencies, 95),
            "failures": sum(1 for r in recs if r.get("error")),
            "errors": sorted({str(r["error"]) for r in recs if r.get("error")})[:5],
            "pending": len(golden.items) - n,
        }
    return {
        "thrifty_eval_results": RESULTS_VERSION,
        "set": golden.path,
        "set_fingerprint": golden.fingerprint,
        "confidence": confidence,
        "models": models,
        "items": {
            system: {
                i.id: bool(records[(system, i.id)]["passed"])
                for i in golden.items
                if (system, i.id) in records
            }
            for system in systems
        },
    }


def write_results(path: Path, results: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


def read_results(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as err:
        raise InvalidData(f"cannot read results file {path}: {err.strerror}") from err
    except orjson.JSONDecodeError as err:
        raise InvalidData(f"{path}: not JSON ({err})") from err
    if not isinstance(data, dict) or data.get("thrifty_eval_results") != RESULTS_VERSION:
        raise InvalidData(f"{path}: not a thrifty eval results file (written by `thrifty eval run --out`)")
    return data


def write_zeroeval(
    path: Path,
    golden: GoldenSet,
    systems: Sequence[str],
    records: Mapping[tuple[str, str], Mapping[str, Any]],
    names: Mapping[str, str] | None = None,
) -> int:
    """Labelled outputs, one ZeroEval row per item answered without error, so `thrifty route train`
    can learn a router from the team's own golden set; `names` maps a system to the model id the
    row names it by (the upstream model, which prices know). Returns the rows written."""
    names = names or {}
    rows = []
    for item in golden.items:
        responses = {
            names.get(s, s): {"output": r["output"], "correct": int(bool(r["passed"]))}
            for s in systems
            if (r := records.get((s, item.id))) is not None
            and not r.get("error")
            and r.get("output") is not None
        }
        if not responses:
            continue
        rows.append(
            {
                "id": item.id,
                "task": item.task or (item.tags[0] if item.tags else ""),
                "prompt": item.prompt_text(),
                "reference": "" if item.expected is None else str(item.expected),
                "responses": responses,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return len(rows)


def table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    out = []
    for name, m in results["models"].items():
        acc = "-" if m["accuracy"] is None else f"{m['accuracy'] * 100:.1f}%"
        ci = f"{m['ci'][0] * 100:.1f}-{m['ci'][1] * 100:.1f}"
        cps = "-" if m["cost_per_success_usd"] is None else f"${Decimal(m['cost_per_success_usd']):.6f}"
        p50 = "-" if m["p50_latency_ms"] is None else f"{m['p50_latency_ms']:.0f}"
        p95 = "-" if m["p95_latency_ms"] is None else f"{m['p95_latency_ms']:.0f}"
        out.append(
            [
                name,
                str(m["items"]),
                acc,
                ci,
                f"${Decimal(m['eval_cost_usd']):.6f}",
                cps,
                p50,
                p95,
                str(m["failures"]),
            ]
        )
    return out


TABLE_HEADERS = [
    "model",
    "items",
    "accuracy",
    "95% CI",
    "cost",
    "cost/success",
    "p50 ms",
    "p95 ms",
    "failures",
]
