"""Security (docs/design/security.md): API keys and their permissions on every RPC, filtered
reads, key reload / revocation / rotation, a broken keys file, the reserved caller key in event
metadata, the audit log, TLS and mTLS, and what /health/ready reports — through purerpc and
grpcio.

Every call goes to 127.0.0.1, every wait is bounded, nothing asserts on timing. A keys file is
re-read every API_KEYS_RELOAD_MS (100 ms here); tests that change it poll for the effect for at
most RELOAD_WAIT seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import socket
import ssl
import stat
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import h2.exceptions
import orjson
import psycopg
import purerpc
import pytest
import trio
import trustme
from cryptography import x509

from eventstore.auth.authenticator import Authenticator
from eventstore.auth.keyfile import allow_certificate, create_key, list_keys, revoke_key
from eventstore.errors import Unauthenticated
from eventstore.server import ServerInfo, serve
from eventstore.v1 import eventstore_pb2 as pb
from tests.clients import RpcError
from tests.conftest import PgCluster, make_settings
from tests.helpers import (
    append_request,
    get,
    health_check,
    new_event,
    read_all,
    read_stream,
    sid,
)
from tests.secure_clients import (
    CLIENTS,
    Metadata,
    Tls,
    bearer,
    first_note,
    open_client,
    status,
    x_api_key,
)

CALLER = "$eventstore.caller"
HOST_ADDR = "127.0.0.1"
RELOAD_MS = 100
RELOAD_WAIT = 5.0
VOCAB = "VocabularyItem"
PROGRESS = "Progress"
KEY_RE = re.compile(r"es_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


# -- servers, keys, waiting -----------------------------------------------------------------


async def start(nursery: trio.Nursery, database_url: str, **overrides: object) -> ServerInfo:
    settings = make_settings(database_url, **overrides)
    with trio.fail_after(30):
        info: ServerInfo = await nursery.start(serve, settings)
    return info


async def start_with_keys(nursery: trio.Nursery, database_url: str, keys: Path,
                          **overrides: object) -> ServerInfo:
    return await start(nursery, database_url, api_keys_file=str(keys),
                       api_keys_reload_ms=RELOAD_MS, **overrides)


@pytest.fixture(params=CLIENTS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return tmp_path / "keys.json"


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     seconds: float = RELOAD_WAIT) -> None:
    """Poll `check` until it holds; fail after `seconds`."""
    with trio.fail_after(seconds + 20):
        deadline = trio.current_time() + seconds
        while True:
            if await check():
                return
            if trio.current_time() > deadline:
                raise AssertionError(f"not within {seconds} s: {what}")
            await trio.sleep(0.05)


def count_events(database_url: str, stream_type: str | None = None) -> int:
    with psycopg.connect(database_url) as conn:
        if stream_type is None:
            row = conn.execute("SELECT count(*) FROM events").fetchone()
        else:
            row = conn.execute("SELECT count(*) FROM events WHERE stream_type = %s",
                               (stream_type,)).fetchone()
    assert row is not None
    return int(row[0])


async def stored_count(database_url: str, stream_type: str | None = None) -> int:
    return await trio.to_thread.run_sync(count_events, database_url, stream_type)


def read_file(path: Path) -> bytes:
    return path.read_bytes()


def write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def secret_of(key: str) -> str:
    """The secret part of `es_<16 hex>_<43 base64url>` (which may itself contain `_`)."""
    m = KEY_RE.fullmatch(key)
    assert m is not None, "not a key"
    return m.group(2)


def unknown_key() -> str:
    """Well-formed, but in no keys file."""
    return f"es_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def caller_of(event: pb.Event) -> Any:
    return orjson.loads(event.metadata).get(CALLER) if event.metadata else None


async def append_one(client: Any, stream_type: str = VOCAB, stream_id: str | None = None,
                     metadata: bytes = b"", creds: Metadata | None = None,
                     ) -> pb.AppendEventsResponse:
    return await client.call(
        "AppendEvents",
        append_request(stream_id or sid(), [new_event(metadata=metadata)],
                       stream_type=stream_type),
        creds)


async def call_status(client: Any, method: str, request: Any,
                      creds: Metadata | None = None) -> str:
    return (await status(client, method, request, creds))[0]


# -- the permission matrix ------------------------------------------------------------------

RPCS = ("AppendEvents", "SaveSnapshot", "GetEvents", "GetSnapshot", "SubscribeToStream",
        "ReadAll", "SubscribeToAll")
NEEDS = {"AppendEvents": "write", "SaveSnapshot": "write"}  # every other RPC needs read
# Permitted or forbidden, depending on the key: exact names, prefixes, suffixes, infixes.
TYPES = (VOCAB, "VocabularyItems", "MyVocabularyItem", PROGRESS)
PROFILES: dict[str, dict[str, Any]] = {
    "read": {"read": [VOCAB]},
    "write": {"write": [VOCAB]},
    "read_write": {"read": [VOCAB], "write": [VOCAB]},
    "pattern": {"read": ["Vocab*"], "write": ["Vocab*"]},
    "read_any_write_suffix": {"read": ["*"], "write": ["*Item"]},
    "admin": {"admin": True},
    "nothing": {},
}


def matches(patterns: list[str], stream_type: str) -> bool:
    """The spec's pattern rule: `*` matches any run of characters, everything else itself."""
    return any(re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), stream_type)
               for pattern in patterns)


def may(profile: dict[str, Any], what: str, stream_type: str) -> bool:
    return bool(profile.get("admin")) or matches(profile.get(what, []), stream_type)


def may_read_anything(profile: dict[str, Any]) -> bool:
    return bool(profile.get("admin")) or bool(profile.get("read"))


def request_for(rpc: str, stream_type: str, stream_id: str) -> Any:
    if rpc == "AppendEvents":
        return append_request(sid(), [new_event()], stream_type=stream_type)
    if rpc == "SaveSnapshot":
        return pb.SaveSnapshotRequest(stream_id=stream_id, stream_type=stream_type, version=1,
                                      data=b'{"snap": 1}')
    if rpc == "GetEvents":
        return pb.GetEventsRequest(stream_id=stream_id, stream_type=stream_type)
    if rpc == "GetSnapshot":
        return pb.GetSnapshotRequest(stream_id=stream_id, stream_type=stream_type)
    if rpc == "SubscribeToStream":
        return pb.SubscribeRequest(stream_type=stream_type, stream_id=stream_id)
    if rpc == "ReadAll":
        return pb.ReadAllRequest(filter=pb.Filter(stream_types=[stream_type]))
    assert rpc == "SubscribeToAll"
    return pb.SubscribeAllRequest(filter=pb.Filter(stream_types=[stream_type]))


