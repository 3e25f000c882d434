"""The domain's error hierarchy.

Database errors become these at one seam (`eventstore.db.errors`); these become gRPC statuses
at one other (`eventstore.grpc.status`). Messages are written for the API's users: they name the
field, the value or the limit, and never carry a Python repr or internals.
"""

from __future__ import annotations


class EventStoreError(Exception):
    """Base class of every error the store reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(EventStoreError):
    """Raised when a request is malformed: a bad UUID, name, JSON payload, version or filter."""


class LimitExceeded(EventStoreError):
    """Raised when a request or an event is over a documented size limit."""


class WrongExpectedVersion(EventStoreError):
    """Raised when an append's `expected_version` does not hold for the stream."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"wrong expected version: expected {expected}, actual {actual}")
        self.expected = expected
        self.actual = actual


class NotFound(EventStoreError):
    """Raised when a call names something the server does not have (a health check of a
    service it does not serve)."""


class AlreadyExists(EventStoreError):
    """Raised when an event id is reused for another event, or a snapshot version is saved
    again with other data."""


class FailedPrecondition(EventStoreError):
    """Raised when an operation needs a state the store is not in (a snapshot beyond the
    stream's version)."""


class Unauthenticated(EventStoreError):
    """Raised when a call carries no credentials, or credentials the server does not know
    (only when API keys or client certificates are configured)."""


class PermissionDenied(EventStoreError):
    """Raised when the caller is known but may not do this to this stream type."""


class Unavailable(EventStoreError):
    """Raised when the database cannot be reached (the outcome of a write is then known to be
    "not written"), or when the server is draining."""


class Internal(EventStoreError):
    """Raised for failures that are neither the caller's fault nor an outage. The message is
    generic; details go to the server log only."""
