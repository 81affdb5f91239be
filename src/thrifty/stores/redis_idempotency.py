"""Idempotency records on Redis (the shared implementation of `IdempotencyStore`).

One record per (tenant, Idempotency-Key), a hash. `claim` is one Lua script: with no live record
(none, expired, or running under the same owner) it writes a running record for the owner with a
lease and returns nothing (the caller generates); otherwise it returns the record and writes
nothing, so across replicas exactly one request generates per key. The owner is the fencing
token: `complete` and `release` act only while the caller still owns the key, so a leader whose
lease ran out (it stalled or died, another replica took over) cannot publish over the new
owner's result. Records expire in Redis with their lease or TTL, which bounds memory.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from thrifty.stores.ports import IdempotencyKey, IdempotencyRecord, StoredResult
from thrifty.stores.redis_state import RedisState

_CLAIM = """
local h = KEYS[1]
local fingerprint, owner, now, lease = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local rec = redis.call('HMGET', h, 'fingerprint', 'state', 'owner', 'response', 'cost', 'expires_at')
if rec[1] then
  local live = tonumber(rec[6]) > now and not (rec[2] == 'running' and rec[3] == owner)
  if live then return {rec[1], rec[2], rec[4] or '', rec[5] or '', rec[6]} end
end
redis.call('DEL', h)
redis.call('HSET', h, 'fingerprint', fingerprint, 'state', 'running', 'owner', owner,
  'expires_at', string.format('%.6f', now + lease))
redis.call('PEXPIRE', h, math.ceil(lease * 1000) + 1000)
return {}
"""

_COMPLETE = """
local h = KEYS[1]
local owner, response, cost, now, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('HGET', h, 'owner') ~= owner or redis.call('HGET', h, 'state') ~= 'running' then
  return 0
end
redis.call('HSET', h, 'state', 'done', 'response', response, 'cost', cost,
  'expires_at', string.format('%.6f', now + ttl))
redis.call('PEXPIRE', h, math.ceil(ttl * 1000) + 1000)
return 1
"""

_RELEASE = """
local h = KEYS[1]
if redis.call('HGET', h, 'owner') == ARGV[1] and redis.call('HGET', h, 'state') == 'running' then
  return redis.call('DEL', h)
end
return 0
"""


class RedisIdempotencyStore:
    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._claim = state.client.register_script(_CLAIM)
        self._complete = state.client.register_script(_COMPLETE)
        self._release = state.client.register_script(_RELEASE)

    def _key(self, key: IdempotencyKey) -> str:
        return f"{self._state.prefix}idem:{len(key.tenant_id)}:{key.tenant_id}:{key.key}"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def claim(
        self, key: IdempotencyKey, fingerprint: str, *, owner: str, now: float, lease_s: float
    ) -> IdempotencyRecord | None:
        keys = [self._key(key)]
        args: list[Any] = [fingerprint, owner, repr(now), repr(lease_s)]
        reply = await self._state.call(lambda: self._claim(keys=keys, args=args))
        if not reply:
            return None
        found, state, response, cost, expires_at = reply
        result = None
        if state == "done":
            result = StoredResult(orjson.loads(response), Decimal(cost) if cost else None)
        return IdempotencyRecord(found, result, float(expires_at))

    async def complete(
        self, key: IdempotencyKey, result: StoredResult, *, owner: str, now: float, ttl_s: float
    ) -> None:
        response = orjson.dumps(result.body).decode()
        cost = "" if result.cost_usd is None else format(result.cost_usd, "f")
        keys = [self._key(key)]
        args: list[Any] = [owner, response, cost, repr(now), repr(ttl_s)]
        await self._state.call(lambda: self._complete(keys=keys, args=args))

    async def release(self, key: IdempotencyKey, *, owner: str) -> None:
        keys = [self._key(key)]
        await self._state.call(lambda: self._release(keys=keys, args=[owner]))


__all__ = ["RedisIdempotencyStore"]
