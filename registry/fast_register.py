"""The registration fast path: an ASGI route in front of Django for POST /api/v1/services/.

A fleet that restarts re-registers mostly what it registered before. Here such a request is a body parse,
a digest and its share of one Redis script call on the event loop (registry.reregister; the checks queued
while a call is out go together in the next): no Django request cycle, no database. It answers so only
when it is sure the registration would change nothing and would be answered 200 with the remembered body.

Every other valid JSON registration (new, or changed) is validated on the event loop as the view validates
it (registry.registration_input for a body in the common form, else the view's own ``RegisterSerializer``)
and handed to the process's ``RegistrationBatcher``: registrations that arrive while a batch is in the
database join the next one, and a batch is one transaction in Django's sync thread (``leases.register_many``:
one locking read, the INSERTs of all three tables (one statement on PostgreSQL), one Redis step for
revisions and one for leases), a token lookup for all of its tokens, and one Redis round trip remembering
the answers. Each
request is answered exactly what the view answers (201/200 and the same body, 403 for another token's
service, 503 when the database or the lease store failed the batch, nothing of it written); the
batch's events are sent from the event loop after the answers.

The answers are remembered after the commit. If that step fails (Redis went away in between), the
requests are still answered 201/200: the registrations did commit, and their events are sent. Only the
shortcut is missing: the next unchanged re-registration of those services is written through the
database as a re-registration (a history row, a new revision), which remembers it again
(tests/test_register_batch.py).

Anything else (a body that does not validate, a token it does not find, another content type or Accept,
a query string, a throttled deployment, an unexpected error) goes on to Django untouched, its body
replayed, where the view decides: the same 400 naming the field, the same 401.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django import db
from django.conf import settings
from django.utils import timezone
from rest_framework.exceptions import ValidationError

from registry_project import limits

from . import events, lease_store, leases, outage, reregister
from .auth import token_from_header
from .fastpath import host_allowed, with_fresh_connection
from .leases import cache_token
from .loop_batch import LoopBatcher
from .models import ApiToken, Health, hash_token
from .path_ids import path_identifier_error
from .redis_client import get_async_redis
from .registration_input import common_registration
from .serializers import RegisterSerializer, registered_body

log = logging.getLogger(__name__)

REGISTER_PATH = "/api/v1/services/"
MAX_BODY = 64 * 1024  # a registration with 64 labels of the longest keys and values is about 21 KiB
JSON_TYPES = (b"application/json", b"application/json; charset=utf-8")
ACCEPT_JSON = (b"", b"*/*", b"application/json")
HEALTHS = frozenset(Health.values)  # Health.values builds its list anew at each use


class UnchangedRegistrationFastPath:
    """ASGI middleware: answers unchanged re-registrations itself and passes everything else to ``app``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == REGISTER_PATH
            and not scope.get("query_string")
            and settings.REGISTRY_THROTTLE_RATE is None
        ):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        length = headers.get(b"content-length", b"")
        if (
            headers.get(b"content-type", b"").lower() not in JSON_TYPES
            or headers.get(b"accept", b"") not in ACCEPT_JSON
            or not (length.isdigit() and len(length) < 10 and int(length) <= _max_body())
            or not host_allowed(headers.get(b"host", b""))
        ):
            await self.app(scope, receive, send)
            return
        body, complete = await _read_body(receive)
        if complete:
            key = token_from_header(headers.get(b"authorization", b"").decode("latin-1")) or ""
            data = _parse(body) if key else None  # (no key, or not a JSON object: Django answers)
            answer, request_digest = await _try_unchanged(data, key) if data is not None else (None, None)
            if answer is not None:
                await limits.send_json(send, 200, answer)
                return
            scope = {**scope, reregister.CHECKED: True}  # the view need not ask Redis again
            job = _job(data, key, request_digest) if data is not None else None
            if job is not None:
                result = await batcher().submit(job)
                if result is not None:
                    await limits.send_json(send, result.status, result.body, result.headers)
                    return
        await self.app(scope, _replay(body, complete, receive), send)


def _max_body() -> int:
    """Never more than the server's own body cap, which BodyLimit enforces on whatever this passes on."""
    return min(MAX_BODY, limits.max_body_bytes())


