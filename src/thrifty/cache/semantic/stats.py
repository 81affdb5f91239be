"""`thrifty cache stats`: per route and partition, what the semantic cache answered and how sure it is.

Hit rate, estimated precision of paraphrase hits with its confidence interval (from the sampled
verifications: a random share of the hits served), verifications and their cost, savings net of that
cost and the partition's current threshold and status (``adaptive.bound``). Pure over the stored
partition states, the routes' settings and the partitions' entry counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from rich.table import Table

from thrifty.cache.semantic.adaptive import PartitionState, bound, sample_rate, wilson
from thrifty.cache.semantic.decision import DecisionParams
from thrifty.cache.semantic.verify import policy_of
from thrifty.settings import CacheVerifySettings

CI_Z = 1.96  # the precision's two-sided 95% interval


@dataclass(frozen=True, slots=True)
class PartitionStats:
    tenant_id: str
    route: str
    partition: str  # "all" on a route's summary row
    entries: int
    lookups: int
    paraphrase_hits: int
    repeat_hits: int
    verifications: int
    verified_wrong: int
    near_miss_checks: int
    feedback: int
    feedback_wrong: int
    verify_cost_usd: Decimal
    saved_usd: Decimal
    status: str  # learning | certified | off | - (route no longer verifies)
    threshold: float | None  # None: paraphrases off, or unknown
    sample_rate: float | None

    @property
    def hit_rate(self) -> float:
        return (self.paraphrase_hits + self.repeat_hits) / self.lookups if self.lookups else 0.0

    @property
    def precision(self) -> tuple[float, float, float] | None:
        """Estimated precision of paraphrase hits and its 95% interval, from the verifications."""
        if not self.verifications:
            return None
        wrong = self.verified_wrong / self.verifications
        low, high = wilson(wrong, self.verifications, CI_Z)
        return 1 - wrong, 1 - high, 1 - low

    @property
    def net_saved_usd(self) -> Decimal:
        return self.saved_usd - self.verify_cost_usd

    def to_dict(self) -> dict[str, Any]:
        p = self.precision
        return {
            "tenant_id": self.tenant_id,
            "route": self.route,
            "partition": self.partition,
            "entries": self.entries,
            "lookups": self.lookups,
            "paraphrase_hits": self.paraphrase_hits,
            "repeat_hits": self.repeat_hits,
            "hit_rate": self.hit_rate,
            "precision": None if p is None else {"estimate": p[0], "ci95": [p[1], p[2]]},
            "verifications": self.verifications,
            "verified_wrong": self.verified_wrong,
            "near_miss_checks": self.near_miss_checks,
            "feedback": self.feedback,
            "feedback_wrong": self.feedback_wrong,
            "verify_cost_usd": str(self.verify_cost_usd),
            "saved_usd": str(self.saved_usd),
            "net_saved_usd": str(self.net_saved_usd),
            "status": self.status,
            "threshold": self.threshold,
            "sample_rate": self.sample_rate,
        }


def partition_stats(
    rows: Sequence[tuple[str, PartitionState]],
    verify: Mapping[str, CacheVerifySettings],
    params: Mapping[str, DecisionParams],
    entries: Mapping[str, int],
) -> list[PartitionStats]:
    """One row per partition (``rows``: partition key and state), then one summary row per route."""
    out: list[PartitionStats] = []
    for partition, state in rows:
        settings, route_params = verify.get(state.route), params.get(state.route)
        status, threshold, rate = "-", None, None
        if settings is not None and route_params is not None:
            policy = policy_of(settings)
            verdict = bound(state, route_params.threshold_for(entries.get(partition, 0)), policy)
            status = verdict.status
            threshold = None if math.isinf(verdict.threshold) else verdict.threshold
            rate = sample_rate(state, verdict, policy)
        out.append(_row(state, partition[:12], entries.get(partition, 0), status, threshold, rate))
    by_route: dict[tuple[str, str], list[PartitionStats]] = {}
    for row in out:
        by_route.setdefault((row.tenant_id, row.route), []).append(row)
    summaries = [_summary(tenant, route, group) for (tenant, route), group in by_route.items()]
    return out + summaries


def _row(
    s: PartitionState, partition: str, entries: int, status: str, threshold: float | None, rate: float | None
) -> PartitionStats:
    return PartitionStats(
        tenant_id=s.tenant_id,
        route=s.route,
        partition=partition,
        entries=entries,
        lookups=s.semantic_lookups,
        paraphrase_hits=s.paraphrase_hits,
        repeat_hits=s.repeat_hits,
        verifications=s.verifications,
        verified_wrong=s.verified_wrong,
        near_miss_checks=s.near_miss_checks,
        feedback=s.feedback,
        feedback_wrong=s.feedback_wrong,
        verify_cost_usd=s.verify_cost_usd,
        saved_usd=s.saved_usd,
        status=status,
        threshold=threshold,
        sample_rate=rate,
    )


def _summary(tenant: str, route: str, rows: Sequence[PartitionStats]) -> PartitionStats:
    statuses = sorted({r.status for r in rows})
    return PartitionStats(
        tenant_id=tenant,
        route=route,
        partition="all",
        entries=sum(r.entries for r in rows),
        lookups=sum(r.lookups for r in rows),
        paraphrase_hits=sum(r.paraphrase_hits for r in rows),
        repeat_hits=sum(r.repeat_hits for r in rows),
        verifications=sum(r.verifications for r in rows),
        verified_wrong=sum(r.verified_wrong for r in rows),
        near_miss_checks=sum(r.near_miss_checks for r in rows),
        feedback=sum(r.feedback for r in rows),
        feedback_wrong=sum(r.feedback_wrong for r in rows),
        verify_cost_usd=sum((r.verify_cost_usd for r in rows), Decimal(0)),
        saved_usd=sum((r.saved_usd for r in rows), Decimal(0)),
        status="/".join(statuses),
        threshold=None,
        sample_rate=None,
    )


def stats_table(rows: Sequence[PartitionStats], with_thresholds: bool) -> Table:
    """The rows as the CLI prints them."""

    table = Table(title="semantic cache by route and partition")
    for col in (
        "tenant/route",
        "partition",
        "entries",
        "lookups",
        "hit rate",
        "precision (95% CI)",
        "verified (wrong)",
        "feedback wrong",
        "verify cost",
        "net saved",
        "status",
        "threshold",
        "sampling",
    ):
        table.add_column(col, justify="left" if col in ("tenant/route", "partition", "status") else "right")
    for r in rows:
        p = r.precision
        table.add_row(
            f"{r.tenant_id}/{r.route}",
            r.partition,
            f"{r.entries:,}",
            f"{r.lookups:,}",
            f"{r.hit_rate:.1%}",
            "-" if p is None else f"{p[0]:.1%} ({p[1]:.1%}-{p[2]:.1%})",
            f"{r.verifications:,} ({r.verified_wrong:,})",
            f"{r.feedback_wrong}/{r.feedback}",
            f"${r.verify_cost_usd}",
            f"${r.net_saved_usd}",
            "paraphrases off" if r.status == "off" else r.status,
            "-" if r.threshold is None else f"{r.threshold:.4f}",
            "-" if r.sample_rate is None else f"{r.sample_rate:.1%}",
        )
    if not with_thresholds:
        table.caption = "thresholds need the routes' settings: pass --config"
    return table


__all__ = ["PartitionStats", "partition_stats", "stats_table"]
