"""Per-key limits on job submission: a token bucket per API key, refused with 429 and `Retry-After`.

Each key gets `burst` tokens that refill at `per_minute / 60` per second; a submission takes one. Keys are
told apart by the SHA-256 of the bearer key, so no plaintext key is kept in memory longer than the request.
The bucket counts every submission attempt, valid or not, so a client cannot flood the validator either.

The buckets live in this API process. That is exact for one process (`qaa api`, the compose file); with N
API processes behind a balancer each keeps its own buckets, so a key gets up to N times the rate. Such a
deployment needs the buckets in a shared store: one Redis key per API key updated by a Lua script (the same
arithmetic as `TokenBucket.take`, atomic on the server), or a limit at the reverse proxy.
"""

from __future__ import annotations

import hashlib
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


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class TokenBucket:
    """Buckets of `burst` tokens refilled at `per_minute` per minute, one per key; thread-safe."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 when granted, else the seconds until one is available."""
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


def key_identity(request: Request) -> str:
    """A stable, non-secret name for the request's bearer key (its SHA-256)."""
    credential = request.headers.get("authorization", "").partition(" ")[2].strip()
    return hashlib.sha256(credential.encode()).hexdigest()


def check_submit_rate(request: Request, _owner: CurrentOwner) -> None:
    """Dependency of `POST /v1/jobs`: after authentication (unknown keys are 401, not counted), one token."""
    limiter: TokenBucket | None = getattr(request.app.state, "submit_limiter", None)
    if limiter is None:
        return
    wait = limiter.take(key_identity(request))
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise Problem(
            429,
            f"too many job submissions for this API key: at most {limiter.rate * 60:g} per minute "
            f"(bursts of {limiter.burst}); retry in {retry} s",
            headers={"Retry-After": str(retry)},
            retry_after=retry,
        )


SubmitRateLimited = Annotated[None, Depends(check_submit_rate)]
