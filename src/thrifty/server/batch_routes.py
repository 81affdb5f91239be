"""HTTP routes of batch offload: OpenAI's files and batches, and thrifty's deferred jobs.

`POST /v1/files` streams the multipart body to disk as it arrives (python-multipart's push
parser), so memory does not grow with the size of the file.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import orjson
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from thrifty.batch.service import BatchService, Upload
from thrifty.errors import InvalidRequest, NotFound, ThriftyError
from thrifty.gateway import Gateway
from thrifty.server.app import (
    Receive,
    Scope,
    Send,
    _error_headers,
    _headers,
    _MethodNotAllowed,
    _Responded,
    _send_json,
    _tags,
    read_body,
)

PREFIXES = ("/v1/files", "/v1/batches", "/v1/thrifty/")


class BatchRoutes:
    def __init__(self, gateway: Gateway, max_body: int) -> None:
        self.gateway = gateway
        self.service: BatchService = gateway.batch
        self._max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"].rstrip("/")
        method: str = scope["method"]
        headers = _headers(scope)
        tenant = self.gateway.authenticate(headers.get("authorization"))
        parts = path.split("/")[2:]  # after "/v1"
        service = self.service
        if parts == ["files"]:
            _only(method, "POST", path)
            record = await self._upload(scope, receive, headers, tenant)
            await _send_json(send, 200, service.file_object(record))
        elif len(parts) == 2 and parts[0] == "files":
            _only(method, "GET", path)
            await _send_json(send, 200, service.file(tenant, parts[1]))
        elif len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
            _only(method, "GET", path)
            await self._stream(send, service.content(tenant, parts[1]))
        elif parts == ["batches"] and method == "GET":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            raw_limit = (query.get("limit") or ["20"])[0]
            if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
                raise InvalidRequest("'limit' must be a number from 1 to 100", param="limit")
            after = (query.get("after") or [None])[0]
            await _send_json(send, 200, service.list_batches(tenant, int(raw_limit), after))
        elif parts == ["batches"]:
            _only(method, "POST", path)
            body = _json(await read_body(receive, self._max_body))
            job = service.create_batch(
                tenant, body, _tags(tenant, headers, {}), headers.get("x-thrifty-route")
            )
            await _send_json(send, 200, service.batch_object(job))
        elif len(parts) == 2 and parts[0] == "batches":
            _only(method, "GET", path)
            await _send_json(send, 200, service.batch_object(service.job(tenant, parts[1])))
        elif len(parts) == 3 and parts[0] == "batches" and parts[2] == "cancel":
            _only(method, "POST", path)
            await _send_json(send, 200, service.batch_object(service.cancel(tenant, parts[1])))
        elif len(parts) == 3 and parts[:2] == ["thrifty", "jobs"]:
            _only(method, "GET", path)
            await _send_json(send, 200, service.job_view(service.job(tenant, parts[2], "deferred")))
        elif parts == ["thrifty", "batches"]:
            _only(method, "GET", path)
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            sha = (query.get("sha256") or [""])[0]
            if len(sha) != 64:
                raise InvalidRequest(
                    "give ?sha256=HEX (the sha256 of an uploaded input file)", param="sha256"
                )
            data = service.batches_for_sha256(tenant, sha.lower())
            await _send_json(send, 200, {"object": "list", "data": data})
        else:
            raise NotFound(
                f"no route {method} {path}; batch routes: POST /v1/files, GET /v1/files/ID[/content], "
                "POST /v1/batches, GET /v1/batches[/ID], POST /v1/batches/ID/cancel, GET /v1/thrifty/jobs/ID",
                code="unknown_url",
            )

    async def _upload(self, scope: Scope, receive: Receive, headers: dict[str, str], tenant: str) -> Any:
        kind, options = parse_options_header(headers.get("content-type", ""))
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise InvalidRequest(
                "POST /v1/files takes multipart/form-data with the fields 'purpose' and 'file' "
                "(the openai SDK's client.files.create sends it so)"
            )
        form = _Form(self.service)
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": form.part_begin,
                "on_header_field": form.header_field,
                "on_header_value": form.header_value,
                "on_header_end": form.header_end,
                "on_headers_finished": form.headers_finished,
                "on_part_data": form.part_data,
                "on_part_end": form.part_end,
            },
        )
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Responded
                parser.write(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            parser.finalize()
        except BaseException:
            form.abort()
            raise
        upload = form.upload
        purpose = form.fields.get("purpose")
        if upload is None or purpose is None:
            form.abort()
            raise InvalidRequest("the form needs both 'purpose' (batch) and 'file' (the JSONL input)")
        return self.service.finish_upload(tenant, upload, form.filename or "input.jsonl", purpose)

    @staticmethod
    async def _stream(send: Send, chunks: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Form:
    """Collects a multipart form: small fields in memory, the file straight to disk."""

    def __init__(self, service: BatchService) -> None:
        self._service = service
        self.fields: dict[str, str] = {}
        self.upload: Upload | None = None
        self.filename: str | None = None
        self._field = b""
        self._value = b""
        self._disposition = b""
        self._name: str | None = None
        self._buffer: list[bytes] = []

    def part_begin(self) -> None:
        self._disposition = b""
        self._name = None
        self._buffer = []

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            self._disposition = self._value
        self._field = self._value = b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode()
        if self._name == "file":
            if self.upload is not None:
                raise InvalidRequest("send one 'file' per upload")
            self.filename = options.get(b"filename", b"input.jsonl").decode(errors="replace")
            self.upload = self._service.open_upload()

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            assert self.upload is not None
            self.upload.write(data[start:end])
        elif sum(map(len, self._buffer)) < 4096:
            self._buffer.append(data[start:end])

    def part_end(self) -> None:
        if self._name and self._name != "file":
            self.fields[self._name] = b"".join(self._buffer).decode(errors="replace")

    def abort(self) -> None:
        if self.upload is not None:
            self.upload.abort()
            self.upload = None


def _only(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise _MethodNotAllowed(f"{path} accepts {allowed} only")


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidRequest(f"the request body is not valid JSON: {err}") from err


async def defer_chat(
    gateway: Gateway, send: Send, tenant: str, headers: dict[str, str], body: dict[str, Any], raw_len: int
) -> bool:
    """Answer a deferrable chat request with 202 and its job; False when it is not deferrable."""
    service = gateway.batch
    tags = _tags(tenant, headers, body)
    try:
        defer = service.defer_settings(headers, body)
        if defer is None:
            return False
        job, _ = await service.defer(body, tags, defer, headers.get("x-thrifty-webhook"))
    except ThriftyError as err:
        refused = await gateway.refuse(tags, err, body_bytes=raw_len, model=body.get("model"))
        extra = [(b"x-thrifty-request-id", refused.request_id.encode())]
        await _send_json(send, err.status, err.to_openai(), _error_headers(err, extra))
        return True
    view = service.job_view(job)
    poll = f"/v1/thrifty/jobs/{job.job_id}"
    await _send_json(
        send,
        202,
        {
            "id": job.job_id,
            "object": "thrifty.job",
            "status": view["status"],
            "defer": job.completion_window,
            "poll_url": poll,
            "request_id": view["request_id"],
        },
        [(b"location", poll.encode()), (b"x-thrifty-request-id", str(view["request_id"]).encode())],
    )
    return True
