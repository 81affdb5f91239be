"""The ledger's INSERT sent straight through libpq: prepared once per batch size, text parameters.

A response waits for its ledger row's commit, so the INSERT's client CPU is on every request's
path. psycopg's `cursor.execute` spent ~160 us of it per one-row INSERT (adapting 32 values
through its dumpers, its prepare bookkeeping, its generator machinery); the same statement
prepared once and sent with the values as text (what the ledger's values already are: strings,
ints, floats, JSON and decimal text) costs ~90 us (measured in one process, 2026-12-02). This
module does only that, on a connection psycopg opened and that nothing else uses meanwhile.
Any failure is a `psycopg.OperationalError`, which the writer answers by spooling the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

_PREPARED_UP_TO = 32  # batch sizes prepared (each once per connection); larger ones parse each time


class PreparedInsert:
    """Multi-row INSERTs of one statement shape over one psycopg connection's libpq handle."""

    def __init__(self, conn: Any, sql_for: Any) -> None:
        self._conn = conn  # a psycopg AsyncConnection, autocommit; this object is its only user
        self._sql_for = sql_for  # n -> the statement for n rows, with $1.. placeholders
        self._prepared: set[int] = set()

    async def insert(self, rows: Sequence[Sequence[Any]]) -> None:
        from psycopg import OperationalError, pq

        pgconn = self._conn.pgconn
        pgconn.nonblocking = 1
        params = [_text(value) for row in rows for value in row]
        n = len(rows)
        if n <= _PREPARED_UP_TO:
            name = b"ledger_insert_%d" % n
            if n not in self._prepared:
                pgconn.send_prepare(name, self._sql_for(n).encode())
                await self._flush(pgconn)
                await self._result(pgconn, pq.ExecStatus.COMMAND_OK)
                self._prepared.add(n)
            pgconn.send_query_prepared(name, params)
        else:
            pgconn.send_query_params(self._sql_for(n).encode(), params)
        await self._flush(pgconn)
        result = await self._result(pgconn, pq.ExecStatus.COMMAND_OK)
        if result is None:
            raise OperationalError("PostgreSQL returned no result for the ledger INSERT")

    async def _flush(self, pgconn: Any) -> None:
        while pgconn.flush() == 1:  # more to send than the socket took: wait until it drains
            await _ready(pgconn.socket, writable=True)

    async def _result(self, pgconn: Any, expected: Any) -> Any:
        """The statement's result, read without blocking (libpq: get_result only when not busy)."""
        from psycopg import OperationalError

        last = None
        error = None
        while True:
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    if error is not None:
                        raise OperationalError(f"ledger INSERT failed: {error}")
                    return last
                if result.status != expected and error is None:
                    error = result.error_message.decode(errors="replace").strip() or result.status.name
                last = result
            await _ready(pgconn.socket, writable=False)


async def _ready(fd: int, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await future
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _text(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()  # int, float (repr: round-trips exactly), Decimal


__all__ = ["PreparedInsert"]
