"""A no-op server on the same proto and the same purerpc transport as eventstore: AppendEvents
answers an empty reply at once, SubscribeToAll streams ready-made notifications. Its rates are
the transport's ceiling, the baseline our own gRPC figures are divided by.

    python benches/noop_server.py   # prints the port on stdout, serves until killed
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import trio
from purerpc.grpclib.events import RequestReceived

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eventstore.grpc.transport import GrpcServer, Method
from eventstore.v1 import eventstore_pb2 as pb

REPLY = pb.AppendEventsResponse(next_expected_version=1, first_position=1, last_position=1,
                                event_ids=["00000000-0000-4000-8000-000000000000"])
NOTE = pb.EventNotification(event=pb.Event(
    event_id="00000000-0000-4000-8000-000000000000", stream_id="00000000-0000-4000-8000-0000"
    "00000001", stream_type="Bench", version=1, event_type="WordAdded",
    data=b'{"word": "neko"}' * 20, position=1)).SerializeToString()


async def append(raw: bytes, request: RequestReceived) -> bytes:
    return bytes(REPLY.SerializeToString())


async def stream(raw: bytes, request: RequestReceived) -> AsyncIterator[bytes]:
    count = pb.SubscribeAllRequest.FromString(raw).max_batch_size or 10_000
    for _ in range(count):
        yield NOTE


async def main() -> None:
    prefix = "eventstore.v1.EventStoreService/"
    server = GrpcServer({prefix + "AppendEvents": Method(unary=append),
                         prefix + "SubscribeToAll": Method(stream=stream)},
                        max_request_bytes=16 << 20)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        print(port, flush=True)


if __name__ == "__main__":
    trio.run(main)
