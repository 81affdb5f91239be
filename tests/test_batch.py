"""Batch offload end to end: the openai SDK's files + batches through thrifty to wire-level fakes of
OpenAI's Batch API and Anthropic's Message Batches; money to the exact Decimal; deferred requests."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from tests.conftest import KEYS, LoopThread, base_settings, ledger_rows
from tests.fakes.anthropic_batch_wire import AnthropicBatchWireServer, FakeMessageBatch
from tests.fakes.anthropic_wire import Reply as AReply
from tests.fakes.openai_batch_wire import FakeBatch, OpenAIBatchWireServer
from tests.fakes.openai_wire import Reply
from thrifty.batch.adapters.anthropic import AnthropicBatchAdapter
from thrifty.batch.adapters.base import Outbound
from thrifty.batch.adapters.openai import OpenAIBatchAdapter
from thrifty.batch.entries import result_entry
from thrifty.batch.sqlite_store import SqliteBatchStore
from thrifty.batch.store import ItemResult, JobRecord, NewItem
from thrifty.report import batch_line, build_report
from thrifty.server.run import BackgroundServer
from thrifty.stores.postgres_reporting import PostgresReportingStore
from thrifty.stores.reporting import SqliteReportingStore, Window
from thrifty.types import ModelTarget, Usage

OPENAI_KEY = "sk-fake-upstream"
ANTHROPIC_KEY = "sk-ant-fake"
M = Decimal(1_000_000)


@dataclass
class Backend:
    """Where the gateway under test keeps its state: the SQLite file, or a PostgreSQL database."""

    kind: str
    url: str
    storage: dict[str, Any]

    def rows(self) -> list[dict[str, Any]]:
        """The ledger, oldest first."""
        if self.kind == "sqlite":
            return ledger_rows(Path(self.url.removeprefix("sqlite:///")))
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.url, row_factory=dict_row) as conn:
            return list(conn.execute("SELECT * FROM ledger ORDER BY ts"))

    def reader(self) -> Any:
        from thrifty.stores.postgres import PostgresLedgerReader

        return (
            sqlite3.connect(self.url.removeprefix("sqlite:///"))
            if self.kind == "sqlite"
            else (PostgresLedgerReader(self.url))
        )


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """SQLite, or each backend for a test marked `parametrize("backend", BACKENDS, indirect=True)`."""
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
        return Backend(kind, url, {"url": url})
    url = request.getfixturevalue("pg_url")
    storage = {
        "url": url,
        "local_path": str(tmp_path / "local.db"),
        "spool_path": str(tmp_path / "spool.jsonl"),
    }
    return Backend(kind, url, storage)


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def oa(loop_thread: LoopThread) -> Iterator[OpenAIBatchWireServer]:
    server = OpenAIBatchWireServer(api_key=OPENAI_KEY)
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


@pytest.fixture
def an(loop_thread: LoopThread) -> Iterator[AnthropicBatchWireServer]:
    server = AnthropicBatchWireServer(api_key=ANTHROPIC_KEY)
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


def settings_for(
    tmp_path: Path, oa: OpenAIBatchWireServer, an: AnthropicBatchWireServer, **extra: Any
) -> Any:
    batch = {"poll_interval_s": 0.05, **extra.pop("batch", {})}
    tenants = extra.pop("tenants", None)
    settings = base_settings(
        tmp_path,
        providers={
            "oa": {"kind": "openai", "base_url": oa.base_url, "api_key_env": "OA_KEY"},
            "an": {
                "kind": "anthropic",
                "base_url": an.base_url,
                "api_key_env": "AN_KEY",
                "batch_discount": "0.5",
            },
        },
        models={
            "gpt-4o-mini": {"provider": "oa", "upstream": "gpt-4o-mini"},
            "gpt-4o": {"provider": "oa", "upstream": "gpt-4o-2024-08-06"},
            "claude-haiku": {"provider": "an", "upstream": "claude-3-5-haiku-latest"},
            "claude-new": {"provider": "an", "upstream": "claude-haiku-4-5"},
        },
        batch=batch,
        **extra,
    )
    if tenants:
        data = settings.model_dump(mode="json")
        for name, update in tenants.items():
            data["tenants"][name].update(update)
        from thrifty.settings import settings_from_mapping

        settings = settings_from_mapping(data)
    return settings


@pytest.fixture
def make_gateway(
    tmp_path: Path, oa: OpenAIBatchWireServer, an: AnthropicBatchWireServer, backend: Backend
) -> Iterator[Callable[..., BackgroundServer]]:
    servers: list[BackgroundServer] = []

    def make(**extra: Any) -> BackgroundServer:
        server = BackgroundServer(
            settings_for(tmp_path, oa, an, storage=backend.storage, **extra),
            secrets={"oa": OPENAI_KEY, "an": ANTHROPIC_KEY},
        )
        server.__enter__()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.__exit__(None, None, None)


def _client(server: BackgroundServer, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS[tenant], max_retries=0, timeout=20)


def _line(custom_id: str, model: str, text: str = "hi", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def _jsonl(rows: list[Any]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def _submit(client: openai.OpenAI, rows: list[Any], **kwargs: Any) -> Any:
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", **kwargs
    )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_sdk_batch_to_openai_and_anthropic_with_bad_lines_and_partial_failures(make_gateway, oa, an, backend):
    server = make_gateway(
        tenants={"acme": {"allowed_models": ["gpt-4o-mini", "claude-haiku", "route:short"]}},
        routes={"short": {"model": "gpt-4o-mini", "max_input_tokens": 20}},
    )
    oa.by_model["gpt-4o-mini"] = [Reply(), Reply(status=500, error_message="upstream broke"), Reply()]
    an.reply(
        AReply(text="claude says hi", input_tokens=20, output_tokens=4),
        AReply(error_status=529, error_type="overloaded_error", error_message="Overloaded"),
    )
    client = _client(server)
    rows: list[Any] = [
        _line("a1", "gpt-4o-mini"),
        _line("a2", "gpt-4o-mini"),
        b"{not json",
        _line("a3", "gpt-4o-mini", max_tokens=50),
        _line("a1", "gpt-4o-mini"),  # duplicate custom_id
        _line("c1", "claude-haiku", temperature=0.2),
        _line("x1", "gpt-4o"),  # not allowed for acme
        _line("s1", "gpt-4o-mini", stream=True),
        {"custom_id": "w1", "method": "GET", "url": "/v1/chat/completions", "body": {}},
        _line("c2", "claude-haiku"),  # Anthropic answers it errored: a partial failure
        _line("c3", "claude-haiku", temperature=5),  # Anthropic's range is 0-1: refused at validation
        _line("r1", "route:short", text="many words " * 40),  # over the route's input limit
    ]
    batch = _submit(client, rows, metadata={"feature": "nightly-eval", "prompt_version": "v7"})
    assert batch.status == "validating" and batch.id.startswith("batch_")
    done = _wait(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts.total == 12
    assert done.request_counts.completed == 3 and done.request_counts.failed == 9
    assert [b.id for b in client.batches.list()] == [batch.id]

    output = _lines(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in output) == ["a1", "a3", "c1"]
    by_id = {o["custom_id"]: o for o in output}
    assert by_id["c1"]["response"]["body"]["choices"][0]["message"]["content"] == "claude says hi"
    assert by_id["a1"]["response"]["status_code"] == 200 and by_id["a1"]["error"] is None
    errors = {(e["custom_id"], (e["error"] or {}).get("code")): e for e in _lines(client, done.error_file_id)}
    assert ("a2", None) in errors and errors[("a2", None)]["response"]["status_code"] == 500
    assert "line 3" in errors[("line-3", "invalid_json")]["error"]["message"]
    assert "line 5" in errors[("a1", "duplicate_custom_id")]["error"]["message"]
    assert "may not use 'gpt-4o'" in errors[("x1", "model_not_allowed")]["error"]["message"]
    assert "stream" in errors[("s1", "invalid_body")]["error"]["message"]
    assert ("w1", "invalid_method") in errors
    assert errors[("c2", None)]["response"]["status_code"] == 529  # errored: overloaded_error
    assert "line 11" in errors[("c3", "invalid_request_error")]["error"]["message"]
    assert "input tokens of route 'short'" in errors[("r1", "route_input_limit_exceeded")]["error"]["message"]

    # One provider batch per provider (OpenAI: one model per file), custom_id = thrifty's request id.
    assert oa.batch_creations == 1 and an.batch_creations == 1
    (sent,) = oa.batches.values()
    assert len(sent.lines) == 3 and all(line["custom_id"].startswith("req_") for line in sent.lines)
    assert sent.lines[2]["body"]["max_tokens"] == 50

    rows_ = backend.rows()
    assert len(rows_) == 12 and all(r["batch"] == 1 for r in rows_)
    assert {r["feature"] for r in rows_} == {"nightly-eval"} and {r["prompt_version"] for r in rows_} == {
        "v7"
    }
    answered = {r["request_id"] for r in rows_ if r["status"] == "ok"}
    assert {line["custom_id"] for line in sent.lines} & answered == {
        by_id["a1"]["response"]["request_id"],
        by_id["a3"]["response"]["request_id"],
    }


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_batch_items_cost_exactly_the_batch_rate(make_gateway, oa, an, backend, caplog):
    caplog.set_level(logging.WARNING)
    server = make_gateway()
    oa.by_model["gpt-4o-mini"] = [Reply(prompt_tokens=1234, cached_tokens=200, completion_tokens=321)]
    an.reply(
        AReply(input_tokens=1000, output_tokens=77, cache_read_input_tokens=300),
        AReply(input_tokens=50, output_tokens=10),
    )
    client = _client(server)
    rows = [
        _line("o", "gpt-4o-mini"),
        _line("h", "claude-haiku"),  # no batch price in genai-prices: providers.an.batch_discount 0.5
        _line("n", "claude-new"),  # genai-prices has its batch price
    ]
    done = _wait(client, _submit(client, rows).id)
    assert done.status == "completed", done
    by_custom = {o["custom_id"]: o["response"]["request_id"] for o in _lines(client, done.output_file_id)}
    costs = {r["request_id"]: r for r in backend.rows()}
    # gpt-4o-mini batch: $0.075 input, $0.075 cached input, $0.30 output per 1M tokens.
    expect_o = (Decimal(1034) * Decimal("0.075") + 200 * Decimal("0.075") + 321 * Decimal("0.3")) / M
    # claude-3-5-haiku real time: $0.80 input, $0.08 cache read, $4 output; half of it.
    expect_h = (1000 * Decimal("0.8") + 300 * Decimal("0.08") + 77 * Decimal(4)) / M * Decimal("0.5")
    # claude-haiku-4-5 batch: $0.50 input, $2.50 output.
    expect_n = (50 * Decimal("0.5") + 10 * Decimal("2.5")) / M
    assert Decimal(costs[by_custom["o"]]["cost_usd"]) == expect_o
    assert Decimal(costs[by_custom["h"]]["cost_usd"]) == expect_h
    assert Decimal(costs[by_custom["n"]]["cost_usd"]) == expect_n
    # saved = what the same call costs in real time, less the batch price
    realtime_o = (Decimal(1034) * Decimal("0.15") + 200 * Decimal("0.075") + 321 * Decimal("0.6")) / M
    assert Decimal(costs[by_custom["o"]]["saved_usd"]) == realtime_o - expect_o
    # Both Anthropic models have a batch price (one from genai-prices, one from the discount).
    assert not any("no batch price" in r.message for r in caplog.records)
    # The report: batch share, batch cost, and the same items at real-time prices.
    source = backend.reader()
    (acme,) = build_report(source, "tenant")
    source.close()
    report = acme.to_json()
    assert report["batch_requests"] == 3 and report["batch_share"] == 1.0
    assert Decimal(report["batch_cost_usd"]) == expect_o + expect_h + expect_n
    realtime = realtime_o + expect_h * 2 + (50 * Decimal(1) + 10 * Decimal(5)) / M
    assert Decimal(report["batch_realtime_usd"]) == realtime
    # The dashboard's rollups hold the batch rows too, to the same Decimal, folded and not.
    if backend.kind == "sqlite":
        reporting: Any = SqliteReportingStore(Path(backend.url.removeprefix("sqlite:///")))
    else:
        reporting = PostgresReportingStore(backend.url)

    async def rolled_up() -> list[Any]:
        try:
            before = await reporting.rollup_by("tenant", Window(None, None))
            await reporting.fold()
            return [before, await reporting.rollup_by("tenant", Window(None, None))]
        finally:
            await reporting.aclose()

    for (rolled,) in asyncio.run(rolled_up()):
        assert rolled.requests == 3 and rolled.cost_usd == acme.cost_usd == expect_o + expect_h + expect_n
    line = batch_line([acme])
    assert line is not None and "3 of 3 requests (100.0%)" in line and f"${realtime}" in line


def test_no_batch_price_and_no_discount_is_a_start_warning(tmp_path, oa, an, caplog):
    caplog.set_level(logging.WARNING)
    settings = settings_for(tmp_path, oa, an)
    data = settings.model_dump(mode="json")
    data["providers"]["an"]["batch_discount"] = None
    from thrifty.settings import settings_from_mapping

    with BackgroundServer(settings_from_mapping(data), secrets={"oa": OPENAI_KEY, "an": ANTHROPIC_KEY}):
        pass
    warned = [r.message for r in caplog.records if "no batch price" in r.message]
    assert len(warned) == 1 and "'claude-haiku' (an)" in warned[0] and "batch_discount" in warned[0]
    assert "claude-new" not in warned[0] and "gpt-4o" not in warned[0]  # genai-prices has theirs


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_expiry_and_cancel_release_reservations_and_keep_answered_lines(make_gateway, oa, an, backend):
    server = make_gateway(tenants={"acme": {"budget": {"usd_per_day": "1"}}})
    client = _client(server)
    oa.expire, oa.answer_before_expiry = True, 1
    done = _wait(client, _submit(client, [_line(f"e{i}", "gpt-4o-mini") for i in range(3)]).id)
    assert done.status == "expired"
    assert [o["custom_id"] for o in _lines(client, done.output_file_id)] == ["e0"]
    assert {e["error"]["code"] for e in _lines(client, done.error_file_id)} == {"batch_expired"}
    oa.expire = False

    an.hold = True
    batch = _submit(client, [_line(f"k{i}", "claude-haiku") for i in range(2)])
    deadline = time.monotonic() + 10
    while not an.batches and time.monotonic() < deadline:
        time.sleep(0.02)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling"
    done = _wait(client, batch.id)
    assert done.status == "cancelled" and done.request_counts.failed == 2
    with pytest.raises(openai.BadRequestError, match="cancelled already"):
        client.batches.cancel(batch.id)
    rows = backend.rows()
    assert len(rows) == 5 and all(r["batch"] for r in rows)
    # Every reservation is released: left is the limit less what was spent and this request's own
    # worst case (a few millionths of a dollar; one leaked item's would be over $0.001).
    spent = sum(Decimal(r["cost_usd"]) for r in rows)
    resp = httpx.post(
        server.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {KEYS['acme']}"},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    )
    remaining = Decimal(resp.headers["x-thrifty-budget-remaining"].split(";")[0])
    assert Decimal(0) < Decimal(1) - spent - remaining < Decimal("0.00001")


def test_a_job_over_the_budget_fails_whole_before_any_call(make_gateway, oa, an):
    server = make_gateway(tenants={"acme": {"budget": {"usd_per_day": "0.0001"}}})
    client = _client(server)
    done = _wait(client, _submit(client, [_line(f"b{i}", "gpt-4o", max_tokens=4000) for i in range(3)]).id)
    assert done.status == "failed" and done.errors.data[0].code == "budget_exceeded"
    assert oa.batch_creations == 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_batch_route_body_over_the_server_limit_is_a_413(make_gateway, backend):
    server = make_gateway(server={"max_body_bytes": 4096})
    client = _client(server, "acme")
    with pytest.raises(openai.APIStatusError, match="over 4096 bytes") as err:
        client.batches.create(
            input_file_id="f" * 5000, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert err.value.status_code == 413 and "max_body_bytes" in str(err.value)


def test_bad_requests_name_the_problem(make_gateway, oa, an, backend):
    server = make_gateway(batch={"max_lines": 2, "max_file_bytes": 2048})
    client = _client(server)
    with pytest.raises(openai.NotFoundError, match="batch_nope"):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError, match="file-nope"):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    too_many = client.files.create(
        file=("x.jsonl", io.BytesIO(_jsonl([_line(f"l{i}", "gpt-4o-mini") for i in range(3)]))),
        purpose="batch",
    )
    with pytest.raises(openai.BadRequestError, match="3 lines, over the limit of 2"):
        client.batches.create(
            input_file_id=too_many.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.APIStatusError, match="over 2048 bytes") as err:
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 5000)), purpose="batch")
    assert err.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=too_many.id, endpoint="/v1/embeddings", completion_window="24h")
    # Another tenant cannot see or use acme's files and batches.
    other = _client(server, "globex")
    with pytest.raises(openai.NotFoundError):
        other.files.content(too_many.id)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).files.content(too_many.id)


# -- automatic offload ------------------------------------------------------------------------


@pytest.fixture
def webhook(loop_thread: LoopThread) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    port = loop_thread.run(start())
    yield f"http://127.0.0.1:{port}/hook", received
    loop_thread.run(runner.cleanup())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_deferred_requests_go_in_one_provider_batch_answered_by_poll_and_webhook(
    make_gateway, oa, an, backend, webhook
):
    hook_url, received = webhook
    server = make_gateway(
        routes={"nightly": {"model": "gpt-4o-mini", "defer": {"max_batch": 3, "max_age_s": 60}}}
    )
    url = server.base_url + "/chat/completions"
    auth = {"authorization": f"Bearer {KEYS['acme']}"}
    jobs = []
    with httpx.Client(timeout=10) as http:
        for i in range(3):
            headers = {**auth, "x-thrifty-feature": "digest"}
            if i == 0:
                headers["x-thrifty-webhook"] = hook_url
            if i == 1:
                headers["idempotency-key"] = "digest-1"
            body = {"model": "route:nightly", "messages": [{"role": "user", "content": f"q{i}"}]}
            resp = http.post(url, json=body, headers=headers)
            assert resp.status_code == 202, resp.text
            jobs.append(resp.json())
            if i == 1:  # the same request again: enqueued once, the same job
                again = http.post(url, json=body, headers=headers)
                assert again.status_code == 202 and again.json()["id"] == resp.json()["id"]
                other_body = {**body, "messages": [{"role": "user", "content": "something else"}]}
                conflict = http.post(url, json=other_body, headers=headers)
                assert (
                    conflict.status_code == 422 and "Idempotency-Key" in conflict.json()["error"]["message"]
                )
        assert jobs[0]["status"] == "queued" and jobs[0]["poll_url"] == f"/v1/thrifty/jobs/{jobs[0]['id']}"
        views = []
        for job in jobs:
            deadline = time.monotonic() + 15
            while True:
                view = http.get(server.base_url.removesuffix("/v1") + job["poll_url"], headers=auth).json()
                if view["status"] == "completed" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            views.append(view)
        # A header defers a request on a route without defer settings; 'no' keeps it real time.
        resp = http.post(
            url,
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "now"}]},
            headers={**auth, "x-thrifty-defer": "no"},
        )
        assert resp.status_code == 200
        bad = http.post(
            url,
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
            headers={**auth, "x-thrifty-defer": "soon"},
        )
        assert bad.status_code == 400 and "90s, 30m, 24h" in bad.json()["error"]["message"]
        streamed = http.post(
            url,
            json={"model": "route:nightly", "messages": [{"role": "user", "content": "x"}], "stream": True},
            headers=auth,
        )
        assert streamed.status_code == 400 and "cannot stream" in streamed.json()["error"]["message"]
        other = http.get(
            server.base_url.removesuffix("/v1") + jobs[0]["poll_url"],
            headers={"authorization": f"Bearer {KEYS['globex']}"},
        )
        assert other.status_code == 404
    assert [v["status"] for v in views] == ["completed"] * 3, views
    assert views[0]["response"]["body"]["choices"][0]["message"]["content"] == Reply().text
    assert oa.batch_creations == 1 and len(next(iter(oa.batches.values())).lines) == 3
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["id"] for r in received] == [jobs[0]["id"]] and received[0]["status"] == "completed"
    rows = [r for r in backend.rows() if r["batch"]]
    assert (
        len(rows) == 3
        and {r["route"] for r in rows} == {"nightly"}
        and {r["feature"] for r in rows} == {"digest"}
    )


def test_a_deferred_request_over_the_budget_is_refused_at_once(make_gateway, oa, an, tmp_path):
    server = make_gateway(tenants={"acme": {"budget": {"usd_per_day": "0.0001"}}})
    resp = httpx.post(
        server.base_url + "/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4000},
        headers={"authorization": f"Bearer {KEYS['acme']}", "x-thrifty-defer": "24h"},
    )
    assert resp.status_code == 429 and "budget" in resp.json()["error"]["message"]
    (row,) = ledger_rows(tmp_path / "ledger.db")
    assert row["http_status"] == 429 and row["request_id"] == resp.headers["x-thrifty-request-id"]


def _crashed_while_sending(
    tmp_path: Path, settings: Any, provider: str, model: str, loop_thread: LoopThread
) -> str:
    """What a crash between sending a provider batch and storing its id leaves behind: the items
    claimed into a provider batch still "preparing" here, while the provider has it."""
    store = SqliteBatchStore(tmp_path / "ledger.db")
    now = time.time()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    job = JobRecord(
        "batch_crash",
        "file",
        "acme",
        None,
        "/v1/chat/completions",
        "24h",
        "in_progress",
        None,
        {},
        now,
        now + 86400,
    )
    items = [
        NewItem(
            f"req_{i:032x}",
            job.job_id,
            i + 1,
            f"c{i}",
            "queued",
            job.job_id,
            now,
            now,
            1,
            model,
            None,
            provider,
            body,
        )
        for i in range(3)
    ]
    store.create_job(job, items)
    (group,) = store.queue_groups()
    assert store.claim(group, 10, "ub_crash", now) == 3
    upstream = settings.models[model].upstream
    target = ModelTarget(model, provider, upstream, None)
    adapter: Any = (
        OpenAIBatchAdapter(provider, settings.providers[provider], OPENAI_KEY)
        if provider == "oa"
        else AnthropicBatchAdapter(provider, settings.providers[provider], ANTHROPIC_KEY)
    )
    outbound = [Outbound(i.request_id, target, body) for i in store.items_of_upstream("ub_crash")]

    async def send() -> str:
        await adapter.start()
        try:
            return str(await adapter.submit(outbound, "ub_crash"))
        finally:
            await adapter.close()

    remote_id = loop_thread.run(send())
    store.close()
    return remote_id


def test_an_openai_batch_sent_just_before_a_crash_is_found_by_its_label_not_sent_again(
    tmp_path, oa, an, loop_thread
):
    settings = settings_for(tmp_path, oa, an)
    ours = _crashed_while_sending(tmp_path, settings, "oa", "gpt-4o-mini", loop_thread)
    # 120 newer batches of someone else's: ours is on the second page of the provider's list.
    for i in range(120):
        other = FakeBatch(
            f"batch_other{i}", "file-x", "/v1/chat/completions", "24h", {"thrifty_batch": f"x{i}"}, []
        )
        oa.batches[other.id] = other
    assert oa.batch_creations == 1
    with BackgroundServer(settings, secrets={"oa": OPENAI_KEY, "an": ANTHROPIC_KEY}) as server:
        done = _wait(_client(server), "batch_crash")
    assert done.status == "completed" and done.request_counts.completed == 3
    assert oa.batch_creations == 1 and oa.batches[ours].status == "completed"  # adopted, not sent again
    assert len(ledger_rows(tmp_path / "ledger.db")) == 3


def test_an_anthropic_batch_sent_just_before_a_crash_is_told_apart_from_others_of_its_size(
    tmp_path, oa, an, loop_thread
):
    settings = settings_for(tmp_path, oa, an)
    an.reply(*[AReply(input_tokens=40, output_tokens=5)] * 3)
    ours = _crashed_while_sending(tmp_path, settings, "an", "claude-new", loop_thread)
    params = {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}

    def foreign(name: str) -> FakeMessageBatch:
        batch = FakeMessageBatch(name, [{"custom_id": f"{name}-{i}", "params": params} for i in range(3)])
        an.batches[batch.id] = batch
        return batch

    ended = foreign("msgbatch_foreign_ended")  # same size, but its custom_ids are not ours
    ended.status = "ended"
    ended.results = [{"custom_id": r["custom_id"], "result": {"type": "expired"}} for r in ended.requests]
    running = foreign("msgbatch_foreign_running")  # same size and still running: cannot be told apart yet
    foreign("msgbatch_foreign_bigger").requests.append({"custom_id": "x", "params": params})
    assert an.batch_creations == 1
    with BackgroundServer(settings, secrets={"oa": OPENAI_KEY, "an": ANTHROPIC_KEY}) as server:
        client = _client(server)
        deadline = time.monotonic() + 1.5
        while an.list_calls < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert an.list_calls >= 3  # looked for again and again, never sent while it could not tell
        assert client.batches.retrieve("batch_crash").status == "in_progress" and an.batch_creations == 1
        assert an.batches[ours].polls == 0
        running.status, running.results = "ended", ended.results  # it ends: its custom_ids tell
        done = _wait(client, "batch_crash")
    assert done.status == "completed" and done.request_counts.completed == 3
    assert an.batch_creations == 1 and an.batches[ours].polls >= 2  # ours adopted, not sent again
    rows = ledger_rows(tmp_path / "ledger.db")
    # claude-haiku-4-5 at batch prices: $0.50 input, $2.50 output per 1M tokens.
    assert (
        len(rows) == 3
        and sum(Decimal(r["cost_usd"]) for r in rows) == 3 * (40 * Decimal("0.5") + 5 * Decimal("2.5")) / M
    )


def test_a_deferred_request_not_sent_within_its_window_expires(make_gateway, oa, an, tmp_path):
    server = make_gateway()
    oa.api_key = "rotated"  # every submission is refused (401) until the window has passed
    auth = {"authorization": f"Bearer {KEYS['acme']}", "x-thrifty-defer": "2s"}
    resp = httpx.post(
        server.base_url + "/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
        headers=auth,
    )
    assert resp.status_code == 202 and resp.json()["defer"] == "2s"
    poll = server.base_url.removesuffix("/v1") + resp.json()["poll_url"]
    deadline = time.monotonic() + 10
    view = httpx.get(poll, headers=auth).json()
    # Between two refused submissions it is briefly "submitted".
    while view["status"] in ("queued", "submitted") and time.monotonic() < deadline:
        time.sleep(0.1)
        view = httpx.get(poll, headers=auth).json()
    assert view["status"] == "expired" and view["error"]["code"] == "batch_expired"
    assert oa.batch_creations == 0
    (row,) = ledger_rows(tmp_path / "ledger.db")
    assert row["batch"] == 1 and row["status"] == "error" and Decimal(row["cost_usd"]) == 0


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_with_shared_budgets_batch_spend_counts_on_every_replica(
    make_gateway, oa, an, backend, services, redis_prefix
):
    """Two replicas on PostgreSQL and Redis: a job's worst case is held in Redis while it runs and
    its spend lands there item by item, whichever replica collects, with no hold left behind."""
    shared = {"url": services.redis_url, "prefix": redis_prefix}
    tenants = {"acme": {"budget": {"usd_per_day": "1"}}}
    replicas = [make_gateway(tenants=tenants, shared_state=shared) for _ in range(2)]
    oa.by_model["gpt-4o-mini"] = [Reply(prompt_tokens=1000, completion_tokens=400) for _ in range(3)]
    oa.hold = True
    client = _client(replicas[0])
    batch = _submit(client, [_line(f"b{i}", "gpt-4o-mini", max_tokens=400) for i in range(3)])
    auth = {"authorization": f"Bearer {KEYS['acme']}"}
    probe = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}

    def remaining(server: BackgroundServer) -> Decimal:
        resp = httpx.post(server.base_url + "/chat/completions", headers=auth, json=probe)
        assert resp.status_code == 200, resp.text
        return Decimal(resp.headers["x-thrifty-budget-remaining"].split(";")[0])

    deadline = time.monotonic() + 15
    while not oa.batches and time.monotonic() < deadline:
        time.sleep(0.05)
    # While the job runs, the other replica sees its worst case held: 3 x (prompt + 400 output).
    held = Decimal(1) - remaining(replicas[1])
    assert held > 3 * 400 * Decimal("0.3") / M
    oa.release()
    done = _wait(_client(replicas[1]), batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3
    spent = sum(Decimal(r["cost_usd"]) for r in backend.rows())
    # gpt-4o-mini batch: 3 x (1000 x $0.075 + 400 x $0.30) per 1M, plus the probe's real-time cost.
    assert spent > 3 * (1000 * Decimal("0.075") + 400 * Decimal("0.3")) / M
    for server in replicas:  # spent counted, every hold released: only this probe's worst case is left
        assert Decimal(0) < Decimal(1) - spent - remaining(server) < Decimal("0.00001")
        spent = sum(Decimal(r["cost_usd"]) for r in backend.rows())


def test_holds_of_items_another_process_recorded_are_let_go(make_gateway, oa, an, tmp_path):
    """Two processes share the SQLite file (or PostgreSQL): the one that validated a job holds its
    worst case; when the other records the results, the first lets its holds go (by the next lease)."""
    server = make_gateway(tenants={"acme": {"budget": {"usd_per_day": "1"}}}, batch={"lease_s": 0.3})
    oa.hold = True  # this gateway sends the batch and never collects it
    client = _client(server)
    batch = _submit(client, [_line(f"h{i}", "gpt-4o", max_tokens=4000) for i in range(3)])
    deadline = time.monotonic() + 15
    while not oa.batches and time.monotonic() < deadline:
        time.sleep(0.05)
    probe = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}

    def remaining() -> Decimal:
        resp = httpx.post(
            server.base_url + "/chat/completions",
            headers={"authorization": f"Bearer {KEYS['acme']}"},
            json=probe,
        )
        return Decimal(resp.headers["x-thrifty-budget-remaining"].split(";")[0])

    # 3 x 4,000 output tokens of gpt-4o at $5 per 1M (batch): at least $0.06 held.
    assert Decimal(1) - remaining() > Decimal("0.06")
    # Another process records every item (as a replica collecting the provider's batch would).
    other = SqliteBatchStore(tmp_path / "ledger.db")
    items = list(other.items_of_job(batch.id))
    results = [
        ItemResult(
            i.request_id,
            "done",
            200,
            {"choices": []},
            None,
            result_entry(
                i,
                "acme",
                {},
                ok=True,
                status_code=200,
                usage=Usage(),
                cost=Decimal(0),
                realtime=Decimal(0),
                error=None,
                ts=time.time(),
            ),
        )
        for i in items
    ]
    assert len(other.record_results(results, time.time())) == 3
    other.close()
    deadline = time.monotonic() + 10
    while Decimal(1) - remaining() > Decimal("0.001") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Decimal(1) - remaining() < Decimal("0.001")  # only the probes' own worst cases and spend


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_metrics_show_the_batch_queue_depths(make_gateway, oa, an, backend):
    """thrifty_queue_depth{queue=batch_queued|batch_submitted}: items waiting for a provider batch,
    then in one until it ends; parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    oa.hold = True  # the provider keeps its batch in progress until released
    server = make_gateway(
        routes={"nightly": {"model": "gpt-4o-mini", "defer": {"max_batch": 3, "max_age_s": 600}}},
        metrics={"require_admin_key": False},
    )
    root = server.base_url.removesuffix("/v1")

    def depths() -> dict[str, float]:
        text = httpx.get(root + "/metrics", timeout=10).text
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == "thrifty_queue_depth"]
        return {s.labels["queue"]: s.value for s in family.samples}

    def wait_for(want: dict[str, float]) -> dict[str, float]:
        deadline = time.monotonic() + 15
        while (found := depths()) and any(found[k] != v for k, v in want.items()):
            assert time.monotonic() < deadline, found
            time.sleep(0.05)
        return found

    def defer(text: str) -> None:
        body = {"model": "route:nightly", "messages": [{"role": "user", "content": text}]}
        auth = {"authorization": f"Bearer {KEYS['acme']}"}
        resp = httpx.post(server.base_url + "/chat/completions", json=body, headers=auth)
        assert resp.status_code == 202, resp.text

    assert wait_for({"batch_queued": 0, "batch_submitted": 0})["ledger"] == 0
    defer("q0")
    defer("q1")
    found = wait_for({"batch_queued": 2, "batch_submitted": 0})
    assert ("ledger_spool" in found) == (backend.kind == "postgresql")
    defer("q2")  # max_batch: the three go to the provider, which holds them
    wait_for({"batch_queued": 0, "batch_submitted": 3})
    oa.release()
    wait_for({"batch_queued": 0, "batch_submitted": 0})