async def seed(admin: Any, types: tuple[str, ...] = TYPES) -> dict[str, str]:
    """One stream with one event per type, written with an admin key."""
    streams = {}
    for stream_type in types:
        streams[stream_type] = sid()
        await append_one(admin, stream_type, streams[stream_type])
    return streams


def _any_key(keys: Path, name: str, rights: dict[str, Any]) -> tuple[str, str]:
    """create_key, also for a key with no permissions at all, which `keys create` refuses to
    make but a file edited by hand may hold."""
    if any(rights.values()):
        return create_key(keys, name, **rights)
    key_id, key = create_key(keys, name, read=["placeholder"])
    data = json.loads(keys.read_text())
    next(e for e in data["keys"] if e["id"] == key_id)["read"] = []
    keys.write_text(json.dumps(data))
    return key_id, key


@pytest.mark.parametrize(("profile", "header"),
                         [(p, "authorization") for p in PROFILES] + [("read_write",
                                                                     "x-api-key")])
async def test_permission_matrix(nursery: trio.Nursery, database_url: str, keys: Path,
                                 kind: str, profile: str, header: str) -> None:
    """Every RPC × a permitted and a forbidden stream type → OK or PERMISSION_DENIED, as the
    key's read / write / admin say; nothing is written by a refused call."""
    _, admin_key = create_key(keys, "admin-tool", admin=True)
    name = f"svc-{profile}"
    _, key = _any_key(keys, name, PROFILES[profile])
    info = await start_with_keys(nursery, database_url, keys)
    rights = PROFILES[profile]
    async with open_client(kind, info.port, bearer(admin_key)) as admin:
        streams = await seed(admin)
    creds = bearer(key) if header == "authorization" else x_api_key(key)
    expected: dict[tuple[str, str], str] = {}
    actual: dict[tuple[str, str], str] = {}
    messages: dict[tuple[str, str], str] = {}
    async with open_client(kind, info.port, creds) as client:
        for stream_type in TYPES:
            for rpc in RPCS:
                allowed = may(rights, NEEDS.get(rpc, "read"), stream_type)
                expected[rpc, stream_type] = "OK" if allowed else "PERMISSION_DENIED"
                code, message = await status(client, rpc,
                                             request_for(rpc, stream_type, streams[stream_type]))
                actual[rpc, stream_type], messages[rpc, stream_type] = code, message
        for rpc, request in (("ReadAll", pb.ReadAllRequest()),
                             ("SubscribeToAll", pb.SubscribeAllRequest())):
            expected[rpc, "(no filter)"] = ("OK" if may_read_anything(rights)
                                            else "PERMISSION_DENIED")
            code, message = await status(client, rpc, request)
            actual[rpc, "(no filter)"], messages[rpc, "(no filter)"] = code, message
    assert actual == expected
    for where, message in messages.items():
        rpc, stream_type = where
        assert key not in message
        if actual[where] == "PERMISSION_DENIED":
            # Names the caller, the operation (the RPC, or what it needs) and the type.
            assert name in message, message
            assert rpc in message or NEEDS.get(rpc, "read") in message.lower(), message
            if stream_type != "(no filter)":
                assert stream_type in message, message
    # Refused appends wrote nothing: one seeded event per type, one more where writing is
    # allowed.
    for stream_type in TYPES:
        wanted = 1 + (1 if may(rights, "write", stream_type) else 0)
        assert await stored_count(database_url, stream_type) == wanted, stream_type


def bad_credentials(key_id: str, key: str) -> dict[str, Metadata]:
    return {
        "none": (),
        "garbage": bearer("garbage"),
        "unknown": bearer(unknown_key()),
        "wrong_secret": bearer(f"es_{key_id}_{secrets.token_urlsafe(32)}"),
        "truncated": bearer(key[:-1]),
        "not_bearer": (("authorization", f"Basic {key}"),),
        "garbage_x_api_key": x_api_key("garbage"),
        "unknown_x_api_key": x_api_key(unknown_key()),
    }


async def test_missing_malformed_or_unknown_key_is_unauthenticated(
        nursery: trio.Nursery, database_url: str, keys: Path, kind: str) -> None:
    key_id, key = create_key(keys, "admin-tool", admin=True)
    info = await start_with_keys(nursery, database_url, keys)
    async with open_client(kind, info.port, bearer(key)) as admin:
        streams = await seed(admin, (VOCAB,))
        expected, actual = {}, {}
        for case, creds in bad_credentials(key_id, key).items():
            for rpc in RPCS:
                code, message = await status(admin, rpc, request_for(rpc, VOCAB, streams[VOCAB]),
                                             creds)
                expected[case, rpc], actual[case, rpc] = "UNAUTHENTICATED", code
                assert key not in message
            for rpc, request in (("ReadAll", pb.ReadAllRequest()),
                                 ("SubscribeToAll", pb.SubscribeAllRequest())):
                expected[case, rpc + "(no filter)"] = "UNAUTHENTICATED"
                actual[case, rpc + "(no filter)"] = await call_status(admin, rpc, request, creds)
        # Checked before the request is read: an invalid request is still UNAUTHENTICATED.
        bad = append_request("not-a-uuid", [new_event(data=b"{not json")])
        expected["none", "invalid request"] = "UNAUTHENTICATED"
        actual["none", "invalid request"] = await call_status(admin, "AppendEvents", bad, ())
        assert actual == expected
    assert await stored_count(database_url) == 1


async def test_credential_precedence_and_check_order(
        nursery: trio.Nursery, database_url: str, keys: Path, kind: str) -> None:
    """`authorization` wins over `x-api-key`; permissions are checked after validation."""
    _, admin_key = create_key(keys, "admin-tool", admin=True)
    _, reader = create_key(keys, "reader", read=[VOCAB])
    info = await start_with_keys(nursery, database_url, keys)
    async with open_client(kind, info.port) as client:
        both_ok = (*bearer(admin_key), *x_api_key("garbage"))
        assert await call_status(client, "AppendEvents", request_for("AppendEvents", VOCAB, ""),
                                 both_ok) == "OK"
        garbage_wins = (*bearer("garbage"), *x_api_key(admin_key))
        assert await call_status(client, "AppendEvents", request_for("AppendEvents", VOCAB, ""),
                                 garbage_wins) == "UNAUTHENTICATED"
        reader_wins = (*bearer(reader), *x_api_key(admin_key))
        assert await call_status(client, "AppendEvents", request_for("AppendEvents", VOCAB, ""),
                                 reader_wins) == "PERMISSION_DENIED"
        # A forbidden but invalid request: validation comes first.
        bad = append_request("not-a-uuid", [new_event()], stream_type=PROGRESS)
        assert await call_status(client, "AppendEvents", bad, bearer(reader)) == \
            "INVALID_ARGUMENT"
        bad_read = pb.GetEventsRequest(stream_id="not-a-uuid", stream_type=PROGRESS)
        assert await call_status(client, "GetEvents", bad_read, bearer(reader)) == \
            "INVALID_ARGUMENT"
    assert await stored_count(database_url) == 1


