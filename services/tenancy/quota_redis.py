"""Quotas counted in Redis, so any number of routers enforce one budget.

A reservation is one Lua script (atomic in Redis): it drops buckets that left
each window, checks every limit with the arithmetic of services.tenancy.quota,
and charges them all or none. Time is Redis's own (TIME), so routers whose
clocks differ still share one set of buckets; tests may pass a clock.

Keys per tenant, all in one cluster slot (`{tenant}`):
`PREFIX{tenant}:<window>` a hash bucket -> amount, expiring with its window;
`PREFIX{tenant}:concurrent` a sorted set of reservation ids scored by lease end.

When Redis cannot be reached (connection refused, a timeout: sockets wait at
most `timeout` seconds), the store follows its policy: `open` counts in this
router's memory against `share` of each limit (1/N with N routers keeps the
sum at the limit), `closed` refuses with QUOTA_STORE_UNAVAILABLE. Tenants
without limits are always served. Either way a counter rises and one log line
says Redis is down (and one when it is back); Redis is tried again after
`retry_interval` seconds, not on every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.errors import MeshError, Reason
from services.tenancy.quota import (
    CONCURRENT,
    WINDOWS,
    Assessment,
    FailurePolicy,
    Reservation,
    TenantUsage,
    assess,
    demand,
    first_refusal,
    limit_of,
    new_id,
    refusal,
    state_of,
)
from services.tenancy.quota_memory import MemoryQuotaStore
from services.tenancy.tenants import Tenant

log = logging.getLogger("llmmesh.tenancy")

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


# KEYS: one hash per window, then the concurrency sorted set.
# ARGV: now_ms ('' = Redis TIME), id, concurrency limit (-1 = none), lease ms,
#       then per window: limit (-1 = none), bucket ms, buckets counted (n), amount.
# Returns {ok, refused, retry_ms, now_ms, in_flight, then per window:
#          bucket, used before, oldest bucket (-1 = none), newest bucket (-1 = none)}.
# `refused`: '' | 'never:<window number>' | 'window:<window number>' | 'concurrent'.
RESERVE = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local id = ARGV[2]
local climit = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local nw = #KEYS - 1
local ckey = KEYS[nw + 1]
local retry = -1
local refused = ''
local facts = {}
for w = 1, nw do
  local base = 4 + (w - 1) * 4
  local limit = tonumber(ARGV[base + 1])
  local bms = tonumber(ARGV[base + 2])
  local n = tonumber(ARGV[base + 3])
  local amount = tonumber(ARGV[base + 4])
  local b = math.floor(now / bms)
  local flat = redis.call('HGETALL', KEYS[w])
  local used = 0
  local live = {}
  local oldest = -1
  local newest = -1
  for i = 1, #flat, 2 do
    local bi = tonumber(flat[i])
    local v = tonumber(flat[i + 1])
    if bi <= b - n then
      redis.call('HDEL', KEYS[w], flat[i])
    elseif v > 0 then
      used = used + v
      live[#live + 1] = {bi, v}
      if oldest < 0 or bi < oldest then oldest = bi end
      if bi > newest then newest = bi end
    end
  end
  facts[w] = {b, used, oldest, newest, amount, bms, n}
  if limit >= 0 and used + amount > limit and string.sub(refused, 1, 5) ~= 'never' then
    if amount > limit then
      refused = 'never:' .. w
    else
      table.sort(live, function(x, y) return x[1] < y[1] end)
      local excess = used + amount - limit
      local freed = 0
      for _, e in ipairs(live) do
        freed = freed + e[2]
        if freed >= excess then
          local at = (e[1] + n) * bms - now
          if at > retry then
            retry = at
            refused = 'window:' .. w
          end
          break
        end
      end
    end
  end
end
redis.call('ZREMRANGEBYSCORE', ckey, '-inf', now)
local active = redis.call('ZCARD', ckey)
if refused == '' and climit >= 0 and active + 1 > climit then
  refused = 'concurrent'
end
local out = {0, refused, retry, now, active}
if refused == '' then
  out[1] = 1
  for w = 1, nw do
    local f = facts[w]
    if f[5] > 0 then
      redis.call('HINCRBY', KEYS[w], f[1], f[5])
    end
    redis.call('PEXPIRE', KEYS[w], (f[7] + 1) * f[6])
  end
  redis.call('ZADD', ckey, now + lease, id)
  redis.call('PEXPIRE', ckey, lease)
  out[5] = active + 1
end
for w = 1, nw do
  local f = facts[w]
  out[#out + 1] = f[1]
  out[#out + 1] = f[2]
  out[#out + 1] = f[3]
  out[#out + 1] = f[4]
end
return out
"""

