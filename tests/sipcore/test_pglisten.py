"""The re-listen loop shared by the LISTEN owners (location, subscribers, billing); the
connection side is exercised against a real PostgreSQL in their own tests."""

from __future__ import annotations

import pytest

from sipcore import pglisten


async def test_relisten_retries_with_growing_waits_until_an_attempt_succeeds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(pglisten.asyncio, "sleep", sleep)
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        if calls <= 7:
            raise ConnectionRefusedError("down")

    assert await pglisten.relisten(attempt, lambda: False, "test") is True
    assert calls == 8
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


async def test_relisten_gives_up_when_its_owner_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    stopping = False

    async def sleep(seconds: float) -> None:
        nonlocal stopping
        stopping = True

    monkeypatch.setattr(pglisten.asyncio, "sleep", sleep)

    async def attempt() -> None:
        raise OSError("down")

    assert await pglisten.relisten(attempt, lambda: stopping, "test") is False
