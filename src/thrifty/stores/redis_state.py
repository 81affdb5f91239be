"""Shared state on Redis: budget reservations and settlements, rate-limit windows, session steps.

Each guarantee is one Lua script, so it holds across replicas exactly as the in-process stores
hold it on one event loop:
- **reserve** checks every applicable limit and reserves on all of them or none, in one round
  trip. Each reservation is a lease: a replica that dies before settling leaves a reservation
  that the next script run on that counter releases after `reservation_lease_s`.
- **settle** is idempotent: its id (the reservation's) is marked in the same script that moves
  the money, so a settle retried after a timeout counts once.
- **admit** (rate limits) trims the tenant's sliding minute, checks requests, tokens and the
  session's steps, and records the request, in one round trip.

Money is held as integer picodollars (1e-12 USD; exact for prices with up to six decimals per
million tokens), moved with HINCRBY on decimal strings, never as floats. The scripts compare in
Lua's doubles, which are exact up to 2^53 picodollars (about $9,007); above that a decision may be
off by a few picodollars, while the stored amounts stay exact.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from decimal import ROUND_CEILING, Decimal
from typing import Any, Literal, TypeVar

from thrifty.errors import ConfigError, SharedStateUnavailable
from thrifty.settings import SharedStateSettings
from thrifty.stores.ports import (
    Admission,
    AdmitRequest,
    CounterKey,
    Limit,
    Reservation,
    ReserveOutcome,
    window_bounds,
)
from thrifty.stores.resp import Arg, RespClient, Script

log = logging.getLogger(__name__)

PICO = Decimal("1e12")
_COUNTER_DAYS = 40  # counters outlive their window by this much (reports of the last window)
T = TypeVar("T")

_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# reserve(K, A, now): K = (counter hash, its lease zset) per limit; A = lease ms, reservation id,
# counter ttl, then (limit, need) per limit. Returns {refused limit (1-based) or 0, then spent and
# reserved per limit}.
_RESERVE_FN = """
local function reserve(K, A, now)
  local lease, id, ttl = tonumber(A[1]), A[2], tonumber(A[3])
  local n = #K / 2
  for i = 1, n do
    local h, z = K[2 * i - 1], K[2 * i]
    local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
    for _, rid in ipairs(expired) do
      local held = redis.call('HGET', h, 'r:' .. rid)
      if held and held ~= '0' then redis.call('HINCRBY', h, 'reserved', '-' .. held) end
      redis.call('HDEL', h, 'r:' .. rid)
    end
    if #expired > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
  end
  local refused = 0
  local out = {}
  for i = 1, n do
    local h = K[2 * i - 1]
    local spent = redis.call('HGET', h, 'spent') or '0'
    local reserved = redis.call('HGET', h, 'reserved') or '0'
    local limit, need = A[2 + 2 * i], A[3 + 2 * i]
    if refused == 0 and tonumber(need) > tonumber(limit) - tonumber(spent) - tonumber(reserved) then
      refused = i
    end
    out[2 * i] = spent
    out[2 * i + 1] = reserved
  end
  out[1] = refused
  if refused > 0 then return out end
  for i = 1, n do
    local h, z = K[2 * i - 1], K[2 * i]
    local need = A[3 + 2 * i]
    if need ~= '0' then redis.call('HINCRBY', h, 'reserved', need) end
    redis.call('HSET', h, 'r:' .. id, need)
    redis.call('ZADD', z, now + lease, id)
    redis.call('EXPIRE', h, ttl)
    redis.call('EXPIRE', z, ttl)
    out[2 * i + 1] = redis.call('HGET', h, 'reserved')
  end
  return out
