"""What a group member tells the application: ``TopicPartition`` and the ``ConsumerRebalanceListener``
protocol (Kafka's), whose three callbacks a ``GroupMember`` calls one at a time, in order.

- ``on_partitions_revoked(partitions)``: the member is asked to give these up. Stop consuming them
  and commit their offsets before returning: the member confirms the generation (and the partitions
  pass to their next owner) only after this returns.
- ``on_partitions_assigned(partitions)``: these are the member's now; start consuming them. Never
  called for a partition the server still holds for another member (``pending``).
- ``on_partitions_lost(partitions)``: these are no longer the member's and may already be consumed
  by another: the member was removed or fenced, or its session could not be confirmed in time.
  Stop at once and do not commit.

A callback may be a plain function or (with ``conveyor.aio``) a coroutine function.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

CALLBACKS = ("on_partitions_revoked", "on_partitions_assigned", "on_partitions_lost")


class TopicPartition(NamedTuple):
    """One partition of one topic, as ``("orders", 3)``; ``str()`` gives ``orders:3``."""

    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}"


@runtime_checkable
class ConsumerRebalanceListener(Protocol):
    """The three callbacks of a group member's application (see the module docstring). Each gets the
    partitions concerned, sorted; what it returns is ignored (a coroutine is awaited under
    ``conveyor.aio``). An exception is logged and counts as a return: the member moves on."""

    def on_partitions_revoked(self, partitions: list[TopicPartition]) -> Awaitable[None] | None: ...

    def on_partitions_assigned(self, partitions: list[TopicPartition]) -> Awaitable[None] | None: ...

    def on_partitions_lost(self, partitions: list[TopicPartition]) -> Awaitable[None] | None: ...


def check_listener(listener: Any) -> None:
    """TypeError unless ``listener`` is None or has all three callbacks. A listener without
    ``on_partitions_lost`` would keep consuming what it lost, and one that answered a loss with
    ``on_partitions_revoked`` would commit for partitions it no longer owns: both are refused."""
    if listener is None:
        return
    missing = [name for name in CALLBACKS if not callable(getattr(listener, name, None))]
    if missing:
        raise TypeError(
            f"the listener lacks {', '.join(missing)}: a ConsumerRebalanceListener needs "
            "on_partitions_revoked, on_partitions_assigned and on_partitions_lost (they may do nothing)"
        )


def partitions_of(mapping: Mapping[str, Iterable[int]] | None) -> frozenset[TopicPartition]:
    """``{"orders": [0, 1]}`` (the server's form) as a set of TopicPartition."""
    return frozenset(TopicPartition(topic, int(n)) for topic, numbers in (mapping or {}).items() for n in numbers)
