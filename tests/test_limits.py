"""Send limits hold across processes (through Redis) and a limited send waits without spending an attempt."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import Harness, deal_event, make_settings, start_harness

from cadence.models import TouchStatus
from channels import Channel, Message, RateLimited, Receipt
from channels.limits import Limits


def _key() -> str:
    return f"test-{uuid.uuid4().hex}"


@pytest.mark.parametrize("limit", [1, 3])
def test_a_window_shared_through_redis_holds_across_processes(redis_url: str, limit: int) -> None:
    # Two Limits on one Redis stand for two worker processes on different hosts.
    key = _key()
    first, second = Limits(redis_url).per_window(key, limit, 60), Limits(redis_url).per_window(key, limit, 60)
    taken = 0
    refused = []
    for i in range(limit + 2):
        try:
            (first if i % 2 else second).check("sms")
            taken += 1
        except RateLimited as exc:
            refused.append(exc)
    assert taken == limit
    assert len(refused) == 2
    assert all("limit of" in str(exc) and exc.retry_after > 0 for exc in refused)


def test_a_daily_quota_says_how_long_until_the_day_turns(redis_url: str) -> None:
    quota = Limits(redis_url).per_day(_key(), 1)
    quota.check("email")
    with pytest.raises(RateLimited) as caught:
        quota.check("email")
    assert 0 < caught.value.retry_after <= 86_400
    assert "1 a day" in str(caught.value)


def test_the_embedded_default_keeps_limits_in_memory() -> None:
    key = _key()
    limits = Limits(None)
    limits.per_window(key, 1, 60).check("sms")
    with pytest.raises(RateLimited):
        limits.per_window(key, 1, 60).check("sms")


class _Limited(Channel):
    """An email provider that is over its limit the first `times` sends."""

    name = "email"
    requires = "email"
    idempotent = True

    def __init__(self, real: Channel, times: int) -> None:
        self.real = real
        self.times = times
        self.sent: list[str] = []

    def render(self, *args: Any) -> dict[str, str]:
        return self.real.render(*args)

    def send(self, message: Message) -> Receipt:
        if self.times:
            self.times -= 1
            raise RateLimited("email: limit of 1 per 60 s reached", retry_after=30)
        self.sent.append(message.key)
        return Receipt("test", message.key)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = start_harness(make_settings(tmp_path))
    yield h
    h.stop()


def test_a_rate_limited_touch_waits_and_goes_once_without_spending_attempts(harness: Harness) -> None:
    limited = _Limited(harness.service.channels["email"], times=3)
    harness.service.channels["email"] = limited
    harness.service.dispatcher.channels = harness.service.channels
    harness.post("/webhooks/generic", deal_event())
    harness.service.scheduler.tick()
    harness.drain()
    [first] = harness.touches()
    assert (first.status, first.attempts) == (TouchStatus.planned, 0)
    assert first.status_reason == "email: limit of 1 per 60 s reached"
    for _ in range(3):
        harness.clock.set(harness.clock() + timedelta(seconds=31))
        harness.service.scheduler.tick()
        harness.drain()
    [first, *_] = harness.touches()
    assert (first.status, first.attempts) == (TouchStatus.sent, 1)
    assert limited.sent == [first.key]


def test_idempotency_keys_differ_between_installations_for_the_same_touch() -> None:
    from cadence.signing import idempotency_key

    one, other = idempotency_key(b"first secret", "7-0-0"), idempotency_key(b"second secret", "7-0-0")
    assert one != other
    assert one == idempotency_key(b"first secret", "7-0-0")  # stable: a retry carries the same key
    assert one.endswith("-7-0-0") and other.endswith("-7-0-0")