# KEYS: as RESERVE. ARGV: id, then per window: bucket, refund (negative: overshoot).
# A bucket that has left its window is not touched; no bucket goes below 0.
SETTLE = """
local nw = #KEYS - 1
redis.call('ZREM', KEYS[nw + 1], ARGV[1])
for w = 1, nw do
  local bucket = ARGV[1 + (w - 1) * 2 + 1]
  local refund = tonumber(ARGV[1 + (w - 1) * 2 + 2])
  if refund ~= 0 then
    local cur = redis.call('HGET', KEYS[w], bucket)
    if cur then
      local v = tonumber(cur) - refund
      if v < 0 then v = 0 end
      redis.call('HSET', KEYS[w], bucket, v)
    end
  end
end
return 1
"""


class RedisQuotaStore:
    def __init__(
        self,
        url: str,
        *,
        policy: FailurePolicy = FailurePolicy.CLOSED,
        share: float = 1.0,
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        lease: float = 900.0,
        prefix: str = "llmmesh:quota:",
        clock: Callable[[], float] | None = None,
        on_unreachable: Callable[[], None] | None = None,
    ) -> None:
        """`share`: the part of each limit this router may use alone while Redis
        is down (policy open). `lease`: seconds a reservation holds a concurrency
        slot at most (longer than any request's deadline). `on_unreachable`:
        called once per failed attempt (a metric counter)."""
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.url = url
        self.policy = policy
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._lease_ms = int(lease * 1000)
        self._prefix = prefix
        self._clock = clock
        self._on_unreachable = on_unreachable
        self._client = aioredis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), decode_responses=True,
        )
        self._reserve = self._client.register_script(RESERVE)
        self._settle = self._client.register_script(SETTLE)
        self._local = MemoryQuotaStore(
            clock or time.time, limits=lambda tenant: tenant.limits.scaled(share)
        )
        self._down_until = 0.0
        self.reachable = True

    # -- reachability -----------------------------------------------------------

    def _skip(self) -> bool:
        return not self.reachable and time.monotonic() < self._down_until

    def _failed(self, exc: BaseException) -> None:
        if self._on_unreachable is not None:
            self._on_unreachable()
        self._down_until = time.monotonic() + self._retry_interval
        if self.reachable:
            self.reachable = False
            log.error(
                "quota store unreachable",
                extra={"store": _safe_url(self.url), "policy": self.policy.value,
                       "error": type(exc).__name__},
            )

    def _succeeded(self) -> None:
        if not self.reachable:
            self.reachable = True
            log.warning("quota store reachable again", extra={"store": _safe_url(self.url)})

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        # The socket timeouts bound each read and write; this bounds the whole
        # call (a reconnect and a script load included).
        return await asyncio.wait_for(script(keys=keys, args=args), self._timeout * 4)

    def _keys(self, tenant: str) -> list[str]:
        base = f"{self._prefix}{{{tenant}}}:"
        return [base + w.name for w in WINDOWS] + [base + CONCURRENT]

    def _now_arg(self) -> str:
        return "" if self._clock is None else str(int(self._clock() * 1000))

    # -- the QuotaStore protocol -------------------------------------------------

    async def reserve(self, tenant: Tenant, tokens: int, requests: int = 1) -> Reservation:
        if self._skip():
            return await self._fallback(tenant, tokens, requests)
        args: list[Any] = [
            self._now_arg(), new_id(), _arg(tenant.limits.concurrent), self._lease_ms,
        ]
        amounts = [demand(w, requests, tokens) for w in WINDOWS]
        for window, amount in zip(WINDOWS, amounts, strict=True):
            args += [_arg(limit_of(tenant.limits, window.name)), window.bucket_ms,
                     window.buckets, amount]
        try:
            out = await self._call(self._reserve, self._keys(tenant.name), args)
        except UNREACHABLE as exc:
            self._failed(exc)
            return await self._fallback(tenant, tokens, requests)
        self._succeeded()
        ok, refused, retry_ms, now, active = (
            int(out[0]), str(out[1]), int(out[2]), int(out[3]), int(out[4])
        )
        facts = [tuple(int(x) for x in out[5 + 4 * i: 9 + 4 * i]) for i in range(len(WINDOWS))]
        if not ok:
            raise self._refusal(tenant, refused, retry_ms, amounts, facts, now)
        states = []
        buckets = {}
        for window, amount, (bucket, used, oldest, _newest) in zip(
            WINDOWS, amounts, facts, strict=True
        ):
            buckets[window.name] = bucket
            states.append(state_of(
                window, limit_of(tenant.limits, window.name), used + amount,
                bucket if oldest < 0 else oldest, bucket, now,
            ))
        return Reservation(
            args[1], tenant, requests, tokens, buckets, tuple(states), self, concurrent=active
        )

    def _refusal(
        self, tenant: Tenant, refused: str, retry_ms: int, amounts: list[int],
        facts: list[tuple[int, ...]], now: int,
    ) -> MeshError:
        if refused == "concurrent":
            limit = tenant.limits.concurrent
            assert limit is not None
            return refusal(tenant, CONCURRENT, limit, 1, None, False)
        kind, _, number = refused.partition(":")
        w = int(number) - 1
        window = WINDOWS[w]
        verdict = Assessment(
            facts[w][1], None, None, None if kind == "never" else retry_ms, kind == "never"
        )
        error = first_refusal(tenant, [(window, amounts[w], verdict)])
        assert error is not None
        return error

    async def _fallback(self, tenant: Tenant, tokens: int, requests: int) -> Reservation:
        if self.policy is FailurePolicy.OPEN or tenant.limits.unlimited:
            return await self._local.reserve(tenant, tokens, requests)
        raise MeshError(
            Reason.QUOTA_STORE_UNAVAILABLE,
            "the quota store cannot be reached and quotas fail closed; retry shortly",
            metadata={"tenant": tenant.name},
            retry_after=self._retry_interval,
        )

    async def settle(self, reservation: Reservation, actual_tokens: int) -> int:
        refund = reservation.tokens - actual_tokens
        args: list[Any] = [reservation.id]
        for window in WINDOWS:
            args += [reservation.buckets[window.name], refund if window.tokens else 0]
        try:
            await self._call(self._settle, self._keys(reservation.tenant.name), args)
        except UNREACHABLE as exc:
            # The tokens stay charged (never too few) and the slot's lease ends it.
            self._failed(exc)
        else:
            self._succeeded()
        return max(0, -refund)

    async def usage(self, tenant: Tenant) -> TenantUsage:
        keys = self._keys(tenant.name)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.time()
                for key in keys[:-1]:
                    pipe.hgetall(key)
                pipe.zrangebyscore(keys[-1], "-inf", "+inf", withscores=True)
                results = await asyncio.wait_for(pipe.execute(), self._timeout * 4)
        except UNREACHABLE as exc:
            self._failed(exc)
            return await self._local.usage(tenant)
        self._succeeded()
        seconds, micros = results[0]
        now = int(self._clock() * 1000) if self._clock else seconds * 1000 + micros // 1000
        states = []
        for window, raw in zip(WINDOWS, results[1:-1], strict=True):
            buckets = {int(k): int(v) for k, v in raw.items()}
            verdict = assess(window, buckets, None, 0, now)
            states.append(state_of(
                window, limit_of(tenant.limits, window.name), verdict.used, verdict.oldest,
                verdict.newest, now,
            ))
        in_flight = sum(1 for _, lease_end in results[-1] if lease_end > now)
        return TenantUsage(tenant.name, tuple(states), in_flight, tenant.limits.concurrent)

    async def close(self) -> None:
        await self._client.aclose()


def _arg(limit: int | None) -> int:
    return -1 if limit is None else limit


def _safe_url(url: str) -> str:
    """The URL without a password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
