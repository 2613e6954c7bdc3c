"""Prometheus metrics of one LetterThief, on a registry of its own.

``letterthief_letters{status,queue}`` is read from the store at scrape time,
so it is right even after a restart. ``letterthief_collector_lag_seconds`` is
how long the newest committed batch took from failure to commit: when it
grows, the collector is behind (or the database is slow).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.letters = Gauge(
            "letterthief_letters",
            "Letters in the store, by status and original queue.",
            ["status", "queue"],
            registry=self.registry,
        )
        self.collected = Counter(
            "letterthief_collected",
            "Dead-letter occurrences committed by the collector.",
            ["source"],
            registry=self.registry,
        )
        self.lag = Gauge(
            "letterthief_collector_lag_seconds",
            "Seconds from failure to commit for the newest letter of the last batch.",
            registry=self.registry,
        )
        self.last_commit = Gauge(
            "letterthief_collector_last_commit_timestamp_seconds",
            "Unix time of the collector's last committed batch.",
            registry=self.registry,
        )
        self.store_errors = Counter(
            "letterthief_collector_store_errors",
            "Batches the database refused (they stay unacked in RabbitMQ and are retried).",
            registry=self.registry,
        )
        self.replays = Counter(
            "letterthief_replays",
            "Letters tried again, by result.",
            ["result"],
            registry=self.registry,
        )
        self.alerts = Counter(
            "letterthief_alerts", "Slack posts, by result.", ["result"], registry=self.registry
        )

    def set_letters(self, counts: list[tuple[str, str, int]]) -> None:
        self.letters.clear()
        for status, queue, n in counts:
            self.letters.labels(status, queue).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
