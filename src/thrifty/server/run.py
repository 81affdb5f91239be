"""Running the ASGI app under uvicorn (uvloop + httptools), in the foreground or a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import uvicorn

from thrifty.gateway import Gateway
from thrifty.server.app import ThriftyApp, create_app
from thrifty.settings import Settings


def server_options() -> dict[str, object]:
    """The server stack, shared with the benchmark's bare pass-through so both run on the same one."""
    return {
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,
        "log_level": "warning",
        "timeout_keep_alive": 30,
        "backlog": 2048,
        # thrifty never reads the client address; the X-Forwarded-* middleware is pure per-request cost.
        "proxy_headers": False,
    }


def uvicorn_config(
    settings: Settings,
    secrets: Mapping[str, str | None],
    *,
    host: str,
    port: int,
    app: ThriftyApp | None = None,
) -> uvicorn.Config:
    return uvicorn.Config(
        app or create_app(settings, secrets=secrets),
        host=host,
        port=port,
        **server_options(),  # type: ignore[arg-type]
    )


def startup_line(settings: Settings, settings_path: Path | None, address: str) -> str:
    """What `thrifty serve` says once it listens: where, with which settings, ledger and routes."""
    routes = ", ".join(settings.routes) or "none (models only)"
    source = str(settings_path.resolve()) if settings_path is not None else "(in-memory settings)"
    url = settings.storage.url
    storage = (
        f"ledger {Path(url.removeprefix('sqlite:///')).resolve()}" if url.startswith("sqlite:///") else url
    )
    return f"thrifty serving http://{address}/v1 | settings {source} | {storage} | routes: {routes}"


class _AnnouncingServer(uvicorn.Server):
    """uvicorn, but the one line printed once it listens is thrifty's (uvicorn's own is at INFO)."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[str], str]) -> None:
        super().__init__(config)
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(self._announce(f"{host}:{port}"), flush=True)


def serve(
    settings: Settings,
    secrets: Mapping[str, str | None],
    *,
    host: str,
    port: int,
    settings_path: Path | None = None,
) -> None:
    config = uvicorn_config(settings, secrets, host=host, port=port)
    _AnnouncingServer(config, lambda address: startup_line(settings, settings_path, address)).run()


class BackgroundServer:
    """The gateway on an ephemeral loopback port in a thread of this process (demo, tests)."""

    def __init__(
        self, settings: Settings, secrets: Mapping[str, str | None] | None = None, host: str = "127.0.0.1"
    ) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: uvicorn writes a response's head and body separately, and
        # with Nagle on, a keep-alive client waits ~40 ms (its delayed ACK) for the body.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.bind((host, 0))
        self.host = host
        self.port = self._sock.getsockname()[1]
        self.app = create_app(settings, secrets=secrets or {})
        # The composition root of this server: where a test (or an embedding app) subscribes
        # feedback observers before the first request.
        self.gateway: Gateway = self.app.gateway
        config = uvicorn_config(settings, secrets or {}, host=host, port=self.port, app=self.app)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="thrifty-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start; see the log above")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn's `sockets=`, with TCP_NODELAY (see BackgroundServer)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock
