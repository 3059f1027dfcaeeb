"""MissReads: lookups of missing cache keys joined into reads of many (sans database)."""

from __future__ import annotations

import asyncio

import pytest

from sipcore.missreads import MissReads


async def test_the_misses_of_one_turn_are_one_read_in_chunks() -> None:
    calls: list[list[int]] = []

    async def read(keys: list[int]) -> dict[int, str | None]:
        calls.append(list(keys))
        await asyncio.sleep(0)
        return {k: f"v{k}" for k in keys if k % 5}  # multiples of 5: not found

    misses: MissReads[int, str] = MissReads(read, batch=4)
    keys = [1, 2, 3, 5, 6, 7, 2, 8, 9, 10]  # 2 twice: read once
    got = await asyncio.gather(*(misses.get(k) for k in keys))
    assert got == ["v1", "v2", "v3", None, "v6", "v7", "v2", "v8", "v9", None]
    assert calls == [[1, 2, 3, 5], [6, 7, 8, 9], [10]]
    assert (misses.reads, misses.keys_read) == (3, 9)
    # The next turn's misses are a read of their own.
    assert await misses.get(11) == "v11"
    assert calls[-1] == [11] and misses.reads == 4


async def test_a_failed_read_fails_its_waiters_and_a_cancelled_waiter_not_the_others() -> None:
    gate = asyncio.Event()
    fail = True

    async def read(keys: list[str]) -> dict[str, int | None]:
        await gate.wait()
        if fail:
            raise ConnectionRefusedError("database down (test)")
        return {k: len(k) for k in keys}

    misses: MissReads[str, int] = MissReads(read)
    a, b = asyncio.ensure_future(misses.get("a")), asyncio.ensure_future(misses.get("bb"))
    await asyncio.sleep(0)
    gate.set()
    for task in (a, b):
        with pytest.raises(ConnectionRefusedError):
            await task
    assert misses.reads == 0
    fail, gate = False, asyncio.Event()
    c, d = asyncio.ensure_future(misses.get("ccc")), asyncio.ensure_future(misses.get("dddd"))
    await asyncio.sleep(0)
    c.cancel()  # one caller gives up (a timeout): the shared read goes on for the other
    gate.set()
    assert await d == 4
    with pytest.raises(asyncio.CancelledError):
        await c
    await misses.drain()
    assert misses.reads == 1 and misses.keys_read == 2
