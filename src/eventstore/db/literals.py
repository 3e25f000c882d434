"""Parameters bound client-side as SQL literals, for the writer's multi-statement queries.

psycopg's `ClientCursor.mogrify` does the same through its adapters, and cost 0.2 ms of the
event loop per commit (arrays of uuids, names and versions, timestamps). The writer's
parameters are few kinds of value, so they are written here directly. Text is written as an
escape string constant, `E'…'`, with `\\` and `'` doubled: its meaning does not depend on
`standard_conforming_strings` (the same rule as the Rust extension's INSERT text). Text never
holds NUL (names and ids are validated before they get here); one that did is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

Literal = int | str | datetime | None | Sequence["Literal"]


def literal(value: Literal) -> str:
    """`value` as an SQL literal: an int, text, a timestamptz (an aware datetime), NULL, or an
    array of those (untyped: the query casts it, as in `%s::uuid[]`)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        raise TypeError("no booleans here")
    if isinstance(value, int):
        # A negative one in parentheses: `-9223372036854775808::int8` casts before it negates
        # (and overflows), and after a minus sign a bare `-5` would open a comment.
        return str(value) if value >= 0 else f"({value})"
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text cannot hold NUL")
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("a timestamptz needs an aware datetime")
        return f"'{value.isoformat()}'::timestamptz"
    if not value:
        return "'{}'"
    return "ARRAY[" + ",".join(literal(item) for item in value) + "]"


def bind(query: str, params: Sequence[Literal]) -> str:
    """`query` with each `%s` replaced by the literal of the next parameter (the query holds
    no other `%`)."""
    return query % tuple(literal(param) for param in params)
