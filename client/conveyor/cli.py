"""The ``conveyor`` command line: the services, consumer groups, topics, selection and leader of a
conveyor-registry, as tables for people or (``--json``) JSON for scripts.

    conveyor services list [--name N] [--type T] [--health H] [--group G] [--selector k=v,...]
    conveyor services get|deregister ID
    conveyor services drain|undrain ID [ID ...]            (staff tokens)
    conveyor services register ID --name N --type T --endpoint HOST:PORT [--label k=v ...] [--lease S]
    conveyor services watch [--name N] [--count N]
    conveyor groups list | describe GROUP [--partitions] | watch GROUP [--count N]
    conveyor groups join GROUP --topics T [T ...] --exec CMD
    conveyor topics list | put NAME --partitions N
    conveyor select NAME [--strategy S] [--key K] [--selector k=v,...] [--endpoint]

``services watch`` is ``Registry.watch_services``, ``select`` ``Registry.balancer(...).select()`` and
``groups join`` ``Registry.group_member`` with a listener that runs the command (``conveyor._exec``).
    conveyor leader

Where and as whom: ``--url`` / ``--token``, else ``CONVEYOR_URL`` / ``CONVEYOR_TOKEN``.

Exit codes say what happened: 0 done; 1 any other error (e.g. a 409 conflict); 2 bad usage or input
(also a server's 400); 3 not found; 4 no valid token (401) or not allowed (403); 5 the registry is
unreachable, timed out, rate-limited or unavailable (503): retry later; 6 ``select`` found no instance
to choose (instances exist, none eligible). A watch ends with 0 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import quote

from . import errors
from ._config import Config, resolve
from ._http import Transport
from .records import Service, WatchEvent
from .registry import Registry
from .strategies import STRATEGIES

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_DENIED = 4
EXIT_UNAVAILABLE = 5
EXIT_NO_INSTANCE = 6

PAGE_SIZE = 1000
IDENTIFIER = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class CliError(Exception):
    """A failure the command reports in a sentence, with the exit code that says what it was."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def exit_code(error: errors.ConveyorError) -> int:
    """The exit code for a typed error of the client library."""
    if isinstance(error, errors.NoInstanceAvailable) or _no_instance(error):
        return EXIT_NO_INSTANCE
    if isinstance(error, errors.InvalidRequest):
        return EXIT_USAGE
    if isinstance(error, errors.NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, errors.Unauthorized | errors.Forbidden):
        return EXIT_DENIED
    if isinstance(error, errors.Unavailable | errors.RateLimited):
        return EXIT_UNAVAILABLE
    return EXIT_ERROR


def _no_instance(error: errors.ConveyorError) -> bool:
    # The select endpoint's 503 names the service: instances exist but none can be chosen. A 503 of an
    # unreachable lease store does not.
    return error.status == 503 and isinstance(error.body, dict) and "name" in error.body


# --- output ---------------------------------------------------------------------------------------


