"""Anthropic's Message Batches API at the wire, beside the Messages fake it extends.

`POST /v1/messages/batches` with `requests: [{custom_id, params}]`, `GET /v1/messages/batches/{id}`
(processing_status in_progress | canceling | ended, request_counts), `GET /v1/messages/batches`
(newest first; `limit` 1-1000, default 20; `after_id` / `before_id` cursors; `{data, has_more,
first_id, last_id}` as Anthropic's API reference gives it), `POST .../{id}/cancel`, and the
`results_url` JSONL of `{custom_id, result: {type: succeeded | errored | canceled | expired}}`.
Each request's params are validated as the Messages API does; an invalid one is an `errored`
result, not a failed batch (as Anthropic does). A batch ends on the second poll (`hold` keeps it
in progress until `release()`); `expire` ends it with the unanswered requests expired.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.anthropic_wire import AnthropicWireServer, Reply, error_body, validate_request

_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class FakeMessageBatch:
    id: str
    requests: list[dict[str, Any]]
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    status: str = "in_progress"
    polls: int = 0
    cancel_initiated_at: datetime | None = None
    ended_at: datetime | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


class AnthropicBatchWireServer(AnthropicWireServer):
    def __init__(self, api_key: str = "sk-ant-test", *, host: str = "127.0.0.1") -> None:
        super().__init__(api_key, host=host)
        self.batches: dict[str, FakeMessageBatch] = {}
        self.batch_creations = 0
        self.hold = False
        self.expire = False
        self.answer_before_expiry = 0
        # Called with each batch once it is stored, before the answer goes out (a test kills the
        # gateway there: Anthropic has the batch, the gateway never learns its id).
        self.on_create: Callable[[FakeMessageBatch], None] | None = None
        self.list_calls = 0

    def release(self) -> None:
        self.hold = False

    async def start(self) -> str:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/batches", self._create)
        app.router.add_get("/v1/messages/batches", self._list)
        app.router.add_get("/v1/messages/batches/{id}", self._retrieve)
        app.router.add_post("/v1/messages/batches/{id}/cancel", self._cancel)
        app.router.add_get("/v1/messages/batches/{id}/results", self._results)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self._base_url = f"http://{self.host}:{port}"
        return self._base_url

    async def _create(self, request: web.Request) -> web.Response:
        rejection = self._check_headers(request)
        if rejection is not None:
            return rejection
        body = await request.json(loads=orjson.loads)
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return self._error(400, "invalid_request_error", "requests: Field required")
        seen: set[str] = set()
        for i, item in enumerate(requests):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
                return self._error(
                    400, "invalid_request_error", f"requests.{i}.custom_id: String should match pattern"
                )
            if custom_id in seen:
                return self._error(400, "invalid_request_error", f"Duplicate custom_id: {custom_id}")
            seen.add(custom_id)
            if not isinstance(item.get("params"), dict):
                return self._error(400, "invalid_request_error", f"requests.{i}.params: Field required")
        self.batch_creations += 1
        batch = FakeMessageBatch(id="msgbatch_" + secrets.token_hex(12), requests=requests)
        self.batches[batch.id] = batch
        if self.on_create is not None:
            self.on_create(batch)
        return web.json_response(self._object(batch))

    async def _list(self, request: web.Request) -> web.Response:
        rejection = self._check_headers(request)
        if rejection is not None:
            return rejection
        self.list_calls += 1
        raw = request.query.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            return self._error(400, "invalid_request_error", "limit: Input should be between 1 and 1000")
        limit = int(raw)
        newest = list(self.batches.values())[::-1]  # most recently created first
        ids = [b.id for b in newest]
        after, before = request.query.get("after_id"), request.query.get("before_id")
        if after is not None:
            newest = newest[ids.index(after) + 1 :] if after in ids else []
            page, more = newest[:limit], len(newest) > limit
        elif before is not None:
            newest = newest[: ids.index(before)] if before in ids else []
            page, more = newest[-limit:], len(newest) > limit
        else:
            page, more = newest[:limit], len(newest) > limit
        data = [self._object(b) for b in page]
        return web.json_response(
            {
                "data": data,
                "has_more": more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    def _lookup(self, request: web.Request) -> FakeMessageBatch | web.Response:
        rejection = self._check_headers(request)
        if rejection is not None:
            return rejection
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return self._error(404, "not_found_error", f"Message batch {request.match_info['id']} not found")
        return batch

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self._lookup(request)
        if isinstance(batch, web.Response):
            return batch
        batch.polls += 1
        if batch.status == "canceling":
            self._end(batch, answered=0, leftover="canceled")
        elif batch.status == "in_progress" and batch.polls >= 2 and not self.hold:
            if self.expire:
                self._end(batch, answered=self.answer_before_expiry, leftover="expired")
            else:
                self._end(batch, answered=len(batch.requests), leftover="expired")
        return web.json_response(self._object(batch))

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self._lookup(request)
        if isinstance(batch, web.Response):
            return batch
        if batch.status == "in_progress":
            batch.status = "canceling"
            batch.cancel_initiated_at = datetime.now(UTC)
        return web.json_response(self._object(batch))

    async def _results(self, request: web.Request) -> web.Response:
        batch = self._lookup(request)
        if isinstance(batch, web.Response):
            return batch
        if batch.status != "ended":
            return self._error(400, "invalid_request_error", "Batch results are not available yet")
        body = b"".join(orjson.dumps(r) + b"\n" for r in batch.results)
        return web.Response(body=body, content_type="application/binary")

    def _end(self, batch: FakeMessageBatch, *, answered: int, leftover: str) -> None:
        for i, item in enumerate(batch.requests):
            if i >= answered:
                batch.results.append({"custom_id": item["custom_id"], "result": {"type": leftover}})
                continue
            params = item["params"]
            self.requests.append(_recorded(params))
            reply: Reply = self._replies.popleft() if self._replies else self.default_reply
            problem = validate_request(params)
            error_type = "invalid_request_error"
            if problem is None and reply.error_status is not None:
                problem, error_type = reply.error_message, reply.error_type
            if problem is not None:
                result = {"type": "errored", "error": error_body(error_type, problem)}
            else:
                result = {"type": "succeeded", "message": self._message(reply, params["model"])}
            batch.results.append({"custom_id": item["custom_id"], "result": result})
        batch.status = "ended"
        batch.ended_at = datetime.now(UTC)

    def _object(self, batch: FakeMessageBatch) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if batch.status != "ended":
            counts["processing"] = len(batch.requests)
        for r in batch.results:
            counts[r["result"]["type"]] += 1
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": counts,
            "ended_at": _iso(batch.ended_at) if batch.ended_at else None,
            "created_at": _iso(batch.created_at),
            "expires_at": _iso(batch.created_at + timedelta(hours=24)),
            "archived_at": None,
            "cancel_initiated_at": _iso(batch.cancel_initiated_at) if batch.cancel_initiated_at else None,
            "results_url": f"{self.base_url}/v1/messages/batches/{batch.id}/results"
            if batch.status == "ended"
            else None,
        }


def _recorded(params: dict[str, Any]) -> Any:
    from tests.fakes.anthropic_wire import RecordedRequest

    return RecordedRequest(method="POST", path="/v1/messages/batches", headers={}, body=params)
