"""Real Redis and PostgreSQL for the shared-state tests, started by scripts/services.sh.

One pair of servers per test session (started on first use), one database and one Redis key
prefix per test. A missing server binary fails these tests in CI (`CI=true`) and skips them
elsewhere, with the command that installs them; the rest of the suite runs either way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "services.sh"


def _missing(reason: str) -> None:
    message = f"{reason}; install the servers with `bash scripts/services.sh install` (as root)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass
class ServiceDir:
    """A data directory holding one Redis and/or PostgreSQL started by the project script."""

    path: Path
    urls: dict[str, str]

    @classmethod
    def start(cls, which: str = "all") -> ServiceDir:
        path = Path(
            tempfile.mkdtemp(prefix="thrifty-svc-")
        )  # not under pytest's 0700 tmp: a non-root user owns it
        service = cls(path, {})
        service.run("start", which)
        return service

    def run(self, command: str, which: str = "all") -> None:
        proc = subprocess.run(
            ["bash", str(SCRIPT), command, str(self.path), which], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            if "not installed" in proc.stderr:
                _missing(proc.stderr.strip())
            raise RuntimeError(f"services.sh {command} {which} failed: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            name, _, value = line.partition("=")
            if value:
                self.urls[name] = value

    def stop(self, which: str = "all") -> None:
        self.run("stop", which)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.path, ignore_errors=True)

    @property
    def redis_url(self) -> str:
        return self.urls["REDIS_URL"]

    @property
    def postgres_url(self) -> str:
        return self.urls["POSTGRES_URL"]


@pytest.fixture(scope="session")
def services() -> Iterator[ServiceDir]:
    service = ServiceDir.start("all")
    yield service
    service.remove()


@pytest.fixture
def redis_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def pg_url(services: ServiceDir) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL, dropped after the test."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(services.postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base = services.postgres_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(services.postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def private_redis() -> Iterator[ServiceDir]:
    """A Redis of this test's own, which the test may stop and start."""
    service = ServiceDir.start("redis")
    yield service
    service.remove()
