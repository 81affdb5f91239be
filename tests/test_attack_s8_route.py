"""Session 8 attacks on routes driven by a `thrifty route train` artifact: can a request get past
the cost cap or the budget it was admitted under by letting the router pick a dearer model than the
route names? Real gateway, the openai SDK, a wire-level fake upstream billing honestly."""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, base_settings, ledger_rows, openai_models
from tests.fakes.openai_wire import OpenAIWireServer, Reply
from thrifty.routing.train.gate import Logistic, parse, prompt_features, stage_features
from thrifty.routing.train.router import AGREE_BONUS, NEVER, Gate, Router
from thrifty.server.run import BackgroundServer
from thrifty.stores.keys import hash_key

MINI_ID, FLASH_ID, BIG_ID = "gpt-4o-mini-2024-07-18", "gemini-1.5-flash", "gpt-4o-2024-08-06"
QUESTION = [{"role": "user", "content": "What is 6 x 7?"}]


def _router(path: Path, voter: str = FLASH_ID) -> None:
    """Known task "t": the classifier sends it to gpt-4o-mini (P = 0.8 >= 0.7); any other task, or
    none, goes to gpt-4o. As a cascade, agreement of mini and flash is accepted on "t"."""

    def constant(p: float, dim: int) -> Logistic:
        return Logistic((0.0,) * dim, (1.0,) * dim, (0.0,) * dim, math.log(p / (1 - p)))

    d = parse('{"answer": "4"}', "t")
    one, two, prompt = (
        len(stage_features([d], "q")),
        len(stage_features([d, d], "q")),
        len(prompt_features("q")),
    )
    Router(
        reference=BIG_ID,
        target_quality=0.99,
        ladder=(MINI_ID, voter),
        strong=BIG_ID,
        first_gate=constant(0.5, one),
        agree_gate=constant(0.95, two),
        split_gate=constant(0.05, two),
        prompt_gate=constant(0.8, prompt),
        gates={"t": Gate(0.9, AGREE_BONUS, 0.7, cost_aware=False)},
        fallback=Gate(NEVER, AGREE_BONUS + 0.99, NEVER, cost_aware=False),
    ).save(path)


def _server(tmp_path: Path, upstream: OpenAIWireServer, budget: str | None = None, cap: str | None = None):
    artifact = tmp_path / "router.json"
    _router(artifact)
    models = {
        **openai_models(),
        "flash": {
            "provider": "up",
            "upstream": FLASH_ID,
            "price": {"input_per_mtok": "0.075", "output_per_mtok": "0.3"},
        },
    }
    router = {"path": str(artifact), "models": {MINI_ID: "gpt-4o-mini", FLASH_ID: "flash", BIG_ID: "gpt-4o"}}
    limits: dict[str, Any] = {"max_cost_per_request_usd": cap} if cap else {}
    acme: dict[str, Any] = {"key_hashes": [hash_key(KEYS["acme"])]}
    if budget:
        acme["budget"] = {"usd_per_day": budget}
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": upstream.base_url}},
        models=models,
        routes={
            # The route names its cheap model; the classifier may send a request to gpt-4o.
            "picked": {"model": "gpt-4o-mini", "strategy": "classifier", "router": router, **limits},
            "learned": {"model": "gpt-4o-mini", "strategy": "cascade", "router": router, **limits},
        },
        tenants={"acme": acme},
        resilience={"max_retries": 0},
    )
    return BackgroundServer(settings, secrets={"up": UPSTREAM_KEY})


def _client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0, timeout=30)


def test_a_classifier_route_is_capped_at_the_dearest_model_it_may_pick(tmp_path, openai_upstream):
    """$0.002 a request: 1,000 output tokens fit on gpt-4o-mini ($0.0006), not on gpt-4o ($0.01),
    where the classifier sends a prompt of no known task."""
    openai_upstream.default = Reply(honest=True, completion_tokens=100_000)
    with _server(tmp_path, openai_upstream, cap="0.002") as server:
        client = _client(server)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="route:picked", messages=QUESTION, max_tokens=1000)
        assert info.value.body["code"] == "request_cost_cap_exceeded"
        assert "the dearest model route 'picked' may pick (gpt-4o-mini, gpt-4o)" in info.value.message
        # 100 tokens fit on either model: admitted, and the known task goes to gpt-4o-mini.
        ok = client.chat.completions.with_raw_response.create(
            model="route:picked", messages=QUESTION, max_tokens=100, extra_headers={"x-thrifty-task": "t"}
        )
        assert ok.headers["x-thrifty-model"] == "gpt-4o-mini"
    assert [r["model"] for r in openai_upstream.requests] == ["gpt-4o-mini"]


