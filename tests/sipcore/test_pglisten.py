"""The shared LISTEN connection (NotifyHub) and its re-listen loop, against a real
PostgreSQL; the owners' re-reads are tested with the owners (location, subscribers, billing)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from sipcore import pglisten
from tests.support import RefusingPool, eventually


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


# ------------------------------------------------------------------ the hub, on PostgreSQL



async def _listeners(pool: asyncpg.Pool) -> int:
    """Backends that are idle after a LISTEN: the listening connections."""
    count: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' "
        "AND pid <> pg_backend_pid()")
    return count


class _Owner:
    """A cache's side of a subscription: what it heard, when it was told of a loss, and its
    re-reads (which fail while ``failing`` is above zero)."""

    def __init__(self, hub: pglisten.NotifyHub, channel: str) -> None:
        self.hub = hub
        self.channel = channel
        self.heard: list[str] = []
        self.lost = 0
        self.restored = 0
        self.failing = 0
        self.sub: pglisten.Subscription | None = None

    async def subscribe(self) -> None:
        self.sub = await self.hub.subscribe(self.channel, self.on_notify, lost=self.on_lost,
                                            restore=self.restore)

    def on_notify(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        assert channel == self.channel
        self.heard.append(str(payload))

    def on_lost(self) -> None:
        self.lost += 1

    async def restore(self) -> None:
        if self.failing:
            self.failing -= 1
            raise ConnectionRefusedError("re-read failed (test)")
        # The hub listens again before anyone re-reads: what changes from now on is heard.
        assert self.hub.connected
        self.restored += 1


async def test_one_connection_listens_for_every_subscription(db_pool: asyncpg.Pool) -> None:
    hub = pglisten.NotifyHub(db_pool, "test")
    owners = [_Owner(hub, f"hub_test_{i}") for i in range(3)]
    try:
        for owner in owners:
            await owner.subscribe()
        assert hub.listening and hub.channels == [o.channel for o in owners]
        assert await _listeners(db_pool) == 1
        for owner in owners:
            await db_pool.execute("SELECT pg_notify($1, $1)", owner.channel)
        await eventually(lambda: all(o.heard for o in owners), "every notification")
        assert [o.heard for o in owners] == [[o.channel] for o in owners]
        # One owner leaves; the others go on hearing theirs.
        first = owners[0].sub
        assert first is not None
        await hub.unsubscribe(first)
        await db_pool.execute("SELECT pg_notify('hub_test_0', 'x'), pg_notify('hub_test_1', 'y')")
        await eventually(lambda: len(owners[1].heard) == 2, "the second notification")
        assert owners[0].heard == ["hub_test_0"]
    finally:
        await hub.close()
    assert not hub.listening and await _listeners(db_pool) == 0


async def test_a_lost_connection_is_replaced_and_every_owner_re_reads(
        db_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def short_sleep(seconds: float) -> None:
        if seconds >= 0.5:  # the hub's waits (not this test's polling)
            waits.append(seconds)
            seconds = 0.01
        await real_sleep(seconds)

    monkeypatch.setattr(pglisten.asyncio, "sleep", short_sleep)
    hub = pglisten.NotifyHub(db_pool, "test")
    a, b = _Owner(hub, "hub_test_a"), _Owner(hub, "hub_test_b")
    try:
        await a.subscribe()
        await b.subscribe()
        b.failing = 2  # its first two re-reads fail (the database is still coming back)
        await db_pool.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()")
        await eventually(lambda: a.lost == 1 and b.lost == 1, "the loss told to both")
        await eventually(lambda: hub.listening, "listening again")
        # a re-read once; b was retried, with growing waits, without re-running a's.
        assert (a.restored, b.restored, b.failing) == (1, 1, 0)
        assert waits == [0.5, 1.0]
        assert hub.stats == {"lost": 1, "restored": 1}
        assert await _listeners(db_pool) == 1
        await db_pool.execute("SELECT pg_notify('hub_test_a', '1'), pg_notify('hub_test_b', '2')")
        await eventually(lambda: a.heard == ["1"] and b.heard == ["2"], "the new connection")
        # A latecomer joins the replaced connection.
        c = _Owner(hub, "hub_test_c")
        await c.subscribe()
        await db_pool.execute("SELECT pg_notify('hub_test_c', '3')")
        await eventually(lambda: c.heard == ["3"], "the latecomer's notification")
        assert await _listeners(db_pool) == 1
    finally:
        await hub.close()
    assert await _listeners(db_pool) == 0


async def test_close_stops_the_re_listening(db_pool: asyncpg.Pool) -> None:
    gate = RefusingPool(db_pool, refuse=False)
    hub = pglisten.NotifyHub(gate, "test")  # type: ignore[arg-type]
    owner = _Owner(hub, "hub_test_close")
    await owner.subscribe()
    gate.refuse = True
    await db_pool.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()")
    await eventually(lambda: gate.refused > 0, "a refused attempt")
    assert not hub.connected and not hub.listening and owner.lost == 1
    await hub.close()
    refused = gate.refused
    await asyncio.sleep(0.6)  # past the first retry's wait
    assert gate.refused == refused and owner.restored == 0
    with pytest.raises(RuntimeError):
        await hub.subscribe("hub_test_late", owner.on_notify)
