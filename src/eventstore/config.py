"""Settings from the environment, validated once at start-up.

Every setting is an environment variable (names as in the README's configuration table). A bad
value raises `ConfigError` naming the variable, and `eventstore serve` stops with that message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class ConfigError(ValueError):
    """Raised by `load_settings` when an environment variable has a bad value; names it."""


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "eventstore")


class Settings(msgspec.Struct, frozen=True, kw_only=True, rename="upper"):
    """The service's configuration. Field `x` is read from the environment variable `X`."""

    port: Port = 50051
    # Listen address of both ports; unset: every interface when callers must authenticate,
    # loopback only in open mode (`listen_host`).
    host: str | None = None
    http_port: Port = 8080
    database_url: str | None = None
    # Where the embedded PostgreSQL keeps its cluster when DATABASE_URL is unset.
    eventstore_data_dir: str = msgspec.field(default_factory=_default_data_dir)
    snapshot_threshold: NonNegative = 100
    snapshot_retention_days: NonNegative = 30
    # How often the retention task runs.
    snapshot_retention_interval_seconds: Annotated[float, msgspec.Meta(ge=0.01)] = 3600.0
    max_snapshot_bytes: Annotated[int, msgspec.Meta(ge=16)] = 16 * 1024 * 1024 - 4096
    # Reader connections (GetEvents, ReadAll); the writer has its own connection.
    db_pool_size: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    # Group commit: one transaction takes at most this much of what is queued.
    writer_max_batch_events: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    writer_max_batch_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 16 * 1024 * 1024
    # How long the writer keeps retrying a lost database before answering UNAVAILABLE.
    writer_retry_seconds: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    # Request limits (see README "Limits").
    max_events_per_request: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10_000
    max_event_bytes: Annotated[int, msgspec.Meta(ge=16)] = 1024 * 1024
    max_request_bytes: Annotated[int, msgspec.Meta(ge=1024, le=32 * 1024 * 1024 - 1024)] = (
        16 * 1024 * 1024
    )
    # How long a call's request may take to arrive in full (then DEADLINE_EXCEEDED).
    request_read_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    read_page_default: Positive = 1000
    read_page_max: Positive = 10_000
    # A read reply stops growing at this many bytes (grpcio's default receive limit is 4 MiB).
    read_reply_max_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024)] = 3_500_000
    # ReadAll with a filter scans at most this many positions per call.
    read_all_scan_window: Positive = 100_000
    # Live delivery: the shared window of recent events every subscriber reads from.
    live_window_events: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    live_window_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024 * 1024
    # The feed also polls this often, in case a commit notification was missed.
    live_poll_ms: Annotated[int, msgspec.Meta(ge=10)] = 1000
    # A subscription's checkpoint interval when its request says 0.
    checkpoint_interval_ms: Annotated[int, msgspec.Meta(ge=10)] = 1000
    # At shutdown: how long in-flight appends and open subscriptions get to finish before
    # everything stops.
    shutdown_grace_seconds: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    # How often readiness (database answers, migrations applied) is checked.
    health_check_interval_ms: Annotated[int, msgspec.Meta(ge=50)] = 1000
    statement_timeout_ms: NonNegative = 30_000
    # Security (docs/design/security.md). Unset API_KEYS_FILE and TLS_CLIENT_CA_FILE: open mode.
    api_keys_file: str | None = None
    # How often the keys file is checked for changes.
    api_keys_reload_ms: Annotated[int, msgspec.Meta(ge=10)] = 1000
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Makes client certificates signed by this CA required (mTLS).
    tls_client_ca_file: str | None = None
    # Backups (README "Backup and recovery"): base backups every BACKUP_INTERVAL_HOURS into
    # BACKUP_DIR (unset: none), the newest BACKUP_KEEP kept; the embedded PostgreSQL also
    # archives its WAL there, for recovery to any moment.
    backup_dir: str | None = None
    backup_interval_hours: Annotated[float, msgspec.Meta(gt=0)] = 24.0
    backup_keep: Positive = 7
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    def __post_init__(self) -> None:
        if self.read_page_default > self.read_page_max:
            raise ValueError("READ_PAGE_DEFAULT must not exceed READ_PAGE_MAX")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")


def listen_host(host: str | None, authentication: str) -> str:
    """Where to listen: HOST when it is set; else every interface ("*") when callers must
    authenticate, and only loopback in open mode (anyone reaching the port may do anything)."""
    if host is not None:
        return host
    return "127.0.0.1" if authentication == "open" else "*"


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Read settings from `environ` (default: os.environ); `overrides` win (for tests)."""
    env = os.environ if environ is None else environ
    names = {f.encode_name: f.name for f in msgspec.structs.fields(Settings)}
    raw: dict[str, object] = {}
    for env_name in names:
        value = env.get(env_name)
        if value is not None and value != "":
            raw[env_name] = value.upper() if env_name == "LOG_LEVEL" else value
    for key, override in overrides.items():
        raw[key.upper()] = override
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        # msgspec says "... - at `$.PORT`"; lead with the variable's name.
        if " - at `$." in message:
            text, _, where = message.rpartition(" - at `$.")
            raise ConfigError(f"{where.rstrip('`')}: {text}") from None
        raise ConfigError(message) from None
