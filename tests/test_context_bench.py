"""The context benchmark's reading of ShareGPT: a cut-off file read up to its last whole record,
pieces of one chat joined back (a piece starting where the previous ended continues its message)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from thrifty.bench.sharegpt import load_conversations, requests_of

pytest.importorskip("ijson")


def turn(who: str, text: str) -> dict[str, str]:
    return {"from": who, "value": text}


def test_cut_off_file_pieces_rejoined(tmp_path: Path) -> None:
    records = [
        {"id": "A_0", "conversations": [turn("human", "q1"), turn("gpt", "a1 part one, ")]},
        {"id": "A_1", "conversations": [turn("gpt", "part two"), turn("human", "q2"), turn("gpt", "a2")]},
        {"id": "A_4", "conversations": [turn("human", "q3"), turn("gpt", "a3")]},  # follows on
        {"id": "A_9", "conversations": [turn("human", "later"), turn("gpt", "x")]},  # a gap: another chat
        {
            "id": "B_0",
            "conversations": [turn("gpt", "no user first"), turn("human", "hi"), turn("gpt", "yo")],
        },
    ]
    text = orjson.dumps(records).decode()
    path = tmp_path / "sharegpt.json"
    path.write_text(text[:-1] + ', {"id": "C_0", "conversations": [{"from": "hum', encoding="utf-8")  # cut
    shipped = list(load_conversations(1, 100, path=path))
    assert len(shipped) == 5  # the cut record is not read, nor an error
    chats = list(load_conversations(1, 100, rejoin=True, path=path))
    assert [[m["content"] for m in c] for c in chats] == [
        ["q1", "a1 part one, part two", "q2", "a2", "q3", "a3"],
        ["later", "x"],
        ["hi", "yo"],  # a chat starts with the user
    ]
    assert [len(r) for r in requests_of(chats[0])] == [1, 3, 5]
    assert len(list(load_conversations(6, 100, rejoin=True, path=path))) == 1


def test_bench_runs_on_a_small_file_and_writes_json(tmp_path: Path) -> None:
    from rich.console import Console

    from thrifty.bench.context import run_context_bench

    long = " ".join(["apple"] * 300)
    chat = [turn("human" if i % 2 == 0 else "gpt", f"m{i} {long}") for i in range(12)]
    path = tmp_path / "chats.json"
    path.write_text(orjson.dumps([{"id": "A_0", "conversations": chat}]).decode(), encoding="utf-8")
    out = tmp_path / "bench.json"
    with (tmp_path / "out.txt").open("w") as printed:
        result = run_context_bench(
            conversations=5,
            min_messages=10,
            history_budget=1000,
            summary_tokens=100,
            answer_model="gpt-4o",
            summary_model="gpt-4o-mini",
            json_out=out,
            console=Console(file=printed),
            large_samples=2,
            data=path,
        )
    assert orjson.loads(out.read_bytes()) == result
    assert len(result["datasets"]) == 2  # records as shipped, then rejoined chats
    records = result["datasets"][0]
    none, trim, compact = records["policies"]
    assert [p["policy"] for p in records["policies"]] == ["none", "trim", "compact"]
    assert none["requests"] == trim["requests"] == compact["requests"] == 6
    assert none["input_tokens_by_turn"]["1"] == trim["input_tokens_by_turn"]["1"]  # nothing to cut yet
    assert compact["summary_calls"] >= 1 and trim["summary_calls"] == 0
    assert compact["input_tokens_per_request"] < none["input_tokens_per_request"]
    assert Decimal(compact["summary_cost_usd"]) > 0
    assert "offline stand-in" in result["note"] and "cannot be measured offline" in result["note"]


def test_a_missing_data_file_is_a_clear_error_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "thrifty", "bench", "context", "--data", str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "cannot read" in done.stderr and "Traceback" not in done.stderr
    junk = tmp_path / "junk.json"
    junk.write_text("hello", encoding="utf-8")
    from thrifty.bench.sharegpt import load_conversations
    from thrifty.errors import InvalidData

    with pytest.raises(InvalidData, match="not ShareGPT JSON"):
        list(load_conversations(1, 10, path=junk))
