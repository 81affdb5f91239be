"""The replay provider answers offline from recorded outputs, through the real gateway."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import openai
import orjson
import pytest

from tests.conftest import KEYS, base_settings
from thrifty.server.run import BackgroundServer

ROWS = [
    {
        "id": "t-1",
        "task": "gsm",
        "prompt": "What is 2 + 3?",
        "reference": "5",
        "responses": {
            "gpt-4o-mini-2024-07-18": {"output": '{"answer": "5"}', "correct": 1},
            "claude-3-haiku-20240307": {"output": '{"answer": "6"}', "correct": 0},
        },
    },
]
RECORDING = {
    "thrifty_recording": 1,
    "model": "gpt-4o-mini-2024-07-18",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ],
    "response": {
        "id": "chatcmpl-rec",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 21, "completion_tokens": 2, "total_tokens": 23},
    },
}


@pytest.fixture
def replay(tmp_path: Path) -> Iterator[openai.OpenAI]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in ROWS) + b"\n")
    (data / "recorded.jsonl").write_bytes(orjson.dumps(RECORDING) + b"\n")
    settings = base_settings(
        tmp_path,
        providers={"replay": {"kind": "replay", "data": [str(data)], "stream_chunk_chars": 3}},
        models={
            "mini": {"provider": "replay", "upstream": "gpt-4o-mini-2024-07-18"},
            "haiku": {"provider": "replay", "upstream": "claude-3-haiku-20240307"},
            "gpt-4o": {"provider": "replay", "upstream": "gpt-4o-2024-08-06"},
        },
    )
    with BackgroundServer(settings) as server:
        yield openai.OpenAI(base_url=server.base_url, api_key=KEYS["acme"], max_retries=0)


def test_zeroeval_rows_answer_with_the_chosen_models_output(replay, ledger):
    ask = [{"role": "user", "content": "What is 2 + 3?"}]
    mini = replay.chat.completions.with_raw_response.create(model="mini", messages=ask)
    assert mini.parse().choices[0].message.content == '{"answer": "5"}'
    assert (
        replay.chat.completions.create(model="haiku", messages=ask).choices[0].message.content
        == '{"answer": "6"}'
    )
    rows = ledger()
    # gpt-4o-mini is counted exactly with o200k; claude's tokenizer is not public: estimated.
    assert [r["usage_estimated"] for r in rows] == [0, 1]
    # prompt: 3 + (3 + 1 + 8) = 15 tokens; output '{"answer": "5"}' = 6 tokens; at $0.15 / $0.60 per 1M.
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (15, 6)
    assert Decimal(mini.headers["x-thrifty-cost-usd"]) == (15 * Decimal("0.15") + 6 * Decimal("0.6")) / 10**6


def test_stream_replays_the_same_text_and_cost(replay, ledger):
    ask = [{"role": "user", "content": "What is 2 + 3?"}]
    replay.chat.completions.create(model="mini", messages=ask)
    text = ""
    for chunk in replay.chat.completions.create(model="mini", messages=ask, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == '{"answer": "5"}'
    first, second = ledger()
    assert first["cost_usd"] == second["cost_usd"] and second["stream"] == 1


def test_thrifty_recordings_match_on_model_and_messages(replay, ledger):
    completion = replay.chat.completions.create(model="mini", messages=RECORDING["messages"])
    assert completion.choices[0].message.content == "Paris."
    assert ledger()[0]["input_tokens"] == 21  # the recording's own usage wins over a local count


def test_unknown_prompt_or_model_is_a_clear_404(replay):
    with pytest.raises(openai.NotFoundError) as info:
        replay.chat.completions.create(model="mini", messages=[{"role": "user", "content": "never recorded"}])
    assert "no recording for this prompt" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        replay.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "What is 2 + 3?"}]
        )
    assert (
        "no output of model 'gpt-4o-2024-08-06'" in info.value.message
        and "claude-3-haiku" in info.value.message
    )