# -- ReadAll / SubscribeToAll with a key that may read only some types -------------------------

MIXED = (VOCAB, "VocabularyList", PROGRESS, "Deck", "Secret")
READABLE = {VOCAB, "VocabularyList", "Deck"}


async def write_mixed(admin: Any, rounds: int, tag: str) -> list[str]:
    """Interleaved appends of every type in MIXED; the event ids in commit order."""
    ids: list[str] = []
    streams = {t: sid() for t in MIXED}
    for r in range(rounds):
        for stream_type in MIXED:
            reply = await admin.call("AppendEvents", append_request(
                streams[stream_type],
                [new_event(f"{tag}{r}", data=b'{"r": %d}' % r) for _ in range(2)],
                stream_type=stream_type))
            ids.extend(reply.event_ids)
    return ids


async def test_read_all_returns_only_readable_types(
        nursery: trio.Nursery, database_url: str, keys: Path, kind: str) -> None:
    _, admin_key = create_key(keys, "admin-tool", admin=True)
    _, key = create_key(keys, "reader", read=["Vocab*", "Deck"], write=[PROGRESS])
    info = await start_with_keys(nursery, database_url, keys)
    async with open_client(kind, info.port, bearer(admin_key)) as admin, \
            open_client(kind, info.port, bearer(key)) as reader:
        await write_mixed(admin, 4, "Happened")
        everything = await read_all(admin)
        assert {e.stream_type for e in everything} == set(MIXED)
        visible = [e.event_id for e in everything if e.stream_type in READABLE]

        for page in (1000, 3):
            got = await read_all(reader, page=page)
            assert [e.event_id for e in got] == visible, f"page {page}"
        by_prefix = await read_all(reader, prefixes=("Happened1",))
        assert {e.stream_type for e in by_prefix} <= READABLE
        assert [e.event_id for e in by_prefix] == [
            e.event_id for e in everything
            if e.stream_type in READABLE and e.event_type == "Happened1"]
        only_deck = await read_all(reader, stream_types=("Deck",))
        assert [e.event_id for e in only_deck] == [e.event_id for e in everything
                                                   if e.stream_type == "Deck"]
        for forbidden in ((PROGRESS,), (VOCAB, PROGRESS), ("Secret", "Deck")):
            with pytest.raises(RpcError) as err:
                await read_all(reader, stream_types=forbidden)
            assert err.value.code == "PERMISSION_DENIED", forbidden
            code = await call_status(reader, "SubscribeToAll", pb.SubscribeAllRequest(
                include_existing=True, filter=pb.Filter(stream_types=forbidden)))
            assert code == "PERMISSION_DENIED", forbidden


@dataclass
class Received:
    events: list[pb.Event]
    caught_up: int = 0

    def add(self, note: pb.EventNotification) -> None:
        kind = note.WhichOneof("kind")
        if kind == "event":
            self.events.append(note.event)
        elif kind == "batch":
            self.events.extend(note.batch.events)
        elif kind == "caught_up":
            self.caught_up += 1


@pytest.mark.parametrize("batch", [1, 50])
async def test_subscribe_to_all_delivers_only_readable_types(
        nursery: trio.Nursery, database_url: str, keys: Path, kind: str, batch: int) -> None:
    """History and live events: only the readable types, every one of them, never another."""
    _, admin_key = create_key(keys, "admin-tool", admin=True)
    _, key = create_key(keys, "reader", read=["Vocab*", "Deck"])
    info = await start_with_keys(nursery, database_url, keys)
    async with open_client(kind, info.port, bearer(admin_key)) as admin, \
            open_client(kind, info.port, bearer(key)) as reader:
        await write_mixed(admin, 3, "Old")
        got = Received([])
        request = pb.SubscribeAllRequest(include_existing=True, max_batch_size=batch,
                                         checkpoint_interval_ms=50)
        with trio.fail_after(30):
            async with reader.stream("SubscribeToAll", request) as notes:
                for _ in range(10_000):
                    got.add(await notes.next())
                    if got.caught_up:
                        break
                await write_mixed(admin, 3, "Live")
                sentinel = (await append_one(admin, "Deck")).event_ids[0]
                for _ in range(10_000):
                    if sentinel in {e.event_id for e in got.events}:
                        break
                    got.add(await notes.next())
                else:
                    raise AssertionError("the sentinel never arrived")
        everything = await read_all(admin)
    assert {e.stream_type for e in got.events} <= READABLE
    assert [e.event_id for e in got.events] == [e.event_id for e in everything
                                               if e.stream_type in READABLE]
    assert got.caught_up == 1


# -- reload, revocation, rotation -------------------------------------------------------------


async def test_revocation_rotation_and_new_keys_take_effect_without_restart(
        nursery: trio.Nursery, database_url: str, keys: Path, kind: str) -> None:
    old_id, old = create_key(keys, "svc", read=[VOCAB], write=[VOCAB])
    new_id, new = create_key(keys, "svc", read=[VOCAB], write=[VOCAB])
    info = await start_with_keys(nursery, database_url, keys)
    stream = sid()
    async with open_client(kind, info.port) as client:
        # Rotation: both keys of the name work.
        await append_one(client, stream_id=stream, creds=bearer(old))
        await append_one(client, stream_id=stream, creds=bearer(new))

        assert revoke_key(keys, old_id) is True
        assert revoke_key(keys, "0123456789abcdef") is False

        async def old_refused() -> bool:
            code = await call_status(client, "GetEvents", pb.GetEventsRequest(
                stream_id=stream, stream_type=VOCAB), bearer(old))
            assert code in ("OK", "UNAUTHENTICATED"), code
            return code == "UNAUTHENTICATED"

        await eventually(old_refused, "the revoked key is refused")
        # The other key of the same name keeps working.
        await append_one(client, stream_id=stream, creds=bearer(new))
        stored = await read_stream(_With(client, bearer(new)), stream)
        assert [caller_of(e) for e in stored] == [
            {"name": "svc"}] * 3  # the key's id is in the audit line, not in the event
        # Every RPC refuses the revoked key.
        for rpc in RPCS:
            assert await call_status(client, rpc, request_for(rpc, VOCAB, stream),
                                     bearer(old)) == "UNAUTHENTICATED", rpc

        entries = {e.id: e for e in list_keys(keys)}
        assert entries[old_id].revoked_at is not None
        assert entries[new_id].revoked_at is None

        # A key created while the server runs starts working; a changed key changes.
        assert await call_status(client, "GetEvents", pb.GetEventsRequest(
            stream_id=stream, stream_type=VOCAB), bearer(unknown_key())) == "UNAUTHENTICATED"
        late_id, late = create_key(keys, "late", read=[VOCAB])

        async def late_reads() -> bool:
            code = await call_status(client, "GetEvents", pb.GetEventsRequest(
                stream_id=stream, stream_type=VOCAB), bearer(late))
            assert code in ("OK", "UNAUTHENTICATED"), code
            return code == "OK"

        await eventually(late_reads, "a key created while the server runs works")
        assert await call_status(client, "AppendEvents", request_for("AppendEvents", VOCAB, ""),
                                 bearer(late)) == "PERMISSION_DENIED"
        edit_key(keys, late_id, write=[VOCAB])

        async def late_writes() -> bool:
            code = await call_status(client, "AppendEvents",
                                     request_for("AppendEvents", VOCAB, ""), bearer(late))
            assert code in ("OK", "PERMISSION_DENIED"), code
            return code == "OK"

        await eventually(late_writes, "a changed key's new permission applies")


