"""GetEvents and ReadAll: ranges, paging, filters, limits — through purerpc and grpcio."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from eventstore.server import ServerInfo, serve
from eventstore.v1 import eventstore_pb2 as pb
from tests.clients import PurerpcClient, RpcError
from tests.conftest import make_settings
from tests.helpers import STREAM_TYPE, append, events, new_event, read_all, read_stream, sid
from tests.helpers import get as get_http


def get(stream: str, **kw: Any) -> pb.GetEventsRequest:
    return pb.GetEventsRequest(stream_id=stream, stream_type=STREAM_TYPE, **kw)


async def test_get_events_pages_through_a_stream(api: Any) -> None:
    stream = sid()
    await append(api, stream, events(25))
    reply = await api.call("GetEvents", get(stream, max_count=10))
    assert [e.version for e in reply.events] == list(range(1, 11))
    assert reply.has_more and reply.next_from_version == 11 and reply.stream_version == 25
    reply = await api.call("GetEvents", get(stream, from_version=11, max_count=10))
    assert [e.version for e in reply.events] == list(range(11, 21))
    reply = await api.call("GetEvents", get(stream, from_version=21, max_count=10))
    assert [e.version for e in reply.events] == list(range(21, 26))
    assert not reply.has_more and reply.next_from_version == 26
    reply = await api.call("GetEvents", get(stream, from_version=26))
    assert not reply.events and not reply.has_more and reply.next_from_version == 26
    assert [e.version for e in await read_stream(api, stream, page=7)] == list(range(1, 26))


async def test_get_events_version_range(api: Any) -> None:
    stream = sid()
    await append(api, stream, events(10))
    reply = await api.call("GetEvents", get(stream, from_version=3, to_version=6))
    assert [e.version for e in reply.events] == [3, 4, 5, 6]
    assert not reply.has_more and reply.next_from_version == 7
    reply = await api.call("GetEvents", get(stream, from_version=3, to_version=6, max_count=2))
    assert [e.version for e in reply.events] == [3, 4]
    assert reply.has_more and reply.next_from_version == 5
    reply = await api.call("GetEvents", get(stream, from_version=0, to_version=1))
    assert [e.version for e in reply.events] == [1]
    reply = await api.call("GetEvents", get(stream, from_version=9, to_version=50))
    assert [e.version for e in reply.events] == [9, 10] and not reply.has_more


async def test_get_events_agrees_with_its_stream_version_while_appends_go_on(
        api: Any) -> None:
    """GetEvents reads the stream's version and its events from one snapshot: while another
    task appends to the stream, every reply holds exactly the versions 1..stream_version (or
    the first page of them), never one beyond it and never a gap. (The race between reading
    the version and the events is narrow, so this checks the invariant more than it proves
    the isolation: the REPEATABLE READ transaction is what rules the race out.)"""
    stream = sid()
    await append(api, stream, events(3))
    stop = trio.Event()
    checked = 0

    async def writer() -> None:
        for i in range(400):
            if stop.is_set():
                return
            await append(api, stream, events(1 + i % 7))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        with trio.fail_after(60):
            for _ in range(150):
                limited = checked % 2 == 1
                reply = await api.call("GetEvents", get(stream, max_count=10 if limited else 0))
                versions = [e.version for e in reply.events]
                assert versions and versions[-1] <= reply.stream_version, (
                    versions[-3:], reply.stream_version)
                assert versions == list(range(1, len(versions) + 1))
                if not reply.has_more:
                    assert versions[-1] == reply.stream_version
                    assert reply.next_from_version == reply.stream_version + 1
                checked += 1
        stop.set()
    assert checked == 150


def prefetch_counts(text: bytes, read: str = "get_events") -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith(f"eventstore_{read}_prefetch_total{{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = float(line.rsplit(" ", 1)[1])
    return counts


async def test_later_pages_are_read_ahead_and_served_only_while_the_stream_stands(
        server: ServerInfo, api: Any) -> None:
    """Paging through a stream, the page after each later page is read ahead; a page read
    ahead is served only when the stream has not moved since, otherwise read again (so a
    client that appends between pages sees its own events)."""
    stream = sid()
    await append(api, stream, events(25))
    versions: list[int] = []
    next_from = 0
    for _ in range(10):
        reply = await api.call("GetEvents", get(stream, from_version=next_from, max_count=5))
        versions += [e.version for e in reply.events]
        assert reply.stream_version == 25
        if not reply.has_more:
            break
        next_from = reply.next_from_version
    assert versions == list(range(1, 26))
    _, text, _ = await get_http(server.http_port, "/metrics")
    # Page 2 reads page 3 ahead, page 3 page 4, page 4 page 5; the last page has no next.
    assert prefetch_counts(text).get("hit") == 3

    await api.call("GetEvents", get(stream, from_version=6, max_count=10))  # reads 16-25 ahead
    await append(api, stream, events(4), expected=25)
    reply = await api.call("GetEvents", get(stream, from_version=16, max_count=10))
    assert [e.version for e in reply.events] == list(range(16, 26))
    assert reply.stream_version == 29 and reply.has_more and reply.next_from_version == 26
    _, text, _ = await get_http(server.http_port, "/metrics")
    assert prefetch_counts(text) == {"hit": 3, "stale": 1}


async def test_read_all_pages_are_read_ahead_and_the_last_one_is_read_again(
        server: ServerInfo, api: Any) -> None:
    """Paging through the store with ReadAll, the page after each page that has more is read
    ahead and served as a fresh read would return it; a page read ahead that reached the end of
    the store is read again, so events committed after it was read ahead are in it."""
    await append(api, sid(), events(12))
    pages: list[pb.ReadAllResponse] = []
    after = 0
    for _ in range(10):  # pages of 5: positions 1-5, 6-10, then the rest
        if len(pages) == 2:
            # Page 3 (11-12) has been read ahead since page 2 was served; two more arrive.
            await append(api, sid(), events(2))
        reply = await api.call("ReadAll", pb.ReadAllRequest(from_position=after, max_count=5))
        pages.append(reply)
        if not reply.has_more:
            break
        after = reply.next_from_position
    assert [[e.position for e in page.events] for page in pages] == [
        [1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14]]
    # The page served from the read-ahead is the page a fresh read gives.
    again = await api.call("ReadAll", pb.ReadAllRequest(from_position=5, max_count=5))
    assert again == pages[1]
    _, text, _ = await get_http(server.http_port, "/metrics")
    assert prefetch_counts(text, "read_all") == {"hit": 1, "partial": 1}


async def test_missing_stream_is_not_an_error(api: Any) -> None:
    reply = await api.call("GetEvents", get(sid()))
    assert reply.stream_version == 0 and not reply.events and not reply.has_more


async def test_stream_identity_is_id_and_type(api: Any) -> None:
    stream = sid()
    await append(api, stream, events(2), stream_type="A")
    await append(api, stream, events(3), stream_type="B")
    a = await api.call("GetEvents", pb.GetEventsRequest(stream_id=stream, stream_type="A"))
    b = await api.call("GetEvents", pb.GetEventsRequest(stream_id=stream, stream_type="B"))
    assert (a.stream_version, len(a.events), b.stream_version, len(b.events)) == (2, 2, 3, 3)


@pytest.mark.parametrize(("request_kw", "words"), [
    ({"stream_id": "nope"}, "stream_id"),
    ({"stream_id": "urn:uuid:" + sid()}, "stream_id: not a UUID"),
    ({"stream_type": ""}, "stream_type"),
    ({"from_version": -1}, "from_version"),
    ({"from_version": 5, "to_version": 4}, "to_version"),
    ({"max_count": -1}, "max_count"),
])
async def test_get_events_bad_input(api: Any, request_kw: dict[str, Any], words: str) -> None:
    kw: dict[str, Any] = {"stream_id": sid(), "stream_type": STREAM_TYPE, **request_kw}
    with pytest.raises(RpcError) as err:
        await api.call("GetEvents", pb.GetEventsRequest(**kw))
    assert err.value.code == "INVALID_ARGUMENT"
    assert words in err.value.message
    await api.call("GetEvents", get(sid()))  # still serving


async def test_metadata_and_payload_round_trip(api: Any) -> None:
    stream = sid()
    data = '{"word": "日本語", "n": [1, 2.5, null, true], "deep": {"a": {"b": "c"}}}'.encode()
    await append(api, stream, [new_event("Tagged", data, metadata=b'{"by": "me"}')])
    [event] = await read_stream(api, stream)
    # Stored as jsonb: equal as a JSON value (key order and spacing are PostgreSQL's).
    assert orjson.loads(event.data) == orjson.loads(data)
    assert orjson.loads(event.metadata) == {"by": "me"}
    assert event.event_type == "Tagged"


async def test_read_all_in_position_order_with_paging(api: Any) -> None:
    streams = [sid() for _ in range(5)]
    for round_ in range(3):
        for s in streams:
            await append(api, s, events(round_ + 1))
    everything = await read_all(api, page=4)
    assert len(everything) == 5 * (1 + 2 + 3)
    positions = [e.position for e in everything]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    reply = await api.call("ReadAll", pb.ReadAllRequest(from_position=positions[9], max_count=3))
    assert [e.position for e in reply.events] == positions[10:13]
    assert reply.has_more and reply.next_from_position == positions[12]
    tail = await api.call("ReadAll", pb.ReadAllRequest(from_position=positions[-1]))
    assert not tail.events and not tail.has_more
    assert tail.next_from_position == positions[-1]


async def test_read_all_filters(api: Any) -> None:
    s1, s2 = sid(), sid()
    await append(api, s1, [new_event("OrderPlaced"), new_event("OrderShipped")],
                 stream_type="Order")
    await append(api, s2, [new_event("UserCreated"), new_event("OrderNoted")], stream_type="User")
    await append(api, s1, [new_event("Order_Paid")], stream_type="Order")

    by_type = await read_all(api, stream_types=("User",))
    assert [e.event_type for e in by_type] == ["UserCreated", "OrderNoted"]
    by_prefix = await read_all(api, prefixes=("Order",))
    assert [e.event_type for e in by_prefix] == ["OrderPlaced", "OrderShipped", "OrderNoted",
                                                 "Order_Paid"]
    both = await read_all(api, stream_types=("Order",), prefixes=("OrderS", "Order_"))
    assert [e.event_type for e in both] == ["OrderShipped", "Order_Paid"]
    # LIKE wildcards in a prefix are literal characters.
    assert await read_all(api, prefixes=("Order%",)) == []
    assert [e.event_type for e in await read_all(api, prefixes=("Order_",))] == ["Order_Paid"]


async def test_read_all_next_position_advances_past_filtered_out_events(api: Any) -> None:
    await append(api, sid(), events(10), stream_type="Noise")
    reply = await api.call("ReadAll", pb.ReadAllRequest(filter=pb.Filter(stream_types=["None"])))
    assert not reply.events and not reply.has_more
    assert reply.next_from_position >= 10


async def test_read_all_filtered_scan_is_bounded(nursery: trio.Nursery,
                                                 database_url: str) -> None:
    info = await nursery.start(serve, make_settings(database_url, read_all_scan_window=7))
    async with PurerpcClient.connect(info.port) as api:
        await append(api, sid(), events(20), stream_type="Noise")
        await append(api, sid(), events(2), stream_type="Signal")
        reply = await api.call("ReadAll", pb.ReadAllRequest(
            filter=pb.Filter(stream_types=["Signal"])))
        assert not reply.events and reply.has_more and reply.next_from_position == 7
        found = await read_all(api, stream_types=("Signal",))
        assert [e.version for e in found] == [1, 2]


@pytest.mark.parametrize(("request_kw", "words"), [
    ({"from_position": -1}, "from_position"),
    ({"max_count": -5}, "max_count"),
    ({"filter": pb.Filter(stream_types=[""])}, "filter.stream_types[0]"),
    ({"filter": pb.Filter(event_type_prefixes=["A", ""])}, "filter.event_type_prefixes[1]"),
])
async def test_read_all_bad_input(api: Any, request_kw: dict[str, Any], words: str) -> None:
    with pytest.raises(RpcError) as err:
        await api.call("ReadAll", pb.ReadAllRequest(**request_kw))
    assert err.value.code == "INVALID_ARGUMENT"
    assert words in err.value.message


async def test_page_size_is_capped_and_bytes_are_bounded(nursery: trio.Nursery,
                                                         database_url: str) -> None:
    settings = make_settings(database_url, read_page_max=5, read_page_default=3,
                             read_reply_max_bytes=64 * 1024)
    info = await nursery.start(serve, settings)
    async with PurerpcClient.connect(info.port) as api:
        stream = sid()
        await append(api, stream, events(12))
        reply = await api.call("GetEvents", get(stream))
        assert len(reply.events) == 3 and reply.has_more
        reply = await api.call("GetEvents", get(stream, max_count=1000))
        assert len(reply.events) == 5 and reply.has_more
        reply = await api.call("ReadAll", pb.ReadAllRequest(max_count=1000))
        assert len(reply.events) == 5 and reply.has_more
        big = sid()
        blob = b'{"s": "' + b"z" * 30_000 + b'"}'
        await append(api, big, [new_event(data=blob) for _ in range(4)])
        reply = await api.call("GetEvents", get(big, max_count=5))
        assert 1 <= len(reply.events) < 4 and reply.has_more
        assert len(reply.SerializeToString()) <= 64 * 1024 + 1024
        assert [e.version for e in await read_stream(api, big)] == [1, 2, 3, 4]
