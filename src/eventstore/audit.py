"""The audit log: one structured line per write operation (append, snapshot save, snapshot
deletion), refused ones included, on the `eventstore.audit` logger — who (the caller's name,
key id or certificate subject, and address), what stream, which versions and positions, how
many events, the outcome and how long it took. Payloads and keys are never logged."""

from __future__ import annotations

import logging
from typing import Any

from eventstore.auth.principals import ANONYMOUS
from eventstore.logs import write_json
from eventstore.v1 import eventstore_pb2 as pb

audit_log = logging.getLogger("eventstore.audit")


def caller_of(request: Any) -> dict[str, str]:
    """Who made a call, for its audit line: `caller` (the key's or certificate's name, or
    `anonymous` in open mode), `caller_key_id` or `caller_subject`, and `peer` (address).
    Never the key itself."""
    principal = getattr(request, "principal", ANONYMOUS)
    return {**principal.audit_fields(), "peer": str(getattr(request, "peer", "unknown"))}


def record(operation: str, *, outcome: str, seconds: float, **fields: object) -> None:
    """One audit line; `fields` include who (`caller`, see `caller_of`) and what."""
    _line(f"audit {operation} {outcome}", {
        "audit": True, "operation": operation, "outcome": outcome,
        "duration_ms": round(seconds * 1000, 3), **fields})


def _line(message: str, fields: dict[str, object]) -> None:
    # Straight to the JSON log when logging is as configured (a line per write: see
    # eventstore.logs), else through `logging`.
    if not write_json(audit_log, logging.INFO, message, fields):
        audit_log.info(message, extra=fields)


def append_fields(reply: bytes) -> dict[str, object]:
    """Versions and positions of an AppendEventsResponse, for the audit line."""
    response = pb.AppendEventsResponse.FromString(reply)
    count = len(response.event_ids)
    return {"first_version": response.next_expected_version - count + 1,
            "last_version": response.next_expected_version,
            "first_position": response.first_position,
            "last_position": response.last_position, "event_count": count}


def refused(method: str, peer: str, reason: str) -> None:
    """The audit line of a call refused for want of valid credentials (nothing was read)."""
    _line(f"audit {method} Unauthenticated", {
        "audit": True, "operation": method, "outcome": "Unauthenticated",
        "caller": "unauthenticated", "peer": peer, "reason": reason})
