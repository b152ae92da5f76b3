"""The asyncio API of conveyor: the same names as the sync one (``Registry``, ``register``, ``group_member``,
``balancer``, the errors), with coroutines and async iterators."""

from ..errors import (
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
from ..listener import ConsumerRebalanceListener, TopicPartition
from ..records import Service, WatchEvent
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