def _headers(scope: dict[str, Any]) -> dict[bytes, bytes]:
    wanted = (b"host", b"authorization", b"content-length", b"content-type", b"accept")
    return {name: value for name, value in scope["headers"] if name in wanted}


async def _read_body(receive: Any) -> tuple[bytes, bool]:
    """The body, up to MAX_BODY; complete False if the client disconnected or sent more (Django decides)."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body, False
        body += message.get("body", b"")
        if len(body) > _max_body():
            return body, False
        if not message.get("more_body", False):
            return body, True


def _replay(body: bytes, complete: bool, receive: Any) -> Any:
    """A ``receive`` that hands Django the body already read, then (if any) the rest from the client."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return replayed


def _parse(body: bytes) -> dict[str, Any] | None:
    """The JSON object of a body; None if it is not one (Django answers it)."""
    try:
        data = limits.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


async def _try_unchanged(data: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str | None]:
    """The answer to an unchanged re-registration, or None (let Django register it); and the request's
    digest, if it was taken (None: it could not be)."""
    if not isinstance(data.get("service_id"), str):
        return None, None
    if path_identifier_error("service_id", data["service_id"]) is not None:
        return None, None  # never registered: Django names the field
    health = data.get("health", Health.HEALTHY)
    if not isinstance(health, str) or health not in HEALTHS:  # (a set: a list or object is no member)
        return None, None
    try:
        request_digest = reregister.digest(data)
    except (TypeError, ValueError):
        return None, None
    key_hash = hash_token(key)
    check = (reregister.token_key(key_hash), data["service_id"], request_digest, health)
    try:
        for _attempt in range(2):
            code, deadline, snapshot = await unchanged_checker().run(check)
            if code == b"OK":
                return reregister.unchanged_body(snapshot, int(deadline)), request_digest
            if code != b"TOKEN_MISS":
                return None, request_digest
            if not await sync_to_async(with_fresh_connection, thread_sensitive=True)(cache_token, key_hash):
                return None, request_digest  # not a token: Django answers 401
    except redis.RedisError as exc:
        log.warning("unchanged re-registration check skipped: Redis unavailable: %s", exc)
    return None, request_digest


# A renewal check: the token's key, service id, request digest, reported health (RENEW_UNCHANGED_MANY_LUA).
Check = tuple[str, str, str, str]
Reply = tuple[bytes, bytes, bytes]


class UnchangedChecker(LoopBatcher[Check, Reply]):
    """Sends the unchanged re-registration checks of one event-loop turn as one RENEW_UNCHANGED_MANY_LUA
    call (``registry.loop_batch``), as heartbeats are sent: a storm of registrations (new, changed or
    unchanged) costs the lease store one round trip per turn, not one per request."""

    what = "checks"
    SERIAL = True  # a client answered by a batch comes back one turn after another: share a call

    async def call(self, items: list[Check]) -> list[Reply | Exception]:
        keys = reregister.renew_keys() + [token for token, _service_id, _digest, _health in items]
        args: list[str | int] = [lease_store.to_ms(timezone.now())]
        for _token, service_id, request_digest, health in items:
            args += [service_id, request_digest, health]
        r = get_async_redis()
        reply = await reregister.RENEW_UNCHANGED_MANY.run_async(r, keys, *args)
        if len(reply) != 3 * len(items):
            raise redis.RedisError(f"{len(reply) // 3} replies to a batch of {len(items)} checks")
        return [(reply[i], reply[i + 1], reply[i + 2]) for i in range(0, len(reply), 3)]


def unchanged_checker() -> UnchangedChecker:
    """The running event loop's checker."""
    return UnchangedChecker.of_loop()  # type: ignore[return-value]


@dataclass
class Job:
    """A registration the batcher takes: validated data, the token's key hash, the request's digest."""

    data: dict[str, Any]
    key_hash: str
    request_digest: str

    @property
    def service_id(self) -> str:
        return str(self.data["service_id"])


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: list[tuple[bytes, bytes]]


def _job(data: dict[str, Any], key: str, request_digest: str | None) -> Job | None:
    """The registration in a request, validated as the view validates it; None: let Django answer it.
    ``request_digest``: the digest of ``data`` as sent, if taken."""
    validated = common_registration(data)
    if validated is None:
        try:
            validated = dict(_validator().run_validation(data))
        except ValidationError:
            return None  # Django authenticates first, then answers the same 400 naming the field
        request_digest = None
    # A body in the common form validates to its own fields, values and types: the same digest.
    return Job(validated, hash_token(key), request_digest or reregister.digest(validated))