def edit_key(path: Path, key_id: str, **changes: object) -> None:
    """Change a key's entry by hand (in place, as an operator's editor might)."""
    content = json.loads(path.read_text())
    for entry in content["keys"]:
        if entry["id"] == key_id:
            entry.update(changes)
    path.write_text(json.dumps(content, indent=2))


class _With:
    """A client that always sends the given credentials (for tests.helpers' readers)."""

    def __init__(self, client: Any, creds: Metadata) -> None:
        self._client = client
        self._creds = creds

    async def call(self, method: str, request: Any) -> Any:
        return await self._client.call(method, request, self._creds)


async def test_retry_from_another_key_of_the_same_name_is_recognised(
        nursery: trio.Nursery, database_url: str, keys: Path, kind: str) -> None:
    _, first = create_key(keys, "svc", read=[VOCAB], write=[VOCAB])
    _, second = create_key(keys, "svc", read=[VOCAB], write=[VOCAB])
    _, other = create_key(keys, "other", read=[VOCAB], write=[VOCAB])
    info = await start_with_keys(nursery, database_url, keys)
    stream = sid()
    evs = [new_event(event_id=str(uuid.uuid4()), metadata=b'{"m": 1}'),
           new_event(event_id=str(uuid.uuid4()))]
    request = append_request(stream, evs, expected=0)
    async with open_client(kind, info.port) as client:
        original = await client.call("AppendEvents", request, bearer(first))
        assert await client.call("AppendEvents", request, bearer(first)) == original
        assert await client.call("AppendEvents", request, bearer(second)) == original
        # Another caller's request with the same ids is a different event.
        code = await call_status(client, "AppendEvents", request, bearer(other))
        assert code == "ALREADY_EXISTS"
    assert await stored_count(database_url) == 2


# -- a broken keys file -------------------------------------------------------------------------


def corrupt(path: Path, how: str, readonly_id: str) -> None:
    if how == "not_json":
        path.write_text('{"keys": [')
    elif how == "empty":
        path.write_text("")
    elif how == "wrong_shape":
        path.write_text('{"keys": 5, "certificates": "all"}')
    elif how == "removed":
        path.unlink()
    else:
        # Valid JSON that grants the read-only key admin, but with one entry broken: the whole
        # file is refused, the read-only key stays read-only.
        assert how == "bad_entry_grants_admin"
        content = json.loads(path.read_text())
        for entry in content["keys"]:
            if entry["id"] == readonly_id:
                entry["admin"] = True
            else:
                entry["hash"] = "md5:nothex"
        path.write_text(json.dumps(content))


@pytest.mark.parametrize("how", ["not_json", "empty", "wrong_shape", "removed",
                                 "bad_entry_grants_admin"])
async def test_a_broken_keys_file_keeps_the_previous_keys(
        nursery: trio.Nursery, database_url: str, keys: Path, kind: str, how: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    _, writer = create_key(keys, "writer", read=[VOCAB], write=[VOCAB])
    reader_id, reader = create_key(keys, "reader", read=[VOCAB])
    good = read_file(keys)
    info = await start_with_keys(nursery, database_url, keys)
    async with open_client(kind, info.port) as client:
        await append_one(client, creds=bearer(writer))
        seen = len(caplog.records)
        corrupt(keys, how, reader_id)

        async def complained() -> bool:
            return any(r.levelno >= logging.WARNING and r.name.startswith("eventstore")
                       for r in caplog.records[seen:])

        await eventually(complained, "the broken keys file is logged as an error")
        # Several reload intervals later the previous keys are still in force.
        await trio.sleep(3 * RELOAD_MS / 1000)
        await append_one(client, creds=bearer(writer))
        assert await call_status(client, "AppendEvents", request_for("AppendEvents", VOCAB, ""),
                                 bearer(reader)) == "PERMISSION_DENIED"
        assert await call_status(client, "AppendEvents", request_for("AppendEvents", PROGRESS,
                                                                     ""),
                                 bearer(writer)) == "PERMISSION_DENIED"
        for creds in ((), bearer("garbage"), bearer(unknown_key())):
            for rpc in ("AppendEvents", "GetEvents", "ReadAll"):
                assert await call_status(client, rpc, request_for(rpc, VOCAB, sid()),
                                         creds) == "UNAUTHENTICATED", (rpc, creds)
        # A repaired file is picked up again.
        write_file(keys, good)
        _, late = create_key(keys, "late", read=[VOCAB])

        async def late_works() -> bool:
            return await call_status(client, "GetEvents", request_for("GetEvents", VOCAB, sid()),
                                     bearer(late)) == "OK"

        await eventually(late_works, "a key added to the repaired file works")
    assert await stored_count(database_url) == 2


@pytest.mark.parametrize("how", ["not_json", "wrong_shape", "bad_hash"])
async def test_an_invalid_keys_file_stops_start_up(database_url: str, keys: Path,
                                                   how: str) -> None:
    write_file(keys, {"not_json": b"{nope", "wrong_shape": b'{"keys": {"a": 1}}',
                      "bad_hash": b'{"keys": [{"id": "0123456789abcdef", "name": "x", '
                                  b'"hash": "sha256:00"}]}'}[how])
    message = await start_up_failure(make_settings_or_error(database_url,
                                                            api_keys_file=str(keys)))
    assert message, "the server started with an invalid keys file"
    assert keys.name in message


async def test_a_missing_keys_file_never_opens_the_server(
        nursery: trio.Nursery, database_url: str, keys: Path, kind: str) -> None:
    """API_KEYS_FILE names no file: start-up stops naming it, or every call is refused."""
    message = await start_up_failure(make_settings_or_error(database_url,
                                                            api_keys_file=str(keys)))
    if message:
        assert keys.name in message
        return
    info = await start_with_keys(nursery, database_url, keys)
    async with open_client(kind, info.port) as client:
        for rpc in RPCS:
            assert await call_status(client, rpc, request_for(rpc, VOCAB, sid())) == \
                "UNAUTHENTICATED", rpc
    assert await stored_count(database_url) == 0


def make_settings_or_error(database_url: str, **overrides: object) -> Any:
    """Settings, or the error (with its message) that loading them raised."""
    try:
        return make_settings(database_url, **overrides)
    except Exception as exc:  # ConfigError or whatever names the bad setting
        return exc


async def start_up_failure(settings: Any) -> str:
    """The message with which start-up stops ("" when the server started)."""
    if isinstance(settings, Exception):
        return str(settings)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, settings)
                nursery.cancel_scope.cancel()
    except trio.TooSlowError:
        raise
    except Exception as exc:  # the message is what matters, whatever the exception type
        return " ".join(str(e) for e in leaves(exc))
    return ""


