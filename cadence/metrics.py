"""Prometheus metrics, one registry per service so tests and several services in one process stay apart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics

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
