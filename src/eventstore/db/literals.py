"""Parameters bound client-side as SQL literals, for the writer's multi-statement queries.

psycopg's `ClientCursor.mogrify` does the same through its adapters, and cost 0.2 ms of the
event loop per commit (arrays of uuids, names and versions, timestamps). The writer's
parameters are few kinds of value, so the Rust extension writes them directly
(`rust/es_codec/src/literals.rs`; in Python this was still a third of building a one-event
commit). Text is written as an escape string constant, `E'…'`, with `\\` and `'` doubled: its
meaning does not depend on `standard_conforming_strings` (the same rule as the Rust
extension's INSERT text). Text never holds NUL (names and ids are validated before they get
here); one that did is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from eventstore._es_codec import bind_sql

Literal = int | str | datetime | None | Sequence["Literal"]


def bind(query: str, params: Sequence[Literal]) -> str:
    """`query` with each `%s` replaced by the literal of the next parameter (`%%` is a `%`; the
    query holds no other `%`): an int within int8, text, a timestamptz (an aware datetime),
    NULL, or an array of those (untyped: the query casts it, as in `%s::uuid[]`). A value
    that cannot be bound raises TypeError or ValueError."""
    return bind_sql(query, params)
