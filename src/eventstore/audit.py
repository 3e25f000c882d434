"""The audit log: one structured line per write operation (append, snapshot save, snapshot
deletion), on the `eventstore.audit` logger — who, what stream, which versions and positions,
how many events, the outcome and how long it took. Payloads are never logged."""

from __future__ import annotations

import logging
from typing import Any

from eventstore.v1 import eventstore_pb2 as pb

audit_log = logging.getLogger("eventstore.audit")


def caller_of(request: Any) -> str:
    """The caller's identity: its peer address until API keys identify callers."""
    return str(getattr(request, "peer", "unknown"))


def record(operation: str, *, caller: str, outcome: str, seconds: float,
           **fields: object) -> None:
    audit_log.info("audit %s %s", operation, outcome, extra={
        "audit": True, "operation": operation, "caller": caller, "outcome": outcome,
        "duration_ms": round(seconds * 1000, 3), **fields})


def append_fields(reply: bytes) -> dict[str, object]:
    """Versions and positions of an AppendEventsResponse, for the audit line."""
    response = pb.AppendEventsResponse.FromString(reply)
    count = len(response.event_ids)
    return {"first_version": response.next_expected_version - count + 1,
            "last_version": response.next_expected_version,
            "first_position": response.first_position,
            "last_position": response.last_position, "event_count": count}
