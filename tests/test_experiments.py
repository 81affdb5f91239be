"""Route experiments: sticky assignment and weights, the arms through the real gateway with the
openai SDK (headers, ledger, report), and the stop rule's recorded actions."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from typer.testing import CliRunner

from tests.backends import pg_url, services, storage  # noqa: F401 - fixtures
from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.fakes.openai_wire import OpenAIWireServer
from thrifty.cli import app
from thrifty.errors import ThriftyError
from thrifty.experiments.assign import RouteArms, bucket, settings_arms
from thrifty.experiments.stoprule import decide
from thrifty.server.run import BackgroundServer
from thrifty.settings import ExperimentSettings, Settings
from thrifty.stores.factory import open_experiment_store

ARMS = {
    "control": {"weight": 90},
    "cheap": {"weight": 10, "model": "selfhosted", "prompt_version": "v2", "system_prompt": "Be brief."},
}


def experiment(**variants: dict[str, Any]) -> ExperimentSettings:
    arms = variants or ARMS
    return ExperimentSettings.model_validate({"variants": arms, "baseline": next(iter(arms))})


def shares(arms: RouteArms, users: int = 10_000) -> Counter[str]:
    return Counter(arms.pick("acme", f"user-{i}").name for i in range(users))


def test_weights_hold_within_two_points_on_10000_users() -> None:
    for weights in ((90, 10), (50, 50), (70, 20, 10)):
        names = [f"arm{i}" for i in range(len(weights))]
        arms = settings_arms(
            "r", experiment(**{n: {"weight": w} for n, w in zip(names, weights, strict=True)})
        )
        got = shares(arms)
        for name, weight in zip(names, weights, strict=True):
            assert abs(got[name] / 10_000 - weight / sum(weights)) <= 0.02, (weights, got)


def test_assignment_is_sticky_and_a_growing_canary_keeps_its_users() -> None:
    small = settings_arms("r", experiment(control={"weight": 90}, canary={"weight": 10}))
    big = settings_arms("r", experiment(control={"weight": 75}, canary={"weight": 25}))
    users = [f"u{i}" for i in range(2000)]
    first = {u: small.pick("acme", u).name for u in users}
    assert first == {u: small.pick("acme", u).name for u in users}  # the same arm every time
    on_canary = {u for u, arm in first.items() if arm == "canary"}
    assert on_canary and all(big.pick("acme", u).name == "canary" for u in on_canary)
    # Another route (or salt) shuffles independently; without a user the tenant decides.
    assert bucket("", "r", "u1") != bucket("", "other", "u1") != bucket("s", "r", "u1")
    assert len({small.pick("acme", None).name for _ in range(20)}) == 1
    # sticky_by tenant: every user of a tenant on one arm, tenants spread over the arms.
    by_tenant = settings_arms(
        "r",
        ExperimentSettings.model_validate(
            {"variants": {"a": {"weight": 50}, "b": {"weight": 50}}, "sticky_by": "tenant"}
        ),
    )
    assert len({by_tenant.pick("acme", u).name for u in users}) == 1
    assert {by_tenant.pick(f"tenant-{i}", "u1").name for i in range(50)} == {"a", "b"}


def test_stop_rule_stops_a_clearly_worse_arm_and_not_an_equal_one() -> None:
    rule = {"margin": 0.005, "alpha": 0.05, "tau": 0.02, "min_requests": 100}
    assert not decide(20, 1000, 15, 1000, **rule).stop  # 2% vs 1.5%: not shown worse by > 0.5pp yet
    assert decide(200, 2000, 150, 20_000, **rule).stop  # 10% vs 0.75%: stopped
    assert not decide(30, 99, 0, 5000, **rule).stop  # too few requests in the arm
    d = decide(40, 2000, 300, 20_000, **rule)
    assert not d.stop and d.low < 0.005 < d.high


@pytest.fixture
def upstream(loop_thread: Any) -> Iterator[OpenAIWireServer]:
    server = OpenAIWireServer(api_key=UPSTREAM_KEY)
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


def experiment_settings(
    tmp_path: Path, upstream: OpenAIWireServer, store: dict[str, Any] | None = None
) -> Settings:
    return base_settings(
        tmp_path,
        **({"storage": store} if store is not None else {}),
        providers={"up": {"kind": "openai", "base_url": upstream.base_url, "api_key_env": "UP_KEY"}},
        models=openai_models(),
        routes={
            "support": {
                "model": "gpt-4o-mini",
                "experiment": {
                    "baseline": "control",
                    "variants": {
                        "control": {"weight": 50},
                        "cheap": {
                            "weight": 30,
                            "model": "selfhosted",
                            "prompt_version": "v2",
                            "system_prompt": "Be brief.",
                        },
                        "cascade": {
                            "weight": 20,
                            "tiers": ["selfhosted", "gpt-4o"],
                            "gates": [{"kind": "json_schema", "json_schema": {"type": "object"}}],
                        },
                    },
                    "stop": {"min_requests": 20, "margin": 0.0},
                },
            }
        },
        resilience={"max_retries": 0},
        experiments={"refresh_s": 0.05},
    )


def test_arms_through_the_gateway_with_the_openai_sdk(tmp_path: Path, upstream: OpenAIWireServer) -> None:
    settings = experiment_settings(tmp_path, upstream)
    arms = settings_arms("support", settings.routes["support"].experiment)  # type: ignore[arg-type]
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
        seen: dict[str, str] = {}
        for i in range(40):
            raw = client.chat.completions.with_raw_response.create(
                model="route:support",
                messages=[{"role": "system", "content": "Be long."}, {"role": "user", "content": f"q{i}"}],
                extra_headers={"x-thrifty-user": f"user-{i}"},
            )
            variant = raw.headers["x-thrifty-variant"]
            assert variant == arms.pick("acme", f"user-{i}").name
            seen[f"user-{i}"] = variant
            upstream_body = upstream.requests[-1]
            if variant == "cheap":
                assert upstream_body["model"] == "llama-3.1-8b-local"
                assert upstream_body["messages"][0] == {"role": "system", "content": "Be brief."}
                assert len(upstream_body["messages"]) == 2
            elif variant == "control":
                assert upstream_body["model"] == "gpt-4o-mini"
                assert upstream_body["messages"][0]["content"] == "Be long."
            else:
                # The cascade's draft (not JSON) failed its gate: the top tier answered.
                assert [b["model"] for b in upstream.requests[-2:]] == [
                    "llama-3.1-8b-local",
                    "gpt-4o-2024-08-06",
                ]
    assert set(seen.values()) == {"control", "cheap", "cascade"}
    rows = ledger_rows(tmp_path / "ledger.db")
    assert [r["variant"] for r in rows] == [seen[f"user-{i}"] for i in range(40)]
    assert {r["prompt_version"] for r in rows if r["variant"] == "cheap"} == {"v2"}
    assert {r["model"] for r in rows if r["variant"] == "cheap"} == {"selfhosted"}
    assert {(r["model"], r["escalated"]) for r in rows if r["variant"] == "cascade"} == {("gpt-4o", 1)}
    result = CliRunner().invoke(
        app, ["report", "--by", "variant", "--format", "json", "--db", str(tmp_path / "ledger.db")]
    )
    assert result.exit_code == 0, result.output
    groups = {g["group"]: g["requests"] for g in orjson.loads(result.output)}
    assert groups == {f"support/{v}": n for v, n in Counter(seen.values()).items()}


def cli(*args: str) -> tuple[int, str]:
    """The CLI in-process, with `main`'s exit codes (a ThriftyError is one line and exit 2)."""
    result = CliRunner().invoke(app, list(args))
    if isinstance(result.exception, ThriftyError):
        return 2, result.output + result.exception.message
    return result.exit_code, result.output


