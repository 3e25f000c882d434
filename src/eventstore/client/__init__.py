"""The Python client of eventstore: Trio, over purerpc.

    from eventstore.client import EventStoreClient, NewEvent

    async with EventStoreClient.connect("127.0.0.1", 50051) as client:
        result = await client.append_events(stream_id, "VocabularyItem",
                                            [NewEvent("WordAdded", {"word": "neko"})],
                                            expected_version=0)
        async for event in client.get_events(stream_id, "VocabularyItem"):
            print(event.version, event.event_type, event.json())
        async with client.subscribe_to_all() as subscription:
            async for item in subscription:  # RecordedEvent | Checkpoint | CaughtUp
                ...
"""

from eventstore.client._client import EventStoreClient, tls_context
from eventstore.client._subscription import Subscription
from eventstore.client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    ClientError,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotImplementedByServer,
    PermissionDenied,
    ResourceExhausted,
    StatusCode,
    Unauthenticated,
    Unavailable,
    WrongExpectedVersion,
)
from eventstore.client.models import (
    AppendResult,
    CaughtUp,
    Checkpoint,
    ExpectedVersion,
    NewEvent,
    ReconnectPolicy,
    RecordedEvent,
    SavedSnapshot,
    Snapshot,
    SubscriptionItem,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AppendResult",
    "Cancelled",
    "CaughtUp",
    "Checkpoint",
    "ClientError",
    "DeadlineExceeded",
    "EventStoreClient",
    "ExpectedVersion",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "NewEvent",
    "NotImplementedByServer",
    "PermissionDenied",
    "ReconnectPolicy",
    "RecordedEvent",
    "ResourceExhausted",
    "SavedSnapshot",
    "Snapshot",
    "StatusCode",
    "Subscription",
    "SubscriptionItem",
    "Unauthenticated",
    "Unavailable",
    "WrongExpectedVersion",
    "tls_context",
]
