"""The client's exceptions: one hierarchy under `ClientError`, one class per gRPC status.

Every failure of a call reaches the caller as a `ClientError` subclass. The translation from
what purerpc, h2, anyio and the OS raise happens in one place, `translate` (used through
`translating`); nothing else in the client turns foreign exceptions into these.

Errors of the caller's own making that never reach the wire stay ordinary Python errors: a
`NewEvent` whose data orjson cannot serialize raises `TypeError`, a bad option `ValueError`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import anyio
import h2.exceptions
from purerpc.grpclib.exceptions import GRPCError, RpcFailedError


class StatusCode(enum.IntEnum):
    """The gRPC status codes (the numbers are gRPC's)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ClientError(Exception):
    """Base class of every error a call reports. `code` is the gRPC status, `message` the
    server's (or the client's) explanation.

    Raised as this class itself for a status the client has no class of its own for
    (UNKNOWN, NOT_FOUND, OUT_OF_RANGE, DATA_LOSS, or a code gRPC does not define).
    """

    code: StatusCode = StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Cancelled(ClientError):
    """Raised when the server (or a proxy) answers CANCELLED. The eventstore server itself never
    does; a call the caller cancels ends with trio's own `Cancelled`, not this."""

    code = StatusCode.CANCELLED


class InvalidArgument(ClientError):
    """Raised on INVALID_ARGUMENT: the request is malformed (a bad UUID, an empty or too long
    name, no events, invalid JSON, a bad version, range, page size or filter)."""

    code = StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(ClientError):
    """Raised when a call did not complete within the client's `timeout` (or a subscription's
    connection attempt within `ReconnectPolicy.connect_timeout`), or on DEADLINE_EXCEEDED.
    An append that timed out may still have been committed: retry it with the same event ids."""

    code = StatusCode.DEADLINE_EXCEEDED


class AlreadyExists(ClientError):
    """Raised on ALREADY_EXISTS: an event id is already stored for another event (or only some
    of a request's ids are stored), or a snapshot version was saved before with other data."""

    code = StatusCode.ALREADY_EXISTS


class PermissionDenied(ClientError):
    """Raised on PERMISSION_DENIED: the credentials are known but lack the permission."""

    code = StatusCode.PERMISSION_DENIED


class ResourceExhausted(ClientError):
    """Raised on RESOURCE_EXHAUSTED: a request or an event is over a documented size limit."""

    code = StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ClientError):
    """Raised on FAILED_PRECONDITION: the store is not in the state the operation needs (a
    snapshot for a version beyond the stream's)."""

    code = StatusCode.FAILED_PRECONDITION


class Aborted(ClientError):
    """Raised on ABORTED when the message is not a version conflict (see
    `WrongExpectedVersion`, its subclass, for that case)."""

    code = StatusCode.ABORTED


class WrongExpectedVersion(Aborted):
    """Raised by `append_events` when `expected_version` does not hold for the stream (ABORTED,
    `wrong expected version: expected X, actual Y`). `expected` and `actual` are X and Y."""

    def __init__(self, message: str, *, expected: int, actual: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class NotImplementedByServer(ClientError):
    """Raised on UNIMPLEMENTED: the server does not implement this RPC (yet)."""

    code = StatusCode.UNIMPLEMENTED


class InternalError(ClientError):
    """Raised on INTERNAL: the server failed in a way that is neither the caller's fault nor an
    outage (details are in the server's log only); also when a reply breaks the protocol."""

    code = StatusCode.INTERNAL


class Unavailable(ClientError):
    """Raised when the server cannot be reached or the connection is lost mid-call (refused,
    reset, TLS failure, closed) and on UNAVAILABLE (database unreachable, server draining).

    For an append the outcome is then unknown unless the status said otherwise: retrying with
    the same event ids is always safe. Subscriptions handle this by themselves (they resume)
    until their `ReconnectPolicy` gives up; then they raise it.
    """

    code = StatusCode.UNAVAILABLE


class Unauthenticated(ClientError):
    """Raised on UNAUTHENTICATED: no API key, or one the server does not know (when the server
    has keys configured)."""

    code = StatusCode.UNAUTHENTICATED


_BY_CODE: dict[StatusCode, type[ClientError]] = {
    cls.code: cls
    for cls in (Cancelled, InvalidArgument, DeadlineExceeded, AlreadyExists, PermissionDenied,
                ResourceExhausted, FailedPrecondition, Aborted, NotImplementedByServer,
                InternalError, Unavailable, Unauthenticated)
}

_CONFLICT = re.compile(r"wrong expected version: expected (-?\d+), actual (-?\d+)")

Trailers = Iterable[tuple[str, str | bytes]]


def error_from_status(code: int, message: str, trailers: Trailers = ()) -> ClientError:
    """The exception for a non-OK status `code` with `message` and trailing metadata."""
    try:
        status = StatusCode(code)
    except ValueError:
        return ClientError(message or f"status {code}")
    if status == StatusCode.ABORTED:
        conflict = _version_conflict(message, trailers)
        if conflict is not None:
            return WrongExpectedVersion(message, expected=conflict[0], actual=conflict[1])
    cls = _BY_CODE.get(status)
    if cls is None:
        return ClientError(message, code=status)
    return cls(message)


def _version_conflict(message: str, trailers: Trailers) -> tuple[int, int] | None:
    # The contract sends the numbers twice: in trailing metadata (`expected-version`,
    # `actual-version`) and in the message. purerpc's high-level stubs raise without the
    # trailing metadata (`raise_status` keeps only the status); our own call path reads it from
    # the stream's end event when it is there, and falls back to parsing the message.
    found = {name: value for name, value in trailers
             if name in ("expected-version", "actual-version")}
    try:
        return int(found["expected-version"]), int(found["actual-version"])
    except (KeyError, ValueError):
        pass
    match = _CONFLICT.search(message)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def translate(exc: BaseException, target: str) -> ClientError | None:
    """The `ClientError` for an exception raised while talking to `target` ("host:port"), or
    None when it is not a call's failure (cancellation, a bug) and must propagate unchanged."""
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, RpcFailedError):
        status = exc.status
        return error_from_status(status.int_value, status.status_message)
    if isinstance(exc, (anyio.EndOfStream, anyio.BrokenResourceError,
                        anyio.ClosedResourceError)):
        return Unavailable(f"the connection to {target} was lost")
    if isinstance(exc, OSError):
        # ConnectionRefusedError, socket.gaierror, ssl.SSLError, TimeoutError, …; anyio's
        # "All connection attempts failed" carries the attempts' errors as its cause.
        cause = exc.__cause__
        if isinstance(cause, BaseExceptionGroup):
            cause = next(_leaves(cause), None)
        if isinstance(cause, OSError):
            exc = cause
        reason = exc.strerror or str(exc) or type(exc).__name__
        return Unavailable(f"cannot talk to {target}: {reason}")
    if isinstance(exc, (GRPCError, h2.exceptions.H2Error)):
        return Unavailable(f"the connection to {target} failed: HTTP/2 error "
                           f"({type(exc).__name__})")
    if isinstance(exc, BaseExceptionGroup):
        errors = [translate(leaf, target) for leaf in _leaves(exc)]
        if errors and all(error is not None for error in errors):
            return errors[0]
    return None


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


@contextmanager
def translating(target: str) -> Iterator[None]:
    """Re-raise what the body raises as a `ClientError` (see `translate`)."""
    try:
        yield
    except ClientError:
        raise
    except BaseException as exc:
        error = translate(exc, target)
        if error is None:
            raise
        raise error from exc
