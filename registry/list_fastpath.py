"""The service list fast path: an ASGI route in front of Django for GET /api/v1/services/ when the page
asked for is one this process remembers (``registry.listing.PageCache``).

Such a request is a query-string check, one Redis script call and a JSON encoding on the event loop: the
script checks the token against the token cache, that the registry's membership counter and the change
counter of each service name on the page still have the values the page was read at, and reads the
page's lease deadlines. When only a name's counter moved (a service on the page changed), or the page
was not read yet, and the selector's matching ids are remembered, the page's rows are read by id on one
of Django's request threads (``listing.read_page``: one statement, remembered again) without the rest
of the Django request, and the deadlines in a second call. The body is the view's: the same rows and
count, written by ``listing.representation`` with the live deadlines, the next and previous links built
by DRF's own helpers from Django's own request object, encoded by DRF's JSON renderer.

Everything else goes on to Django untouched, where the view answers and remembers the page for the next
time: a page not remembered (or remembered before a registration or removal, or too long ago; or a page
whose rows must be read that is a walk of the list's index, not of remembered ids), a token that is not
active (one not yet in the token cache is loaded into it, as the other fast paths do), a ``health``
filter, a query the view would refuse or read in its own way (``format``, a page or page size that is
not a plain number), a browser's Accept header, a throttled deployment.
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
from .redis_client import get_async_redis

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
# Replies: {'TOKEN_MISS'} | {'STALE'} (the count and ids no longer hold) | {'ROWS', the change counter or ""}
# (they do, but the page's rows are to be read) | {'OK', deadline or false, ...}.
PAGE_LUA = """
if not redis.call('GET', KEYS[1]) then return {'TOKEN_MISS'} end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {'STALE'} end
local names = #KEYS - 4
local rows = ARGV[2] == '0'
for i = 1, names do
  if (redis.call('GET', KEYS[4 + i]) or '') ~= ARGV[2 + i] then rows = true end
end
if rows then return {'ROWS', redis.call('GET', KEYS[4]) or ''} end
if #ARGV == names + 2 then return {'OK'} end
local reply = redis.call('ZMSCORE', KEYS[3], unpack(ARGV, names + 3))
table.insert(reply, 1, 'OK')
return reply
"""

# What a query string reads as: None (Django's business) or (filters, page number, page size). Remembered
# by the exact bytes of the query, short ones only.
Query = tuple[tuple[Any, ...], int, int]
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
    filters = tuple(sorted((k, repr(v)) for k, v in query.validated_data.items()))
    return filters, int(page or 1), min(int(size), PAGE_SIZE_MAX) if size else PAGE_SIZE_DEFAULT


class ServiceListFastPath:
    """ASGI middleware: answers the list pages this process remembers and passes everything else to ``app``."""

    def __init__(self, app: Any, run_sync: RunSync | None = None) -> None:
        self.app = app
        self.renderer = JSONRenderer()
        # Where the page's rows are read when they must be (the request threads of Django's handler);
        # without it, such a request goes to the view.
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
        """Answer from a remembered page; False to leave the request to Django."""
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
        filters, number, per_page = query
        memo = listing.PAGES.remembered_now(filters)
        if memo is None or memo.count is None:
            return False
        page = memo.pages.get((number, per_page))
        if page is None and (memo.ids is None or self.run_sync is None):
            return False
        stamps = page.stamps if page is not None else ()
        rows = page.rows if page is not None else []
        k = lease_store.keys()
        keys = [k.token(token_hash), events.services_membership_key(), k.deadline, events.services_version_key()]
        keys += listing.stamp_keys(stamps)
        args = [str(memo.version), "1" if page is not None else "0", *(s for _, s in stamps), *(row[0] for row in rows)]
        r = get_async_redis()
        try:
            reply = await r.eval(PAGE_LUA, len(keys), *keys, *args)
            if reply[0] == b"TOKEN_MISS":
                # Load the token into the cache as the other fast paths do (none such, or inactive: the view's 401)
                if not await sync_to_async(with_fresh_connection, thread_sensitive=True)(cache_token, token_hash):
                    return False
                reply = await r.eval(PAGE_LUA, len(keys), *keys, *args)
            if reply[0] == b"ROWS":
                if memo.ids is None or self.run_sync is None:
                    return False  # a page that is a walk of the list's index: the view reads it
                ids = memo.ids[(number - 1) * per_page : number * per_page]
                if not ids and number > 1:
                    return False  # past the end: the view's 404
                changes = reply[1] or None  # the registry's change counter before the rows are read
                read = await self.run_sync(listing.read_page, memo, (number, per_page), ids, changes)
                if read is None:
                    return False  # a remembered id is gone: the view reads afresh
                rows = read
                reply = [b"OK", *(await r.zmscore(k.deadline, ids))] if ids else [b"OK"]
        except redis.RedisError:
            return False  # Django answers as it does when Redis is unreachable
        except (db.OperationalError, db.InterfaceError):
            return False
        if reply[0] != b"OK":
            return False
        now = timezone.now()
        live = {
            row[0]: (int(score) if score is not None else None, None)
            for row, score in zip(rows, reply[1:], strict=True)
        }
        results = listing.representation(rows, now, live)
        request = ASGIRequest(scope, io.BytesIO())
        url = request.build_absolute_uri()
        pages = max(1, -(-memo.count // per_page))
        previous = None
        if number > 1:
            previous = remove_query_param(url, "page") if number == 2 else replace_query_param(url, "page", number - 1)
        body = {
            "count": memo.count,
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
