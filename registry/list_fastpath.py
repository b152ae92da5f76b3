"""The service list fast path: an ASGI route in front of Django for GET /api/v1/services/ when the page
asked for is one this process remembers (``registry.listing.PageCache``).

Such a request is a query-string check, one Redis script call and a JSON encoding on the event loop: the
script checks the token against the token cache, that the registry's membership counter and the change
counter of each service name on the page still have the values the page was read at, and reads the
page's lease deadlines. The body is the view's: the same remembered rows and count, written by
``listing.representation`` with the live deadlines, the next and previous links built by DRF's own
helpers from Django's own request object, encoded by DRF's JSON renderer.

Everything else goes on to Django untouched, where the view answers and remembers the page for the next
time: a page not remembered (or remembered before a registration or removal, or before a change of one of
its services, or too long ago), a token that is not active (one not yet in the token cache is loaded into
it, as the other fast paths do), a ``health`` filter, a query the view would refuse or read in its own way
(``format``, a page or page size that is not a plain number), a browser's Accept header, a throttled
deployment.
"""

from __future__ import annotations

import io
import logging
import re
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

log = logging.getLogger(__name__)

LIST_PATH = "/api/v1/services/"
PLAIN_NUMBER = re.compile(r"[1-9][0-9]{0,8}")
PAGE_SIZE_DEFAULT = listing.ServiceListPagination.page_size
PAGE_SIZE_MAX = listing.ServiceListPagination.max_page_size

# KEYS: the token's cache entry, the registry's membership counter, the lease deadlines, then the change
# counter of each service name on the page. ARGV: the membership counter's value the entry was read at, each
# name's counter as remembered ("" for unset), then the page's service ids.
# Replies: {'TOKEN_MISS'} | {'STALE'} | {'OK', deadline or false, ...}.
PAGE_LUA = """
if not redis.call('GET', KEYS[1]) then return {'TOKEN_MISS'} end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {'STALE'} end
local names = #KEYS - 3
for i = 1, names do
  if (redis.call('GET', KEYS[3 + i]) or '') ~= ARGV[1 + i] then return {'STALE'} end
end
if #ARGV == names + 1 then return {'OK'} end
local reply = redis.call('ZMSCORE', KEYS[3], unpack(ARGV, names + 2))
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

    def __init__(self, app: Any) -> None:
        self.app = app
        self.renderer = JSONRenderer()

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
        if page is None:
            return False
        rows = page.rows
        k = lease_store.keys()
        keys = [k.token(token_hash), events.services_membership_key(), k.deadline, *listing.stamp_keys(page.stamps)]
        args = [str(memo.version), *(stamp for _, stamp in page.stamps), *(row[0] for row in rows)]
        r = get_async_redis()
        try:
            reply = await r.eval(PAGE_LUA, len(keys), *keys, *args)
            if reply[0] == b"TOKEN_MISS":
                # Load the token into the cache as the other fast paths do (none such, or inactive: the view's 401)
                if not await sync_to_async(with_fresh_connection, thread_sensitive=True)(cache_token, token_hash):
                    return False
                reply = await r.eval(PAGE_LUA, len(keys), *keys, *args)
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