# -- the reserved caller key --------------------------------------------------------------------

FORGED = (
    b'{"$eventstore.caller": {"name": "admin"}}',
    b'{"a": 1, "$eventstore.caller": null}',
    b'{"\\u0024eventstore.caller": {"name": "admin"}}',
    b'{"\\u0024eventstore\\u002ecaller": 1}',
    b'{"$eventstore\\u002Ecaller": "x"}',
    b'{"\\u0024\\u0065ventstore.caller": []}',
)


@pytest.mark.parametrize("mode", ["api_keys", "open"])
async def test_forged_caller_key_is_invalid_and_writes_nothing(
        nursery: trio.Nursery, database_url: str, keys: Path, kind: str, mode: str) -> None:
    creds: Metadata = ()
    if mode == "api_keys":
        _, admin_key = create_key(keys, "admin-tool", admin=True)
        creds = bearer(admin_key)
        info = await start_with_keys(nursery, database_url, keys)
    else:
        info = await start(nursery, database_url)
    async with open_client(kind, info.port, creds) as client:
        for metadata in FORGED:
            stream = sid()
            for evs in ([new_event(metadata=metadata)],
                        [new_event(), new_event(metadata=metadata), new_event()]):
                with pytest.raises(RpcError) as err:
                    await client.call("AppendEvents", append_request(stream, evs))
                assert err.value.code == "INVALID_ARGUMENT", metadata
            reply = await client.call("GetEvents", pb.GetEventsRequest(stream_id=stream,
                                                                       stream_type=VOCAB))
            assert reply.stream_version == 0 and not reply.events
        # The same key nested deeper is the client's own business.
        nested = await append_one(client, metadata=b'{"x": {"$eventstore.caller": 1}}')
        assert nested.next_expected_version == 1
    assert await stored_count(database_url) == 1


async def test_open_mode_adds_no_caller(nursery: trio.Nursery, database_url: str,
                                        kind: str) -> None:
    info = await start(nursery, database_url)
    async with open_client(kind, info.port) as client:
        stream = sid()
        await append_one(client, stream_id=stream)
        await append_one(client, stream_id=stream, metadata=b'{"a": 1}')
        stored = await read_stream(client, stream)
    assert stored[0].metadata == b""
    assert orjson.loads(stored[1].metadata) == {"a": 1}


async def test_caller_is_recorded_in_metadata_and_audit_log(
        nursery: trio.Nursery, database_url: str, keys: Path, kind: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="eventstore")
    key_id, key = create_key(keys, "vocabulary", read=[VOCAB], write=[VOCAB])
    info = await start_with_keys(nursery, database_url, keys)
    stream = sid()
    client_metadata = {"correlation_id": "c-1", "causation": {"n": [1, 2]}, "user": "ann"}
    async with open_client(kind, info.port, bearer(key)) as client:
        reply = await client.call("AppendEvents", append_request(stream, [
            new_event("WithMetadata", metadata=orjson.dumps(client_metadata)),
            new_event("WithoutMetadata"),
            new_event("EmptyObject", metadata=b"{}"),
        ]))
        await client.call("SaveSnapshot", pb.SaveSnapshotRequest(
            stream_id=stream, stream_type=VOCAB, version=3, data=b'{"s": 1}'))
        # A refused call, and a call with a bad key: still no key text anywhere.
        await call_status(client, "AppendEvents", request_for("AppendEvents", PROGRESS, ""))
        await call_status(client, "GetEvents", request_for("GetEvents", VOCAB, stream),
                          bearer(key[:-2] + "xx"))
        stored = await read_stream(client, stream)
        via_read_all = await read_all(client)
    # The name only: the key's id is in the audit line (security.md, "The caller in event
    # metadata"), so a retry with another key of the same service is still a retry.
    caller = {"name": "vocabulary"}
    assert [orjson.loads(e.metadata) for e in stored] == [
        {**client_metadata, CALLER: caller}, {CALLER: caller}, {CALLER: caller}]
    assert [e.event_id for e in stored] == list(reply.event_ids)
    assert [e.metadata for e in via_read_all] == [e.metadata for e in stored]

    audit = [r for r in caplog.records if r.name == "eventstore.audit"]
    writes = [r for r in audit if getattr(r, "operation", None) in ("append", "snapshot_save")
              and getattr(r, "outcome", None) == "ok"]
    assert len(writes) == 2, [vars(r) for r in audit]
    for r in writes:
        assert getattr(r, "caller", None) == "vocabulary"
        assert getattr(r, "caller_key_id", None) == key_id
        assert str(getattr(r, "peer", "")).startswith("127.0.0.1")
    # The call with a bad key is in the audit log too, with where it came from.
    refused = [r for r in audit if getattr(r, "outcome", None) == "Unauthenticated"]
    assert [getattr(r, "operation", None) for r in refused] == ["GetEvents"]
    assert str(getattr(refused[0], "peer", "")).startswith("127.0.0.1")
    assert caplog.records
    for r in caplog.records:
        assert key not in r.getMessage()
        assert key not in str(vars(r))
        assert secret_of(key) not in str(vars(r))


async def test_open_mode_audit_caller_is_anonymous(
        nursery: trio.Nursery, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="eventstore.audit")
    info = await start(nursery, database_url)
    async with open_client("purerpc", info.port) as client:
        await append_one(client)
    audit = [r for r in caplog.records if r.name == "eventstore.audit"]
    assert len(audit) == 1
    assert getattr(audit[0], "caller", None) == "anonymous"
    assert str(getattr(audit[0], "peer", "")).startswith("127.0.0.1")


