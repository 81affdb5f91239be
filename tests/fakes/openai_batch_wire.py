"""OpenAI's Batch API at the wire (files + batches), beside the chat fake it extends.

`POST /v1/files` (multipart, purpose=batch), `POST /v1/batches`, `GET /v1/batches/{id}`,
`POST /v1/batches/{id}/cancel`, `GET /v1/files/{id}/content`. A batch walks OpenAI's states
validating -> in_progress -> finalizing -> completed | failed | expired, or cancelling -> cancelled,
one step per poll (`hold` keeps it in_progress until `release()`); each line is answered with the
chat fake's scripted `Reply` for its model, so a non-200 reply is a partial failure in the error file.
Input is validated as OpenAI does: one model per file, unique custom_id, url equal to the endpoint.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.openai_wire import OpenAIWireServer, Reply, _usage

_UNAUTHORIZED = {
    "error": {
        "message": "Incorrect API key provided",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }
}


@dataclass
class FakeBatch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    lines: list[dict[str, Any]]
    status: str = "validating"
    created_at: int = field(default_factory=lambda: int(time.time()))
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, int] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0


class OpenAIBatchWireServer(OpenAIWireServer):
    """The chat fake plus files and batches. `expire` or `hold` steer the next batches."""

    def __init__(self, api_key: str = "sk-fake-upstream") -> None:
        super().__init__(api_key)
        self.files: dict[str, tuple[str, bytes]] = {}  # id -> (purpose, content)
        self.batches: dict[str, FakeBatch] = {}
        self.batch_creations = 0
        self.hold = False  # batches stay in_progress until release()
        self.expire = False  # batches expire instead of completing (answered lines are kept)
        self.answer_before_expiry = 0  # how many lines an expiring batch still answers
        # Called with each batch once it is stored, before the answer goes out (a test kills the
        # gateway there: the provider has the batch, the gateway never learns its id).
        self.on_create: Callable[[FakeBatch], None] | None = None

    def release(self) -> None:
        self.hold = False

    async def start(self) -> str:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{id}", self._retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.base_url

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.api_key}"

    @staticmethod
    def _error(status: int, message: str, code: str | None = None) -> web.Response:
        return web.json_response(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}},
            status=status,
        )

    async def _upload(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response(_UNAUTHORIZED, status=401)
        form = await request.post()
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose not in ("batch", "assistants", "fine-tune", "vision", "user_data", "evals"):
            return self._error(400, f"'{purpose}' is not a valid purpose")
        if upload is None or isinstance(upload, str):
            return self._error(400, "file is required")
        content = upload.file.read()
        file_id = "file-" + secrets.token_hex(12)
        self.files[file_id] = (str(purpose), content)
        return web.json_response(self._file_object(file_id, upload.filename, str(purpose), len(content)))

    @staticmethod
    def _file_object(file_id: str, name: str, purpose: str, size: int) -> dict[str, Any]:
        return {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
        }

    async def _content(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response(_UNAUTHORIZED, status=401)
        found = self.files.get(request.match_info["id"])
        if found is None:
            return self._error(404, f"No such File object: {request.match_info['id']}")
        return web.Response(body=found[1], content_type="application/octet-stream")

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response(_UNAUTHORIZED, status=401)
        body = await request.json(loads=orjson.loads)
        self.batch_creations += 1
        file = self.files.get(body.get("input_file_id"))
        if file is None:
            return self._error(404, f"No such File object: {body.get('input_file_id')}")
        if file[0] != "batch":
            return self._error(400, "The input file must have purpose 'batch'")
        if body.get("completion_window") != "24h":
            return self._error(400, "completion_window must be '24h'")
        endpoint = body.get("endpoint")
        lines = [orjson.loads(line) for line in file[1].splitlines() if line.strip()]
        batch = FakeBatch(
            id="batch_" + secrets.token_hex(12),
            input_file_id=body["input_file_id"],
            endpoint=str(endpoint),
            completion_window="24h",
            metadata=body.get("metadata"),
            lines=lines,
        )
        self.batches[batch.id] = batch
        if self.on_create is not None:
            self.on_create(batch)
        return web.json_response(self._batch_object(batch))

    def _validate(self, batch: FakeBatch) -> None:
        seen: set[str] = set()
        models: set[str] = set()
        for i, line in enumerate(batch.lines, 1):
            custom_id = line.get("custom_id")
            problem = None
            if custom_id in seen:
                problem = ("duplicate_custom_id", f"The custom_id '{custom_id}' is not unique.")
            elif line.get("url") != batch.endpoint:
                problem = ("mismatched_endpoint", f"The url '{line.get('url')}' does not match the endpoint.")
            elif line.get("method") != "POST":
                problem = ("invalid_method", "The method must be POST.")
            if problem:
                batch.errors.append({"code": problem[0], "message": problem[1], "param": None, "line": i})
            seen.add(str(custom_id))
            models.add(str((line.get("body") or {}).get("model")))
        if len(models) > 1:
            batch.errors.append(
                {
                    "code": "mismatched_model",
                    "message": "A batch input file may only contain requests for a single model.",
                    "param": None,
                    "line": None,
                }
            )

    def _step(self, batch: FakeBatch) -> None:
        """One state transition per poll, as a slow real batch would show them."""
        now = int(time.time())
        if batch.status == "validating":
            self._validate(batch)
            if batch.errors:
                batch.status = "failed"
                batch.times["failed_at"] = now
            else:
                batch.status = "in_progress"
                batch.times["in_progress_at"] = now
        elif batch.status == "in_progress" and not self.hold:
            if self.expire:
                self._finish(batch, answered=self.answer_before_expiry, leftover="batch_expired")
                batch.status = "expired"
                batch.times["expired_at"] = now
            else:
                batch.status = "finalizing"
                batch.times["finalizing_at"] = now
        elif batch.status == "finalizing":
            self._finish(batch, answered=len(batch.lines), leftover="batch_expired")
            batch.status = "completed"
            batch.times["completed_at"] = now
        elif batch.status == "cancelling":
            self._finish(batch, answered=0, leftover="batch_cancelled")
            batch.status = "cancelled"
            batch.times["cancelled_at"] = now

    def _finish(self, batch: FakeBatch, *, answered: int, leftover: str) -> None:
        output: list[bytes] = []
        errors: list[bytes] = []
        for i, line in enumerate(batch.lines):
            line_id = "batch_req_" + secrets.token_hex(12)
            if i >= answered:
                text = (
                    "This request could not be executed before the completion window expired."
                    if leftover == "batch_expired"
                    else "This request was not executed because the batch was cancelled."
                )
                errors.append(
                    orjson.dumps(
                        {
                            "id": line_id,
                            "custom_id": line["custom_id"],
                            "response": None,
                            "error": {"code": leftover, "message": text},
                        }
                    )
                )
                batch.failed += 1
                continue
            body = line.get("body") or {}
            self.requests.append(body)
            reply = self._next(body.get("model"))
            response = {
                "status_code": reply.status,
                "request_id": secrets.token_hex(16),
                "body": self._completion(reply, body)
                if reply.status == 200
                else {"error": {"message": reply.error_message, "type": reply.error_type, "code": None}},
            }
            row = orjson.dumps(
                {"id": line_id, "custom_id": line["custom_id"], "response": response, "error": None}
            )
            if reply.status == 200:
                output.append(row)
                batch.completed += 1
            else:
                errors.append(row)
                batch.failed += 1
        if output:
            batch.output_file_id = "file-" + secrets.token_hex(12)
            self.files[batch.output_file_id] = ("batch_output", b"\n".join(output) + b"\n")
        if errors:
            batch.error_file_id = "file-" + secrets.token_hex(12)
            self.files[batch.error_file_id] = ("batch_output", b"\n".join(errors) + b"\n")

    @staticmethod
    def _completion(reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "chatcmpl-" + secrets.token_hex(8),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": _usage(reply),
            "system_fingerprint": "fp_fake",
        }

    async def _list(self, request: web.Request) -> web.Response:
        """GET /v1/batches?limit=&after=: newest first, `after` the last id of the previous page."""
        if not self._authorized(request):
            return web.json_response(_UNAUTHORIZED, status=401)
        limit = int(request.query.get("limit", "20"))
        if not 1 <= limit <= 100:
            return self._error(400, "limit must be between 1 and 100")
        newest = list(self.batches.values())[::-1]
        after = request.query.get("after")
        if after is not None:
            ids = [b.id for b in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        page = newest[:limit]
        data = [self._batch_object(b) for b in page]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(newest) > limit,
            }
        )

    async def _retrieve(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response(_UNAUTHORIZED, status=401)
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return self._error(404, f"No batch found with id '{request.match_info['id']}'.")
        self._step(batch)
        return web.json_response(self._batch_object(batch))

    async def _cancel(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response(_UNAUTHORIZED, status=401)
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return self._error(404, f"No batch found with id '{request.match_info['id']}'.")
        if batch.status not in ("validating", "in_progress", "finalizing"):
            return self._error(409, f"Cannot cancel a batch with status '{batch.status}'.")
        batch.status = "cancelling"
        batch.times["cancelling_at"] = int(time.time())
        return web.json_response(self._batch_object(batch))

    @staticmethod
    def _batch_object(batch: FakeBatch) -> dict[str, Any]:
        times = {
            key: batch.times.get(key)
            for key in (
                "in_progress_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "cancelling_at",
                "cancelled_at",
            )
        }
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window,
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": batch.created_at,
            "expires_at": batch.created_at + 86400,
            **times,
            "request_counts": {
                "total": len(batch.lines),
                "completed": batch.completed,
                "failed": batch.failed,
            },
            "metadata": batch.metadata,
        }