_validators = threading.local()


def _validator() -> RegisterSerializer:
    """The view's serializer, built once per thread: its fields' deep copies cost more than validating.
    ``run_validation`` keeps no state between calls (no database: its rules are validators.* and bounds)."""
    found = getattr(_validators, "serializer", None)
    if found is None:
        found = _validators.serializer = RegisterSerializer()
        found.fields  # noqa: B018 (bind the fields now)
    return found


# The most registrations one transaction takes (a burst beyond that is the next batch's).
MAX_BATCH = 256
RETRY = [(b"retry-after", b"1")]
# How many events may wait to be sent before the next batch waits for them (a bound on the backlog).
MAX_UNSENT = 4096


# How long a batch may wait for the registrations it expects (``RegistrationBatcher._gather``), and over
# how long a window the number of registrations in flight at once is remembered.
LINGER = 0.003
PEAK_WINDOW = 1.0


class RegistrationBatcher:
    """Group commit for registrations on one event loop: while a batch is in the database, new jobs wait
    and form the next batch, which takes each service id at most once (a second registration of an id
    waits for the batch after: as if they came one after the other).

    A batch costs about as much for one registration as for eight, and clients answered by one batch come
    back while the next one runs: alone, a steady load splits into two alternating batches (one and seven
    of eight clients, say). So a batch is started once as many registrations are pending as were lately
    in flight at once, or after LINGER: the clients come back together, and a lone client never waits."""

    def __init__(self) -> None:
        self.pending: list[tuple[Job, asyncio.Future[Answer | None]]] = []
        self.running: asyncio.Task[None] | None = None
        self.publishing: asyncio.Task[None] | None = None
        self.unsent = 0  # events of committed batches not sent yet
        self.finishing: set[asyncio.Task[None]] = set()
        self.in_flight = 0  # submitted and not answered yet
        self.peak = self.peak_before = 0  # the most in flight at once in this window, and in the one before
        self.window_ends = 0.0
        self.arrival: asyncio.Future[None] | None = None  # what _gather waits on

    async def submit(self, job: Job) -> Answer | None:
        """The answer to ``job`` (None: let Django answer the request)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer | None] = loop.create_future()
        self.pending.append((job, future))
        self.in_flight += 1
        now = loop.time()
        if now >= self.window_ends:
            self.peak_before, self.peak, self.window_ends = self.peak, 0, now + PEAK_WINDOW
        self.peak = max(self.peak, self.in_flight)
        if self.arrival is not None and not self.arrival.done():
            self.arrival.set_result(None)
        if self.running is None or self.running.done():
            self.running = loop.create_task(self._drain())
        try:
            return await future
        finally:
            self.in_flight -= 1

    async def _gather(self) -> None:
        """Wait, at most LINGER, until as many registrations are pending as were lately in flight at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER
        while len(self.pending) < min(MAX_BATCH, max(self.peak, self.peak_before)):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self.arrival = loop.create_future()
            timer = loop.call_later(remaining, _wake, self.arrival)
            try:
                await self.arrival
            finally:
                timer.cancel()
                self.arrival = None

    def _next_batch(self) -> list[tuple[Job, asyncio.Future[Answer | None]]]:
        batch: list[tuple[Job, asyncio.Future[Answer | None]]] = []
        rest: list[tuple[Job, asyncio.Future[Answer | None]]] = []
        ids: set[str] = set()
        for entry in self.pending:
            if len(batch) >= MAX_BATCH or entry[0].service_id in ids:
                rest.append(entry)
            else:
                ids.add(entry[0].service_id)
                batch.append(entry)
        self.pending = rest
        return batch

    async def _drain(self) -> None:
        while self.pending:
            if self.unsent > MAX_UNSENT and self.publishing is not None:
                # Watchers' events fell behind: let them catch up before writing more.
                await asyncio.gather(self.publishing, return_exceptions=True)
            await self._gather()
            batch = self._next_batch()
            try:
                done = await sync_to_async(with_fresh_connection, thread_sensitive=True)(
                    run_batch, [job for job, _future in batch], timezone.now()
                )
            except Exception:
                log.exception("registration batch failed; its requests go to the view")
                done = Done([None] * len(batch), [], [])
            # The rest off Django's thread, so the next batch starts at once.
            task = asyncio.get_running_loop().create_task(self._finish(batch, done))
            self.finishing.add(task)  # a reference, so the task is not collected before it ran
            task.add_done_callback(self.finishing.discard)

    async def _finish(self, batch: list[tuple[Job, asyncio.Future[Answer | None]]], done: Done) -> None:
        """Remember the answers (registry.reregister), answer, then send the events after the batch before's."""
        if done.remembered:
            try:
                args = reregister.remember_many_args(done.remembered)
                await get_async_redis().eval(reregister.REMEMBER_MANY_LUA, 2, *args)
            except Exception as exc:  # noqa: BLE001 (committed: answered as such; see the module docstring)
                log.warning("registrations not remembered: %s", exc)
        for (_job, future), answer in zip(batch, done.answers, strict=True):
            if not future.done():  # the client may have gone
                future.set_result(answer)
        if done.messages:
            self.unsent += len(done.messages)
            self.publishing = asyncio.get_running_loop().create_task(self._publish(self.publishing, done.messages))

    async def _publish(self, previous: asyncio.Task[None] | None, messages: list[tuple[str, dict[str, Any]]]) -> None:
        try:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)  # one batch's events after the one before's
            await events.send_collected(messages)
        finally:
            self.unsent -= len(messages)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RegistrationBatcher] = weakref.WeakKeyDictionary()


