"""The OpenAPI schema tells the truth: schemathesis drives every operation of /api/schema/ on a live
server (a uvicorn process on the suite's Redis and database) with a staff token, and checks that no
answer is a server error, every status code is documented and every body matches its schema.

Bounded by SCHEMATHESIS_MAX_TIME (seconds, default 25; `make nemesis` runs 300) of generated requests; SCHEMATHESIS_SEED
replays a run (its seed is printed in the output).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from registry.models import ApiToken
from registry_project.embedded_redis import free_port
from registry_project.localserver import start_server
from tests.conftest import database_url

BASE = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.django_db(transaction=True)

CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"
# A 5xx is a failure, except the balancer's documented 503 "instances exist but none is eligible"
# (schemathesis registers drained or unhealthy instances too). Every operation documents 503 for
# an unreachable Redis, but Redis is up here: anywhere else a 503 is a finding.
CONFIG = """
[[operations]]
include-name = "GET /api/v1/balancer/select/"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]
"""


@pytest.mark.timeout(900)  # `make nemesis` gives it 5 minutes
def test_schemathesis_finds_no_failure_in_any_operation(redis_server, tmp_path):
    # given a live server and a staff token, so every operation is authorised
    key = ApiToken.generate_key()
    token = ApiToken(name="schemathesis", is_staff=True)
    token.set_key(key)
    token.save()
    port = free_port()
    # ERROR: the 400s and 404s it provokes by the thousand are expected; a 500 is logged with its traceback
    env = dict(os.environ, REDIS_URL=redis_server.url, DATABASE_URL=database_url(), LOG_LEVEL="ERROR")
    server = start_server(port, env)
    base = f"http://127.0.0.1:{port}"
    report = tmp_path / "report.json"
    try:
        schema = httpx.get(f"{base}/api/schema/?format=json", timeout=30).json()
        operations = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{base}/api/schema/?format=json",
            "--checks",
            CHECKS,
            "--max-time",
            os.environ.get("SCHEMATHESIS_MAX_TIME", "25"),
            "--workers",
            "2",
            "--header",
            f"Authorization: Bearer {key}",
            # Growing a subscribed topic to ~10,000 partitions rebalances them all: seconds, not milliseconds
            "--request-timeout",
            "90",
            "--report",
            "json",
            "--report-json-path",
            str(report),
            "--no-color",
        ]
        config = tmp_path / "schemathesis.toml"
        config.write_text(CONFIG)
        command[3:3] = ["--config-file", str(config)]  # a global option: before "run"
        if os.environ.get("SCHEMATHESIS_SEED"):
            command += ["--seed", os.environ["SCHEMATHESIS_SEED"]]
        # when schemathesis runs over the whole schema
        result = subprocess.run(
            command,
            cwd=tmp_path,
            env={**env, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(BASE), "NO_COLOR": "1"},
            capture_output=True,
            text=True,
            timeout=280,
            check=False,
        )
    finally:
        server.terminate()
        server.wait(timeout=20)
    output = result.stdout + result.stderr
    print(output)  # shown with -rP: phases, counts, warnings and the seed
    # then it tested every operation of the schema (all of DESIGN.md's REST table) and found nothing
    assert len(operations) >= 16, sorted(operations)
    assert result.returncode == 0, output
    summary = json.loads(report.read_text())
    assert summary["failures"] == [] and summary["errors"] == [], output
    assert summary["operations"]["tested"] == summary["operations"]["total"] == len(operations), output
    # every phase that generates requests ran (none was starved of time), and passed
    phases = {name: phase["status"] for name, phase in summary["phases"].items()}
    assert phases["coverage"] == phases["fuzzing"] == phases["stateful"] == "success", (phases, output)
