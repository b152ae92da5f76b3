"""Select benchmark: GET /api/v1/balancer/select/ over HTTP with 1,000 instances of one name, per strategy,
served by the ASGI fast path (ours) and by the DRF view (the anchor, reached with ``&format=json``, which the
fast path leaves to Django), in the same run on the same stack (2 uvicorn workers, wrk).

    SECRET_KEY=dev .venv/bin/python bench/selection.py [--instances 1000] [--seconds 10] [--connections 32]

Hash keys: ``hash`` draws them from 1,000 distinct keys (clients keyed by customer or session repeat their
keys), ``hash-unique`` sends a new key with every request (each one costs a rendezvous over every instance).
Each run also reports the server processes' CPU time per select (user + system, from /proc), which a busy
machine disturbs far less than the request rate. Needs wrk (Debian: apt-get install wrk). (Not named
select.py: run as scripts, the files of bench/ would import it in place of the standard library's ``select``
module.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.balancer import register
from bench.common import Stack, cpu_seconds, run_wrk

WRK_SCRIPT = """
wrk.headers["Authorization"] = "Bearer {token}"
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/api/v1/balancer/select/?name=bench-sink&strategy={strategy}{key}{extra}")
end
"""
KEYS = {"hash": '&key=k" .. (n % 1000) .. "', "hash-unique": '&key=k" .. n .. "'}
STRATEGIES = ("round_robin", "weighted", "hash", "hash-unique")
TARGET_RPS = 5000
TARGET_P99_MS = 10.0


def script(token: str, strategy: str, anchor: bool) -> str:
    return (
        WRK_SCRIPT.replace("{token}", token)
        .replace("{strategy}", strategy.split("-")[0])
        .replace("{key}", KEYS.get(strategy, ""))
        .replace("{extra}", "&format=json" if anchor else "")
    )


def measure(
    instances: int, seconds: int, connections: int, anchor_seconds: int, strategies: tuple[str, ...] = STRATEGIES
) -> dict[str, dict[str, dict]]:
    """{strategy: {"ours": wrk figures, "anchor": wrk figures}}."""
    out: dict[str, dict[str, dict]] = {}
    with Stack(workers=2) as stack:
        asyncio.run(register(stack.url, stack.token, instances))
        for n, strategy in enumerate(strategies):
            # Warm up (each worker loads the list from the database on its first select).
            run_wrk(stack.url, script(stack.token, strategy, False), 2 if n == 0 else 1, connections, threads=2)
            ours = _run(stack, script(stack.token, strategy, False), seconds, connections)
            anchor = _run(stack, script(stack.token, strategy, True), anchor_seconds, connections)
            out[strategy] = {"ours": ours, "anchor": anchor}
    return out


def _run(stack: Stack, lua: str, seconds: int, connections: int) -> dict:
    """wrk's figures plus ``cpu_us``: the server processes' CPU time per request answered."""
    pids = stack.server_pids()
    before = cpu_seconds(pids)
    figures = run_wrk(stack.url, lua, seconds, connections, threads=2)
    figures["cpu_us"] = (cpu_seconds(pids) - before) / max(figures["requests"], 1) * 1e6
    return figures


def _fmt(r: dict) -> str:
    return (
        f"{r['rps']:7.0f} req/s  p50 {r['p50_ms']:5.1f} ms  p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}"
        f"  server CPU {r['cpu_us']:4.0f} us/select"
    )


def results(quick: bool = False) -> list[dict]:
    # quick: the three strategies of the target, short runs (well under a minute in all)
    figures = measure(1000, 2, 32, 1, STRATEGIES[:3]) if quick else measure(1000, 10, 32, 5)
    rows = []
    for strategy, r in figures.items():
        ours, anchor = r["ours"], r["anchor"]
        rows.append(
            {
                "figure": f"select {strategy}, 1,000 instances (req/s; p99)",
                "ours": f"{ours['rps']:.0f}/s; p99 {ours['p99_ms']:.1f} ms; {ours['errors']} errors; "
                f"server CPU {ours['cpu_us']:.0f} us/select",
                "anchor": f"{anchor['rps']:.0f}/s; p99 {anchor['p99_ms']:.1f} ms; "
                f"server CPU {anchor['cpu_us']:.0f} us/select (DRF view)",
                "ratio": f"{ours['rps'] / anchor['rps']:.1f}x" if anchor["rps"] else None,
                "target": f">= {TARGET_RPS}/s, p99 < {TARGET_P99_MS:.0f} ms",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--anchor-seconds", type=int, default=5)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    figures = measure(args.instances, args.seconds, args.connections, args.anchor_seconds)
    print(f"select over HTTP, {args.instances} instances of one name, {args.connections} connections, 2 workers:")
    for strategy, r in figures.items():
        print(f"  {strategy:12s} fast path  {_fmt(r['ours'])}")
        print(f"  {'':12s} DRF view   {_fmt(r['anchor'])}   ratio {r['ours']['rps'] / r['anchor']['rps']:.1f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
