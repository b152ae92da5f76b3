"""``GroupMember``: a consumer-group member for the sync API, as the seed's ``GroupCoordinator`` with
Kafka's ``ConsumerRebalanceListener`` (``conveyor.listener``). No ``poll()``: a background thread
joins, heartbeats and follows the member websocket, and the listener's callbacks run one at a time on
one thread of the member's own.

    from conveyor import Registry

    with Registry().group_member("billing", topics=["orders"], listener=listener) as member:
        member.wait_for_assignment(30)
        while running:
            for tp in member.assignment:     # only while the session is confirmed
                consume(tp)

The protocol is driven by ``conveyor.aio.member.GroupMember`` on an event loop in that background
thread; the decisions are the pure ``conveyor._member_state``. See ``conveyor.aio.member`` for what
each task does and when the member joins again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .aio._http import AsyncTransport
from .aio.member import GroupMember as AsyncGroupMember
from .errors import ConveyorError
from .listener import TopicPartition

T = TypeVar("T")


class _Handles:
    """What the asyncio member needs of a registry: its configuration and an async transport."""

    def __init__(self, registry: Any) -> None:
        self.config = registry.config
        self.transport = AsyncTransport(registry.config)


class GroupMember:
    """A member of consumer group ``group``, started (joined) on construction. Arguments as
    ``conveyor.aio.member.GroupMember``: ``topics``, ``listener``, ``member_id``, ``service_name``,
    ``static``, ``session_timeout``, ``heartbeat_interval``, ``safety_margin``.

    The constructor raises ``Unauthorized``, ``Forbidden`` or ``InvalidRequest`` when the join is
    refused for good; an unreachable server or a ``member_id_in_use`` is retried in the background.
    ``close()`` (or the end of a ``with`` block) revokes, so the application commits, then leaves.
    """

    def __init__(self, registry: Any, group: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"conveyor-member-{group}", daemon=True)
        self._handles = _Handles(registry)
        self._member = AsyncGroupMember(self._handles, group, **kwargs)
        self._closed = False
        self._thread.start()
        try:
            self._run(self._member.start())
        except BaseException:
            self._stop_loop()
            raise

    # ------------------------------------------------------------ what the application reads

    @property
    def group(self) -> str:
        return self._member.group

    @property
    def member_id(self) -> str:
        return self._member.member_id

    @property
    def member_epoch(self) -> int:
        """The live incarnation's epoch (0 while there is none)."""
        return self._member.member_epoch

    @property
    def generation(self) -> int:
        """The generation of the newest assignment applied."""
        return self._member.generation

    @property
    def processed_generation(self) -> int:
        """The generation the member confirms in its heartbeats: every partition it took away has been
        through ``on_partitions_revoked`` or ``on_partitions_lost``, and the callback returned."""
        return self._member.processed_generation

    @property
    def error(self) -> ConveyorError | None:
        """Why the member stopped by itself (refused, or a fenced static member); None otherwise."""
        return self._member.error

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        """What the application holds now, and only while the session is confirmed."""
        return self._member.assignment

    def is_owned(self, tp: TopicPartition | tuple[str, int]) -> bool:
        """Whether the application holds ``tp`` now; check it before a commit outside the callbacks."""
        return self._member.is_owned(tp)

    def wait_for_assignment(self, timeout: float | None = None) -> frozenset[TopicPartition]:
        """Wait until the member holds its whole target assignment and return it (see the asyncio
        member). ``TimeoutError`` after ``timeout`` seconds. Not from a callback: it would wait for
        that callback."""
        if self._on_callback_thread():
            raise RuntimeError("wait_for_assignment() from a listener callback would wait for that callback")
        return self._run(self._member.wait_for_assignment(timeout))

    # ------------------------------------------------------------ closing

    def close(self) -> None:
        """Revoke (``on_partitions_revoked``: commit there), leave the group, stop the threads. From a
        listener callback it only starts the close, which completes once the callback has returned."""
        if self._closed:
            return
        if self._on_callback_thread():
            asyncio.run_coroutine_threadsafe(self._member.close(), self._loop)
            return
        self._closed = True
        try:
            self._run(self._member.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> GroupMember:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the loop thread

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _on_callback_thread(self) -> bool:
        return threading.get_ident() == self._member.callback_thread

    def _stop_loop(self) -> None:
        if not self._loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(self._handles.transport.aclose(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
