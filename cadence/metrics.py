"""Prometheus metrics, one registry per service so tests and several services in one process stay apart."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double every counter and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.webhooks = Counter(
            "cadence_webhooks_total",
            "Webhook deliveries by source and result",
            ["source", "result"],
            registry=self.registry,
        )
        self.touches = Counter(
            "cadence_touches_total",
            "Touches finished by channel and status",
            ["channel", "status"],
            registry=self.registry,
        )
        self.outcomes = Counter(
            "cadence_outcomes_total", "Outcomes recorded by name", ["name"], registry=self.registry
        )
        self.latency = Histogram(
            "cadence_dispatch_latency_seconds",
            "From a touch's due time to its send, by channel",
            ["channel"],
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
            registry=self.registry,
        )
        self.backlog = Gauge(
            "cadence_due_backlog",
            "Touches due and not yet sent: planned ones past their time, and queued ones",
            ["status"],
            registry=self.registry,
        )

    def watch_backlog(self, db: sa.Engine, clock: Callable[[], datetime]) -> None:
        """Count the backlog in the database each time the metrics are read."""
        from cadence.models import Touch, TouchStatus

        def count(status: str, due_only: bool) -> Callable[[], float]:
            def read() -> float:
                query = sa.select(sa.func.count()).select_from(Touch).where(Touch.status == status)  # type: ignore[arg-type]
                if due_only:
                    query = query.where(Touch.due_at <= clock())  # type: ignore[arg-type]
                with db.connect() as connection:
                    return float(connection.execute(query).scalar_one())

            return read

        self.backlog.labels("planned").set_function(count(TouchStatus.planned, True))
        self.backlog.labels("queued").set_function(count(TouchStatus.queued, False))
