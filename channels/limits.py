"""Send limits shared by every process: a provider's rate, a sender's daily quota.

They live in the broker's backend (Redis in production, memory in the embedded default), so a limit holds
across any number of worker processes and hosts.
"""

from __future__ import annotations

import time

from dramatiq.rate_limits import BucketRateLimiter, RateLimiter, WindowRateLimiter
from dramatiq.rate_limits.backend import RateLimiterBackend
from dramatiq.rate_limits.backends import RedisBackend, StubBackend

from channels import RateLimited


class Limits:
    """Makes limiters on one backend; `check` raises RateLimited when a limit has no place left."""

    def __init__(self, redis_url: str | None) -> None:
        stub = StubBackend()  # type: ignore[no-untyped-call]
        self.backend: RateLimiterBackend = RedisBackend(url=redis_url) if redis_url else stub

    def per_window(self, key: str, limit: int, seconds: int) -> Limit:
        """At most `limit` sends in any `seconds` (a rolling window)."""
        window = WindowRateLimiter(self.backend, key, limit=limit, window=seconds)  # type: ignore[no-untyped-call]
        return Limit(window, f"{limit} per {seconds} s", 1.0)

    def per_day(self, key: str, limit: int) -> Limit:
        """At most `limit` sends in one UTC day."""
        day_ms = 86_400_000
        limiter = BucketRateLimiter(self.backend, key, limit=limit, bucket=day_ms)  # type: ignore[no-untyped-call]
        return Limit(limiter, f"{limit} a day", None)


class Limit:
    def __init__(self, limiter: RateLimiter, said: str, wait_seconds: float | None) -> None:
        self.limiter = limiter
        self.said = said
        self._wait = wait_seconds

    def check(self, what: str) -> None:
        """Take a place, or raise RateLimited saying how long to wait."""
        with self.limiter.acquire(raise_on_failure=False) as acquired:
            if acquired:
                return
        wait = self._wait if self._wait is not None else 86_400 - time.time() % 86_400
        raise RateLimited(f"{what}: limit of {self.said} reached", retry_after=wait)