async def test_injected_caller_does_not_count_towards_max_event_bytes(
        nursery: trio.Nursery, database_url: str, pg_cluster: PgCluster, keys: Path) -> None:
    _, admin_key = create_key(keys, "a-rather-long-service-name-for-the-caller", admin=True)
    limit = 400
    open_info = await start(nursery, database_url, max_event_bytes=limit)
    keyed_info = await start_with_keys(nursery, pg_cluster.fresh_database(), keys,
                                       max_event_bytes=limit)

    async def largest_accepted(client: Any) -> int:
        async def accepted(n: int) -> bool:
            data = b'{"x": "' + b"x" * n + b'"}'
            code = await call_status(client, "AppendEvents",
                                     append_request(sid(), [new_event(data=data)]))
            assert code in ("OK", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"), code
            return code == "OK"

        lo, hi = 0, limit + 10  # accepted(lo), not accepted(hi)
        assert await accepted(lo) and not await accepted(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if await accepted(mid):
                lo = mid
            else:
                hi = mid
        return lo

    async with open_client("purerpc", open_info.port) as open_client_, \
            open_client("purerpc", keyed_info.port, bearer(admin_key)) as keyed:
        assert await largest_accepted(keyed) == await largest_accepted(open_client_)


# -- the keys file and the CLI ------------------------------------------------------------------


def test_keyfile_functions_store_only_hashes(keys: Path) -> None:
    key_id, key = create_key(keys, "vocabulary", read=[VOCAB, "Learning*"], write=[VOCAB])
    admin_id, admin_key = create_key(keys, "ops", admin=True)
    m = KEY_RE.fullmatch(key)
    assert m is not None and m.group(1) == key_id
    assert KEY_RE.fullmatch(admin_key) is not None
    assert key_id != admin_id and key != admin_key
    text = keys.read_text()
    assert key not in text and admin_key not in text
    assert secret_of(key) not in text
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o600
    content = json.loads(text)
    entries = {e["id"]: e for e in content["keys"]}
    entry = entries[key_id]
    assert entry["name"] == "vocabulary"
    assert entry["hash"] == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert entry["read"] == [VOCAB, "Learning*"] and entry["write"] == [VOCAB]
    assert entry["admin"] is False and entry["revoked_at"] is None and entry["created_at"]
    assert entries[admin_id]["admin"] is True

    listed = {e.id: e for e in list_keys(keys)}
    assert set(listed) == {key_id, admin_id}
    assert listed[key_id].name == "vocabulary"
    assert revoke_key(keys, key_id) is True
    listed = {e.id: e for e in list_keys(keys)}
    assert listed[key_id].revoked_at is not None  # kept, with its history
    assert listed[admin_id].revoked_at is None

    allow_certificate(keys, "CN=progress,OU=services,O=example", "progress", read=["*"],
                      write=[PROGRESS])
    certs = json.loads(keys.read_text())["certificates"]
    assert certs == [{"subject": "CN=progress,OU=services,O=example", "name": "progress",
                      "read": ["*"], "write": [PROGRESS], "admin": False}]


async def run_cli(*args: str, env: dict[str, str] | None = None) -> str:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "eventstore", "keys", *args], capture_stdout=True,
            capture_stderr=True, check=False, env={**os.environ, **(env or {})})
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return bytes(done.stdout).decode()


