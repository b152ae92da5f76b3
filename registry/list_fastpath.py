"""The service list fast path: an ASGI route in front of Django for GET /api/v1/services/, answering the
pages of lists without a ``health`` filter without the Django request cycle.

A page this process remembers (``registry.listing.PageCache``) is a query-string check, one Redis script
call and a JSON encoding on the event loop: the script checks the token against the token cache, that the
registry's membership counter and the change counter of each service name on the page still have the
values the page was read at, and reads the page's lease deadlines. When only a name's counter moved (a
service on the page changed), the rows of that name are read again by id, the others kept
(``listing.read_page``: one statement); a page not read yet, of a selector's remembered matching ids, is
read by id whole; anything else not remembered is read as the view reads it (``listing.read_fresh``: the
view's own paginator and queries).
Both run on one of Django's request threads (``run_sync``), the token checked in Redis first, and are
remembered for the next time. The body is the view's: the same rows and count, written by
``listing.representation`` with the live deadlines, the next and previous links built by DRF's own
helpers from Django's own request object, encoded by DRF's JSON renderer.

Everything else goes on to Django untouched, where the view answers: a token that is not active (one not
yet in the token cache is loaded into it, as the other fast paths do), a ``health`` filter, a page that
does not exist, a query the view would refuse or read in its own way (``format``, a page or page size
that is not a plain number), a browser's Accept header, a throttled deployment, an error of Redis or of
the database.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django import db
from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.core.handlers.asgi import ASGIRequest
from django.http import QueryDict
from django.utils import timezone
from rest_framework.renderers import JSONRenderer
from rest_framework.utils.urls import remove_query_param, replace_query_param

from . import events, lease_store, listing
from .fastpath import authenticate, host_allowed, json_request_headers, with_fresh_connection
from .leases import cache_token
from .redis_client import Lua, get_async_redis

RunSync = Callable[..., Awaitable[Any]]

log = logging.getLogger(__name__)

LIST_PATH = "/api/v1/services/"
PLAIN_NUMBER = re.compile(r"[1-9][0-9]{0,8}")
PAGE_SIZE_DEFAULT = listing.ServiceListPagination.page_size
PAGE_SIZE_MAX = listing.ServiceListPagination.max_page_size

# KEYS: the token's cache entry, the registry's membership counter, the lease deadlines, the registry's change
# counter, then the change counter of each service name on the page. ARGV: the membership counter's value the
# entry was read at, whether the page is remembered ("1") or not ("0"), each name's counter as remembered
# ("" for unset), then the page's service ids.
# Replies: {'TOKEN_MISS'} | {'STALE'} (the count and ids no longer hold) | {'ROWS', the change counter or "",
# the 1-based index of each name whose counter moved, ...} (they do, but the page's rows are to be read: those
# of the names given, or all of them for a page not remembered) | {'OK', deadline or false, ...}.
PAGE = Lua("""
if not redis.call('GET', KEYS[1]) then return {'TOKEN_MISS'} end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {'STALE'} end
local names = #KEYS - 4
local moved = {}
for i = 1, names do
  if (redis.call('GET', KEYS[4 + i]) or '') ~= ARGV[2 + i] then moved[#moved + 1] = i end
end
if ARGV[2] == '0' or #moved > 0 then
  local reply = {'ROWS', redis.call('GET', KEYS[4]) or ''}
  for _, i in ipairs(moved) do reply[#reply + 1] = i end
  return reply
end
if #ARGV == names + 2 then return {'OK'} end
local reply = redis.call('ZMSCORE', KEYS[3], unpack(ARGV, names + 3))
table.insert(reply, 1, 'OK')
return reply
""")

# What a query string reads as: None (Django's business) or (filters, page number, page size, the filters'
# validated values). Remembered by the exact bytes of the query, short ones only.
Query = tuple[tuple[Any, ...], int, int, dict[str, Any]]
_MAX_QUERY = 1200
_MAX_QUERIES = 4096
_queries: dict[bytes, Query | None] = {}


def read_query(query_string: bytes) -> Query | None:
    found = _queries.get(query_string, False)
    if found is False:
        found = _read(query_string)
        if len(query_string) <= _MAX_QUERY:
            if len(_queries) >= _MAX_QUERIES:
                _queries.clear()
            _queries[query_string] = found
    return found  # type: ignore[return-value]


def _read(query_string: bytes) -> Query | None:
    from .serializers import ServiceQuerySerializer

    try:
        params = QueryDict(query_string.decode())
    except (UnicodeDecodeError, SuspiciousOperation):  # Django has its own answers to these
        return None
    if "format" in params or "health" in params:
        return None
    page, size = params.get("page"), params.get("page_size")
    if (page is not None and not PLAIN_NUMBER.fullmatch(page)) or (
        size is not None and not PLAIN_NUMBER.fullmatch(size)
    ):
        return None  # "last", "0", " 2" and the like: the view's rules and messages
    query = ServiceQuerySerializer(data=params)
    if not query.is_valid():
        return None  # the view's 400
    filters = listing.filters_key(query.validated_data)
    size_read = min(int(size), PAGE_SIZE_MAX) if size else PAGE_SIZE_DEFAULT
    return filters, int(page or 1), size_read, dict(query.validated_data)


class ServiceListFastPath:
    """ASGI middleware: answers list pages (remembered, or read on Django's request threads) and passes
    everything else to ``app``."""

    def __init__(self, app: Any, run_sync: RunSync | None = None) -> None:
        self.app = app
        self.renderer = JSONRenderer()
        # Where a page is read when it must be (the request threads of Django's handler); without it, only
        # remembered pages are answered here.
        self.run_sync = run_sync

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"] == LIST_PATH
            and settings.REGISTRY_THROTTLE_RATE is None
        ):
            answered = await self.answer(scope, send)
            if answered:
                return
        await self.app(scope, receive, send)

    async def answer(self, scope: dict[str, Any], send: Any) -> bool:
        """Answer the page; False to leave the request to Django."""
        headers = json_request_headers(scope)
        if headers is None:
            return False
        host, authorization = headers
        query = read_query(scope["query_string"])
        if query is None or not host_allowed(host):
            return False
        token_hash, refused = authenticate(authorization)
        if refused is not None:
            return False  # the view's 401
        filters, number, per_page, params = query
        found = await self.page_of(token_hash, filters, params, number, per_page)
        if found is None:
            return False
        count, rows, deadlines = found
        now = timezone.now()
        live = {
            row[0]: (int(score) if score is not None else None, None)
            for row, score in zip(rows, deadlines, strict=True)
        }
        results = listing.representation(rows, now, live)
        request = ASGIRequest(scope, io.BytesIO())
        url = request.build_absolute_uri()
        pages = max(1, -(-count // per_page))
        previous = None
        if number > 1:
            previous = remove_query_param(url, "page") if number == 2 else replace_query_param(url, "page", number - 1)
        body = {
            "count": count,
            "next": replace_query_param(url, "page", number + 1) if number < pages else None,
            "previous": previous,
            "results": results,
        }
        payload = self.renderer.render(body)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        return True

    async def page_of(
        self, token_hash: str, filters: tuple[Any, ...], params: dict[str, Any], number: int, per_page: int
    ) -> tuple[int, list[tuple[Any, ...]], list[Any]] | None:
        """(count, rows, each row's lease deadline) of the page asked for, with the token checked; None to
        leave the request to the view (a token not active, a page that does not exist, an error)."""
        r = get_async_redis()
        k = lease_store.keys()
        try:
            memo = listing.PAGES.remembered_now(filters)
            if memo is not None and memo.count is not None:
                page = memo.pages.get((number, per_page))
                stamps = page.stamps if page is not None else ()
                rows = page.rows if page is not None else []
                keys = [k.token(token_hash), events.services_membership_key(), k.deadline]
                keys += [events.services_version_key(), *listing.stamp_keys(stamps)]
                args = [str(memo.version), "1" if page is not None else "0", *(v for _, v in stamps)]
                args += [row[0] for row in rows]
                reply = await PAGE.run_async(r, keys, *args)
                if reply[0] == b"TOKEN_MISS":
                    if not await self.load_token(token_hash):
                        return None
                    reply = await PAGE.run_async(r, keys, *args)
                if reply[0] == b"OK":
                    return memo.count, rows, reply[1:]
                if reply[0] == b"ROWS" and memo.ids is not None and self.run_sync is not None:
                    ids = memo.ids[(number - 1) * per_page : number * per_page]
                    if not ids and number > 1:
                        return None  # past the end: the view's 404
                    changes = reply[1] or None  # the registry's change counter before the rows are read
                    moved = {stamps[i - 1][0] for i in reply[2:]}  # the names whose rows changed
                    read = await self.run_sync(listing.read_page, memo, (number, per_page), ids, changes, page, moved)
                    if read is not None:
                        return memo.count, read, await deadlines(r, ids)
                # a registration or removal since, a page that is a walk of the index, or a gone id: read afresh
            elif not await r.exists(k.token(token_hash)) and not await self.load_token(token_hash):
                return None
            if self.run_sync is None:
                return None
            fresh = await self.run_sync(listing.read_fresh, filters, params, number, per_page)
            if fresh is None:
                return None
            count, rows = fresh
            return count, rows, await deadlines(r, [row[0] for row in rows])
        except redis.RedisError:
            return None  # Django answers as it does when Redis is unreachable
        except db.DatabaseError:
            return None  # and as it does when the database fails

    async def load_token(self, token_hash: str) -> bool:
        """Load the token into the cache as the other fast paths do; False if there is no such active token
        (the view's 401)."""
        return bool(await sync_to_async(with_fresh_connection, thread_sensitive=True)(cache_token, token_hash))


async def deadlines(r: Any, service_ids: list[str]) -> list[Any]:
    return list(await r.zmscore(lease_store.keys().deadline, service_ids)) if service_ids else []
