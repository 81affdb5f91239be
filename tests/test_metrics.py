"""/metrics through a real gateway: parsed by prometheus_client's own parser, equal to the ledger."""

from __future__ import annotations

import math
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.dashboard_helpers import ADMIN_KEY
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from thrifty.server.metrics import DURATION_BUCKETS, GatewayMetrics
from thrifty.server.run import BackgroundServer
from thrifty.stores.keys import hash_key


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((sample.labels, sample.value))
    return out


def _total(samples: list[tuple[dict[str, str], float]], **match: str) -> float:
    return sum(v for labels, v in samples if all(labels.get(k) == want for k, want in match.items()))


def test_metrics_counters_equal_the_ledger_sums(tmp_path: Path, openai_upstream: OpenAIWireServer):
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url, "api_key_env": "K"}},
        models=openai_models(),
        routes={"support": {"model": "gpt-4o-mini", "budget": {"usd_per_day": "0.0000001"}}},
        resilience={"max_retries": 1, "retry_base_s": 0},
        dashboard={"admin_key_hashes": [hash_key(ADMIN_KEY)]},
        metrics={"max_label_values": 2},
    )
    openai_upstream.queue(
        Reply(prompt_tokens=30, cached_tokens=10, completion_tokens=5),
        Reply(status=500),  # retried, then answered
        Reply(completion_tokens=3),
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        root = f"http://{server.host}:{server.port}"
        clients = {
            t: openai.OpenAI(base_url=server.base_url, api_key=k, max_retries=0) for t, k in KEYS.items()
        }
        messages: Any = [{"role": "user", "content": "hello"}]
        for i, feature in enumerate(["f1", "f2", "f3", "f4", "f1"]):
            clients["acme" if i % 2 else "globex"].chat.completions.create(
                model="gpt-4o-mini", messages=messages, extra_headers={"x-thrifty-feature": feature}
            )
        stream = clients["acme"].chat.completions.create(model="gpt-4o", messages=messages, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        try:  # the route's budget is too small for any request: a 429
            clients["acme"].chat.completions.create(model="route:support", messages=messages)
        except openai.RateLimitError:
            pass
        else:
            raise AssertionError("expected a budget 429")
        assert httpx.get(root + "/metrics", timeout=10).status_code == 401
        assert (
            httpx.get(root + "/metrics", headers={"authorization": f"Bearer {KEYS['acme']}"}).status_code
            == 401
        )
        scraped = httpx.get(root + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    samples = _samples(scraped.text)
    rows = ledger_rows(tmp_path / "ledger.db")
    assert _total(samples["thrifty_requests_total"]) == len(rows) == 7
    for tenant in KEYS:
        mine = [r for r in rows if r["tenant_id"] == tenant]
        assert _total(samples["thrifty_requests_total"], tenant=tenant) == len(mine)
        for kind, column in (
            ("input", "input_tokens"),
            ("cached_input", "cached_input_tokens"),
            ("output", "output_tokens"),
        ):
            assert _total(samples["thrifty_tokens_total"], tenant=tenant, type=kind) == sum(
                r[column] for r in mine
            )
        cost = sum((Decimal(r["cost_usd"]) for r in mine if r["cost_usd"]), Decimal(0))
        assert math.isclose(
            _total(samples["thrifty_cost_usd_total"], tenant=tenant), float(cost), rel_tol=1e-12
        )
    # Bounded labels: two feature values, then "other" (f3, f4); requests without one are "none".
    features = {labels["feature"] for labels, _ in samples["thrifty_requests_total"]}
    assert features == {"f1", "f2", "other", "none"}
    assert _total(samples["thrifty_requests_total"], feature="other") == 2
    assert _total(samples["thrifty_budget_rejections_total"], tenant="acme", route="support") == 1
    assert _total(samples["thrifty_upstream_errors_total"], status="500") == 1
    # GenAI semantic-convention histograms: one observation per request that reached a model.
    answered = [r for r in rows if r["status"] == "ok"]
    assert _total(samples["gen_ai_client_operation_duration_seconds_count"]) == len(rows)
    assert _total(samples["gen_ai_client_token_usage_sum"], gen_ai_token_type="input") == sum(
        r["input_tokens"] for r in answered
    )
    assert _total(samples["gen_ai_server_time_to_first_token_seconds_count"]) == 1  # the one stream
    states = {labels["model"]: v for labels, v in samples["thrifty_circuit_breaker_state"]}
    assert states and set(states.values()) == {0.0}
    assert _total(samples["thrifty_queue_depth"], queue="ledger") == 0


def test_histograms_read_as_prometheus_clients_own_for_the_same_observations(tmp_path: Path):
    """The sums are kept outside prometheus-client (a row costs a few list updates); the
    exposition of a histogram must still be what its own Histogram writes, bucket for bucket."""
    from tests.test_rollups import varied_entries
    from thrifty.stores.ledger import entry_row

    settings = base_settings(tmp_path, providers={}, models={})
    ours = GatewayMetrics(settings)
    rows = [entry_row(e) for e in varied_entries(60)]
    # Latencies on and around the bucket bounds: `le` includes the bound itself.
    rows = [
        (*r[:25], [b * 1000 for b in DURATION_BUCKETS][i % 14] + (i % 3 - 1) * 1e-6, *r[26:])
        for i, r in enumerate(rows)
    ]
    ours.observe_batch(rows[:7])
    ours.observe_batch(rows[7:])
    registry = CollectorRegistry()
    theirs = Histogram(
        "gen_ai_client_operation_duration_seconds",
        "x",
        ["gen_ai_operation_name", "gen_ai_request_model", "route"],
        buckets=DURATION_BUCKETS,
        registry=registry,
    )
    for r in rows:
        theirs.labels("chat", r[7] or "none", r[5] or "none").observe(r[25] / 1000)

    def samples(text: str) -> list:
        (family,) = [
            f
            for f in text_string_to_metric_families(text)
            if f.name == "gen_ai_client_operation_duration_seconds"
        ]
        return sorted((s.name, sorted(s.labels.items()), round(s.value, 9)) for s in family.samples)

    assert samples(ours.exposition()[0].decode()) == samples(generate_latest(registry).decode())
