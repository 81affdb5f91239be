"""`thrifty batch submit|status|results|cancel`: a batch job through a running gateway.

The commands talk to the gateway's OpenAI-compatible batch routes with a virtual key, as any app
would (--base-url / --key, or THRIFTY_BASE_URL / THRIFTY_API_KEY). `submit` resumes instead of
resubmitting: the gateway records the sha256 of every uploaded file per tenant, and a file whose
sha256 already has a batch that is not failed, expired or cancelled is that batch.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from thrifty.errors import ThriftyError

batch_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="Batch jobs at batch prices, through a running gateway (OpenAI batch format)",
)

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"
_FINAL = ("completed", "failed", "expired", "cancelled")
_RESUMABLE = ("validating", "in_progress", "finalizing", "completed", "cancelling")

BaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--base-url", help=f"the gateway's /v1 URL (env THRIFTY_BASE_URL; default {DEFAULT_BASE_URL})"
    ),
]
KeyOpt = Annotated[str | None, typer.Option("--key", help="a thrifty virtual key (env THRIFTY_API_KEY)")]
IdArg = Annotated[str, typer.Argument(help="the batch id (batch_...)")]


class _Gateway:
    def __init__(self, base_url: str | None, key: str | None) -> None:
        import openai

        self.base_url = (base_url or os.environ.get("THRIFTY_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.key = key or os.environ.get("THRIFTY_API_KEY")
        if not self.key:
            raise ThriftyError("no key: pass --key KEY or set THRIFTY_API_KEY (a thrifty virtual key)")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=self.key, max_retries=1, timeout=60)

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import openai

        try:
            return fn(*args, **kwargs)
        except openai.APIConnectionError as err:
            raise ThriftyError(
                f"cannot reach the gateway at {self.base_url} ({err}); is `thrifty serve` up?"
            ) from err
        except openai.APIStatusError as err:
            message = err.message
            body = err.body
            if isinstance(body, dict) and isinstance(body.get("message"), str):
                message = body["message"]
            raise ThriftyError(f"the gateway answered {err.status_code}: {message}") from err

    def batches_for(self, sha256: str) -> list[dict[str, Any]]:
        import httpx

        try:
            resp = httpx.get(
                f"{self.base_url}/thrifty/batches",
                params={"sha256": sha256},
                headers={"authorization": f"Bearer {self.key}"},
                timeout=30,
            )
        except httpx.TransportError as err:
            raise ThriftyError(
                f"cannot reach the gateway at {self.base_url} ({err}); is `thrifty serve` up?"
            ) from err
        if resp.status_code != 200:
            raise ThriftyError(f"the gateway answered {resp.status_code}: {resp.text[:300]}")
        data: list[dict[str, Any]] = resp.json().get("data") or []
        return data


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _summary(batch: Any) -> str:
    counts = batch.request_counts
    done = f"{counts.completed} answered, {counts.failed} failed of {counts.total}" if counts else ""
    return f"{batch.id}: {batch.status}" + (f" ({done})" if done else "")


def _wait(gateway: _Gateway, batch_id: str) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as progress:
        task = progress.add_task(batch_id, total=None)
        while True:
            batch = gateway.call(gateway.client.batches.retrieve, batch_id)
            counts = batch.request_counts
            if counts is not None and counts.total:
                progress.update(
                    task,
                    total=counts.total,
                    completed=counts.completed + counts.failed,
                    description=f"{batch_id} {batch.status}",
                )
            if batch.status in _FINAL:
                return batch
            time.sleep(0.5)


@batch_app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(help="JSONL input, one {custom_id, method, url, body} per line")],
    route: Annotated[str | None, typer.Option(help="put every line on this route (x-thrifty-route)")] = None,
    feature: Annotated[str | None, typer.Option(help="attribute the items to this feature")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait for the batch to finish, with a progress bar")
    ] = False,
    base_url: BaseUrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Upload FILE and create a batch; a second submit of the same file resumes the first batch."""
    if not file.is_file():
        raise ThriftyError(f"{file}: no such file")
    gateway = _Gateway(base_url, key)
    sha = file_sha256(file)
    existing = [b for b in gateway.batches_for(sha) if b.get("status") in _RESUMABLE]
    if existing:
        batch_id = existing[-1]["id"]
        typer.echo(f"resuming {batch_id}: {file} (sha256 {sha[:12]}...) was submitted already")
    else:
        with file.open("rb") as fh:
            uploaded = gateway.call(gateway.client.files.create, file=(file.name, fh), purpose="batch")
        headers = {"x-thrifty-route": route} if route else {}
        metadata = {"feature": feature} if feature else None
        created = gateway.call(
            gateway.client.batches.create,
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=metadata,
            extra_headers=headers,
        )
        batch_id = created.id
        typer.echo(f"submitted {batch_id} ({file}, sha256 {sha[:12]}...)")
    if wait:
        typer.echo(_summary(_wait(gateway, batch_id)))


@batch_app.command("status")
def status(batch_id: IdArg, base_url: BaseUrlOpt = None, key: KeyOpt = None) -> None:
    """The batch's status and counts, and its output and error file ids."""
    gateway = _Gateway(base_url, key)
    batch = gateway.call(gateway.client.batches.retrieve, batch_id)
    typer.echo(_summary(batch))
    if batch.output_file_id:
        typer.echo(f"output file: {batch.output_file_id}")
    if batch.error_file_id:
        typer.echo(f"error file: {batch.error_file_id}")
    for error in (batch.errors.data if batch.errors else None) or []:
        typer.echo(f"error: {error.code}: {error.message}")


@batch_app.command("results")
def results(
    batch_id: IdArg,
    out: Annotated[Path | None, typer.Option(help="write the lines to this file (default: stdout)")] = None,
    errors: Annotated[bool, typer.Option("--errors", help="the error file instead of the output")] = False,
    base_url: BaseUrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """The output lines (or with --errors the error lines) of a finished batch, as JSONL."""
    gateway = _Gateway(base_url, key)
    batch = gateway.call(gateway.client.batches.retrieve, batch_id)
    if batch.status not in _FINAL:
        raise ThriftyError(f"batch {batch_id} is {batch.status}; its results come when it is finished")
    file_id = batch.error_file_id if errors else batch.output_file_id
    data = b"" if file_id is None else gateway.call(gateway.client.files.content, file_id).content
    if out is None:
        sys.stdout.buffer.write(data)
    else:
        out.write_bytes(data)
        lines = data.count(b"\n")
        typer.echo(f"{out}: {lines} lines")


@batch_app.command("cancel")
def cancel(batch_id: IdArg, base_url: BaseUrlOpt = None, key: KeyOpt = None) -> None:
    """Cancel a batch: queued lines are not sent, sent ones are cancelled at the provider."""
    gateway = _Gateway(base_url, key)
    typer.echo(_summary(gateway.call(gateway.client.batches.cancel, batch_id)))
