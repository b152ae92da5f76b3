"""Django's ASGI handler, running each request's middleware chain and view in one worker thread of a
small per-process pool, where each thread keeps its own database connection between requests.

Every view here is sync. Django's stock ASGIHandler runs the (dual sync/async) middleware in async
mode and hops to a thread and back for each process_request and process_response: about 30 thread
hops per request, 4-5 ms before any view code on this machine (/healthz measured in-process). Loading
the middleware in sync mode and making one hop for the whole request cuts that to one.

Stock Django also serves each request in a thread of its own (a ``ThreadSensitiveContext`` per
request), so a persistent connection (``CONN_MAX_AGE``) would be opened per request and left behind
with its thread. Here the threads are a fixed pool of ``REGISTRY_REQUEST_THREADS``: a connection
opened by one request is reused by the next request served on that thread (no connect, no SQLite
PRAGMAs, no PostgreSQL pool checkout), at most that many connections per process. Each request
starts with ``close_old_connections()`` on its own thread, which drops a connection that has failed
or outlived ``CONN_MAX_AGE``, and with ``CONN_HEALTH_CHECKS`` the first query then checks a reused
connection (e.g. after a database restart) and reconnects instead of failing.

``REGISTRY_REQUEST_THREADS=0`` restores Django's thread per request (benchmarks compare the two).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from asgiref.sync import AsyncToSync, sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.db import close_old_connections, connections
from django.http import HttpRequest, HttpResponseBase

T = TypeVar("T")


class SyncChainASGIHandler(ASGIHandler):
    def __init__(self, threads: int | None = None) -> None:
        super().__init__()
        self.load_middleware(is_async=False)
        threads = settings.REGISTRY_REQUEST_THREADS if threads is None else threads
        self.executor = (
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="django-request") if threads > 0 else None
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.executor is None:
            return await super().__call__(scope, receive, send)
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        # No ThreadSensitiveContext: it would give this request a thread (and a connection) of its own.
        await self.handle(scope, receive, send)
        return None

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        return await self.run_sync(self.get_response, request)

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` where a request's view runs: on a thread of the pool, its connection checked before
        and after (an ASGI fast path that reads the database uses this too). Called from sync code through
        async_to_sync (a test, a management command), it runs in that caller's thread, as thread-sensitive
        code always does, on its connection."""
        if self.executor is None or getattr(AsyncToSync.executors, "current", None) is not None:
            return await sync_to_async(fn, thread_sensitive=True)(*args)
        return await sync_to_async(_checked, thread_sensitive=False, executor=self.executor)(fn, *args)


def _checked(fn: Callable[..., T], *args: Any) -> T:
    # request_started's close_old_connections ran on another thread: this one's connection is the one
    # this request uses, so check it here (and again after, as request_finished would).
    drop_failed_sqlite_connections()
    close_old_connections()
    try:
        return fn(*args)
    finally:
        drop_failed_sqlite_connections()
        close_old_connections()


def drop_failed_sqlite_connections() -> None:
    """Close a SQLite connection that had an error and no longer answers.

    Django keeps a connection that had an error if ``is_usable()``, which SQLite's backend always
    says (there is no server to lose); a handle that really fails would then fail every later
    request on this thread. PostgreSQL's ``is_usable()`` asks the server, so Django handles it.
    """
    for conn in connections.all(initialized_only=True):
        if conn.vendor == "sqlite" and conn.errors_occurred and conn.connection is not None:
            try:
                conn.connection.execute("SELECT 1")
            except sqlite3.Error:
                conn.close()
