"""The self-consistency gate through the real gateway: one call with n=k on OpenAI, k calls on
Anthropic (no n), every sample priced in the ledger, and a worst case that counts k samples."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import KEYS, UPSTREAM_KEY, LoopThread, base_settings, ledger_rows, openai_models
from tests.fakes.anthropic_wire import AnthropicWireServer
from tests.fakes.anthropic_wire import Reply as ClaudeReply
from tests.fakes.openai_wire import Reply
from thrifty.server.run import BackgroundServer

MINI_ID, BIG_ID = "gpt-4o-mini", "gpt-4o-2024-08-06"
ANTHROPIC_KEY = "sk-ant-fake"
GATE = {"kind": "self_consistency", "samples": 3, "min_agree": 2, "field": "answer"}


def _mini(prompt: int, out: int) -> Decimal:
    return (prompt * Decimal("0.15") + out * Decimal("0.6")) / 10**6


BIG = (42 * Decimal("2.5") + 9 * Decimal("10")) / 10**6
# claude-3-haiku: $0.25 input, $1.25 output per 1M tokens; the fake bills 12 in, 9 out.
HAIKU = (12 * Decimal("0.25") + 9 * Decimal("1.25")) / 10**6


@pytest.fixture
def anthropic_upstream(loop_thread: LoopThread) -> Iterator[AnthropicWireServer]:
    server = AnthropicWireServer(api_key=ANTHROPIC_KEY)
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


def _server(tmp_path: Path, openai_upstream: Any, anthropic_upstream: Any, **route: Any) -> BackgroundServer:
    models = {
        **openai_models(),
        "haiku": {"provider": "claude", "upstream": "claude-3-haiku-20240307", "context_window": 200000},
    }
    settings = base_settings(
        tmp_path,
        providers={
            "up": {"kind": "openai", "base_url": openai_upstream.base_url},
            "claude": {"kind": "anthropic", "base_url": anthropic_upstream.base_url},
        },
        models=models,
        routes={
            "sc": {
                "model": "gpt-4o-mini",
                "strategy": "cascade",
                "tiers": ["gpt-4o-mini", "gpt-4o"],
                "gates": [GATE],
            },
            "sc-claude": {
                "model": "haiku",
                "strategy": "cascade",
                "tiers": ["haiku", "gpt-4o"],
                "gates": [GATE],
            },
            **route,
        },
        resilience={"max_retries": 0},
    )
    return BackgroundServer(settings, secrets={"up": UPSTREAM_KEY, "claude": ANTHROPIC_KEY})


def _ask(server: BackgroundServer, route: str, **kw: Any) -> Any:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)
    messages = [{"role": "user", "content": "What is 6 x 7?"}]
    return client.chat.completions.with_raw_response.create(model=f"route:{route}", messages=messages, **kw)


def _answers(*values: int) -> list[str]:
    return [json.dumps({"answer": v}) for v in values]


def test_openai_draft_is_sampled_in_one_call_with_n_and_the_majority_sample_is_returned(
    tmp_path, openai_upstream, anthropic_upstream
):
    # One call, three samples: 41, 42, 42. The fake bills the call's 3 x 9 output tokens.
    openai_upstream.by_model[MINI_ID] = [Reply(samples=_answers(41, 42, 42), completion_tokens=27)]
    with _server(tmp_path, openai_upstream, anthropic_upstream) as server:
        resp = _ask(server, "sc")
    completion = resp.parse()
    assert [c.message.content for c in completion.choices] == ['{"answer": 42}']
    assert completion.choices[0].index == 0
    assert [(r["model"], r.get("n")) for r in openai_upstream.requests] == [(MINI_ID, 3)]
    assert resp.headers["x-thrifty-model"] == "gpt-4o-mini"
    (row,) = ledger_rows(tmp_path / "ledger.db")
    (draft,) = json.loads(row["attempts"])
    # Every sample is priced: one prompt, three outputs.
    assert Decimal(row["cost_usd"]) == Decimal(draft["cost_usd"]) == _mini(42, 27)
    assert row["output_tokens"] == 27 and row["escalated"] == 0
    assert draft["gate"] == "pass: self_consistency: 2/3 samples agree on '42', need 2"


def test_samples_that_do_not_agree_escalate(tmp_path, openai_upstream, anthropic_upstream):
    openai_upstream.by_model[MINI_ID] = [Reply(samples=_answers(40, 41, 42), completion_tokens=27)]
    openai_upstream.by_model[BIG_ID] = [Reply(text='{"answer": 42}')]
    with _server(tmp_path, openai_upstream, anthropic_upstream) as server:
        resp = _ask(server, "sc")
    assert resp.headers["x-thrifty-model"] == "gpt-4o"
    assert resp.parse().choices[0].message.content == '{"answer": 42}'
    # The top tier is not sampled: it answers once, as the client asked.
    assert [r.get("n") for r in openai_upstream.requests] == [3, None]
    (row,) = ledger_rows(tmp_path / "ledger.db")
    draft, answer = json.loads(row["attempts"])
    assert answer["model"] == "gpt-4o" and answer["role"] == "answer"
    assert draft["gate"].startswith("fail: self_consistency: 1/3 samples agree")
    assert Decimal(row["cost_usd"]) == _mini(42, 27) + BIG and row["escalated"] == 1


def test_anthropic_has_no_n_so_each_sample_is_its_own_priced_call(
    tmp_path, openai_upstream, anthropic_upstream
):
    # 42, then 41: undecided, so a third sample is asked; 42 settles it.
    anthropic_upstream.reply(*(ClaudeReply(text=t) for t in _answers(42, 41, 42)))
    with _server(tmp_path, openai_upstream, anthropic_upstream) as server:
        resp = _ask(server, "sc-claude")
    assert resp.headers["x-thrifty-model"] == "haiku"
    assert json.loads(resp.parse().choices[0].message.content) == {"answer": 42}
    assert len(anthropic_upstream.requests) == 3 and not openai_upstream.requests
    assert all("n" not in r.body for r in anthropic_upstream.requests)
    (row,) = ledger_rows(tmp_path / "ledger.db")
    attempts = json.loads(row["attempts"])
    assert [a["role"] for a in attempts] == ["answer", "voter", "voter"]
    assert Decimal(row["cost_usd"]) == 3 * HAIKU == sum(Decimal(a["cost_usd"]) for a in attempts)
    # Two agreeing samples settle a 2-of-3 vote: the third is never paid for.
    anthropic_upstream.requests.clear()
    anthropic_upstream.reply(*(ClaudeReply(text=t) for t in _answers(7, 7, 9)))
    with _server(tmp_path, openai_upstream, anthropic_upstream) as server:
        _ask(server, "sc-claude")
    assert len(anthropic_upstream.requests) == 2


def test_the_worst_case_counts_every_sample(tmp_path, openai_upstream, anthropic_upstream):
    # 15 prompt and 100 output tokens: $0.0010375 on gpt-4o, $0.00006225 a sample on gpt-4o-mini.
    # One sample: $0.00109975 in all; three: $0.00122425. A cap of $0.0011 between them.
    cap = {"max_cost_per_request_usd": "0.0011"}
    plain = {"model": "gpt-4o-mini", "strategy": "cascade", "tiers": ["gpt-4o-mini", "gpt-4o"]}
    extra = {
        "one-sample": {**plain, "gates": [{"kind": "json_schema", "json_schema": {"type": "object"}}], **cap},
        "three-samples": {**plain, "gates": [GATE], **cap},
    }
    openai_upstream.default = Reply(text='{"answer": 1}')
    with _server(tmp_path, openai_upstream, anthropic_upstream, **extra) as server:
        assert _ask(server, "one-sample", max_tokens=100).headers["x-thrifty-model"] == "gpt-4o-mini"
        with pytest.raises(openai.BadRequestError) as info:
            _ask(server, "three-samples", max_tokens=100)
    assert "(gpt-4o-mini, gpt-4o, gpt-4o-mini, gpt-4o-mini)" in str(info.value)


def test_a_self_consistency_gate_needs_samples() -> None:
    from thrifty.settings import GateSettings

    with pytest.raises(ValueError, match="needs samples"):
        GateSettings.model_validate({"kind": "self_consistency"})
    with pytest.raises(ValueError, match="min_agree 4 > samples 3"):
        GateSettings.model_validate({"kind": "self_consistency", "samples": 3, "min_agree": 4})
