"""I/O-free checks of read requests (the append request is checked by the Rust extension).

Each function raises `InvalidArgument` with a message naming the field and the rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from eventstore.errors import InvalidArgument

MAX_NAME_CHARS = 255


def _shown(value: str, limit: int = 64) -> str:
    return value if len(value) <= limit else value[:limit] + "…"


# API.md: "a UUID in canonical text form", in any letter case. `uuid.UUID` (and PostgreSQL)
# also read 32 bare digits, braces and URNs; the API does not (as the Rust parser of appends).
_CANONICAL_UUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_uuid(field: str, value: str) -> str:
    """The lower-case form of a UUID given in canonical text form, in any letter case."""
    if not value:
        raise InvalidArgument(f"{field}: required (a UUID)")
    if _CANONICAL_UUID.fullmatch(value) is None:
        raise InvalidArgument(f'{field}: not a UUID: "{_shown(value)}"')
    return value.lower()


def check_name(field: str, value: str) -> str:
    """A stream or event type: 1-255 characters, no NUL."""
    if not value or len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{field}: must be 1-{MAX_NAME_CHARS} characters, got {len(value)}")
    if "\x00" in value:
        raise InvalidArgument(f"{field}: must not contain the NUL character")
    return value


def page_size(field: str, value: int, default: int, maximum: int) -> int:
    """0 → the default; above the maximum → capped; negative → InvalidArgument."""
    if value < 0:
        raise InvalidArgument(f"{field}: must not be negative, got {value}")
    if value == 0:
        return default
    return min(value, maximum)


@dataclass(frozen=True)
class EventFilter:
    """ReadAll / SubscribeToAll filter; empty tuples mean no filtering on that field.

    `type_patterns` is not the client's: it is what the caller may read (stream-type patterns,
    `*` matching any run of characters), set by the server when the caller may read only some
    types."""

    stream_types: tuple[str, ...] = ()
    event_type_prefixes: tuple[str, ...] = ()
    type_patterns: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.stream_types and not self.event_type_prefixes and not self.type_patterns

    @cached_property
    def _type_regex(self) -> re.Pattern[str]:
        return type_pattern_regex(self.type_patterns)

    def matches(self, stream_type: str, event_type: str) -> bool:
        if self.stream_types and stream_type not in self.stream_types:
            return False
        if self.type_patterns and self._type_regex.match(stream_type) is None:
            return False
        return not self.event_type_prefixes or event_type.startswith(self.event_type_prefixes)

    def restricted_to(self, type_patterns: tuple[str, ...] | None) -> EventFilter:
        """This filter, narrowed to the stream types matching `type_patterns` (None: as is)."""
        if type_patterns is None:
            return self
        return EventFilter(self.stream_types, self.event_type_prefixes, type_patterns)


def type_pattern_regex(patterns: Sequence[str]) -> re.Pattern[str]:
    """One regular expression that matches (with `.match`) exactly the stream types that match
    one of `patterns` (`*` = any run of characters; no pattern, no match)."""
    parts = [".*".join(re.escape(piece) for piece in p.split("*")) for p in patterns]
    return re.compile("(?:" + "|".join(parts) + r")\Z" if parts else r"(?!)", re.DOTALL)


def like_pattern(pattern: str) -> str:
    """A stream-type pattern (`*` = any run of characters) as a LIKE pattern (backslash
    escapes, PostgreSQL's default)."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


def parse_filter(stream_types: Sequence[str], prefixes: Sequence[str]) -> EventFilter:
    for i, name in enumerate(stream_types):
        check_name(f"filter.stream_types[{i}]", name)
    for i, prefix in enumerate(prefixes):
        check_name(f"filter.event_type_prefixes[{i}]", prefix)
    return EventFilter(tuple(dict.fromkeys(stream_types)), tuple(dict.fromkeys(prefixes)))


@dataclass(frozen=True)
class StreamRange:
    """A validated GetEvents request."""

    stream_id: str
    stream_type: str
    first: int  # inclusive, ≥ 1
    last: int | None  # inclusive
    limit: int
    include_snapshot: bool


def parse_stream_range(stream_id: str, stream_type: str, from_version: int,
                       to_version: int | None, max_count: int, include_snapshot: bool,
                       *, default_page: int, max_page: int) -> StreamRange:
    sid = parse_uuid("stream_id", stream_id)
    check_name("stream_type", stream_type)
    if from_version < 0:
        raise InvalidArgument(f"from_version: must not be negative, got {from_version}")
    first = max(from_version, 1)
    if to_version is not None and to_version < first:
        raise InvalidArgument(
            f"to_version: must be at least from_version ({first}), got {to_version}"
        )
    limit = page_size("max_count", max_count, default_page, max_page)
    return StreamRange(sid, stream_type, first, to_version, limit, include_snapshot)


@dataclass(frozen=True)
class PositionRange:
    """A validated ReadAll request."""

    after: int  # exclusive
    limit: int
    filter: EventFilter


def parse_position_range(from_position: int, max_count: int, event_filter: EventFilter,
                         *, default_page: int, max_page: int) -> PositionRange:
    if from_position < 0:
        raise InvalidArgument(f"from_position: must not be negative, got {from_position}")
    limit = page_size("max_count", max_count, default_page, max_page)
    return PositionRange(from_position, limit, event_filter)


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching strings that start with `prefix` (escape: backslash)."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"