end
"""

_SETTLE = """
local id, marker_ttl = ARGV[1], tonumber(ARGV[2])
local n = (#KEYS - 1) / 2
local fresh = redis.call('SET', KEYS[#KEYS], '1', 'NX', 'EX', marker_ttl)
local out = {}
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  if fresh then
    local held = redis.call('HGET', h, 'r:' .. id)
    if held then
      if held ~= '0' then redis.call('HINCRBY', h, 'reserved', '-' .. held) end
      redis.call('HDEL', h, 'r:' .. id)
      redis.call('ZREM', z, id)
    end
    local actual = ARGV[2 + i]
    if actual ~= '0' then redis.call('HINCRBY', h, 'spent', actual) end
  end
  out[i] = redis.call('HGET', h, 'spent') or '0'
end
return out
"""

_SEED = """
if redis.call('EXISTS', KEYS[#KEYS]) == 1 then return 0 end
for i = 1, #KEYS - 1 do
  redis.call('HSET', KEYS[i], 'spent', ARGV[2 * i - 1])
  redis.call('EXPIRE', KEYS[i], ARGV[2 * i])
end
redis.call('SET', KEYS[#KEYS], '1', 'EX', ARGV[#ARGV])
return 1
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# admit(K, A, now): K = the tenant's window zset, its token total, the session's step counter;
# A = requests per minute, tokens per minute, this request's tokens, its member, max steps (-1:
# no such limit). Returns {0 or 1 requests / 2 tokens / 3 steps, used, wait ms}.
_ADMIT_FN = """
local function admit(K, A, now)
  local z, tk, sk = K[1], K[2], K[3]
  local rpm, tpm, tokens = tonumber(A[1]), tonumber(A[2]), tonumber(A[3])
  local member, max_steps = A[4], tonumber(A[5])
  local limited = rpm >= 0 or tpm >= 0
  if limited then
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - 60000)
    for _, m in ipairs(old) do
      local used = string.match(m, ':(%d+)$')
      if used and used ~= '0' then redis.call('DECRBY', tk, used) end
    end
    if #old > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now - 60000) end
    local count = redis.call('ZCARD', z)
    local used_tokens = tonumber(redis.call('GET', tk) or '0')
    local oldest = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
    local wait = 0
    if oldest[2] then wait = math.max(0, tonumber(oldest[2]) + 60000 - now) end
    if rpm >= 0 and count >= rpm then return {1, count, wait} end
    if tpm >= 0 and used_tokens + tokens > tpm then
      if tokens > tpm then wait = 60000 end
      return {2, used_tokens, wait}
    end
  end
  if max_steps >= 0 then
    local steps = tonumber(redis.call('GET', sk) or '0')
    if steps >= max_steps then return {3, steps, 0} end
    redis.call('INCR', sk)
    redis.call('EXPIRE', sk, 86400)
  end
  if limited then
    redis.call('ZADD', z, now, member)
    if tokens > 0 then redis.call('INCRBY', tk, tokens) end
    redis.call('PEXPIRE', z, 61000)
    redis.call('PEXPIRE', tk, 61000)
  end
  return {0, 0, 0}
end
"""

_RESERVE = _NOW + _RESERVE_FN + "return reserve(KEYS, ARGV, now_ms())"
_ADMIT = _NOW + _ADMIT_FN + "return admit(KEYS, ARGV, now_ms())"
# Rate admission and budget reservation of one request in one round trip: the first 3 keys and
# 5 arguments are admit's, the rest reserve's. A request the rate limit refuses reserves nothing.
_ADMIT_AND_RESERVE = (
    _NOW
    + _ADMIT_FN
    + _RESERVE_FN
    + """
local ak, aa, rk, ra = {}, {}, {}, {}
for i = 1, #KEYS do if i <= 3 then ak[i] = KEYS[i] else rk[#rk + 1] = KEYS[i] end end
for i = 1, #ARGV do if i <= 5 then aa[i] = ARGV[i] else ra[#ra + 1] = ARGV[i] end end
local now = now_ms()
local a = admit(ak, aa, now)
if a[1] ~= 0 then return a end
local r = reserve(rk, ra, now)
local out = {0, 0, 0}
for i = 1, #r do out[3 + i] = r[i] end
return out
"""
)


def to_pico(usd: Decimal) -> int:
    """USD as integer picodollars, rounded up (a reservation never holds less than asked)."""
    return int((usd * PICO).to_integral_value(rounding=ROUND_CEILING))


def from_pico(value: int | str | bytes) -> Decimal:
    # normalize(): 0.0081189, not 0.008118900000 (the same number; shown in alerts and headers).
    return (Decimal(int(value)) / PICO).normalize()


class RedisState:
    """One client for every shared store; scripts are loaded once and run by their sha."""

    def __init__(self, settings: SharedStateSettings) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ConfigError(
                "shared_state.url needs the redis package: pip install 'thrifty[shared]'"
            ) from err
        assert settings.url is not None
        self.settings = settings
        self.prefix = settings.prefix
        self.url = settings.url
        self.client = aioredis.Redis.from_url(
            settings.url,
            socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
            decode_responses=True,
        )
        # The request path's scripts run on the lean client (stores/resp.py); the rest on redis-py.
        self.fast = RespClient(settings.url, settings.timeout_s)
        self.reserve_script = Script(_RESERVE)
        self.settle_script = Script(_SETTLE)
        self.admit_script = Script(_ADMIT)
        self.admit_and_reserve_script = Script(_ADMIT_AND_RESERVE)
        self.seed_script = self.client.register_script(_SEED)
        self.unlock_script = self.client.register_script(_UNLOCK)
        self.round_trips = 0  # counted for `thrifty bench replicas`

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation; an unreachable Redis becomes SharedStateUnavailable."""
        import redis.exceptions

        self.round_trips += 1
        try:
            return await operation()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as err:
            raise self.unavailable(err) from err

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """One request-path script, one round trip (see `call` for what an outage raises)."""
        self.round_trips += 1
        try:
            return await self.fast.run(script, keys, args)
        except OSError as err:  # ConnectionError, TimeoutError
            raise self.unavailable(err) from err

    def unavailable(self, err: BaseException) -> SharedStateUnavailable:
        return SharedStateUnavailable(
            f"the shared-state Redis at {self.url} is unreachable ({err}); budgets and rate limits "
            "cannot be checked across replicas, so the request is refused "
            "(shared_state.fault_mode: fail_closed). Retry shortly."
        )

    async def close(self) -> None:
        await self.fast.aclose()
        await self.client.aclose()


class RedisBudgets:
    """The shared budget store (the SharedBudgetStore port)."""

    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._lease_ms = int(state.settings.reservation_lease_s * 1000)

    def _counter(self, key: CounterKey) -> str:
        scope, window, start, unit = key
        return f"{self._state.prefix}b:{scope.kind}:{scope.name}:{window}:{int(start)}:{unit}"

    def _keys(self, keys: Sequence[CounterKey]) -> list[str]:
        out = []
        for key in keys:
            counter = self._counter(key)
            out += [counter, counter + ":leases"]
        return out

    async def reserve(
        self,
        limits: Sequence[Limit],
        ts: float,
        usd: Decimal,
        tokens: int,
        admit: AdmitRequest | None = None,
        reservation_id: str | None = None,
        lease_s: float | None = None,
    ) -> ReserveOutcome:
        counters: list[CounterKey] = []
        lease_ms = self._lease_ms if lease_s is None else int(lease_s * 1000)
        args: list[Any] = [lease_ms, reservation_id or _new_id(), 0]
        ttl = 0
        for limit in limits:
            start, end = window_bounds(ts, limit.window)
            counters.append((limit.scope, limit.window, start, limit.unit))
            need = to_pico(usd) if limit.unit == "usd" else tokens
            amount = to_pico(limit.amount) if limit.unit == "usd" else int(limit.amount)
            args += [amount, need]
            ttl = max(ttl, int(end - ts) + _COUNTER_DAYS * 86400)
        args[2] = ttl
        keys = self._keys(counters)
        admission = None
        if admit is None:
            reply = await self._state.run(self._state.reserve_script, keys, args)
        else:
            admit_keys, admit_args = admission_call(self._state.prefix, admit)
            both = await self._state.run(
                self._state.admit_and_reserve_script, [*admit_keys, *keys], [*admit_args, *args]
            )
            admission = admission_of(both[:3])
            if admission.refused is not None:
                return ReserveOutcome(None, [], None, admission)
            reply = both[3:]
        refused = int(reply[0])
        left = [_left(limit, reply[1 + 2 * i], reply[2 + 2 * i]) for i, limit in enumerate(limits)]
        if refused:
            return ReserveOutcome(None, left, refused - 1, admission)
        reservation = Reservation(counters, usd, tokens, id=str(args[1]), local=False)
        return ReserveOutcome(reservation, left, None, admission)

    async def settle(self, reservation: Reservation, usd: Decimal, tokens: int) -> list[Decimal]:
        assert reservation.id is not None
        keys = [*self._keys(reservation.keys), f"{self._state.prefix}settled:{reservation.id}"]
        actual = [to_pico(usd) if key[3] == "usd" else tokens for key in reservation.keys]
        marker_ttl = int(self._lease_ms / 1000) * 2 + 3600
        args: list[Any] = [reservation.id, marker_ttl, *actual]
        reply = await self._state.run(self._state.settle_script, keys, args)
        reservation.settled = True
        return [
            from_pico(value) if key[3] == "usd" else Decimal(int(value))
            for key, value in zip(reservation.keys, reply, strict=True)
        ]

    async def remaining(self, limits: Sequence[Limit], ts: float) -> list[Decimal]:
        client = self._state.client
        counters = [
            self._counter((lim.scope, lim.window, window_bounds(ts, lim.window)[0], lim.unit))
            for lim in limits
        ]

        async def read() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for counter in counters:
                    pipe.hmget(counter, "spent", "reserved")
                return list(await pipe.execute())

        replies = await self._state.call(read)
        return [
            _left(limit, spent or "0", held or "0")
            for limit, (spent, held) in zip(limits, replies, strict=True)
        ]

    async def rebuild_once(
        self, month_start: float, load: Callable[[], Awaitable[dict[CounterKey, Decimal]]]
    ) -> bool:
        client = self._state.client
        marker = f"{self._state.prefix}rebuilt:{int(month_start)}"
        lock = f"{self._state.prefix}rebuild-lock"
        token = _new_id()
        deadline = time.monotonic() + 120
        while True:
            if await self._state.call(lambda: client.exists(marker)):
                return False
            if await self._state.call(lambda: client.set(lock, token, nx=True, px=60_000)):
                break
            if time.monotonic() > deadline:
                raise SharedStateUnavailable("another replica held the budget-rebuild lock for 2 minutes")
            await asyncio.sleep(0.05)
        try:
            if await self._state.call(lambda: client.exists(marker)):
                return False
            spent = await load()
            keys = [self._counter(key) for key in spent]
            args: list[Any] = []
            now = time.time()
            for key, amount in spent.items():
                value = to_pico(amount) if key[3] == "usd" else int(amount)
                end = window_bounds(key[2], key[1])[1]
                args += [value, int(end - now) + _COUNTER_DAYS * 86400]
            args.append(_COUNTER_DAYS * 86400 + 31 * 86400)
            done = await self._state.call(lambda: self._state.seed_script(keys=[*keys, marker], args=args))
            return bool(done)
        finally:
            await self._state.call(lambda: self._state.unlock_script(keys=[lock], args=[token]))


class RedisRates:
    """The shared rate-limit store (the SharedRateStore port)."""

    def __init__(self, state: RedisState) -> None:
        self._state = state

    async def admit(self, request: AdmitRequest) -> Admission:
        keys, args = admission_call(self._state.prefix, request)
        reply = await self._state.run(self._state.admit_script, keys, args)
        return admission_of(reply)


def admission_call(prefix: str, request: AdmitRequest) -> tuple[list[str], list[int | str]]:
    """The keys and arguments of the admit script for one request."""
    window = f"{prefix}rl:{request.tenant}"
    session = request.session
    keys = [window, window + ":tokens", f"{prefix}steps:{request.tenant}:{session[0] if session else ''}"]
    args: list[int | str] = [
        -1 if request.requests_per_minute is None else request.requests_per_minute,
        -1 if request.tokens_per_minute is None else request.tokens_per_minute,
        request.tokens,
        f"{_new_id()}:{request.tokens}",
        -1 if session is None else session[1],
    ]
    return keys, args


def admission_of(reply: Sequence[Any]) -> Admission:
    refused, used, wait_ms = (int(v) for v in reply)
    if not refused:
        return Admission()
    kind: Literal["requests", "tokens", "steps"] = ("requests", "tokens", "steps")[refused - 1]
    return Admission(kind, used, wait_ms / 1000)


def _left(limit: Limit, spent: str, reserved: str) -> Decimal:
    if limit.unit == "usd":
        return limit.amount - from_pico(spent) - from_pico(reserved)
    return limit.amount - int(spent) - int(reserved)


def _new_id() -> str:
    return os.urandom(9).hex()


class RedisBreakerBoard:
    """Circuit-breaker state shared by the replicas, off the request path.

    Each replica decides with its own breakers (no round trip per call). When one opens a breaker
    it publishes the target and the wall-clock end of its cool-down here; every replica reads the
    board every `poll_s` (one HGETALL) and opens its own breaker for the rest of that cool-down,
    so a failing target is skipped by all replicas, not only by the one that saw it fail."""

    def __init__(self, state: RedisState, poll_s: float = 0.5) -> None:
        self._state = state
        self._key = f"{state.prefix}breakers"
        self._poll_s = poll_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None

    def opened(self, target: str, cooldown_s: float) -> None:
        """Called by a replica's breaker as it opens (from the loop; the write runs as a task)."""
        task = asyncio.ensure_future(self._publish(target, time.time() + cooldown_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def closed(self, target: str) -> None:
        task = asyncio.ensure_future(self._clear(target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, target: str, until: float) -> None:
        try:
            await self._state.call(lambda: self._state.client.hset(self._key, target, repr(until)))
        except SharedStateUnavailable as err:
            log.warning("breaker state not shared: %s", err.message)

    async def _clear(self, target: str) -> None:
        try:
            await self._state.call(lambda: self._state.client.hdel(self._key, target))
        except SharedStateUnavailable as err:
            log.warning("breaker state not shared: %s", err.message)

    async def read(self) -> dict[str, float]:
        """Targets whose breaker some replica opened, with the seconds of cool-down left."""
        board = await self._state.call(lambda: self._state.client.hgetall(self._key))
        now = time.time()
        return {str(target): float(until) - now for target, until in board.items() if float(until) > now}

    def start(self, apply: Callable[[dict[str, float]], None]) -> None:
        self._poller = asyncio.ensure_future(self._poll(apply))

    async def _poll(self, apply: Callable[[dict[str, float]], None]) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                apply(await self.read())
            except SharedStateUnavailable:
                continue  # each replica keeps deciding alone meanwhile

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = ["RedisBreakerBoard", "RedisBudgets", "RedisRates", "RedisState", "from_pico", "to_pico"]