def test_a_classifier_route_cannot_overrun_the_budget_it_was_admitted_under(tmp_path, openai_upstream):
    openai_upstream.default = Reply(honest=True, completion_tokens=100_000)
    budget = Decimal("0.005")
    with _server(tmp_path, openai_upstream, budget=str(budget)) as server:
        client = _client(server)
        for _ in range(3):
            try:
                client.chat.completions.create(model="route:picked", messages=QUESTION, max_tokens=1000)
            except openai.RateLimitError as err:
                assert err.body["code"] == "budget_exceeded"
    spent = sum(
        (Decimal(r["cost_usd"]) for r in ledger_rows(tmp_path / "ledger.db") if r["cost_usd"]), Decimal(0)
    )
    assert spent <= budget
    assert openai_upstream.requests == []  # each would cost ~$0.01 on gpt-4o: none fits


def test_a_learned_cascade_is_capped_at_every_model_it_may_call(tmp_path, openai_upstream):
    """100 output tokens: mini $0.00006 + flash $0.00003 + gpt-4o $0.001 (plus prompts) > $0.001."""
    openai_upstream.default = Reply(honest=True, completion_tokens=100_000)
    with (
        _server(tmp_path, openai_upstream, cap="0.001") as server,
        pytest.raises(openai.BadRequestError) as info,
    ):
        _client(server).chat.completions.create(
            model="route:learned", messages=QUESTION, max_tokens=100, extra_headers={"x-thrifty-task": "t"}
        )
    assert info.value.body["code"] == "request_cost_cap_exceeded"
    assert "gpt-4o" in info.value.message and openai_upstream.requests == []


def test_n_above_1_is_refused_when_the_artifact_names_an_anthropic_alias_unmapped(
    tmp_path, openai_upstream, loop_thread
):
    """An artifact's model id that is already an alias here needs no mapping. When that alias is an
    Anthropic model (no `n`), a request with n > 1 must be refused before any call, as for a tier."""
    from tests.fakes.anthropic_wire import AnthropicWireServer

    anthropic = AnthropicWireServer(api_key="sk-ant-test")
    loop_thread.run(anthropic.start())
    artifact = tmp_path / "router.json"
    _router(artifact, voter="claude")
    try:
        settings = base_settings(
            tmp_path,
            providers={
                "up": {"kind": "openai", "base_url": openai_upstream.base_url},
                "claude": {"kind": "anthropic", "base_url": anthropic.base_url},
            },
            models={
                **openai_models(),
                "claude": {"provider": "claude", "upstream": "claude-3-5-haiku-20241022"},
            },
            routes={
                "learned": {
                    "model": "gpt-4o-mini",
                    "strategy": "cascade",
                    "router": {"path": str(artifact), "models": {MINI_ID: "gpt-4o-mini", BIG_ID: "gpt-4o"}},
                }
            },
            resilience={"max_retries": 0},
        )
        secrets = {"up": UPSTREAM_KEY, "claude": "sk-ant-test"}
        with (
            BackgroundServer(settings, secrets=secrets) as server,
            pytest.raises(openai.BadRequestError) as info,
        ):
            _client(server).chat.completions.create(
                model="route:learned", messages=QUESTION, n=3, extra_headers={"x-thrifty-task": "t"}
            )
        # Not even the draft (OpenAI) was called and paid for.
        assert openai_upstream.requests == [] and anthropic.requests == []
        assert info.value.body["param"] == "n" and "'claude'" in info.value.message
    finally:
        loop_thread.run(anthropic.stop())


def _tampered(path: Path, how: str) -> None:
    """The hand-made artifact, edited as a careless hand or another tool's version would."""
    import json

    _router(path)
    obj = json.loads(path.read_text())
    if how == "list":
        obj = [obj]
    elif how == "gates-list":
        obj["gates"] = []
    elif how == "short-weights":
        obj["first_gate"]["weights"] = obj["first_gate"]["weights"][:-1]
    elif how == "zero-scale":
        obj["agree_gate"]["scale"] = [0.0] * len(obj["agree_gate"]["scale"])
    elif how == "third-gate-of-one-draft":
        obj["third"], obj["third_gate"] = BIG_ID, obj["first_gate"]
    path.write_text(json.dumps(obj) if how != "not-json" else "{ladder: [")


@pytest.mark.parametrize(
    "how", ["list", "gates-list", "short-weights", "zero-scale", "third-gate-of-one-draft", "not-json"]
)
def test_a_tampered_artifact_is_refused_at_start_with_the_route_named(tmp_path, openai_upstream, how):
    """Not a traceback at start, nor a 500 on every request of the route once it serves."""
    from thrifty.errors import ConfigError
    from thrifty.gateway import Gateway

    artifact = tmp_path / "router.json"
    _tampered(artifact, how)
    settings = base_settings(
        tmp_path,
        providers={"up": {"kind": "openai", "base_url": openai_upstream.base_url}},
        models=openai_models(),
        routes={
            "learned": {
                "model": "gpt-4o-mini",
                "strategy": "cascade",
                "router": {
                    "path": str(artifact),
                    "models": {MINI_ID: "gpt-4o-mini", FLASH_ID: "selfhosted", BIG_ID: "gpt-4o"},
                },
            }
        },
    )
    with pytest.raises(ConfigError, match=r"routes\.learned\.router: cannot load"):
        Gateway(settings)
