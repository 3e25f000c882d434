"""Prometheus metrics of one server (its own registry, so several servers can share a process
in tests). Names follow Prometheus conventions: `eventstore_` prefix, base units, `_total` for
counters."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_appended = Counter(
            "eventstore_events_appended_total", "Events committed by this server's writer.",
            registry=r)
        self.append_requests = Counter(
            "eventstore_append_requests_total", "AppendEvents requests by outcome.",
            ["outcome"], registry=r)
        self.batch_events = Histogram(
            "eventstore_append_batch_events", "Events per group-committed transaction.",
            buckets=_BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram(
            "eventstore_append_batch_requests", "Requests per group-committed transaction.",
            buckets=_BATCH_BUCKETS, registry=r)
        self.append_guesses = Counter(
            "eventstore_append_guesses_total",
            "One-round-trip commits tried, by outcome: hit (committed) or miss (the store had "
            "moved, e.g. another server process appended; the batch was committed the usual "
            "way).", ["outcome"], registry=r)
        self.get_events_prefetch = Counter(
            "eventstore_get_events_prefetch_total",
            "GetEvents pages read ahead, by what became of them: hit (served), stale (the "
            "stream moved; read again), unused (not asked for in time), failed.",
            ["outcome"], registry=r)
        self.read_all_prefetch = Counter(
            "eventstore_read_all_prefetch_total",
            "ReadAll pages read ahead, by what became of them: hit (served), partial (it reached "
            "the end of the store; read again), unused (not asked for in time), failed.",
            ["outcome"], registry=r)
        self.commit_seconds = Histogram(
            "eventstore_append_commit_seconds",
            "Time to commit one batch (lock to COMMIT, retries included).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.grpc_seconds = Histogram(
            "eventstore_grpc_request_duration_seconds",
            "gRPC request duration by method and status code (streams: until they end).",
            ["method", "code"], buckets=_LATENCY_BUCKETS, registry=r)
        self.subscriptions_open = Gauge(
            "eventstore_subscriptions_open", "Subscriptions open on this server.", registry=r)
        self.subscriber_lag = Gauge(
            "eventstore_subscriber_lag_positions",
            "Positions between the newest committed event this server has read and the "
            "oldest position a subscription still has to deliver.", registry=r)
        self.live_window_events = Gauge(
            "eventstore_live_window_events", "Events in the shared live window.", registry=r)
        self.events = Gauge(
            "eventstore_events", "Events in the store (the head position; positions are "
            "dense).", registry=r)
        self.streams = Gauge(
            "eventstore_streams", "Streams in the store (PostgreSQL's estimate, cheap on a "
            "large table).", registry=r)
        self.snapshots = Gauge(
            "eventstore_snapshots", "Snapshots in the store (PostgreSQL's estimate).",
            registry=r)
        self.snapshots_saved = Counter(
            "eventstore_snapshots_saved_total", "Snapshots saved by this server.", registry=r)
        self.snapshots_deleted = Counter(
            "eventstore_snapshots_deleted_total", "Snapshots deleted by retention.", registry=r)
        self.backups = Counter(
            "eventstore_backups_total", "Base backups this server took (BACKUP_DIR), by "
            "outcome.", ["outcome"], registry=r)
        self.backup_last_success = Gauge(
            "eventstore_backup_last_success_timestamp_seconds", "When the newest base backup "
            "in BACKUP_DIR started (Unix time; 0: none).", registry=r)
        self.wal_archive_failures = Gauge(
            "eventstore_wal_archive_failures", "Times the embedded PostgreSQL failed to "
            "archive a WAL segment into BACKUP_DIR (since its statistics were reset); while "
            "it fails, PostgreSQL keeps every segment.", registry=r)
        self.wal_archive_last_success = Gauge(
            "eventstore_wal_archive_last_success_timestamp_seconds", "When the embedded "
            "PostgreSQL last archived a WAL segment (Unix time; 0: never).", registry=r)
        self._grpc_children: dict[tuple[str, str], Any] = {}
        self.database_up = Gauge(
            "eventstore_database_up", "1 when the database answered the last health check.",
            registry=r)

    def observe_grpc(self, method: str, code: str, seconds: float) -> None:
        """One call's duration by method and status code. The labelled histograms are kept
        here: prometheus_client's `labels` takes a lock and builds a key for every call."""
        child = self._grpc_children.get((method, code))
        if child is None:
            child = self._grpc_children[(method, code)] = self.grpc_seconds.labels(method, code)
        child.observe(seconds)

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))
