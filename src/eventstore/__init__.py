"""eventstore: an event store service for event-sourced microservices.

The server runs with `eventstore serve`; the contract is `proto/eventstore/v1/eventstore.proto`.
"""

from eventstore.config import ConfigError, Settings, load_settings
from eventstore.errors import (
    AlreadyExists,
    EventStoreError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LimitExceeded,
    Unavailable,
    WrongExpectedVersion,
)

__all__ = [
    "AlreadyExists",
    "ConfigError",
    "EventStoreError",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LimitExceeded",
    "Settings",
    "Unavailable",
    "WrongExpectedVersion",
    "load_settings",
]
