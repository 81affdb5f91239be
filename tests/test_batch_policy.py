"""The pure parts of batch offload, and the store's exactly-once guarantee on a real SQLite file."""

from __future__ import annotations

import sqlite3
import time
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from thrifty.batch.flush import QueueGroup, due, next_wake
from thrifty.batch.lines import CHAT_ENDPOINT, LineError, parse_line
from thrifty.batch.sqlite_store import SqliteBatchStore
from thrifty.batch.states import next_status, request_counts
from thrifty.batch.store import ItemResult, JobRecord, NewItem
from thrifty.settings import DeferSettings, parse_window
from thrifty.types import LedgerEntry, Usage


def _raw(**row: object) -> bytes:
    base: dict[str, object] = {
        "custom_id": "a",
        "method": "POST",
        "url": CHAT_ENDPOINT,
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    return orjson.dumps({**base, **row})


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"[1]", "invalid_line"),
        (b"{", "invalid_json"),
        (_raw(custom_id=""), "invalid_custom_id"),
        (_raw(custom_id=7), "invalid_custom_id"),
        (_raw(custom_id="seen"), "duplicate_custom_id"),
        (_raw(method="GET"), "invalid_method"),
        (_raw(url="/v1/embeddings"), "mismatched_endpoint"),
        (_raw(body=[]), "invalid_body"),
        (_raw(body={"model": "m", "messages": []}), "invalid_body"),
        (
            _raw(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}),
            "invalid_body",
        ),
        (_raw(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "invalid_body"),
    ],
)
def test_a_bad_line_is_named_by_number_and_why(raw: bytes, code: str):
    with pytest.raises(LineError) as err:
        parse_line(raw, 7, CHAT_ENDPOINT, {"seen"}, None)
    assert err.value.code == code and err.value.message.startswith("line 7: ")


def test_a_route_puts_the_line_on_it():
    line = parse_line(_raw(), 1, CHAT_ENDPOINT, set(), "evals")
    assert line.body["model"] == "route:evals" and line.custom_id == "a"


def test_job_status_follows_its_items():
    assert next_status("in_progress", {"queued": 1, "done": 3}) == "in_progress"
    assert next_status("in_progress", {"done": 3, "failed": 1}) == "completed"
    assert next_status("in_progress", {"done": 1, "expired": 2}) == "expired"
    assert next_status("cancelling", {"submitted": 1}) == "cancelling"
    assert next_status("cancelling", {"done": 1, "cancelled": 2}) == "cancelled"
    assert next_status("completed", {"queued": 5}) == "completed"  # final stays final
    assert next_status("validating", {"done": 5}) == "validating"  # the validator moves it on
    assert request_counts({"done": 2, "failed": 1, "expired": 1, "cancelled": 1}) == {
        "total": 5,
        "completed": 2,
        "failed": 3,
    }


def test_the_queue_flushes_by_size_or_by_age():
    now = 1000.0
    full = QueueGroup("p", "m", "defer", count=10, flush_at=now + 60, flush_size=10)
    old = QueueGroup("p", "m2", "defer", count=1, flush_at=now - 1, flush_size=10)
    young = QueueGroup("p", "m3", "defer", count=9, flush_at=now + 30, flush_size=10)
    assert due([full, old, young], now) == [full, old]
    assert next_wake([young], now, ceiling=60) == 30
    assert next_wake([young], now, ceiling=5) == 5


def test_defer_windows():
    assert parse_window("24h") == 86400 and parse_window("90s") == 90 and parse_window("2d") == 172800
    for bad in ("soon", "0h", "h", "-1h", "1.5h"):
        with pytest.raises(ValueError, match="90s, 30m, 24h"):
            parse_window(bad)
    with pytest.raises(ValueError, match="shorter than the window"):
        DeferSettings(after="1h", max_age_s=3600)


def _entry(request_id: str) -> LedgerEntry:
    return LedgerEntry(
        request_id,
        time.time(),
        "acme",
        None,
        None,
        None,
        None,
        "m",
        "p",
        (),
        Usage(1, 0, 0, 1),
        Decimal("0.000001"),
        Decimal(0),
        "miss",
        False,
        0,
        "ok",
        None,
        200,
        1.0,
        None,
        None,
        batch=True,
    )


def test_an_item_ends_once_and_is_billed_once_however_often_its_result_arrives(tmp_path: Path):
    db = tmp_path / "ledger.db"
    store = SqliteBatchStore(db)
    now = time.time()
    store.create_job(
        JobRecord(
            "batch_1", "file", "acme", None, CHAT_ENDPOINT, "24h", "in_progress", None, {}, now, now + 86400
        ),
        [
            NewItem("req_1", "batch_1", 1, "a", "queued", "batch_1", now, now, 1, "m", None, "p", {"x": 1}),
            NewItem("req_2", "batch_1", 2, "b", "queued", "batch_1", now, now, 1, "m", None, "p", {"x": 2}),
        ],
    )
    (group,) = store.queue_groups()
    assert store.claim(group, 10, "ub_1", now) == 2 and store.claim(group, 10, "ub_2", now) == 0
    result = ItemResult("req_1", "done", 200, {"ok": True}, None, _entry("req_1"))
    assert store.record_results([result], now) == ["req_1"]
    assert store.record_results([result], now) == []  # again (a restart mid-collection): nothing
    # A second process sharing the file sees the item ended and does not bill it either.
    other = SqliteBatchStore(db)
    assert other.record_results([result], now) == []
    other.close()
    assert [i.state for i in store.items_of_upstream("ub_1")] == ["done", "submitted"]
    assert store.item_counts("batch_1") == {"done": 1, "submitted": 1}
    store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM ledger WHERE request_id = 'req_1'").fetchone() == (1,)
    conn.close()


def test_one_process_validates_a_job_at_a_time(tmp_path: Path):
    db = tmp_path / "ledger.db"
    one, two = SqliteBatchStore(db), SqliteBatchStore(db)
    now = time.time()
    one.create_job(
        JobRecord(
            "batch_v", "file", "acme", None, CHAT_ENDPOINT, "24h", "validating", None, {}, now, now + 86400
        )
    )
    assert one.lease("batch_v", "p1", now, 60) and one.lease("batch_v", "p1", now + 1, 60)  # renewed
    assert not two.lease("batch_v", "p2", now + 30, 60)
    assert two.lease("batch_v", "p2", now + 62, 60)  # p1's lease ran out (it crashed): p2 resumes
    assert not one.lease("batch_v", "p1", now + 63, 60)
    one.set_job_status("batch_v", "in_progress", now + 64)
    assert not two.lease("batch_v", "p2", now + 65, 60)  # validated: nothing left to lease
    one.close()
    two.close()
