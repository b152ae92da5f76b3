"""``GroupMember`` for asyncio: a consumer-group member that joins, follows its assignment and tells the
application through a ``ConsumerRebalanceListener`` (``conveyor.listener``). ``conveyor.member`` runs
this same driver on a background event loop for the sync API; the decisions are made by the pure
``conveyor._member_state.MemberState``.

    async with reg.group_member("billing", topics=["orders"], listener=listener) as member:
        await member.wait_for_assignment(30)
        ...  # consume what member.assignment holds

Per incarnation (one join, one ``member_epoch``) four tasks run on the loop:

- heartbeats: ``POST .../heartbeat/`` every ``heartbeat_interval`` and at once when a revocation was
  processed, carrying the processed generation; a 200 confirms the session (from the request's send
  time) and its body is a snapshot like any other; 409 fenced, 404 removed;
- the member socket: ``member.assignment`` snapshots, ``member.removed``, close codes 4409 (fenced),
  4410/4404 (removed), 4400/4401/4403 (a fault no retry mends); any other loss reconnects with
  backoff (the heartbeats keep the session and bring snapshots meanwhile);
- a watchdog that wakes the worker when the session's deadline minus the safety margin passes;
- and, across incarnations, one worker that makes the callbacks, one at a time.

A removed member joins again; a fenced dynamic member joins again under the usual rule (refused while
another live incarnation holds the id); a fenced static member stops (another process took its
instance id, as Kafka's ``FencedInstanceIdException``) with ``error`` set to ``Fenced``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import websockets
from websockets.asyncio.client import connect

from .. import errors
from .._member_state import ASSIGNED, LOST, REVOKED, MemberState, Snapshot, Step, parse_time, session_deadline
from ..listener import TopicPartition, check_listener

log = logging.getLogger("conveyor.member")

FENCED_CLOSE = 4409
REMOVED_CLOSES = (4404, 4410)
FATAL_CLOSES = (4400, 4401, 4403)
FATAL_ERRORS = (errors.Unauthorized, errors.Forbidden, errors.InvalidRequest)
CALLBACK = {REVOKED: "on_partitions_revoked", ASSIGNED: "on_partitions_assigned", LOST: "on_partitions_lost"}

# incarnation endings
FENCED, REMOVED, CLOSED, FATAL = "fenced", "removed", "closed", "fatal"


def generated_member_id(prefix: str) -> str:
    """A member id unique to this process: ``prefix-host-pid-random``, within the identifier rules."""
    raw = f"{prefix}-{socket.gethostname()}-{os.getpid()}-{random.getrandbits(24):06x}"
    return re.sub(r"[^A-Za-z0-9._:-]", "-", raw)[-128:]


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, first: float = 0.1, most: float = 5.0) -> None:
        self.first, self.most, self.attempt = first, most, 0

    def next(self) -> float:
        delay = min(self.most, self.first * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class GroupMember:
    """A member of consumer group ``group``; see the module docstring.

    ``topics``: the topics it reads. ``listener``: a ``ConsumerRebalanceListener`` (None: the
    application polls ``assignment``/``is_owned``). ``member_id``: default a new id per process.
    ``static``: a static member (Kafka's ``group.instance.id``; needs ``member_id``): its join fences a
    live incarnation of the id instead of being refused, for restarts that keep the id.
    ``session_timeout`` (s, 1..3600): the server removes the member after that long without a
    confirmed heartbeat; the member itself stops holding partitions ``safety_margin`` seconds earlier
    (default a tenth of it, at least 0.2 s). ``heartbeat_interval``: default a fifth of it.

    Sync callbacks run one at a time on one thread of the member's own; coroutine callbacks are
    awaited on the loop. Either way the next callback starts only after the previous one returned.
    """

    def __init__(
        self,
        registry: Any,
        group: str,
        *,
        topics: Sequence[str],
        listener: Any = None,
        member_id: str | None = None,
        service_name: str | None = None,
        static: bool = False,
        session_timeout: int = 30,
        heartbeat_interval: float | None = None,
        safety_margin: float | None = None,
    ) -> None:
        if isinstance(topics, str) or not topics:
            raise ValueError("topics: give a list of topic names, e.g. topics=['orders']")
        if static and not member_id:
            raise ValueError("a static member needs a member_id that stays the same across restarts")
        if not 1 <= session_timeout <= 3600:
            raise ValueError(f"session_timeout: expected 1..3600 seconds, got {session_timeout}")
        check_listener(listener)
        self.margin = max(0.2, session_timeout / 10) if safety_margin is None else safety_margin
        self.interval = session_timeout / 5 if heartbeat_interval is None else heartbeat_interval
        if not 0 <= self.margin < session_timeout / 2:
            raise ValueError(f"safety_margin: expected 0 <= s < session_timeout / 2, got {self.margin}")
        if not 0 < self.interval <= (session_timeout - self.margin) / 2:
            raise ValueError(
                f"heartbeat_interval {self.interval} s leaves no room for a lost heartbeat: keep it at most "
                f"(session_timeout - safety_margin) / 2 = {(session_timeout - self.margin) / 2} s"
            )
        self.config = registry.config
        self.transport = registry.transport
        self.group = group
        self.topics = sorted(set(topics))
        self.listener = listener
        self.service_name = service_name or group
        self.member_id = member_id or generated_member_id(self.service_name)
        self.static = static
        self.session_timeout = session_timeout
        self.error: errors.ConveyorError | None = None  # why the member stopped, if not closed
        self._state = MemberState(session_timeout, self.margin)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conveyor-member-callbacks")
        self.callback_thread = 0  # ident of the thread that runs sync callbacks (once one ran)
        # a heartbeat that hangs must not hold up the next one: the session is at stake
        self._request_timeout = max(0.5, min(self.config.timeout, session_timeout / 3))
        self._started = False
        self._closing = False
        self._finished = False
        self._worker: asyncio.Task[None] | None = None
        self._main: asyncio.Task[None] | None = None
        self._ended: asyncio.Future[str] | None = None
        self._wake = asyncio.Event()  # the worker has something to reconcile
        self._rounds_asked = 0  # worker rounds asked for (_until_idle) ...
        self._rounds_done = 0  # ... and the newest one that began after such an ask, done
        self._ack_now = asyncio.Event()  # send a heartbeat now: a revocation was processed
        self._confirmed = asyncio.Event()  # a heartbeat was answered 200
        self._interrupt = asyncio.Event()  # close() was called: cut waits short
        self._progress = asyncio.Event()  # replaced after every worker round (wait_for_assignment)

    # ------------------------------------------------------------ public

    @property
    def member_epoch(self) -> int:
        """The live incarnation's epoch (0 while there is none)."""
        return self._state.epoch

    @property
    def generation(self) -> int:
        """The generation of the newest assignment applied (0 while there is none)."""
        return self._state.latest.generation if self._state.latest else 0

    @property
    def processed_generation(self) -> int:
        """The generation the member confirms in its heartbeats (see ``conveyor._member_state``)."""
        return self._state.processed

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        """What the application holds now: assigned to it and not yet revoked or lost, and only while
        the session is confirmed (empty from the moment it cannot be, even before
        ``on_partitions_lost`` has run)."""
        return self._state.assignment(time.monotonic())

    def is_owned(self, tp: TopicPartition | tuple[str, int]) -> bool:
        """Whether the application holds ``tp`` now (see ``assignment``). Check it before a commit
        outside the callbacks."""
        return self._state.is_owned(TopicPartition(*tp), time.monotonic())

    async def start(self) -> GroupMember:
        """Join and start following. Raises ``Unauthorized``, ``Forbidden`` or ``InvalidRequest`` if
        the join is refused for good; an unreachable server, a 503 or a ``member_id_in_use`` is
        retried in the background (logged), so the member joins once it can."""
        if self._started:
            return self
        self._started = True
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._worker = asyncio.create_task(self._work(), name=f"conveyor-member-worker-{self.member_id}")
        self._main = asyncio.create_task(self._run(first), name=f"conveyor-member-{self.member_id}")
        try:
            await first
        except BaseException:
            await self.close()
            raise
        return self

    async def wait_for_assignment(self, timeout: float | None = None) -> frozenset[TopicPartition]:
        """Wait until the member holds its whole target assignment (nothing pending from another
        member, nothing left to revoke, every callback returned) and return it; it may be empty if
        the group has more members than partitions. ``TimeoutError`` after ``timeout`` seconds; the
        member's ``error`` if it stopped."""

        async def settled() -> frozenset[TopicPartition]:
            while True:
                if self.error is not None:
                    raise self.error
                if self._finished or self._closing:
                    raise errors.ConveyorError("the member is closed")
                if self._state.settled(time.monotonic()):
                    return self._state.owned
                progress = self._progress
                await progress.wait()

        return await asyncio.wait_for(settled(), timeout)

    async def close(self) -> None:
        """Give up the partitions (``on_partitions_revoked``, so the application commits; or
        ``on_partitions_lost`` if the session is not confirmed), leave the group, stop. Called from
        a callback, it only starts the close (waiting there would wait for that callback)."""
        if not self._started or self._finished:
            return
        self._closing = True
        self._state.closing = True
        self._interrupt.set()
        self._wake.set()
        if asyncio.current_task() is self._worker:
            return  # called from a coroutine callback: the worker finishes the close
        if self._main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        self._finished = True
        self._wake.set()
        if self._worker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False)
        self._signal_progress()

    async def __aenter__(self) -> GroupMember:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ the incarnations

    async def _run(self, first: asyncio.Future[None]) -> None:
        backoff = Backoff(0.2, max(1.0, self.session_timeout / 2))
        try:
            while not self._closing:
                delay = 0.0
                try:
                    epoch, snapshot, deadline = await self._join()
                except FATAL_ERRORS as exc:
                    self._fail(exc)
                    _resolve(first, exc)
                    return
                except errors.Conflict as exc:
                    _resolve(first)
                    if exc.code != "member_id_in_use":
                        self._fail(exc)
                        return
                    # another incarnation of this id is live (a previous process, or someone else's):
                    # its session ends by session_expires_at, then the join succeeds
                    expires = parse_time(exc.body.get("session_expires_at") if isinstance(exc.body, dict) else None)
                    wait = (expires - time.time()) if expires is not None else self.session_timeout
                    delay = min(float(self.session_timeout), max(0.2, wait + 0.1))
                    log.warning(
                        "member %s of group %s: %s; joining again in %.1f s",
                        self.member_id,
                        self.group,
                        exc.detail,
                        delay,
                    )
                except errors.ConveyorError as exc:
                    _resolve(first)
                    retry_after = exc.retry_after if isinstance(exc, errors.RateLimited) else None
                    delay = retry_after or backoff.next()
                    log.warning(
                        "member %s of group %s: join failed (%s); retrying in %.1f s",
                        self.member_id,
                        self.group,
                        exc,
                        delay,
                    )
                else:
                    _resolve(first)
                    backoff.reset()
                    why = await self._incarnation(epoch, snapshot, deadline)
                    if why in (CLOSED, FATAL):
                        return
                    if why == FENCED and self.static:
                        self._fail(
                            errors.Fenced(
                                f"static member {self.member_id!r} of group {self.group!r} was fenced: another "
                                "process joined with the same member_id",
                                status=409,
                                code="fenced_member_epoch",
                            )
                        )
                        return
                    delay = backoff.next()
                    log.warning("member %s of group %s was %s; joining again", self.member_id, self.group, why)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._interrupt.wait(), delay)
        except Exception as exc:  # a bug here must not leave the application holding partitions
            log.exception("member %s of group %s stopped", self.member_id, self.group)
            self._fail(errors.ConveyorError(f"the member stopped: {exc!r}"))
            _resolve(first, self.error)
        finally:
            self._state.end()
            self._wake.set()
            await self._until_idle()

    async def _join(self) -> tuple[int, Snapshot | None, float]:
        body = {
            "member_id": self.member_id,
            "service_name": self.service_name,
            "topics": self.topics,
            "session_timeout": self.session_timeout,
            "static": self.static,
        }
        sent = time.monotonic()
        answer = await self.transport.request("POST", f"groups/{self.group}/members/", json=body, resource="group")
        deadline = session_deadline(sent, self.session_timeout, answer, time.monotonic(), time.time())
        return int(answer["member_epoch"]), Snapshot.parse(answer), deadline

    async def _incarnation(self, epoch: int, snapshot: Snapshot | None, deadline: float) -> str:
        """Follow incarnation ``epoch`` until it ends; returns how it ended. Its partitions are lost
        (or, closing, revoked and the member has left) when this returns."""
        await self._until_idle()  # the previous incarnation's partitions were lost first
        self._state.begin(epoch, snapshot, deadline)
        self._ended = asyncio.get_running_loop().create_future()
        self._wake.set()
        log.info("member %s joined group %s: member_epoch %d", self.member_id, self.group, epoch)
        tasks = [
            asyncio.create_task(self._guarded(self._heartbeats(epoch))),
            asyncio.create_task(self._guarded(self._follow(epoch))),
            asyncio.create_task(self._guarded(self._watch())),
        ]
        try:
            why = await self._ended
            if why == CLOSED:
                await self._leave(epoch)  # first: closing the socket would only delay the others
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._state.end()
        self._wake.set()
        await self._until_idle()
        return why

    async def _guarded(self, task: Coroutine[Any, Any, None]) -> None:
        """Run one of the incarnation's tasks; a fault in it stops the member (holding nothing)
        rather than leaving it without heartbeats or without its socket."""
        try:
            await task
        except Exception as exc:
            log.exception("member %s of group %s: internal error", self.member_id, self.group)
            self._fail(errors.ConveyorError(f"the member stopped: {exc!r}"))

    def _end(self, why: str) -> None:
        """The incarnation is over (``why``): from now on nothing is held."""
        if self._ended is None or self._ended.done():
            return
        if why != CLOSED:
            self._state.end()
            log.warning("member %s of group %s: this incarnation was %s", self.member_id, self.group, why)
        self._ended.set_result(why)
        self._wake.set()

    def _fail(self, exc: errors.ConveyorError) -> None:
        self.error = exc
        self._closing = True
        self._interrupt.set()
        self._end(FATAL)
        self._signal_progress()
        log.error("member %s of group %s stopped: %s", self.member_id, self.group, exc)

    async def _leave(self, epoch: int) -> None:
        try:
            await self.transport.request(
                "DELETE",
                f"groups/{self.group}/members/{self.member_id}/",
                params={"member_epoch": epoch},
                resource="group",
            )
        except (errors.NotFound, errors.Conflict):
            pass  # gone already, or another incarnation's now: nothing of ours to leave
        except errors.ConveyorError as exc:
            log.warning(
                "member %s could not leave group %s (%s): its session runs out", self.member_id, self.group, exc
            )

    # ------------------------------------------------------------ the tasks of one incarnation

    async def _heartbeats(self, epoch: int) -> None:
        path = f"groups/{self.group}/members/{self.member_id}/heartbeat/"
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ack_now.wait(), self.interval * random.uniform(0.8, 1.0))
            self._ack_now.clear()
            sent = time.monotonic()
            body = {"generation": self._state.processed, "member_epoch": epoch}
            try:
                answer = await self.transport.request("POST", path, json=body, timeout=self._request_timeout)
            except errors.Fenced:
                self._end(FENCED)
                return
            except errors.NotFound:
                self._end(REMOVED)
                return
            except FATAL_ERRORS as exc:
                self._fail(exc)
                return
            except errors.ConveyorError as exc:
                log.info("member %s heartbeat not confirmed: %s", self.member_id, exc)
                continue  # unconfirmed: the deadline runs out on its own
            if self._state.epoch != epoch:
                return
            self._state.confirm(session_deadline(sent, self.session_timeout, answer, time.monotonic(), time.time()))
            self._state.offer(Snapshot.parse(answer))
            self._confirmed.set()
            self._wake.set()

    async def _follow(self, epoch: int) -> None:
        url = f"{self.config.ws_url}/ws/groups/{self.group}/members/{self.member_id}/?member_epoch={epoch}"
        backoff = Backoff(0.1, 5.0)
        while True:
            code: int | None = None
            try:
                async with connect(
                    url,
                    additional_headers=self.config.headers(),
                    open_timeout=self._request_timeout,
                    max_size=2**22,
                ) as ws:
                    try:
                        async for raw in ws:
                            backoff.reset()
                            self._on_message(epoch, json.loads(raw))
                    except websockets.ConnectionClosed:
                        pass
                    code = ws.close_code
            except (OSError, TimeoutError, websockets.InvalidHandshake, ValueError) as exc:
                log.debug("member %s socket: %s", self.member_id, exc)
            if self._ended is not None and self._ended.done():
                return
            if code == FENCED_CLOSE:
                self._end(FENCED)
                return
            if code in REMOVED_CLOSES:
                self._end(REMOVED)
                return
            if code in FATAL_CLOSES:
                self._fail(errors.ConveyorError(f"the member socket was closed with {code}", status=code))
                return
            await asyncio.sleep(backoff.next())

    def _on_message(self, epoch: int, message: Any) -> None:
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "member.assignment":
            if (message.get("member_epoch") or 0) > epoch:
                self._end(FENCED)  # a later incarnation's assignment
            elif self._state.offer(Snapshot.parse(message)):
                self._wake.set()
        elif kind == "member.removed":
            removed = message.get("member_epoch")
            if removed is not None and removed != epoch:
                return  # another incarnation's removal
            self._end(FENCED if message.get("reason") == FENCED else REMOVED)
        elif kind == "error":
            if message.get("code") == "fenced_member_epoch":
                self._end(FENCED)
            else:
                log.warning("member %s socket error: %s", self.member_id, message.get("detail"))

    async def _watch(self) -> None:
        """Wake the worker when the session's deadline (minus the margin) passes unconfirmed."""
        while True:
            wait = self._state.lapse_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait + 0.001)
                continue
            log.warning(
                "member %s of group %s: session not confirmed in time; partitions lost", self.member_id, self.group
            )
            self._wake.set()
            self._confirmed.clear()
            await self._confirmed.wait()

    # ------------------------------------------------------------ the worker

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            asked = self._rounds_asked
            while True:
                before = self._state.processed
                step = self._state.next_step(time.monotonic())
                self._after_processed(before)
                if step is None:
                    break
                self._state.before(step)
                await self._call(step)
                before = self._state.processed
                self._state.after(step)
                self._after_processed(before)
            if self._state.closing and self._state.epoch and not self._state.owned:
                self._end(CLOSED)
            self._rounds_done = asked
            self._signal_progress()
            if self._finished:
                return

    def _after_processed(self, before: int) -> None:
        # closing, the leave that follows hands everything over at once: no confirmation to wait for
        if self._state.processed > before and self._state.ack_due() and not self._state.closing:
            self._ack_now.set()

    async def _call(self, step: Step) -> None:
        if self.listener is None:
            return
        callback: Callable[[list[TopicPartition]], Any] = getattr(self.listener, CALLBACK[step.kind])
        partitions = list(step.partitions)
        try:
            if inspect.iscoroutinefunction(callback):
                await callback(partitions)
            else:
                result = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._in_thread, callback, partitions
                )
                if asyncio.iscoroutine(result):
                    await result
        except Exception:
            log.exception("member %s: %s(%s) raised", self.member_id, CALLBACK[step.kind], partitions)

    def _in_thread(self, callback: Callable[[list[TopicPartition]], Any], partitions: list[TopicPartition]) -> Any:
        self.callback_thread = threading.get_ident()
        return callback(partitions)

    async def _until_idle(self) -> None:
        """Until a worker round that began after this call has ended: every callback due now has been
        made (after ``end``, the application holds nothing)."""
        self._rounds_asked += 1
        asked = self._rounds_asked
        self._wake.set()
        while self._rounds_done < asked and self._worker is not None and not self._worker.done():
            progress = self._progress
            await progress.wait()

    def _signal_progress(self) -> None:
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()


def _resolve(future: asyncio.Future[None], exc: BaseException | None = None) -> None:
    if not future.done():
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
