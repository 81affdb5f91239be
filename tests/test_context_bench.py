"""The context benchmark's reading of ShareGPT: a cut-off file read up to its last whole record,
pieces of one chat joined back (a piece starting where the previous ended continues its message)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from thrifty.bench.context import load_conversations, requests_of

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