def batcher() -> RegistrationBatcher:
    """The running event loop's batcher."""
    loop = asyncio.get_running_loop()
    found = _batchers.get(loop)
    if found is None:
        found = _batchers[loop] = RegistrationBatcher()
    return found


@dataclass
class Done:
    """A batch's answers (None: the view answers that request), and what is left to do on the event loop:
    the registrations to remember (``reregister.remember_many_args``) and the events to send."""

    answers: list[Answer | None]
    remembered: list[tuple[str, int, str, int | None, Any]]
    messages: list[tuple[str, dict[str, Any]]]


def _active_tokens(key_hashes: set[str]) -> list[ApiToken]:
    """``ApiToken.objects.filter(key_hash__in=key_hashes, is_active=True)`` as a raw query (cheaper to build)."""
    quote = db.connection.ops.quote_name
    where = f"WHERE {quote('is_active')} AND {quote('key_hash')} IN ({', '.join(['%s'] * len(key_hashes))})"
    return leases.select_rows(ApiToken, where, sorted(key_hashes))


def run_batch(jobs: list[Job], now: datetime) -> Done:
    """Register a batch (ids distinct) in one transaction."""
    answers: list[Answer | None] = [None] * len(jobs)
    tokens = {t.key_hash: t for t in _active_tokens({j.key_hash for j in jobs})}
    taken = [i for i, job in enumerate(jobs) if job.key_hash in tokens]  # no token: the view's 401
    if not taken:
        return Done(answers, [], [])
    with events.collect() as messages:
        try:
            outcomes = leases.register_many([(jobs[i].data, tokens[jobs[i].key_hash]) for i in taken], now)
        except redis.RedisError as exc:
            log.error("Redis unavailable during a registration batch: %s", exc)
            outage.note_unreachable()
            failed = Answer(503, {"detail": "Lease store unavailable; retry shortly."}, RETRY)
            return Done([failed if job.key_hash in tokens else None for job in jobs], [], [])
        except (db.OperationalError, db.InterfaceError) as exc:
            log.error("database unavailable during a registration batch: %s", exc)
            failed = Answer(503, {"detail": "Database unavailable; retry shortly."}, RETRY)
            return Done([failed if job.key_hash in tokens else None for job in jobs], [], [])
    remembered = []
    for i, outcome in zip(taken, outcomes, strict=True):
        token = tokens[jobs[i].key_hash]
        if isinstance(outcome, leases.NotOwner):
            answers[i] = Answer(403, {"detail": str(outcome)}, [])
            continue
        service, created = outcome
        owner = token if service.owner_id == token.pk else service.owner
        body = registered_body(service, now, owner.name if owner is not None else None)
        answers[i] = Answer(201 if created else 200, body, [])
        remembered.append((service.service_id, service.revision, jobs[i].request_digest, service.owner_id, body))
    return Done(answers, remembered, list(messages))
