"""One synchronous PostgreSQL connection for a store whose callers are synchronous (batch, experiments).

A lost connection is dropped, so the next call reconnects, and is reported as the database being
unreachable (`SharedStateUnavailable`), never as a traceback. `lock_timeout` keeps a caller from
waiting long behind another replica's row lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from thrifty.errors import SharedStateUnavailable
from thrifty.stores import postgres


class PostgresSession:
    def __init__(self, url: str, *, serialised: bool = False) -> None:
        self._url = url
        self._conn: Any = None
        # A store called from several threads lends the connection to one caller at a time.
        self._lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if serialised else contextlib.nullcontext()
        )

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        psycopg = postgres._psycopg()
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = postgres.connect(self._url)
                    self._conn.execute("SET lock_timeout = '5s'")
                yield self._conn
            except psycopg.OperationalError as err:
                self._drop()
                raise postgres.unreachable(self._url, err) from err
            except SharedStateUnavailable:
                self._drop()
                raise

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


__all__ = ["PostgresSession"]