class Output:
    """Where and how results are written: aligned tables and ``key: value`` blocks, or JSON."""

    def __init__(self, as_json: bool, stream: IO[str] | None = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stdout

    def json(self, value: Any) -> None:
        print(json.dumps(value, indent=2, sort_keys=True), file=self.stream, flush=True)

    def line(self, value: Any) -> None:
        """One JSON document per line (a stream)."""
        print(json.dumps(value, sort_keys=True), file=self.stream, flush=True)

    def text(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def table(self, rows: Sequence[Sequence[Any]], headers: Sequence[str], empty: str = "") -> None:
        if not rows:
            if empty:
                print(empty, file=sys.stderr)
            return
        self.text(render_table(rows, headers))

    def fields(self, pairs: Iterable[tuple[str, Any]]) -> None:
        pairs = list(pairs)
        width = max(len(k) for k, _ in pairs)
        self.text("\n".join(f"{k + ':':<{width + 1}} {_cell(v)}" for k, v in pairs))


def render_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def _cell(value: Any) -> str:
    if value is None or value == "" or value == {} or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def ranges(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8``."""
    ordered = sorted(set(numbers))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def partitions_text(by_topic: dict[str, list[int]] | None) -> str:
    """``{"orders": [0, 1, 2], "refunds": [4]}`` -> ``orders:0-2 refunds:4`` (``-`` when empty)."""
    if not by_topic:
        return "-"
    return " ".join(f"{topic}:{ranges(numbers)}" for topic, numbers in sorted(by_topic.items()) if numbers) or "-"


def count(by_topic: dict[str, list[int]] | None) -> int:
    return sum(len(v) for v in (by_topic or {}).values())


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def relative(value: str | None, now: datetime | None = None) -> str:
    """An ISO time as seconds from now: ``in 27s``, ``3s ago``."""
    moment = parse_time(value)
    if moment is None:
        return "-"
    seconds = round((moment - (now or datetime.now(UTC))).total_seconds())
    return f"in {seconds}s" if seconds >= 0 else f"{-seconds}s ago"


def labels_text(labels: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "-"


# --- context --------------------------------------------------------------------------------------


class Context:
    """What every command gets: the parsed arguments, the configuration, one transport and the output."""

    def __init__(self, args: argparse.Namespace, config: Config, out: Output) -> None:
        self.args = args
        self.config = config
        self.out = out
        self._transport: Transport | None = None
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        """The client library's entry point, for the commands built on its objects (watch, balancer, member)."""
        if self._registry is None:
            self._registry = Registry(self.config.url, self.config.token, timeout=self.config.timeout)
        return self._registry

    @property
    def http(self) -> Transport:
        if self._transport is None:
            self._transport = Transport(self.config)
        return self._transport

    def all_pages(self, path: str, params: dict[str, Any] | None = None, resource: str = "") -> list[dict[str, Any]]:
        """Every item of a paginated list."""
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self.http.request(
                "GET", path, params={**(params or {}), "page": page, "page_size": PAGE_SIZE}, resource=resource
            )
            items += body["results"]
            if not body.get("next"):
                return items
            page += 1

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._registry is not None:
            self._registry.close()


# --- services -------------------------------------------------------------------------------------

SERVICE_HEADERS = ["SERVICE_ID", "NAME", "TYPE", "ENDPOINT", "HEALTH", "WEIGHT", "LEASE", "LABELS"]


def _service_row(s: dict[str, Any]) -> list[Any]:
    weight = f"{s['weight']} (drained)" if s.get("drained") else s.get("weight")
    return [
        s["service_id"],
        s["service_name"],
        s["service_type"],
        s["endpoint"],
        s["health"],
        weight,
        relative(s.get("lease_expires_at")),
        labels_text(s.get("labels")),
    ]


def services_list(ctx: Context) -> int:
    a = ctx.args
    params = {
        k: v
        for k, v in {
            "name": a.name,
            "type": a.type,
            "health": a.health,
            "group_id": a.group,
            "selector": a.selector,
        }.items()
        if v is not None
    }
    services = ctx.all_pages("services/", params)
    if ctx.out.as_json:
        ctx.out.json(services)
    else:
        ctx.out.table([_service_row(s) for s in services], SERVICE_HEADERS, empty="no services")
    return EXIT_OK


def _service_fields(s: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("service_id", s["service_id"]),
        ("name", s["service_name"]),
        ("type", s["service_type"]),
        ("endpoint", s["endpoint"]),
        (
            "health",
            s["health"]
            + ("" if s["health"] == s.get("reported_health") else f" (reported {s.get('reported_health')})"),
        ),
        ("weight", s.get("weight")),
        ("drained", s.get("drained")),
        ("operator weight", s.get("operator_weight")),
        ("labels", labels_text(s.get("labels"))),
        ("group", s.get("group_id")),
        ("owner", s.get("owner")),
        ("registered", s.get("registered_at")),
        ("last heartbeat", s.get("last_heartbeat")),
        ("lease", f"{s.get('lease_duration')}s, expires {relative(s.get('lease_expires_at'))}"),
        ("deregister after", f"{s.get('deregister_after')}s"),
    ]


def services_get(ctx: Context) -> int:
    try:
        service = ctx.http.request("GET", f"services/{ctx.args.service_id}/", resource="service")
    except errors.NotFound as exc:
        raise CliError(
            f"no service is registered under the id {ctx.args.service_id!r} (deregistered, or expired?)",
            EXIT_NOT_FOUND,
        ) from exc
    if ctx.out.as_json:
        ctx.out.json(service)
    else:
        ctx.out.fields(_service_fields(service))
    return EXIT_OK


def _label(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def _identifier(value: str) -> str:
    """A name checked as the registry checks identifiers, before any connection is made."""
    if not IDENTIFIER.fullmatch(value):
        raise argparse.ArgumentTypeError(f"expected 1..128 of [A-Za-z0-9._:-], got {value!r}")
    return value


def _signal_name(value: str) -> str:
    from ._exec import signal_named

    try:
        signal_named(value)
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such signal: {value!r}") from None
    return value


def services_register(ctx: Context) -> int:
    a = ctx.args
    body: dict[str, Any] = {
        "service_id": a.service_id,
        "service_name": a.name,
        "service_type": a.type,
        "endpoint": a.endpoint,
        "labels": dict(a.label or []),
    }
    for key, value in (
        ("lease_duration", a.lease),
        ("deregister_after", a.deregister_after),
        ("weight", a.weight),
        ("health", a.health),
        ("group_id", a.group),
    ):
        if value is not None:
            body[key] = value
    service = ctx.http.request("POST", "services/", json=body, resource="service")
    if ctx.out.as_json:
        ctx.out.json(service)
    else:
        lease = service.get("lease", {})
        ctx.out.text(
            f"registered {service['service_id']} ({service['service_name']} at {service['endpoint']}): lease "
            f"{lease.get('duration')}s, expires {relative(lease.get('expires_at'))}; nothing heartbeats it, so it "
            f"reads unhealthy once the lease lapses (heartbeat every {lease.get('heartbeat_interval')}s to keep it)"
        )
    return EXIT_OK


def services_deregister(ctx: Context) -> int:
    ctx.http.request("DELETE", f"services/{ctx.args.service_id}/", resource="service")
    if ctx.out.as_json:
        ctx.out.json({"service_id": ctx.args.service_id, "deregistered": True})
    else:
        ctx.out.text(f"deregistered {ctx.args.service_id}")
    return EXIT_OK


def _services_operator(action: str) -> Callable[[Context], int]:
    def run(ctx: Context) -> int:
        done, first_failure = [], EXIT_OK
        for service_id in ctx.args.service_ids:
            try:
                done.append(ctx.http.request("POST", f"services/{service_id}/{action}/", resource="service"))
            except errors.ConveyorError as exc:
                report(exc, f"{service_id}: ")
                first_failure = first_failure or exit_code(exc)
        if ctx.out.as_json:
            ctx.out.json(done)
        else:
            ctx.out.table([_service_row(s) for s in done], SERVICE_HEADERS)
        return first_failure

    return run


# --- watches (websockets) -------------------------------------------------------------------------

WS_CLOSE_CODES = {
    4400: EXIT_USAGE,
    4401: EXIT_DENIED,
    4403: EXIT_DENIED,
    4404: EXIT_NOT_FOUND,
}


def follow(config: Config, path: str, handle: Callable[[dict[str, Any]], bool]) -> None:
    """Follow the websocket stream at ``path``, calling ``handle`` per message until it returns False.

    The token goes in the handshake's subprotocol offer (never in the URL). A refusal (bad input,
    token, unknown group) ends it with the matching exit code; a connection lost later is opened again
    with backoff, and the stream starts over with the current state (``handle`` drops what it had).
    """
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
    from websockets.sync.client import connect

    url = config.ws_url + path
    delay, opened = 0.5, False
    while True:
        refusal = None
        try:
            with connect(url, subprotocols=config.ws_subprotocols(), open_timeout=config.timeout) as ws:  # type: ignore[arg-type]
                opened, delay = True, 0.5
                try:
                    for raw in ws:
                        message = json.loads(raw)
                        if message.get("type") == "error":
                            refusal = str(message.get("detail", "refused"))
                            continue
                        if not handle(message):
                            return
                except ConnectionClosed:
                    pass
                code = ws.close_code
        except InvalidStatus as exc:  # refused before the upgrade (a malformed path, a foreign Origin)
            status = exc.response.status_code
            code = {400: EXIT_USAGE, 401: EXIT_DENIED, 403: EXIT_DENIED, 404: EXIT_NOT_FOUND}.get(status)
            if code is None and not opened:
                raise errors.Unavailable(f"{config.url}: websocket {path} refused with HTTP {status}") from exc
            if code is not None:
                raise CliError(f"websocket {path} refused with HTTP {status}", code) from exc
            code = None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            if not opened:
                raise errors.Unavailable(f"{config.url}: websocket {path} could not be opened: {exc}") from exc
            code = None
        if code in WS_CLOSE_CODES:
            raise CliError(refusal or f"the server closed the stream (code {code})", WS_CLOSE_CODES[code])
        print(f"conveyor: {path}: connection lost (code {code}); reconnecting in {delay:.1f}s", file=sys.stderr)
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


class Counter:
    """Stops a watch after ``limit`` messages shown (None: never)."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.shown = limit, 0

    def more(self) -> bool:
        self.shown += 1
        return self.limit is None or self.shown < self.limit


def service_json(service: Service) -> dict[str, Any]:
    """A ``Service`` record with the API's field names."""
    expires = service.lease_expires_at
    return {
        "service_id": service.id,
        "service_name": service.name,
        "service_type": service.type,
        "endpoint": service.endpoint,
        "health": service.health,
        "weight": service.weight,
        "drained": service.drained,
        "labels": dict(service.labels),
        "group_id": service.group_id,
        "lease_expires_at": expires.isoformat().replace("+00:00", "Z") if expires else None,
        "lease_duration": service.lease_duration,
    }


def event_json(event: WatchEvent) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": event.type,
        "service_id": event.service_id,
        "revision": event.revision,
        "resync": event.resync,
    }
    if event.reason is not None:
        body["reason"] = event.reason
    if event.service is not None:
        body |= service_json(event.service)
    return body


def services_watch(ctx: Context) -> int:
    """Every service event (``Registry.watch_services``): per service in revision order and once per state;
    after a reconnect, what changed meanwhile (``resync``), removals included."""
    shown = 0
    with contextlib.suppress(KeyboardInterrupt), ctx.registry.watch_services(ctx.args.name) as watch:
        for event in watch:
            if ctx.out.as_json:
                ctx.out.line(event_json(event))
            else:
                revision = "-" if event.revision is None else event.revision
                line = f"{revision:>8}  {event.type:<20}  {event.service_id}"
                if event.service is None:
                    line += f"  ({event.reason})"
                else:
                    s = event.service
                    line += f"  {s.health}  weight {s.weight}{' drained' if s.drained else ''}  {s.endpoint}"
                ctx.out.text(line + ("  (resync)" if event.resync else ""))
            shown += 1
            if ctx.args.count is not None and shown >= ctx.args.count:
                break
    return EXIT_OK


# --- groups ---------------------------------------------------------------------------------------


def groups_list(ctx: Context) -> int:
    groups = ctx.all_pages("groups/")
    if ctx.out.as_json:
        ctx.out.json(groups)
    else:
        rows = [[g["group_id"], g["generation"], g["state"], len(g["members"]), ",".join(g["topics"])] for g in groups]
        ctx.out.table(rows, ["GROUP", "GENERATION", "STATE", "MEMBERS", "TOPICS"], empty="no consumer groups")
    return EXIT_OK


MEMBER_HEADERS = ["MEMBER", "EPOCH", "SERVICE", "#OWNED", "#REVOKING", "#PENDING", "OWNED", "REVOKING", "PENDING"]
WATCH_HEADERS = [h for h in MEMBER_HEADERS if h != "SERVICE"]  # group.assignment messages do not name it


def _member_row(m: dict[str, Any]) -> list[Any]:
    return [
        m["member_id"],
        m.get("member_epoch"),
        m.get("service_name", ""),
        count(m.get("assigned_partitions")),
        count(m.get("revoking")),
        count(m.get("pending")),
        partitions_text(m.get("assigned_partitions")),
        partitions_text(m.get("revoking")),
        partitions_text(m.get("pending")),
    ]


def partition_rows(group: dict[str, Any]) -> list[list[Any]]:
    """One row per partition: its owner, and the member it moves to (revoking) or waits for (pending)."""
    owner: dict[tuple[str, int], str] = {}
    next_owner: dict[tuple[str, int], str] = {}
    for m in group["members"]:
        for topic, numbers in (m.get("assigned_partitions") or {}).items():
            for n in numbers:
                owner[(topic, n)] = m["member_id"]
        for topic, numbers in (m.get("pending") or {}).items():
            for n in numbers:
                next_owner[(topic, n)] = m["member_id"]
    rows = []
    for tp in sorted(set(owner) | set(next_owner)):
        moving = tp in next_owner
        state = ("revoking" if tp in owner else "unowned") if moving else "owned"
        rows.append([tp[0], tp[1], owner.get(tp, "-"), state, next_owner.get(tp, "-")])
    return rows


def groups_describe(ctx: Context) -> int:
    try:
        group = ctx.http.request("GET", f"groups/{ctx.args.group_id}/", resource="group")
    except errors.NotFound as exc:
        raise CliError(f"no consumer group {ctx.args.group_id!r}", EXIT_NOT_FOUND) from exc
    if ctx.out.as_json:
        ctx.out.json(group)
        return EXIT_OK
    header = [[group["group_id"], group["generation"], group.get("version"), group["state"], ",".join(group["topics"])]]
    ctx.out.text(render_table(header, ["GROUP", "GENERATION", "VERSION", "STATE", "TOPICS"]))
    ctx.out.text("")
    if not group["members"]:
        ctx.out.text("no members")
        return EXIT_OK
    headers = [*MEMBER_HEADERS, "ACKED", "SESSION", "STATIC"]
    rows = [
        [*_member_row(m), m.get("acked_generation"), relative(m.get("session_expires_at")), m.get("static")]
        for m in group["members"]
    ]
    ctx.out.text(render_table(rows, headers))
    if ctx.args.partitions:
        ctx.out.text("")
        ctx.out.text(render_table(partition_rows(group), ["TOPIC", "PARTITION", "OWNER", "STATE", "NEXT_OWNER"]))
    return EXIT_OK


def groups_watch(ctx: Context) -> int:
    """Every new (generation, version) of the group; a reconnect starts over with the current one."""
    newest: list[tuple[int, int]] = [(-1, -1)]
    counter = Counter(ctx.args.count)

    def handle(message: dict[str, Any]) -> bool:
        order = (message.get("generation", 0), message.get("version", 0))
        if order <= newest[0]:
            return True
        newest[0] = order
        if ctx.out.as_json:
            ctx.out.line(message)
        else:
            rows = [row[:2] + row[3:] for row in map(_member_row, message.get("members", []))]  # no service here
            ctx.out.text(
                f"generation {order[0]}  version {order[1]}  {message.get('state')}  "
                f"topics {','.join(message.get('topics', [])) or '-'}"
            )
            ctx.out.text(
                "\n".join("  " + line for line in render_table(rows, WATCH_HEADERS).splitlines())
                if rows
                else "  no members"
            )
        return counter.more()

    with contextlib.suppress(KeyboardInterrupt):
        follow(ctx.config, f"/ws/groups/{quote(ctx.args.group_id, safe='')}/", handle)
    return EXIT_OK


def groups_join(ctx: Context) -> int:
    from . import _exec

    return _exec.join_and_run(ctx.config, ctx.args)


# --- topics, select, leader -----------------------------------------------------------------------


def topics_list(ctx: Context) -> int:
    topics = ctx.all_pages("topics/")
    if ctx.out.as_json:
        ctx.out.json(topics)
    else:
        rows = [[t["name"], t["partitions"], t.get("created_at"), t.get("updated_at")] for t in topics]
        ctx.out.table(rows, ["TOPIC", "PARTITIONS", "CREATED", "UPDATED"], empty="no topics")
    return EXIT_OK


def topics_put(ctx: Context) -> int:
    topic = ctx.http.request("PUT", f"topics/{ctx.args.name}/", json={"partitions": ctx.args.partitions})
    if ctx.out.as_json:
        ctx.out.json(topic)
    else:
        ctx.out.text(f"topic {topic['name']}: {topic['partitions']} partitions")
    return EXIT_OK


def select(ctx: Context) -> int:
    """One instance, chosen by the registry's balancer (``Registry.balancer``, over HTTP: a one-shot command
    shares the server's rotation rather than keeping one of its own)."""
    a = ctx.args
    with ctx.registry.balancer(a.name, strategy=a.strategy, selector=a.selector) as balancer:
        service = service_json(balancer.select(a.key))
    if ctx.out.as_json:
        ctx.out.json(service)
    elif a.endpoint:
        ctx.out.text(service["endpoint"])
    else:
        ctx.out.table([_service_row(service)], SERVICE_HEADERS)
    return EXIT_OK


def leader(ctx: Context) -> int:
    body = ctx.http.request("GET", "leader/")
    if ctx.out.as_json:
        ctx.out.json(body)
        return EXIT_OK
    expires = parse_time(body.get("expires_at"))
    leading = expires is not None and expires > datetime.now(UTC)
    ctx.out.table(
        [[body["name"], body["holder"], body["fencing_token"], relative(body.get("expires_at"))]],
        ["NAME", "HOLDER", "TERM", "LOCK EXPIRES"],
    )
    if not leading:
        ctx.out.text("nobody leads at the moment: the last holder's lock has run out")
    return EXIT_OK


# --- parser and main ------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, default: Any) -> None:
    """Options accepted before and after the command (``conveyor --json services list`` and
    ``conveyor services list --json``); the subcommands' copies default to SUPPRESS so they do not
    overwrite the top level's."""
    parser.add_argument("--url", default=default, help="registry URL (else CONVEYOR_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--token", default=default, help="API token (else CONVEYOR_TOKEN)")
    parser.add_argument("--json", action="store_true", default=default, help="JSON output, for scripts")
    parser.add_argument("--timeout", type=float, default=default, help="seconds per request (default 10)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Services, consumer groups, topics and selection of a conveyor-registry.",
        epilog="Exit codes: 0 done, 1 error, 2 bad usage or input, 3 not found, 4 unauthorized or forbidden, "
        "5 registry unavailable (retry later), 6 no instance available.",
    )
    _common(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _common(common, argparse.SUPPRESS)
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(sub: Any, name: str, handler: Callable[[Context], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    services = top.add_parser("services", help="registered services").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = command(services, "list", services_list, "list services (all pages)")
    p.add_argument("--name", help="service_name")
    p.add_argument("--type", choices=["source", "transform", "sink"])
    p.add_argument("--health", choices=["healthy", "degraded", "unhealthy", "unknown"], help="effective health")
    p.add_argument("--group", help="group_id")
    p.add_argument("--selector", help="labels: k=v,k2=v2 (all must match)")
    p = command(services, "get", services_get, "one service, with its effective health and lease")
    p.add_argument("service_id")
    p = command(services, "watch", services_watch, "follow service events (Ctrl-C ends it)")
    p.add_argument("--name", type=_identifier, help="only services of this name")
    p.add_argument("--count", type=int, help="stop after this many events")
    p = command(services, "register", services_register, "register (or re-register) a service, once")
    p.add_argument("service_id")
    p.add_argument("--name", required=True, help="service_name")
    p.add_argument("--type", required=True, choices=["source", "transform", "sink"])
    p.add_argument("--endpoint", required=True, help="host:port")
    p.add_argument("--label", action="append", type=_label, metavar="KEY=VALUE", help="a label (repeat for more)")
    p.add_argument("--lease", type=int, help="lease seconds (1..3600, default 30)")
    p.add_argument("--deregister-after", type=int, help="seconds after a lapse before removal")
    p.add_argument("--weight", type=int, help="0..1000 (default 100)")
    p.add_argument("--health", choices=["healthy", "degraded", "unhealthy", "unknown"])
    p.add_argument("--group", help="group_id")
    p = command(services, "deregister", services_deregister, "deregister a service")
    p.add_argument("service_id")
    for action, text in (
        ("drain", "take services out of selection until undrained (staff tokens)"),
        ("undrain", "put drained services back in selection (staff tokens)"),
    ):
        p = command(services, action, _services_operator(action), text)
        p.add_argument("service_ids", nargs="+", metavar="service_id")

    groups = top.add_parser("groups", help="consumer groups").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    command(groups, "list", groups_list, "list consumer groups")
    p = command(groups, "describe", groups_describe, "a group's members with what they own, revoke and await")
    p.add_argument("group_id")
    p.add_argument("--partitions", action="store_true", help="also one row per partition")
    p = command(groups, "watch", groups_watch, "follow a group's assignment (Ctrl-C ends it)")
    p.add_argument("group_id")
    p.add_argument("--count", type=int, help="stop after this many assignments")
    p = command(
        groups,
        "join",
        groups_join,
        "join a group and run CMD with the member's partitions in its environment, restarting (or "
        "signalling) it on every change; leaves on Ctrl-C or when CMD exits",
    )
    p.add_argument("group_id")
    p.add_argument("--topics", nargs="+", required=True)
    p.add_argument("--member-id", help="default: <hostname>-<pid>")
    p.add_argument("--service-name", help="default: the group id")
    p.add_argument("--session-timeout", type=int, help="seconds (default 30)")
    p.add_argument("--static", action="store_true", help="a static member id (rolling restarts keep it)")
    p.add_argument(
        "--signal", type=_signal_name, help="send this signal (e.g. HUP) on a change instead of restarting CMD"
    )
    p.add_argument("--grace", type=float, default=10.0, help="seconds CMD has to stop or acknowledge (default 10)")
    p.add_argument(
        "--exec",
        dest="exec_command",
        required=True,
        metavar="CMD",
        help="the command to run, split like a shell line but run without a shell (sh -c '...' for pipes)",
    )

    topics = top.add_parser("topics", help="topics").add_subparsers(dest="action", metavar="ACTION", required=True)
    command(topics, "list", topics_list, "list topics")
    p = command(topics, "put", topics_put, "create a topic or grow it")
    p.add_argument("name")
    p.add_argument("--partitions", type=int, required=True)

    p = command(top, "select", select, "choose one instance of a service, as the balancer would")
    p.add_argument("name", help="service_name")
    p.add_argument("--strategy", choices=STRATEGIES, default="round_robin")
    p.add_argument("--key", help="with --strategy hash: the same key always lands on the same instance")
    p.add_argument("--selector", help="labels: k=v,k2=v2 (all must match)")
    p.add_argument("--endpoint", action="store_true", help="print only host:port")

    command(top, "leader", leader, "who runs the periodic jobs, and its fencing token")
    return parser


def report(error: errors.ConveyorError, prefix: str = "") -> None:
    """The error on stderr: its detail, or for a refused input each field and its rule."""
    fields = error.fields if isinstance(error, errors.InvalidRequest) else {}
    if not fields:
        print(f"conveyor: {prefix}{error.detail}", file=sys.stderr)
        return
    print(f"conveyor: {prefix}the registry refused the input:", file=sys.stderr)
    for field, messages in fields.items():
        for message in messages:
            print(f"  {field}: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = resolve(getattr(args, "url", None), getattr(args, "token", None), getattr(args, "timeout", None) or 10.0)
    ctx = Context(args, config, Output(bool(getattr(args, "json", False))))
    try:
        return args.handler(ctx)
    except errors.ConveyorError as exc:
        report(exc)
        return exit_code(exc)
    except CliError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `conveyor services list | head`
        return EXIT_OK
    finally:
        ctx.close()
