"""Touches sent and outcomes recorded are posted back, signed, to OUTBOUND_URL: none lost, none twice."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from harness import Harness, deal_event, make_settings, start_harness
from sqlmodel import select

from cadence import store
from cadence.api import verify_signature
from cadence.models import Activity

SECRET = "outbound-secret"


class Receiver:
    """A CRM's endpoint on loopback: keeps what it is sent; can be told to fail."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, Any], str | None, bytes]] = []
        self.failing = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.failing:
                    receiver.failing -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.posts.append((json.loads(body), self.headers.get("X-Cadence-Signature"), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cadence"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def _harness(tmp_path: Path, url: str) -> Harness:
    return start_harness(make_settings(tmp_path, outbound_url=url, outbound_secret=SECRET))


def test_a_sent_touch_and_an_outcome_are_posted_signed_once_each(tmp_path: Path, receiver: Receiver) -> None:
    h = _harness(tmp_path, receiver.url)
    try:
        h.post("/webhooks/generic", deal_event())
        h.run_days(1)
        [touch] = [t for t in h.touches() if t.status == "sent"]
        h.post("/outcomes", {"touch_id": touch.id, "outcome": "replied", "note": "call me"})
        h.service.scheduler.tick()
        h.service.scheduler.tick()  # nothing left: each is posted once
        kinds = [
            (p["type"], p.get("touch", {}).get("key"), p.get("outcome", {}).get("name"))
            for p, _, _ in receiver.posts
        ]
        assert kinds == [("touch.sent", touch.key, None), ("outcome.recorded", None, "replied")]
        for document, header, body in receiver.posts:
            assert verify_signature(SECRET, header, body, __import__("time").time(), 300) is None
            assert document["deal"]["external_id"] == "d-1" and document["contact"]["external_id"] == "c-1"
            assert document["id"].startswith("activity-")
        assert receiver.posts[1][0]["outcome"]["note"] == "call me"
    finally:
        h.stop()


def test_a_receiver_that_fails_gets_the_activity_later_and_nothing_is_lost(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.failing = 1_000
    h = _harness(tmp_path, receiver.url)
    try:
        h.post("/webhooks/generic", deal_event())
        h.run_days(1)
        h.service.scheduler.tick()
        assert receiver.posts == []
        with store.session(h.service.db) as s:
            [row] = s.exec(select(Activity)).all()
            # Tried once or twice: a tick may find the touch already sent by the worker threads.
            tried = row.attempts
            assert row.posted_at is None and tried in (1, 2)
            assert row.last_error is not None and "503" in row.last_error
        receiver.failing = 1
        h.service.scheduler.tick()  # the pause after a failure has not passed: not tried again yet
        assert receiver.failing == 1
        for _ in range(2):
            h.clock.set(h.clock() + timedelta(minutes=5))
            h.service.scheduler.tick()
        assert receiver.failing == 0
        assert [p["type"] for p, _, _ in receiver.posts] == ["touch.sent"]
        with store.session(h.service.db) as s:
            [row] = s.exec(select(Activity)).all()
            assert row.posted_at is not None and row.attempts == tried + 2
    finally:
        h.stop()


def test_without_an_outbound_url_nothing_is_kept(tmp_path: Path) -> None:
    h = start_harness(make_settings(tmp_path))
    try:
        h.post("/webhooks/generic", deal_event())
        h.run_days(1)
        with store.session(h.service.db) as s:
            assert s.exec(select(Activity)).all() == []
    finally:
        h.stop()
