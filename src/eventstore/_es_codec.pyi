"""Typed stub of the Rust extension ``eventstore._es_codec`` (crate ``rust/es_codec``).

Hot-path codecs: validation of AppendEventsRequest bytes, the batch version check, the
binary COPY payload that inserts events, binary COPY output to serialized ``Event``s, and the
inbound half of the gRPC server's HTTP/2 connection (frames and HPACK).
"""

from collections.abc import Sequence
from typing import Any, final

__all__ = [
    "AppendRequest",
    "FrameReader",
    "Http2Error",
    "InvalidRequest",
    "RequestTooLarge",
    "check_json",
    "check_versions",
    "encode_copy",
    "encode_event_list",
    "encode_events",
    "insert_sql",
]

class InvalidRequest(ValueError):
    """The request is invalid (INVALID_ARGUMENT); the message names the field in plain words,
    e.g. ``events[2].data: invalid JSON: expected value at line 1 column 1``."""

class RequestTooLarge(InvalidRequest):
    """The request is over a size limit (RESOURCE_EXHAUSTED), e.g.
    ``events: 20000 events, over the limit of 10000``."""

class Http2Error(Exception):
    """An HTTP/2 connection error; ``args`` are (error code, message). The connection must end
    with GOAWAY carrying the code."""

@final
class FrameReader:
    """The inbound half of an HTTP/2 server connection: the client's preface, frames cut from
    the byte stream, header blocks joined across CONTINUATION frames and HPACK-decoded, a
    request's header list checked for well-formedness (RFC 9113 §8.2–8.3)."""

    def __init__(self, max_frame_size: int, header_table_size: int,
                 max_header_list_size: int) -> None:
        """The SETTINGS this side advertised: frames over ``max_frame_size`` and encoded
        header blocks over 4 × ``max_header_list_size`` are connection errors; a decoded list
        over ``max_header_list_size`` is reported as the HEADERS frame's problem."""
    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        """The frames ``data`` completes, in order: DATA ``(0, stream_id, end_stream, data,
        flow_controlled_length)``; HEADERS ``(1, stream_id, end_stream, [(name, value)],
        problem or None, has_pseudo)``; any other frame the caller acts on ``(type, stream_id,
        flags, payload)`` (PRIORITY and unknown types are skipped). Raises Http2Error."""

@final
class AppendRequest:
    """A decoded and fully validated AppendEventsRequest; immutable."""

    @staticmethod
    def parse(raw: bytes, max_events: int, max_event_bytes: int,
              caller: bytes | None = None) -> AppendRequest:
        """Decode and validate serialized AppendEventsRequest bytes.

        Event ids left empty by the client are generated (random UUID v4). ``caller`` (a JSON
        value) is recorded in every event's metadata under the reserved key
        ``$eventstore.caller``; metadata that carries that key itself is refused either way.

        Raises InvalidRequest (or its subclass RequestTooLarge) for a bad request, ValueError
        when ``max_events`` or ``max_event_bytes`` is below 1.
        """
    @property
    def stream_id(self) -> str:
        """Canonical lower-case hyphenated UUID."""
    @property
    def stream_id_bytes(self) -> bytes:
        """The stream id's 16 bytes."""
    @property
    def stream_type(self) -> str: ...
    @property
    def expected_version(self) -> int | None:
        """None when absent (append at any version); 0, -1 or a version otherwise."""
    @property
    def event_count(self) -> int: ...
    @property
    def payload_bytes(self) -> int:
        """Sum of the data and metadata lengths of all events."""
    @property
    def event_ids(self) -> list[str]:
        """Every event's id in order, canonical lower-case, generated ones included."""
    @property
    def client_event_ids(self) -> list[str]:
        """Only the ids the client supplied, in order, canonical lower-case."""
    @property
    def has_client_ids(self) -> bool: ...
    def event_type(self, i: int) -> str:
        """Raises IndexError unless ``0 <= i < event_count``."""
    def event_data(self, i: int) -> bytes:
        """The JSON text exactly as the client sent it. IndexError as for event_type."""
    def event_metadata(self, i: int) -> bytes | None:
        """The JSON text as sent, or None when the client sent none. IndexError as above."""
    def response(self, first_version: int, first_position: int, snapshot_threshold: int) -> bytes:
        """Serialized AppendEventsResponse for this request stored at versions
        ``first_version..`` and positions ``first_position..``.

        snapshot_due is set when ``snapshot_threshold > 0`` and the appended versions reach a
        multiple of it. Raises ValueError when first_version or first_position is below 1 or
        the last version/position would overflow int64.
        """

