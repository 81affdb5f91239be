"""Idempotency records on Redis (the shared implementation of `IdempotencyStore`).

One record per (tenant, Idempotency-Key), a hash. `claim` is one Lua script: with no live record
(none, expired, or running under the same owner) it writes a running record for the owner with a
lease and returns nothing (the caller generates); otherwise it returns the record and writes
nothing, so across replicas exactly one request generates per key. The owner is the fencing
token: `complete` and `release` act only while the caller still owns the key, so a leader whose
lease ran out (it stalled or died, another replica took over) cannot publish over the new
owner's result. The lease is short and the live owner renews it (`renew`, fenced the same way),
so a dead owner's key is taken over within one short lease. Records expire in Redis with their
lease or TTL, which bounds memory.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import orjson

from thrifty.stores.ports import IdempotencyKey, IdempotencyRecord, StoredResult
from thrifty.stores.redis_state import RedisState
from thrifty.stores.resp import Script

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

# renew(owner, now, lease): the owner's running record lives `lease` longer; 0 when it is not the
# owner's running record any more (fenced: a stale owner cannot extend its successor's lease).
_RENEW = """
local h = KEYS[1]
local owner, now, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('HGET', h, 'owner') ~= owner or redis.call('HGET', h, 'state') ~= 'running' then
  return 0
end
redis.call('HSET', h, 'expires_at', string.format('%.6f', now + lease))
redis.call('PEXPIRE', h, math.ceil(lease * 1000) + 1000)
return 1
"""

_RELEASE = """
local h = KEYS[1]
if redis.call('HGET', h, 'owner') == ARGV[1] and redis.call('HGET', h, 'state') == 'running' then
  return redis.call('DEL', h)
end
return 0
"""


# join(flight, owner, now, lease, waiting): lead ({}) when no live running record is there (and,
# for a first join, also over a finished one); {'running'} while another owner runs it; a
# waiting request gets {'done', response, cost} once it finished.
_JOIN = """
local h = KEYS[1]
local owner, now, lease, waiting = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local rec = redis.call('HMGET', h, 'state', 'owner', 'response', 'cost', 'expires_at')
if rec[1] and tonumber(rec[5]) > now then
  if rec[1] == 'running' and rec[2] ~= owner then return {'running'} end
  if rec[1] == 'done' and waiting then return {'done', rec[3], rec[4] or ''} end
end
redis.call('DEL', h)
redis.call('HSET', h, 'fingerprint', '', 'state', 'running', 'owner', owner,
  'expires_at', string.format('%.6f', now + lease))
redis.call('PEXPIRE', h, math.ceil(lease * 1000) + 1000)
return {}
"""


class RedisFlights:
    """Key-less coalescing across replicas (the SharedFlights port): a flight is a record like an
    idempotency key's, owned by its leader (the fencing token), under its own key space."""

    def __init__(self, state: RedisState) -> None:
        self._state = state
        # On the request path's lean client: a waiter polls, and a pool connection per poll (with
        # its handshake) is what timed out under load.
        self._join = Script(_JOIN)
        self._complete = Script(_COMPLETE)
        self._renew = Script(_RENEW)
        self._release = Script(_RELEASE)

    def _key(self, tenant_id: str, flight: str) -> str:
        return f"{self._state.prefix}flight:{len(tenant_id)}:{tenant_id}:{flight}"

    async def join(
        self, tenant_id: str, flight: str, *, owner: str, lease_s: float, waiting: bool
    ) -> StoredResult | bool:
        keys = [self._key(tenant_id, flight)]
        args: list[Any] = [owner, repr(time.time()), repr(lease_s), int(waiting)]
        reply = await self._state.run(self._join, keys, args)
        if not reply:
            return True
        if reply[0] == "running":
            return False
        _, response, cost = reply
        return StoredResult(orjson.loads(response), Decimal(cost) if cost else None)

    async def publish(
        self, tenant_id: str, flight: str, result: StoredResult, *, owner: str, ttl_s: float
    ) -> None:
        response = orjson.dumps(result.body).decode()
        cost = "" if result.cost_usd is None else format(result.cost_usd, "f")
        keys = [self._key(tenant_id, flight)]
        args: list[Any] = [owner, response, cost, repr(time.time()), repr(ttl_s)]
        await self._state.run(self._complete, keys, args)

    async def renew(self, tenant_id: str, flight: str, *, owner: str, lease_s: float) -> bool:
        keys = [self._key(tenant_id, flight)]
        args: list[Any] = [owner, repr(time.time()), repr(lease_s)]
        return bool(await self._state.run(self._renew, keys, args))

    async def release(self, tenant_id: str, flight: str, *, owner: str) -> None:
        await self._state.run(self._release, [self._key(tenant_id, flight)], [owner])


class RedisIdempotencyStore:
    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._claim = state.client.register_script(_CLAIM)
        self._complete = state.client.register_script(_COMPLETE)
        self._renew = state.client.register_script(_RENEW)
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

    async def renew(self, key: IdempotencyKey, *, owner: str, now: float, lease_s: float) -> bool:
        keys = [self._key(key)]
        args: list[Any] = [owner, repr(now), repr(lease_s)]
        return bool(await self._state.call(lambda: self._renew(keys=keys, args=args)))

    async def release(self, key: IdempotencyKey, *, owner: str) -> None:
        keys = [self._key(key)]
        await self._state.call(lambda: self._release(keys=keys, args=[owner]))


__all__ = ["RedisFlights", "RedisIdempotencyStore"]
