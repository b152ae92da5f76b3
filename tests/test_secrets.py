"""Secrets stay secret: API keys never reach a log, the websocket token may travel in a header or a
subprotocol, SECRET_KEY has no public default, and /readyz names what is down without the error text."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import websockets
from django.db import connection
from django.test import Client

from registry.models import ApiToken
from registry_project import logscrub
from registry_project.embedded_redis import free_port
from registry_project.localserver import start_server
from tests.conftest import database_url

BASE = Path(__file__).resolve().parent.parent


def _key(name: str, *, staff: bool = False) -> str:
    key = ApiToken.generate_key()
    token = ApiToken(name=name, is_staff=staff)
    token.set_key(key)
    token.save()
    return key


@pytest.mark.django_db(transaction=True)
def test_a_live_server_logs_no_key_whichever_way_the_handshake_carries_it(redis_server, capfd):
    # given a real uvicorn process logging at INFO (it logs every websocket handshake with its
    # path and query string), on the suite's Redis and database, and a registered service
    key = _key("log-test")
    port = free_port()
    env = dict(os.environ, REDIS_URL=redis_server.url, DATABASE_URL=database_url(), LOG_LEVEL="INFO")
    server = start_server(port, env)
    base = f"http://127.0.0.1:{port}"
    ws_base = f"ws://127.0.0.1:{port}"
    try:
        rest = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        body = {"service_id": "log-1", "service_name": "logsvc", "service_type": "source", "endpoint": "h:1"}
        assert rest.post("/api/v1/services/", json=body).status_code == 201

        async def first_event(url: str, **kwargs: object) -> tuple[dict, str | None]:
            async with websockets.connect(url, **kwargs) as ws:
                return json.loads(await asyncio.wait_for(ws.recv(), 10)), ws.subprotocol

        # when it takes three handshakes, one per way of carrying the key
        by_query = asyncio.run(first_event(f"{ws_base}/ws/services/?name=logsvc&token={key}"))
        by_header = asyncio.run(
            first_event(f"{ws_base}/ws/services/?name=logsvc", additional_headers={"Authorization": f"Bearer {key}"})
        )
        by_subprotocol = asyncio.run(
            first_event(f"{ws_base}/ws/services/?name=logsvc", subprotocols=["conveyor.v1", f"token.{key}"])
        )
        # and HTTP requests with the key in the query string, one of them to an unknown path
        httpx.get(f"{base}/api/v1/services/?token={key}", headers={"Authorization": f"Bearer {key}"})
        httpx.get(f"{base}/no-such-page/?token={key}")
    finally:
        server.terminate()
        server.wait(timeout=20)
    out, err = capfd.readouterr()
    log = out + err

    # then each handshake was authenticated (a refused one is closed with 4401 before any event),
    # the subprotocol answer is the non-secret one,
    for event, _ in (by_query, by_header, by_subprotocol):
        assert (event["type"], event["service_id"]) == ("service.registered", "log-1")
    assert by_subprotocol[1] == "conveyor.v1"
    assert by_query[1] is None
    # the handshake lines were logged (so the log really was captured), scrubbed,
    assert log.count('"WebSocket /ws/services/?[scrubbed]" [accepted]') == 3
    # and the key appears nowhere, whole or in part
    assert key not in log
    assert key[3:20] not in log


def test_scrub_masks_query_strings_bearer_values_subprotocols_and_keys():
    key = ApiToken.generate_key()
    assert logscrub.scrub(f'"WebSocket /ws/services/?name=a&token={key}" [accepted]') == (
        '"WebSocket /ws/services/?[scrubbed]" [accepted]'
    )
    # a percent-encoded parameter name cannot slip past: the whole query string goes
    assert logscrub.scrub("GET /api/v1/services/?%74oken=secretvalue HTTP/1.1") == (
        "GET /api/v1/services/?[scrubbed] HTTP/1.1"
    )
    assert logscrub.scrub(f"< Authorization: Bearer {key}") == "< Authorization: Bearer [scrubbed]"
    assert logscrub.scrub(f"< Sec-WebSocket-Protocol: conveyor.v1, token.{key}") == (
        "< Sec-WebSocket-Protocol: conveyor.v1, token.[scrubbed]"
    )
    assert logscrub.scrub(f"query_string=b'token={key}'") == "query_string=b'token=[scrubbed]'"
    assert key not in logscrub.scrub(f"anything {key} at all")
    # ordinary messages are left alone
    assert logscrub.scrub("Invalid token.") == "Invalid token."
    assert logscrub.scrub("is another `make run` still running? Stop it first.") == (
        "is another `make run` still running? Stop it first."
    )


def test_scrubbing_keeps_uvicorn_access_records_formattable():
    # uvicorn's access formatter unpacks record.args as a 5-tuple: scrubbing must keep that shape
    logscrub.install()
    record = logging.getLogger("uvicorn.access").makeRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/api/v1/services/?token=cr_abcdefghijklmnopqrstuvwxyz", "1.1", 200),
        None,
    )
    logscrub.scrub_record(record)
    assert record.args == ("127.0.0.1:5000", "GET", "/api/v1/services/?[scrubbed]", "1.1", 200)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /api/v1/services/?[scrubbed] HTTP/1.1" 200'


def test_every_log_record_of_the_process_is_scrubbed(caplog):
    # Django configured logging through registry_project.logscrub.configure: any logger, any handler
    key = ApiToken.generate_key()
    with caplog.at_level(logging.INFO):
        logging.getLogger("some.library").info("connecting with %s", {"token": key})
        logging.getLogger("uvicorn.error").info('%s - "WebSocket %s" [accepted]', "1.2.3.4:5", f"/ws/?token={key}")
    assert key not in caplog.text
    assert '"WebSocket /ws/?[scrubbed]" [accepted]' in caplog.text


def _settings_process(env_overrides: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "SECRET_KEY_FILE", "DEBUG"}}
    env.update({"DJANGO_SETTINGS_MODULE": "registry_project.settings", **env_overrides})
    return subprocess.run(
        [sys.executable, "-c", code], cwd=BASE, env=env, capture_output=True, text=True, timeout=60, check=False
    )


_LOAD = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY)"


def test_debug_off_without_secret_key_stops_with_a_clear_message(tmp_path):
    # given no SECRET_KEY and no key file (REGISTRY_VAR_DIR points at an empty folder)
    result = _settings_process({"REGISTRY_VAR_DIR": str(tmp_path), "DEBUG": "false"}, _LOAD)
    # then start-up fails, saying what to set and how
    assert result.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY is not set. Export SECRET_KEY=" in result.stderr
    assert "secrets.token_urlsafe" in result.stderr

    # and the server itself (the ASGI application uvicorn loads) refuses the same way
    asgi = _settings_process({"REGISTRY_VAR_DIR": str(tmp_path)}, "import registry_project.asgi")
    assert asgi.returncode != 0
    assert "SECRET_KEY is not set" in asgi.stderr


def test_secret_key_comes_from_the_environment_or_the_key_file_never_a_default(tmp_path):
    from_env = _settings_process({"REGISTRY_VAR_DIR": str(tmp_path), "SECRET_KEY": "k" * 60}, _LOAD)
    assert from_env.stdout.strip() == "k" * 60
    (tmp_path / "secret_key").write_text("from-the-file-" + "x" * 50 + "\n")
    from_file = _settings_process({"REGISTRY_VAR_DIR": str(tmp_path)}, _LOAD)
    assert from_file.stdout.strip() == "from-the-file-" + "x" * 50
    # with DEBUG on and nothing set: a random key per process, not a fixed one
    empty = tmp_path / "empty"
    empty.mkdir()
    one = _settings_process({"REGISTRY_VAR_DIR": str(empty), "DEBUG": "true"}, _LOAD).stdout.strip()
    two = _settings_process({"REGISTRY_VAR_DIR": str(empty), "DEBUG": "true"}, _LOAD).stdout.strip()
    assert len(one) >= 50 and one != two


def _deploy_check(env: dict[str, str]) -> tuple[set[str], str]:
    result = _settings_process(
        {"SECRET_KEY": secrets.token_urlsafe(50), **env},
        "from django.core.management import execute_from_command_line; "
        "execute_from_command_line(['manage.py', 'check', '--deploy'])",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return set(re.findall(r"\(([a-z_]+\.[WE]\d+)\)", output)), output


def test_check_deploy_reports_only_what_the_readme_explains():
    readme = (BASE / "README.md").read_text()
    # given production settings on plain-HTTP defaults (a real key, DEBUG off)
    reported, output = _deploy_check({})
    # then every check it reports is one the README explains, by its id (and nothing about the
    # schema or the key: those would be findings, not configuration)
    assert reported == {"security.W004", "security.W008", "security.W012", "security.W016"}, output
    assert {w for w in reported if f"`{w}`" not in readme} == set(), output

    # behind a TLS proxy with the README's settings, only the two HSTS choices it explains remain
    proxied = {
        "SECURE_PROXY_SSL_HEADER": "true",
        "SECURE_SSL_REDIRECT": "true",
        "SESSION_COOKIE_SECURE": "true",
        "CSRF_COOKIE_SECURE": "true",
        "SECURE_HSTS_SECONDS": "31536000",
    }
    reported, output = _deploy_check(proxied)
    assert reported == {"security.W005", "security.W021"}, output
    assert all(f"`{w}`" in readme for w in reported), output

    # and with those chosen too, nothing at all
    reported, output = _deploy_check(
        {**proxied, "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true", "SECURE_HSTS_PRELOAD": "true"}
    )
    assert reported == set() and "System check identified no issues" in output, output


@pytest.mark.django_db
def test_readyz_names_a_dead_redis_without_its_error_text(settings, caplog):
    from registry.redis_client import reset_clients

    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    reset_clients()
    try:
        with caplog.at_level(logging.ERROR, logger="registry.views"):
            response = Client().get("/readyz")
    finally:
        reset_clients()
    assert response.status_code == 503
    assert response.json() == {"status": "not ready", "checks": {"database": "ok", "redis": "unavailable"}}
    # the detail is in the log, for the operator
    assert "readyz: redis unavailable" in caplog.text and "127.0.0.1" in caplog.text


@pytest.mark.django_db
def test_readyz_names_a_dead_database_without_host_or_user(redis_server, caplog, monkeypatch):
    # given a database connection that cannot connect: a PostgreSQL URL at a closed port,
    # with a recognisable host and user that must not leak
    from django.db import connections
    from django.db.utils import ConnectionHandler

    port = str(free_port())
    handler = ConnectionHandler(
        {
            "default": {
                **connection.settings_dict,
                "ENGINE": "django.db.backends.postgresql",
                "HOST": "127.0.0.1",
                "PORT": port,
                "USER": "secret_db_user",
                "NAME": "nodb",
                "OPTIONS": {"connect_timeout": 2},
                "TEST": {},
            }
        }
    )
    dead = handler["default"]
    from registry import views

    monkeypatch.setattr(views, "connection", dead)
    with caplog.at_level(logging.ERROR, logger="registry.views"):
        response = Client().get("/readyz")
    dead.close()
    assert connections["default"] is not dead
    body = response.content.decode()
    assert response.status_code == 503
    assert response.json() == {"status": "not ready", "checks": {"database": "unavailable", "redis": "ok"}}
    assert "secret_db_user" not in body and "127.0.0.1" not in body and port not in body
    assert f'"127.0.0.1", port {port} failed' in caplog.text  # the operator still learns why
