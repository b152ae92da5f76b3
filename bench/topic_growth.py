"""Topic growth benchmark: grow a topic read by 3 groups of 5 members from 12 to 10,000 partitions over
HTTP on a running server, while a registration (POST /api/v1/services/) and a join to an unrelated
group are each issued every ~50 ms. Prints the time of the growth request and the longest wait of a
registration and of a join issued while it ran.

The growth request goes to a server process of its own (as behind a load balancer), so the waits
measured are waits for locks, not for the same process's thread that runs synchronous views.

    .venv/bin/python bench/topic_growth.py [--partitions 10000] [--groups 3] [--members 5]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/<db> .venv/bin/python bench/topic_growth.py
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Stack, free_port, start_server


def prober(url: str, token: str, kind: str, stop: threading.Event, waits: list[tuple[float, float, int]]) -> None:
    """Issue one request every ~50 ms until ``stop``; record (issued at, seconds waited, status)."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        i = 0
        while not stop.is_set():
            i += 1
            started = time.perf_counter()
            if kind == "register":
                r = client.post(
                    "/api/v1/services/",
                    json={
                        "service_id": f"probe-{i}",
                        "service_name": "probe",
                        "service_type": "source",
                        "endpoint": "10.0.0.1:50051",
                    },
                )
            else:
                r = client.post(
                    "/api/v1/groups/unrelated/members/",
                    json={"member_id": f"probe-{i}", "service_name": "probe", "topics": ["other"]},
                )
            waited = time.perf_counter() - started
            waits.append((started, waited, r.status_code))
            if kind == "join" and r.status_code == 201:  # leave again (not timed): the group stays small
                epoch = r.json()["member_epoch"]
                client.delete(f"/api/v1/groups/unrelated/members/probe-{i}/?member_epoch={epoch}")
            time.sleep(max(0.0, 0.05 - waited))


def run(url: str, grow_url: str, token: str, partitions: int, groups: int, members: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        client.put("/api/v1/topics/big/", json={"partitions": 12}).raise_for_status()
        client.put("/api/v1/topics/other/", json={"partitions": 12}).raise_for_status()
        for g in range(groups):
            for m in range(members):
                client.post(
                    f"/api/v1/groups/readers-{g}/members/",
                    json={"member_id": f"m{m}", "service_name": "bench", "topics": ["big"], "session_timeout": 600},
                ).raise_for_status()
        stop = threading.Event()
        waits: dict[str, list[tuple[float, float, int]]] = {"register": [], "join": []}
        threads = [threading.Thread(target=prober, args=(url, token, k, stop, waits[k])) for k in waits]
        for t in threads:
            t.start()
        time.sleep(0.5)
        started = time.perf_counter()
        r = httpx.put(f"{grow_url}/api/v1/topics/big/", json={"partitions": partitions}, headers=headers, timeout=600)
        ended = time.perf_counter()
        r.raise_for_status()
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        for g in range(groups):
            body = client.get(f"/api/v1/groups/readers-{g}/").json()
            assert body["state"] in ("stable", "reconciling"), body
    result = {"growth_s": ended - started}
    for kind, samples in waits.items():
        during = [w for at, w, _s in samples if at + w >= started and at <= ended]
        result[f"{kind}_max_wait_s"] = max(during, default=0.0)
        result[f"{kind}_requests"] = len(during)
        result[f"{kind}_errors"] = sum(1 for at, w, s in samples if at + w >= started and at <= ended and s >= 400)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with Stack(workers=args.workers) as stack:
        grow_port = free_port()
        grower = start_server(grow_port, stack.env, workers=1)
        try:
            result = run(
                stack.url, f"http://127.0.0.1:{grow_port}", stack.token, args.partitions, args.groups, args.members
            )
        finally:
            grower.terminate()
            grower.wait(timeout=20)
    database = "postgresql" if "postgres" in stack.env.get("DATABASE_URL", "") else "sqlite"
    print(
        f"{database}: 12 -> {args.partitions} partitions, {args.groups} groups x {args.members} members: "
        f"growth {result['growth_s']:.2f} s; longest wait during it: registration "
        f"{result['register_max_wait_s'] * 1000:.0f} ms ({result['register_requests']:.0f} requests, "
        f"{result['register_errors']:.0f} errors), join to another group {result['join_max_wait_s'] * 1000:.0f} ms "
        f"({result['join_requests']:.0f} requests, {result['join_errors']:.0f} errors)"
    )


if __name__ == "__main__":
    main()
