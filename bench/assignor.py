"""Assignor benchmark: 1,000 members x 10,000 partitions of one topic.

Times a full assignment from scratch, then one join and one leave, and compares the partitions
moved with the minimum. Median of several runs, in-process (no server).

    .venv/bin/python bench/assignor.py [--members 1000] [--partitions 10000] [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from groups.assignor import assign, counts, moves


def timed(fn, runs: int):  # type: ignore[no-untyped-def]
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), max(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    topics = {"events": args.partitions}
    members = {f"member-{i:05d}": ["events"] for i in range(args.members)}

    med, worst, base = timed(lambda: assign(members, topics, {}), args.runs)
    load = counts(base, members).values()
    print(f"{args.members} members x {args.partitions} partitions (median of {args.runs} runs)")
    print(f"  from scratch  {med:7.2f} ms (max {worst:.2f})  counts {min(load)}..{max(load)}")

    joined = dict(members, **{"member-new": ["events"]})
    med, worst, after_join = timed(lambda: assign(joined, topics, base), args.runs)
    minimum = args.partitions // len(joined)
    print(f"  one join      {med:7.2f} ms (max {worst:.2f})  moved {moves(base, after_join)} (minimum {minimum})")

    left = dict(members)
    leaver = sorted(left)[len(left) // 2]
    del left[leaver]
    held = sum(1 for owner in base.values() if owner == leaver)
    med, worst, after_leave = timed(lambda: assign(left, topics, base), args.runs)
    print(f"  one leave     {med:7.2f} ms (max {worst:.2f})  moved {moves(base, after_leave)} (minimum {held})")


if __name__ == "__main__":
    main()