async def test_cli_create_list_revoke(nursery: trio.Nursery, database_url: str,
                                      keys: Path) -> None:
    out = await run_cli("create", "vocabulary", "--read", VOCAB, "--write", VOCAB,
                        "--file", str(keys))
    found = KEY_RE.findall(out)
    assert len(found) == 1, out  # printed once
    key = KEY_RE.search(out).group(0)  # type: ignore[union-attr]
    key_id = found[0][0]
    text = read_file(keys).decode()
    assert key not in text
    assert "sha256:" + hashlib.sha256(key.encode()).hexdigest() in text
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o600

    listing = await run_cli("list", "--file", str(keys))
    assert key_id in listing and "vocabulary" in listing and key not in listing
    as_json = await run_cli("list", "--json", env={"API_KEYS_FILE": str(keys)})
    assert key_id in json.dumps(json.loads(as_json)) and key not in as_json
    await run_cli("allow-certificate", "CN=progress,O=example", "--name", "progress",
                  "--read", "*", "--file", str(keys))
    assert json.loads(read_file(keys))["certificates"][0]["name"] == "progress"
    listing = await run_cli("list", "--file", str(keys))
    assert "certificate 'CN=progress,O=example'  progress" in listing
    assert "read=* write=-" in listing.splitlines()[-1]
    as_json = json.loads(await run_cli("list", "--json", "--file", str(keys)))
    assert [k["id"] for k in as_json["keys"]] == [key_id]
    assert as_json["certificates"] == [{"subject": "CN=progress,O=example", "name": "progress",
                                        "read": ["*"], "write": [], "admin": False}]
    # An entry that could call nothing is refused (a mistake: it would only confuse).
    for command in (["create", "nobody"], ["allow-certificate", "CN=x", "--name", "x"]):
        with trio.fail_after(60):
            done = await trio.run_process(
                [sys.executable, "-m", "eventstore", "keys", *command, "--file", str(keys)],
                capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode != 0 and b"would have no permissions" in done.stderr
    assert len(list_keys(keys)) == 1

    info = await start_with_keys(nursery, database_url, keys)
    async with open_client("purerpc", info.port, bearer(key)) as client:
        await append_one(client)
        await run_cli("revoke", key_id, "--file", str(keys))
        assert next(e for e in list_keys(keys) if e.id == key_id).revoked_at is not None

        async def refused() -> bool:
            return await call_status(client, "ReadAll", pb.ReadAllRequest()) == \
                "UNAUTHENTICATED"

        await eventually(refused, "the key revoked through the CLI is refused")


# -- TLS and mTLS -------------------------------------------------------------------------------


@dataclass
class Pki:
    cert_file: Path
    key_file: Path
    ca_file: Path
    client: Tls  # CN=progress,OU=services,O=example
    stranger: Tls  # same CA, another subject
    foreign: Tls  # the same subject, from another CA
    anonymous: Tls  # no client certificate
    subject: str
    stranger_subject: str


def _client_tls(ca: trustme.CA, ca_file: Path, tmp: Path, name: str, common_name: str,
                ) -> tuple[Tls, str]:
    leaf = ca.issue_cert(f"{common_name}.example", common_name=common_name,
                         organization_unit_name="services", organization_name="example")
    cert_file, key_file = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_file.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_file))
    subject = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).subject
    return Tls(ca_file, cert_file, key_file), subject.rfc4514_string()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other_ca = trustme.CA(), trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(b"".join(p.bytes() for p in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(key_file))
    client, subject = _client_tls(ca, ca_file, tmp_path, "client", "progress")
    stranger, stranger_subject = _client_tls(ca, ca_file, tmp_path, "stranger", "stranger")
    foreign, foreign_subject = _client_tls(other_ca, ca_file, tmp_path, "foreign", "progress")
    assert subject == foreign_subject == "CN=progress,OU=services,O=example"
    return Pki(cert_file, key_file, ca_file, client, stranger, foreign, Tls(ca_file),
               subject, stranger_subject)


def tls_settings(pki: Pki, mtls: bool) -> dict[str, object]:
    out: dict[str, object] = {"tls_cert_file": str(pki.cert_file),
                              "tls_key_file": str(pki.key_file)}
    if mtls:
        out["tls_client_ca_file"] = str(pki.ca_file)
    return out


def leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


TRANSPORT_FAILURES = (OSError, anyio.BrokenResourceError, anyio.EndOfStream,
                      anyio.ClosedResourceError, h2.exceptions.H2Error,
                      purerpc.grpclib.exceptions.ProtocolError,
                      purerpc.grpclib.exceptions.StreamClosedError)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def server_closes(port: int, tls: Tls | None) -> str:
    """Speak HTTP/2 to the port (over TLS with `tls`'s CA and certificate, if given); how the
    server ended the connection. It must end it without a byte of HTTP/2 in reply."""
    with socket.create_connection((HOST_ADDR, port), timeout=10) as raw:
        try:
            if tls is None:
                conn: socket.socket = raw
            else:
                conn = tls.ssl_context().wrap_socket(raw, server_hostname=HOST_ADDR)
            conn.sendall(H2_PREFACE)
            reply = conn.recv(4096)
        except (ssl.SSLError, ConnectionError) as exc:
            return repr(exc)
    assert reply == b"", f"the server answered: {reply[:40]!r}"
    return "EOF"


async def assert_refused(kind: str, port: int, tls: Tls | None, creds: Metadata = ()) -> None:
    """A call that must fail at the transport (handshake), never reach a handler, never hang.

    purerpc 0.8's client does not notice that the server closed the connection (its reader
    returns silently on EOF and pending calls wait forever), so when its call neither succeeds
    nor fails within a second, the server's side is checked with a raw socket: it must close
    the connection without an HTTP/2 reply."""
    try:
        with trio.fail_after(20):
            with trio.move_on_after(1 if kind == "purerpc" else 20) as bound:
                async with open_client(kind, port, creds, tls) as client:
                    await client.call("AppendEvents", request_for("AppendEvents", VOCAB, ""))
            if bound.cancelled_caught:
                assert kind == "purerpc", f"{kind}: the refused connection hung"
                await trio.to_thread.run_sync(server_closes, port, tls)
                return
    except trio.TooSlowError:
        raise AssertionError(f"{kind}: the refused connection hung") from None
    except BaseException as exc:
        for leaf in leaves(exc):
            if isinstance(leaf, trio.Cancelled | KeyboardInterrupt):
                raise
            if isinstance(leaf, RpcError):
                assert leaf.code == "UNAVAILABLE", f"{kind}: {leaf}"
            else:
                assert isinstance(leaf, TRANSPORT_FAILURES), f"{kind}: {leaf!r}"
        return
    raise AssertionError(f"{kind}: the call succeeded")


async def test_tls_serves_both_clients(nursery: trio.Nursery, database_url: str, pki: Pki,
                                       kind: str) -> None:
    info = await start(nursery, database_url, **tls_settings(pki, mtls=False))
    stream = sid()
    async with open_client(kind, info.port, tls=pki.anonymous) as client:
        await append_one(client, stream_id=stream)
        stored = await read_stream(client, stream)
        note = await first_note(client, "SubscribeToAll", pb.SubscribeAllRequest(
            include_existing=True))
    assert len(stored) == 1 and stored[0].metadata == b""  # open mode: nothing added
    assert note.WhichOneof("kind") is not None
    # Plaintext to the TLS port fails, bounded, and reaches no handler.
    await assert_refused(kind, info.port, None)
    assert await stored_count(database_url) == 1
    assert info.http_port
    _, body, _ = await get(info.http_port, "/health/ready")
    ready = orjson.loads(body)
    assert ready["authentication"] == "open" and ready["tls"] is True


def negotiated(port: int, ca_file: Path) -> tuple[str | None, str | None]:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.selected_alpn_protocol(), tls.version()


async def test_tls_negotiates_h2_and_tls12_or_later(nursery: trio.Nursery, database_url: str,
                                                    pki: Pki) -> None:
    info = await start(nursery, database_url, **tls_settings(pki, mtls=False))
    alpn, version = await trio.to_thread.run_sync(negotiated, info.port, pki.ca_file)
    assert alpn == "h2"
    assert version in ("TLSv1.2", "TLSv1.3")


async def test_mtls_without_keys_identifies_callers_by_certificate(
        nursery: trio.Nursery, database_url: str, pki: Pki, kind: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="eventstore.audit")
    info = await start(nursery, database_url, **tls_settings(pki, mtls=True))
    caller = {"name": "progress", "subject": pki.subject}
    stream = sid()
    async with open_client(kind, info.port, tls=pki.client) as client:
        # Full permissions, every type.
        for stream_type in (VOCAB, PROGRESS):
            await append_one(client, stream_type, stream)
        await append_one(client, VOCAB, stream, metadata=b'{"k": "v"}')
        stored = await read_stream(client, stream)
        progress = await read_stream(client, stream, PROGRESS)
        assert len(await read_all(client)) == 3
        with pytest.raises(RpcError) as err:
            await append_one(client, metadata=b'{"\\u0024eventstore.caller": 1}')
        assert err.value.code == "INVALID_ARGUMENT"
    assert [orjson.loads(e.metadata) for e in stored] == [
        {CALLER: caller}, {"k": "v", CALLER: caller}]
    assert caller_of(progress[0]) == caller
    audit = [r for r in caplog.records if r.name == "eventstore.audit"
             and getattr(r, "outcome", None) == "ok"]
    assert audit and all(getattr(r, "caller", None) == "progress" and
                         getattr(r, "caller_subject", None) == pki.subject for r in audit)

    for refused in (pki.anonymous, pki.foreign, None):
        await assert_refused(kind, info.port, refused)
    assert await stored_count(database_url) == 3
    assert info.http_port
    _, body, _ = await get(info.http_port, "/health/ready")
    ready = orjson.loads(body)
    assert ready["authentication"] == "mtls" and ready["tls"] is True


async def test_mtls_with_keys_listed_certificates_and_keys(
        nursery: trio.Nursery, database_url: str, pki: Pki, keys: Path, kind: str) -> None:
    _, admin_key = create_key(keys, "admin-tool", admin=True)
    _, key = create_key(keys, "vocabulary", read=[VOCAB], write=[VOCAB])
    allow_certificate(keys, pki.subject, "progress", read=["*"], write=[PROGRESS])
    info = await start_with_keys(nursery, database_url, keys, **tls_settings(pki, mtls=True))
    stream = sid()
    async with open_client(kind, info.port, tls=pki.client) as progress, \
            open_client(kind, info.port, tls=pki.stranger) as stranger:
        # A listed subject without a key: that entry's permissions.
        await append_one(progress, PROGRESS, stream)
        assert await call_status(progress, "AppendEvents",
                                 request_for("AppendEvents", VOCAB, "")) == "PERMISSION_DENIED"
        assert await call_status(progress, "ReadAll", pb.ReadAllRequest()) == "OK"
        stored = await read_stream(progress, stream, PROGRESS)
        assert caller_of(stored[0]) == {"name": "progress", "subject": pki.subject}
        # A key that is present decides, even with a listed certificate.
        assert await call_status(progress, "ReadAll", pb.ReadAllRequest(),
                                 bearer("garbage")) == "UNAUTHENTICATED"
        assert await call_status(progress, "AppendEvents",
                                 request_for("AppendEvents", PROGRESS, ""),
                                 bearer(key)) == "PERMISSION_DENIED"
        vocab_stream = sid()
        await append_one(progress, VOCAB, vocab_stream, creds=bearer(key))
        # An unlisted subject: no key → UNAUTHENTICATED; with a key → the key's identity.
        for rpc in RPCS:
            assert await call_status(stranger, rpc, request_for(rpc, PROGRESS, stream)) == \
                "UNAUTHENTICATED", rpc
        await append_one(stranger, VOCAB, vocab_stream, creds=bearer(key))
        by_key = await read_stream(_With(stranger, bearer(admin_key)), vocab_stream)
        assert [caller_of(e) for e in by_key] == [{"name": "vocabulary"}] * 2
    # mTLS is still required.
    for refused in (pki.anonymous, pki.foreign):
        await assert_refused(kind, info.port, refused, bearer(admin_key))
    assert await stored_count(database_url) == 3
    assert info.http_port
    _, body, _ = await get(info.http_port, "/health/ready")
    ready = orjson.loads(body)
    assert ready["authentication"] == "api_keys" and ready["tls"] is True


async def test_tls_settings_come_in_pairs(database_url: str, pki: Pki) -> None:
    for partial in ({"tls_cert_file": str(pki.cert_file)},
                    {"tls_key_file": str(pki.key_file)},
                    {"tls_client_ca_file": str(pki.ca_file)}):
        message = await start_up_failure(make_settings_or_error(database_url, **partial))
        assert "TLS_" in message, (partial, message)


async def test_serve_stops_with_a_message_when_tls_files_cannot_be_read(
        database_url: str, tmp_path: Path) -> None:
    """`eventstore serve` with settings it cannot use exits 2 saying why (the error is raised
    inside the server's nursery: not a traceback of an exception group)."""
    env = {**os.environ, "DATABASE_URL": database_url, "HOST": "127.0.0.1", "PORT": "0",
           "HTTP_PORT": "0", "TLS_CERT_FILE": str(tmp_path / "missing.pem"),
           "TLS_KEY_FILE": str(tmp_path / "missing.key")}
    with trio.fail_after(60):
        done = await trio.run_process([sys.executable, "-m", "eventstore", "serve"],
                                      capture_stdout=True, capture_stderr=True, check=False,
                                      env=env)
    stderr = bytes(done.stderr).decode()
    assert done.returncode == 2, stderr
    assert "eventstore: invalid configuration: TLS_CERT_FILE" in stderr
    assert "Traceback" not in stderr


# -- health ---------------------------------------------------------------------------------


async def test_ready_reports_authentication_and_health_needs_no_key(
        nursery: trio.Nursery, database_url: str, keys: Path) -> None:
    open_info = await start(nursery, database_url)
    assert open_info.http_port
    _, body, _ = await get(open_info.http_port, "/health/ready")
    ready = orjson.loads(body)
    assert ready["authentication"] == "open" and ready["tls"] is False

    create_key(keys, "svc", read=[VOCAB])
    keyed = await start_with_keys(nursery, database_url, keys)
    assert keyed.http_port
    _, body, _ = await get(keyed.http_port, "/health/ready")
    ready = orjson.loads(body)
    assert ready["authentication"] == "api_keys" and ready["tls"] is False
    assert await trio.to_thread.run_sync(health_check, keyed.port) == 1  # SERVING
    assert await trio.to_thread.run_sync(health_check, keyed.port,
                                         "eventstore.v1.EventStoreService") == 1


def test_a_certificate_with_an_empty_subject_identifies_nobody(tmp_path: Path) -> None:
    """A CA may sign a certificate whose names are all in the SAN: with client certificates
    required, such a caller is refused rather than let in unnamed."""
    open_mtls = Authenticator(None, client_certificates=True)
    with pytest.raises(Unauthenticated, match="empty subject"):
        open_mtls.authenticate((), {"subject": (), "subjectAltName": (("DNS", "x"),)})
    named = open_mtls.authenticate((), {"subject": ((("commonName", "progress"),),)})
    assert (named.name, named.subject) == ("progress", "CN=progress")
    keyed = Authenticator(str(tmp_path / "keys.json"), client_certificates=True)
    with pytest.raises(Unauthenticated):
        keyed.authenticate((), {"subject": ()})


def test_concurrent_key_commands_do_not_undo_each_other(tmp_path: Path) -> None:
    """Each `eventstore keys` command edits the file under a lock: a revocation racing a
    creation must not be lost (that would bring a key back)."""
    keys = tmp_path / "keys.json"
    old_ids = [create_key(keys, f"svc{i}", read=["*"])[0] for i in range(10)]

    def creator() -> None:
        for i in range(10):
            create_key(keys, f"new{i}", read=["*"])

    def revoker() -> None:
        for key_id in old_ids:
            assert revoke_key(keys, key_id)

    threads = [threading.Thread(target=creator), threading.Thread(target=revoker)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    entries = list_keys(keys)
    assert len(entries) == 20
    assert all(e.revoked_at is not None for e in entries if e.id in old_ids)
