"""conveyor: the Python client of conveyor-registry.

    from conveyor import Registry
    reg = Registry()                      # CONVEYOR_URL / CONVEYOR_TOKEN, or url=..., token=...
    with reg.register("orders-1", name="orders", type="source", endpoint="10.0.0.5:8080"):
        ...                               # heartbeats in the background until the block ends

``conveyor.aio`` has the same names for asyncio.
"""

from .errors import (
    Conflict,
    ConveyorError,
    Fenced,
    Forbidden,
    InvalidRequest,
    NoInstanceAvailable,
    NotFound,
    RateLimited,
    ServiceNotFound,
    Unauthorized,
    Unavailable,
)
from .listener import ConsumerRebalanceListener, TopicPartition
from .records import Service, WatchEvent
from .registry import Registry

__all__ = [
    "Conflict",
    "ConsumerRebalanceListener",
    "ConveyorError",
    "Fenced",
    "Forbidden",
    "InvalidRequest",
    "NoInstanceAvailable",
    "NotFound",
    "RateLimited",
    "Registry",
    "Service",
    "ServiceNotFound",
    "TopicPartition",
    "Unauthorized",
    "Unavailable",
    "WatchEvent",
]
