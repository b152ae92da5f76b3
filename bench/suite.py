"""`make bench`: the hot-path benchmarks one after another, then one table — figure, ours, anchor, ratio,
target — printed and written to bench/RESULTS.md with the machine it ran on.

    .venv/bin/python bench/suite.py            # every benchmark, full length (several minutes)
    .venv/bin/python bench/suite.py --quick    # short runs, for a look (figures not for quoting)
    .venv/bin/python bench/suite.py --only heartbeat,selection

Each benchmark module has ``results(quick) -> list[row]``, a row being a dict with ``figure``, ``ours``,
``anchor`` (or None), ``ratio`` (or None) and ``target``. A benchmark that fails is reported as a row
that says so, and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BASE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE))

# In the order they run: the module under bench/ and what it measures.
BENCHMARKS = {
    "heartbeat": "heartbeats against etcd's lease keepalive",
    "selection": "balancer selection over HTTP",
    "registration": "registration storms and unchanged re-registration",
    "fanout": "rebalance pushes to 1,000 websocket subscribers",
    "queries": "label-selector queries and lists during a mass lapse",
}
COLUMNS = ("figure", "ours", "anchor", "ratio", "target")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    system = f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    return f"{os.cpu_count()} cores ({cpu}){mem}, {system}"


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def git_head() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BASE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[str(row.get(c) if row.get(c) is not None else "—") for c in COLUMNS] for row in rows]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
    return "\n".join(lines)


def run(names: list[str], quick: bool) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for name in names:
        started = time.monotonic()
        print(f"=== {name}: {BENCHMARKS[name]} (load average {load()}) ===", flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            got = module.results(quick=quick)
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            got = [{"figure": f"{name}: FAILED ({type(exc).__name__}: {exc})", "target": "runs"}]
        took = time.monotonic() - started
        notes.append(f"{name}: {took:.0f} s, load average after {load()}")
        rows += got
        print(table(got), flush=True)
    return rows, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs; RESULTS.md is not written")
    parser.add_argument("--only", help="comma-separated: " + ",".join(BENCHMARKS))
    parser.add_argument("--out", default=str(BASE / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    started = datetime.datetime.now(datetime.UTC)
    before = load()
    rows, notes = run(names, args.quick)
    text = "\n".join(
        [
            "# Benchmark results",
            "",
            f"`make bench` ({'quick' if args.quick else 'full'} runs) at commit {git_head()}, "
            f"{started:%Y-%m-%d %H:%M} UTC.",
            "",
            f"Machine: {machine()}. Load average before: {before}.",
            "",
            "Anchors ran in the same launch, on the same machine, with the same load generator settings;",
            "the ratio is ours / anchor (above 1 is better for rates).",
            "",
            table(rows),
            "",
            "Durations: " + "; ".join(notes) + ".",
            "",
        ]
    )
    print()
    print(text)
    if not args.quick and not args.only:
        Path(args.out).write_text(text)
        print(f"written to {args.out}")
    failed = any("FAILED" in str(r.get("figure")) for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
