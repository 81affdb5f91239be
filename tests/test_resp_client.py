"""The request path's Redis client (stores/resp.py) against a real Redis: pipelined replies go to
their own callers, scripts load themselves, errors and timeouts are the caller's alone."""

from __future__ import annotations

import asyncio

import pytest
import redis

from tests.services import ServiceDir
from thrifty.stores.resp import RedisReplyError, RespClient, Script


async def test_concurrent_calls_on_one_connection_each_get_their_own_reply(
    services: ServiceDir, redis_prefix: str
):
    client = RespClient(services.redis_url, timeout_s=5)
    try:
        replies = await asyncio.gather(
            *(client.execute("INCRBY", f"{redis_prefix}n{i}", i) for i in range(200))
        )
        assert replies == list(range(200))
        assert await client.execute("ECHO", "héllo") == "héllo"
    finally:
        await client.aclose()


async def test_a_script_the_server_does_not_know_is_sent_once_then_run_by_its_sha(
    services: ServiceDir, redis_prefix: str
):
    client = RespClient(services.redis_url, timeout_s=5)
    script = Script(f"return {{KEYS[1], ARGV[1], '{redis_prefix}'}}")
    try:
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
        assert await client.run(script, ["k"], [7]) == ["k", "7", redis_prefix]
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
        assert await client.run(script, ["j"], ["x"]) == ["j", "x", redis_prefix]
    finally:
        await client.aclose()


async def test_an_error_reply_raises_for_its_caller_only(services: ServiceDir, redis_prefix: str):
    client = RespClient(services.redis_url, timeout_s=5)
    try:
        await client.execute("SET", f"{redis_prefix}s", "text")
        bad, good = await asyncio.gather(
            client.execute("INCR", f"{redis_prefix}s"),
            client.execute("GET", f"{redis_prefix}s"),
            return_exceptions=True,
        )
        assert isinstance(bad, RedisReplyError) and "not an integer" in str(bad)
        assert good == "text"
    finally:
        await client.aclose()


async def test_a_call_that_times_out_fails_alone_and_the_next_call_reconnects(private_redis: ServiceDir):
    client = RespClient(private_redis.redis_url, timeout_s=0.2)
    admin = redis.Redis.from_url(private_redis.redis_url)
    try:
        assert await client.execute("PING") == "PONG"
        admin.execute_command("CLIENT", "PAUSE", 600, "ALL")
        with pytest.raises(TimeoutError, match=r"did not answer within 0\.2 s"):
            await client.execute("SET", "paused", "1")
        await asyncio.sleep(0.6)
        # The late reply to the timed-out call must not answer this one: a new connection.
        assert await client.execute("ECHO", "after") == "after"
    finally:
        await client.aclose()
        admin.close()


async def test_the_database_number_and_a_stopped_server(private_redis: ServiceDir):
    url = private_redis.redis_url.rsplit("/", 1)[0] + "/3"
    client = RespClient(url, timeout_s=0.5)
    admin = redis.Redis.from_url(url)
    try:
        await client.execute("SET", "in-db-3", "yes")
        assert admin.get("in-db-3") == b"yes"
        private_redis.stop("redis")
        with pytest.raises(ConnectionError):
            await client.execute("GET", "in-db-3")
    finally:
        await client.aclose()
        admin.close()


def test_one_client_serves_a_second_event_loop(services: ServiceDir, redis_prefix: str):
    client = RespClient(services.redis_url, timeout_s=2)
    assert asyncio.run(client.execute("INCR", f"{redis_prefix}loops")) == 1
    # The library used again under a new asyncio.run: a new connection on the new loop.
    assert asyncio.run(client.execute("INCR", f"{redis_prefix}loops")) == 2
