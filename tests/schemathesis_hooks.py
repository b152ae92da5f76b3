"""Schemathesis hooks for tests/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

Growing a topic that a group subscribes to rebalances every partition, which takes seconds at
the schema's maximum of 10,000; the run would spend its whole minute there. Valid partition counts
above LARGEST are lowered to it, so the minute goes to breadth. Invalid counts (0, 10001, strings)
pass unchanged; the largest topics are exercised by the groups tests.
"""

from __future__ import annotations

from typing import Any

import schemathesis

LARGEST = 64


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.operation.method.upper() != "PUT" or case.operation.path != "/api/v1/topics/{name}/":
        return
    body = case.body
    if isinstance(body, dict) and type(body.get("partitions")) is int and LARGEST < body["partitions"] <= 10_000:
        body["partitions"] = LARGEST
