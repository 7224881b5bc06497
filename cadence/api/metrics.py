"""Prometheus metrics, one registry per app (no import-time globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


@dataclass
class Metrics:
    """The instruments cadence exports at ``/metrics``; parts add their own to ``registry``."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.events_accepted = Counter(
            "cadence_events_accepted_total",
            "Events appended to the log",
            ["source"],
            registry=self.registry,
        )
        self.events_duplicate = Counter(
            "cadence_events_duplicate_total",
            "Events dropped as duplicates of a messageId",
            ["source"],
            registry=self.registry,
        )
        self.events_rejected = Counter(
            "cadence_events_rejected_total",
            "Events rejected as malformed",
            ["source"],
            registry=self.registry,
        )
        self.requests = Histogram(
            "cadence_http_request_seconds",
            "HTTP request latency",
            ["route", "status"],
            registry=self.registry,
        )
        self.engine_position = Gauge(
            "cadence_engine_position",
            "Last event-log id the engine loop processed",
            registry=self.registry,
        )
        self.engine_lag = Gauge(
            "cadence_engine_lag_events",
            "Events in the log not yet processed",
            registry=self.registry,
        )
        self.engine_failing = Gauge(
            "cadence_engine_failing",
            "1 while this process's engine-loop batches fail (GET /v1/engine: failing), else 0",
            registry=self.registry,
        )
        self.engine_set_aside = Gauge(
            "cadence_engine_events_set_aside",
            "Events the engine loop set aside because they failed (cadence engine status)",
            registry=self.registry,
        )
