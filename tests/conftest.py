"""Shared fixtures: wire-level fake providers on loopback and a real gateway server.

Fake providers run on an event loop in a background thread, so tests can drive the gateway
with the official synchronous `openai` SDK exactly as an app would.
"""

from __future__ import annotations

import os

# Before numpy loads: one BLAS thread. On a shared 2-core machine a multi-threaded solve in the
# router's training fights the other suites for cores and runs ~10x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest

from tests.fakes.openai_wire import OpenAIWireServer
from tests.services import pg_url, private_redis, redis_prefix, services
from thrifty.server.run import BackgroundServer
from thrifty.settings import Settings, settings_from_mapping
from thrifty.stores.keys import hash_key

T = TypeVar("T")

# Fixtures defined elsewhere, re-exported so every test module can ask for them.
__all__ = ["pg_url", "private_redis", "redis_prefix", "services"]

KEYS = {"acme": "thr-test-key-acme-0001", "globex": "thr-test-key-globex-0002"}
UPSTREAM_KEY = "sk-fake-upstream"


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def openai_upstream(loop_thread: LoopThread) -> Iterator[OpenAIWireServer]:
    server = OpenAIWireServer(api_key=UPSTREAM_KEY)
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


def base_settings(
    tmp_path: Path, providers: dict[str, Any], models: dict[str, Any], **extra: Any
) -> Settings:
    data: dict[str, Any] = {
        "storage": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "providers": providers,
        "models": models,
        "tenants": {t: {"key_hashes": [hash_key(k)]} for t, k in KEYS.items()},
    }
    data.update(extra)
    return settings_from_mapping(data)


def openai_models(provider: str = "up") -> dict[str, Any]:
    return {
        "gpt-4o-mini": {"provider": provider, "upstream": "gpt-4o-mini", "context_window": 128000},
        "gpt-4o": {"provider": provider, "upstream": "gpt-4o-2024-08-06", "context_window": 128000},
        "selfhosted": {
            "provider": provider,
            "upstream": "llama-3.1-8b-local",
            "price": {"flat_per_mtok": "0.02"},
        },
        "mystery": {"provider": provider, "upstream": "mystery-model-x"},
        "tiny": {"provider": provider, "upstream": "gpt-4o-mini", "context_window": 40},
    }


@pytest.fixture
def gateway(tmp_path: Path, openai_upstream: OpenAIWireServer) -> Iterator[BackgroundServer]:
    settings = base_settings(
        tmp_path,
        providers={
            "up": {
                "kind": "openai",
                "base_url": openai_upstream.base_url,
                "api_key_env": "UP_KEY",
                "timeout_s": 2,
            }
        },
        models=openai_models(),
        routes={"support": {"model": "gpt-4o-mini", "max_input_tokens": 30}},
        # Errors pass through as they come; retries and fallbacks are tested on their own.
        resilience={"max_retries": 0},
    )
    with BackgroundServer(settings, secrets={"up": UPSTREAM_KEY}) as server:
        yield server


@pytest.fixture
def client_for(gateway: BackgroundServer) -> Callable[[str], openai.OpenAI]:
    def make(tenant: str = "acme") -> openai.OpenAI:
        return openai.OpenAI(base_url=gateway.base_url, api_key=KEYS[tenant], max_retries=0, timeout=20)

    return make


@pytest.fixture
def client(client_for: Callable[[str], openai.OpenAI]) -> openai.OpenAI:
    return client_for("acme")


def ledger_rows(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM ledger ORDER BY ts")]
    conn.close()
    return rows


@pytest.fixture
def ledger(tmp_path: Path) -> Callable[[], list[dict[str, Any]]]:
    return lambda: ledger_rows(tmp_path / "ledger.db")
