"""registry.loop_batch: a SERIAL batcher has one call out at a time, and what is queued meanwhile (over any
number of loop turns) goes in the next call, each waiter with its own reply; an error of a call reaches its
waiters alone and the next call still goes. A batcher without SERIAL sends each turn's items at once."""

from __future__ import annotations

import asyncio

import pytest

from registry.loop_batch import LoopBatcher


class Recording(LoopBatcher[str, str]):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.release: asyncio.Event | None = None

    async def call(self, items: list[str]) -> list[str | Exception]:
        self.calls.append(list(items))
        assert self.release is not None
        await self.release.wait()
        if "boom" in items:
            raise ConnectionError("gone")
        return [item.upper() for item in items]


class Serial(Recording):
    SERIAL = True


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.parametrize("serial", [True, False])
def test_items_queued_while_a_call_is_out(serial: bool) -> None:
    async def scenario() -> list[list[str]]:
        batcher = (Serial if serial else Recording)()
        batcher.release = asyncio.Event()
        first = batcher.run("a")
        await _turns(2)  # the first call is out
        later = [batcher.run("b")]
        await _turns(1)
        later.append(batcher.run("c"))
        await _turns(2)
        batcher.release.set()
        assert await first == "A"
        assert [await f for f in later] == ["B", "C"]
        with pytest.raises(ConnectionError):
            await batcher.run("boom")
        assert await batcher.run("d") == "D"  # the batcher goes on after a failed call
        return batcher.calls

    calls = asyncio.run(scenario())
    if serial:
        assert calls == [["a"], ["b", "c"], ["boom"], ["d"]]
    else:
        assert calls == [["a"], ["b"], ["c"], ["boom"], ["d"]]