def check_json(doc: bytes) -> bool:
    """Whether ``doc``, one JSON document that PostgreSQL's jsonb accepts (the rules event data
    is checked by), is an object at its top level. Raises InvalidRequest with the reason, e.g.
    ``expected value at line 1 column 1``."""

def check_versions(
    current: Sequence[int],
    stream_index: Sequence[int],
    expected: Sequence[int | None],
    counts: Sequence[int],
) -> list[int]:
    """Optimistic-concurrency check of a batch, deciding the requests in order.

    ``current[s]``: version of distinct stream s (0: no stream). Request i appends
    ``counts[i]`` (>= 1) events to stream ``stream_index[i]`` expecting ``expected[i]``
    (None: any; 0: at 0; -1: above 0; N > 0: exactly N). Accepted requests advance their
    stream for the requests after them. Returns per request its first version (>= 1) when
    accepted, else ``-(actual + 1)`` (``actual = -r - 1``). Raises ValueError on mismatched
    lengths, an index out of range, a count below 1, an expectation below -1 or a negative
    current version.
    """

def encode_copy(
    requests: Sequence[AppendRequest],
    first_versions: Sequence[int],
    first_position: int,
    created_at_us: int,
) -> bytes:
    """The complete binary COPY payload for ``COPY events (event_id, stream_id, stream_type,
    version, event_type, data, metadata, created_at, position) FROM STDIN (FORMAT BINARY)``.

    Request i's events get versions ``first_versions[i]..``; all events get consecutive
    positions from ``first_position``. ``created_at_us``: microseconds since
    2000-01-01 00:00 UTC. Raises ValueError on mismatched lengths, a version or position
    below 1, or int64 overflow.
    """

def bind_sql(query: str, params: Sequence[object]) -> str:
    """``query`` with each ``%s`` replaced by the SQL literal of the next of ``params``
    (``%%`` is ``%``): an int within int8, a str without NUL (``E'…'``), an aware datetime
    (``'…'::timestamptz``), None, or a list or tuple of those (``ARRAY[…]``, ``'{}'`` when
    empty). Raises ValueError for a query or value that cannot be bound, TypeError for a
    value of another type, OverflowError for an int outside int8."""

def insert_sql(
    requests: Sequence[AppendRequest],
    first_versions: Sequence[int],
    first_position: int,
    created_at: str,
) -> str:
    """``INSERT INTO events (…) VALUES (…), …;`` storing every event of ``requests``, with
    the versions and positions of ``encode_copy`` and ``created_at`` (the text of a
    timestamptz literal) for every row. Text values are ``E'…'`` constants. Raises ValueError
    as ``encode_copy`` does, and for a batch without events.
    """

def encode_events(
    copy_out: bytes, max_count: int, max_bytes: int
) -> tuple[bytes, int, int, int, bool]:
    """Serialized ``Event``s, each as a length-delimited field 1, from the binary COPY output
    of ``event_id, stream_id, stream_type, version, event_type, data, metadata, created_at,
    position``.

    Encodes at most ``max_count`` (>= 1) rows and stops before a row that would take the
    output over ``max_bytes`` (>= 0), but always encodes the first row. Returns
    ``(events, rows_encoded, last_version, last_position, more)``, last_* of the last encoded
    row (0 if none), ``more`` true when rows were left out. Raises ValueError on malformed
    COPY data (the whole input is checked) or a limit out of range.
    """

def encode_event_list(copy_out: bytes) -> list[tuple[int, int, str, str, str, bytes, bytes]]:
    """``(position, version, stream_id, stream_type, event_type, serialized Event,
    EventNotification carrying it)`` for every row of the same COPY output as encode_events
    (stream_id in canonical lower case; the Event without a field wrapper, the notification
    its ``event = 1`` field). Raises ValueError on malformed data."""

COPY_LOST: int
"""``Libpq.copy_out``'s status when the connection was lost while waiting for rows."""

class Libpq:
    """libpq's functions as seen from the shared object loaded into this process from
    ``path`` (psycopg's extension module: the lookup searches its dependencies, so it finds
    the libpq psycopg calls; never loaded here). OSError if it is not loaded, or a function
    is not found."""

    def __init__(self, path: str) -> None: ...
    def copy_out(self, pgconn_ptr: int) -> tuple[bytes, int]:
        """Every row of the COPY TO STDOUT in progress on the PGconn at ``pgconn_ptr`` (a
        psycopg ``PGconn.pgconn_ptr`` of this libpq, used by no one else until this returns),
        concatenated, read with the GIL released; and ``PQgetCopyData``'s last status: -1
        the COPY ended, -2 reading it failed, or ``COPY_LOST``: the connection was lost (for
        both, libpq's error message says why). OSError when waiting for the socket fails."""