def write_settings(settings: Settings, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    return path


def test_check_stops_a_failing_arm_and_the_gateway_follows(
    tmp_path: Path,
    upstream: OpenAIWireServer,
    storage: dict[str, Any],  # noqa: F811
) -> None:
    """On either store: the CLI's check and promote, recorded, reach the running gateway."""
    import httpx

    settings = experiment_settings(tmp_path, upstream, storage)
    config = write_settings(settings, tmp_path / "thrifty.yaml")
    runner = CliRunner()
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
        http = httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {KEYS['acme']}"})
        for i in range(150):
            raw = client.chat.completions.with_raw_response.create(
                model="route:support",
                messages=[{"role": "user", "content": f"q{i}"}],
                extra_headers={"x-thrifty-user": f"user-{i}"},
            )
            variant = raw.headers["x-thrifty-variant"]
            answer = http.post(
                "/thrifty/feedback",
                json={"request_id": raw.headers["x-thrifty-request-id"], "correct": variant != "cheap"},
            )
            assert answer.status_code == 200, answer.text
        status = runner.invoke(
            app, ["experiment", "status", "support", "-c", str(config), "--format", "json"]
        )
        assert status.exit_code == 0, status.output
        before = {v["variant"]: v for v in orjson.loads(status.output)["variants"]}
        assert before["cheap"]["success_rate"] == 0.0 and before["control"]["success_rate"] == 1.0
        assert before["cheap"]["stop_rule"]["stop"] is True
        checked = runner.invoke(app, ["experiment", "check", "support", "-c", str(config)])
        assert checked.exit_code == 0, checked.output
        assert "stopped cheap" in checked.output
        store = open_experiment_store(settings)
        assert [(a.action, a.variant) for a in store.actions("support")] == [("stop", "cheap")]
        assert store.actions("support")[0].reason.startswith("stop rule: failure rate 100.00%")
        store.close()
        # A second check finds nothing more to stop and records nothing.
        assert runner.invoke(app, ["experiment", "check", "support", "-c", str(config)]).exit_code == 0
        import time

        time.sleep(0.3)  # the gateway re-reads the arms every experiments.refresh_s
        cheap_users = [
            f"user-{i}" for i in range(150) if arms_of(settings).pick("acme", f"user-{i}").name == "cheap"
        ]
        for user in cheap_users[:5]:
            raw = client.chat.completions.with_raw_response.create(
                model="route:support",
                messages=[{"role": "user", "content": "again"}],
                extra_headers={"x-thrifty-user": user},
            )
            assert raw.headers["x-thrifty-variant"] in ("control", "cascade")
        promoted = runner.invoke(app, ["experiment", "promote", "support", "cascade", "-c", str(config)])
        assert promoted.exit_code == 0, promoted.output
        time.sleep(0.3)
        raw = client.chat.completions.with_raw_response.create(
            model="route:support",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-thrifty-user": "user-1"},
        )
        assert raw.headers["x-thrifty-variant"] == "cascade"
    store = open_experiment_store(settings)
    assert [(a.action, a.variant) for a in store.actions("support")] == [
        ("stop", "cheap"),
        ("promote", "cascade"),
    ]
    store.close()
    code, output = cli("experiment", "stop", "support", "nope", "-c", str(config))
    assert code == 2 and "no variant 'nope'" in output


def arms_of(settings: Settings) -> RouteArms:
    experiment = settings.routes["support"].experiment
    assert experiment is not None
    return settings_arms("support", experiment)


@pytest.mark.parametrize(
    ("experiment", "message"),
    [
        (
            {"variants": {"a": {"weight": 1, "model": "gpt-4o", "tiers": ["gpt-4o-mini", "gpt-4o"]}}},
            "not both",
        ),
        ({"variants": {"a": {"weight": 1, "model": "nope"}}}, "experiment.variants: unknown model 'nope'"),
        ({"variants": {"a": {"weight": 1}}, "baseline": "b"}, "baseline 'b' is not one of the variants"),
        ({"variants": {"a": {"weight": 0}, "b": {"weight": 0}}}, "weights must add up to more than 0"),
        ({"variants": {"a/b": {"weight": 1}}}, "no '/'"),
        ({"variants": {"a": {"weight": -1}}}, "greater than or equal to 0"),
        ({"variants": {}}, "at least one variant"),
        ({"variants": {"a": {"weight": 1, "gates": [{"kind": "logprob", "threshold": 0.5}]}}}, "give tiers"),
    ],
)
def test_bad_experiment_settings_name_what_is_wrong(
    tmp_path: Path, experiment: dict[str, Any], message: str
) -> None:
    from thrifty.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        base_settings(
            tmp_path,
            providers={"up": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            models=openai_models(),
            routes={"support": {"model": "gpt-4o-mini", "experiment": experiment}},
        )


def test_gpu_time_price_needs_both_numbers_and_is_exact(tmp_path: Path) -> None:
    from thrifty.errors import ConfigError
    from thrifty.pricing import PriceCatalog
    from thrifty.types import Usage

    def settings(price: dict[str, Any]) -> Settings:
        return base_settings(
            tmp_path,
            providers={"up": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            models={"local": {"provider": "up", "price": price}},
        )

    with pytest.raises(ConfigError, match="needs both gpu_usd_per_hour and gpu_tokens_per_hour"):
        settings({"gpu_usd_per_hour": "2"})
    with pytest.raises(ConfigError, match="not both"):
        settings({"gpu_usd_per_hour": "2", "gpu_tokens_per_hour": 1000, "flat_per_mtok": "1"})
    with pytest.raises(ConfigError, match="less than or equal to 1"):
        settings({"gpu_usd_per_hour": "2", "gpu_tokens_per_hour": 1000, "gpu_utilisation": "1.5"})
    s = settings({"gpu_usd_per_hour": "1.20", "gpu_tokens_per_hour": 9_000_000, "gpu_utilisation": "0.6"})
    catalog = PriceCatalog.from_settings(s.models, s.providers)
    # $1.20 / (9M tokens x 0.6) per token: 1,000 tokens cost $1.20 * 1000 / 5.4M.
    cost = catalog.cost("local", Usage(input_tokens=700, output_tokens=300))
    assert cost == Decimal("1.20") * 1000 / (Decimal(9_000_000) * Decimal("0.6"))
