"""Per-key rate limits on job submission, estimates and uploads: a token bucket per API key and action,
refused with 429 and `Retry-After`.

Each key gets `burst` tokens that refill at `per_minute / 60` per second; a submission takes one. Keys are
told apart by the SHA-256 of the bearer key, so no plaintext key is kept in memory longer than the request.
The bucket counts every submission attempt, valid or not, so a client cannot flood the validator either.

Where the broker is Redis (production), the buckets live there (`RedisTokenBucket`: one hash per key, updated
by a Lua script on Redis's own clock), so every API process behind a balancer enforces one shared limit. The
embedded default has one API process and keeps them in memory (`TokenBucket`). Same arithmetic in both.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.deps import CurrentOwner
from service.problems import Problem

#: Buckets kept at most; idle full buckets are dropped first when more keys than this are seen.
MAX_BUCKETS = 100_000
#: Redis key prefix of each action's buckets.
PREFIXES = {"submit": "qaa:submit-rate:", "estimate": "qaa:estimate-rate:", "upload": "qaa:upload-rate:"}
REDIS_PREFIX = PREFIXES["submit"]
#: What each action is called in a 429's message.
ACTIONS = {"submit": "job submissions", "estimate": "estimates", "upload": "dataset uploads"}

log = logging.getLogger("qaa.api")


class Limiter:
    """`burst` tokens per key refilled at `per_minute` per minute; `take` is where the buckets live."""

    def __init__(self, per_minute: float, burst: int):
        self.rate = per_minute / 60.0
        self.burst = burst

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 when granted, else the seconds until one is available."""
        raise NotImplementedError


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class TokenBucket(Limiter):
    """The buckets in this process's memory, one per key; thread-safe."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        super().__init__(per_minute, burst)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        if not self.enabled:
            return 0.0
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= MAX_BUCKETS:
                    self._forget_full(now)
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: forgetting them changes nothing a caller could notice."""
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.stamp) * self.rate >= self.burst]
        for key in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[key]


#: `TokenBucket.take` on the server: KEYS[1] the bucket, ARGV rate (tokens/s) and burst; returns the wait as a
#: string (a Lua number would come back truncated to an integer). A full bucket is the same as no bucket, so
#: the hash expires once it would have refilled.
_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or burst
local stamp = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return string.format('%.17g', wait)
"""


class RedisTokenBucket(Limiter):
    """`TokenBucket` shared by every API process through Redis. If Redis does not answer, submissions are let
    through (logged): the limit protects the service and must not become the thing that takes it down."""

    def __init__(self, url: str, per_minute: float, burst: int, prefix: str = REDIS_PREFIX):
        import redis

        super().__init__(per_minute, burst)
        self.prefix = prefix
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._take = self._client.register_script(_TAKE)
        self._errors = (redis.RedisError, OSError)

    def take(self, key: str) -> float:
        if not self.enabled:
            return 0.0
        try:
            return float(self._take(keys=[self.prefix + key], args=[repr(self.rate), self.burst]))
        except self._errors as exc:
            log.warning("rate limit not applied: Redis did not answer (%s)", type(exc).__name__)
            return 0.0


def make_limiter(action: str, per_minute: float, burst: int, broker_url: str | None) -> Limiter:
    """`action`'s buckets: shared in Redis when the broker is Redis, else this process's own."""
    if broker_url and broker_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisTokenBucket(broker_url, per_minute, burst, PREFIXES[action])
    return TokenBucket(per_minute, burst)


def limiters(settings) -> dict[str, Limiter]:
    """One limiter per action, from the settings: `app.state.<action>_limiter`."""
    rates = {
        "submit": (settings.submit_rate_per_minute, settings.submit_burst),
        "estimate": (settings.estimate_rate_per_minute, settings.estimate_burst),
        "upload": (settings.upload_rate_per_minute, settings.upload_burst),
    }
    return {action: make_limiter(action, *rate, settings.broker_url) for action, rate in rates.items()}


def key_identity(request: Request) -> str:
    """A stable, non-secret name for the request's bearer key (its SHA-256)."""
    credential = request.headers.get("authorization", "").partition(" ")[2].strip()
    return hashlib.sha256(credential.encode()).hexdigest()


def _rate_check(action: str):
    def check(request: Request, _owner: CurrentOwner) -> None:
        """After authentication (unknown keys are 401, not counted), one token of `action`'s bucket."""
        limiter: Limiter | None = getattr(request.app.state, f"{action}_limiter", None)
        if limiter is None:
            return
        wait = limiter.take(key_identity(request))
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise Problem(
                429,
                f"too many {ACTIONS[action]} for this API key: at most {limiter.rate * 60:g} per minute "
                f"(bursts of {limiter.burst}); retry in {retry} s",
                headers={"Retry-After": str(retry)},
                retry_after=retry,
            )

    return check


check_submit_rate = _rate_check("submit")
SubmitRateLimited = Annotated[None, Depends(check_submit_rate)]
EstimateRateLimited = Annotated[None, Depends(_rate_check("estimate"))]
UploadRateLimited = Annotated[None, Depends(_rate_check("upload"))]
