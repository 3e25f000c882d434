"""The domain → gRPC status seam: one table, and nothing else turns errors into statuses."""

from __future__ import annotations

from purerpc.grpclib.status import Status, StatusCode

from eventstore.errors import (
    AlreadyExists,
    EventStoreError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    WrongExpectedVersion,
)

STATUS_OF: dict[type[EventStoreError], StatusCode] = {
    InvalidArgument: StatusCode.INVALID_ARGUMENT,
    LimitExceeded: StatusCode.RESOURCE_EXHAUSTED,
    WrongExpectedVersion: StatusCode.ABORTED,
    NotFound: StatusCode.NOT_FOUND,
    AlreadyExists: StatusCode.ALREADY_EXISTS,
    FailedPrecondition: StatusCode.FAILED_PRECONDITION,
    Unavailable: StatusCode.UNAVAILABLE,
    Unauthenticated: StatusCode.UNAUTHENTICATED,
    PermissionDenied: StatusCode.PERMISSION_DENIED,
    Internal: StatusCode.INTERNAL,
}

Trailers = list[tuple[str, str]]


def to_status(error: EventStoreError) -> tuple[Status, Trailers]:
    """The status and trailing metadata that answer `error`."""
    code = StatusCode.INTERNAL
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            code = STATUS_OF[cls]
            break
    trailers: Trailers = []
    if isinstance(error, WrongExpectedVersion):
        trailers = [
            ("expected-version", str(error.expected)),
            ("actual-version", str(error.actual)),
        ]
    return Status(code, status_message=error.message), trailers


def internal_error() -> Status:
    """The status for a failure we did not expect; details go to the log only."""
    return Status(StatusCode.INTERNAL, status_message="internal error")
