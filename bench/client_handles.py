"""Client cost per registration handle: 1,000 handles in one process (sync: a heartbeat thread each; asyncio: a
task each), heartbeating at the registry's interval; prints the process's RSS and CPU per handle.

    .venv/bin/python bench/client_handles.py [--handles 1000] [--lease 30] [--seconds 60] [--mode sync aio]

Each mode runs in a child process of its own (so one does not inherit the other's memory), against a stack
this script starts (Redis, SQLite, uvicorn with 2 workers); --url and --token use a running server instead.
CPU is the child's user + system time over the steady-state window (registrations done), RSS the growth
from just before the first handle to the end of the window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Stack


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def body(i: int) -> dict[str, object]:
    return {"name": "bench-handles", "type": "source", "endpoint": f"10.2.{i // 250}.{i % 250 + 1}:9000"}


def run_sync(url: str, token: str, handles: int, lease: int, seconds: float) -> dict[str, float]:
    from conveyor import Registry

    reg = Registry(url, token, timeout=30)
    rss_before = _rss_self()
    with ThreadPoolExecutor(16) as pool:
        started = list(pool.map(lambda i: reg.register(f"h-{i}", lease=lease, **body(i)), range(handles)))
    beats_before = sum(h.heartbeats for h in started)
    cpu_before, wall_before = cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    cpu, wall = cpu_seconds() - cpu_before, time.monotonic() - wall_before
    beats = sum(h.heartbeats for h in started) - beats_before
    rss_after = _rss_self()
    stopped = sum(h.state != "running" for h in started)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda h: h.close(), started))
    return {"cpu": cpu, "wall": wall, "beats": beats, "rss_kib": rss_after - rss_before, "stopped": stopped}


def run_aio(url: str, token: str, handles: int, lease: int, seconds: float) -> dict[str, float]:
    from conveyor import aio

    async def main() -> dict[str, float]:
        reg = aio.Registry(url, token, timeout=30)
        rss_before = _rss_self()
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> aio.Registration:
            async with sem:
                return await reg.register(f"h-{i}", lease=lease, **body(i))

        started = await asyncio.gather(*(one(i) for i in range(handles)))
        beats_before = sum(h.heartbeats for h in started)
        cpu_before, wall_before = cpu_seconds(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu, wall = cpu_seconds() - cpu_before, time.monotonic() - wall_before
        beats = sum(h.heartbeats for h in started) - beats_before
        rss_after = _rss_self()
        stopped = sum(h.state != "running" for h in started)
        await asyncio.gather(*(h.close() for h in started))
        return {"cpu": cpu, "wall": wall, "beats": beats, "rss_kib": rss_after - rss_before, "stopped": stopped}

    return asyncio.run(main())


def _rss_self() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    run = run_sync if args.child == "sync" else run_aio
    print(json.dumps(run(args.url, args.token, args.handles, args.lease, args.seconds)))


def report(mode: str, handles: int, r: dict[str, float]) -> None:
    per_handle_cpu_ms_per_min = r["cpu"] / r["wall"] * 60 * 1000 / handles
    print(
        f"  {mode:5s} {handles} handles: {r['beats'] / r['wall']:6.1f} heartbeats/s, "
        f"CPU {r['cpu'] / r['wall'] * 100:5.1f}% of a core = {per_handle_cpu_ms_per_min:.2f} ms/min per handle "
        f"({r['cpu'] * 1e6 / max(1, r['beats']):.0f} us per heartbeat), "
        f"RSS +{r['rss_kib'] / 1024:.1f} MiB = {r['rss_kib'] / handles:.1f} KiB per handle, stopped {r['stopped']:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--handles", type=int, default=1000)
    parser.add_argument("--lease", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--mode", nargs="+", choices=["sync", "aio"], default=["sync", "aio"])
    parser.add_argument("--url")
    parser.add_argument("--token")
    parser.add_argument("--child", choices=["sync", "aio"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    def measure(url: str, token: str) -> None:
        print(f"lease {args.lease} s, {args.seconds:.0f} s window after registering:")
        for mode in args.mode:
            command = [sys.executable, __file__, "--child", mode, "--url", url, "--token", token]
            command += ["--handles", str(args.handles), "--lease", str(args.lease), "--seconds", str(args.seconds)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"  {mode}: the child failed:\n{done.stderr[-3000:]}")
                continue
            report(mode, args.handles, json.loads(done.stdout.strip().splitlines()[-1]))

    if args.url:
        measure(args.url, args.token)
        return
    with Stack(workers=2) as stack:
        measure(stack.url, stack.token)


if __name__ == "__main__":
    main()
