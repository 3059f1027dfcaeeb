"""The shown-balance cache against a real PostgreSQL: hits, invalidation by NOTIFY from every
kind of change (postings, reservations, moving a subscriber), a lost LISTEN connection, and a
change racing a miss."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest

from billing.balances import MISS, BalanceCache
from billing.ledger import DisplayBalance, Ledger
from tests.billing.notifycache import listening, quiet
from tests.support import eventually


@pytest.fixture
async def cache(db_pool: asyncpg.Pool) -> AsyncIterator[BalanceCache]:
    balances = BalanceCache(Ledger(db_pool))
    async with listening(balances, db_pool):
        yield balances


async def _account(ledger: Ledger, name: str, user: str, amount: str) -> int:
    account = await ledger.create_account(name, "EUR", initial_balance=Decimal(amount))
    await ledger.attach_subscriber(account.id, user, "cache.example")
    return account.id


async def test_a_second_read_is_a_hit_and_a_posting_is_seen(
    db_pool: asyncpg.Pool, cache: BalanceCache
) -> None:
    ledger = Ledger(db_pool)
    account_id = await _account(ledger, "cache-posting", "2101", "10.00")
    await quiet(cache, db_pool)
    assert cache.peek("2101", "cache.example") is MISS  # nothing read yet
    first = await cache.display_balance("2101", "cache.example")
    assert first == DisplayBalance(account_id, "EUR", Decimal("10.00"))
    assert await cache.display_balance("2101", "cache.example") == first
    assert cache.stats["hits"] == 1 and cache.stats["misses"] == 1 and len(cache) == 1
    # What the REGISTER path reads without awaiting: the same figure.
    assert cache.peek("2101", "cache.example") == first

    seen = cache.stats["invalidations"]
    await ledger.topup(account_id, Decimal("2.50"))
    await eventually(lambda: cache.stats["invalidations"] > seen, "the notification")
    shown = await cache.display_balance("2101", "cache.example")
    assert shown is not None and shown.amount == Decimal("12.50")

    # Without an account: cached as such, until the subscriber is given one.
    hits = cache.stats["hits"]
    assert await cache.display_balance("2100", "cache.example") is None
    assert await cache.display_balance("2100", "cache.example") is None
    assert cache.peek("2100", "cache.example") is None  # cached: no account
    assert cache.stats["hits"] == hits + 2 and len(cache) == 2
    seen = cache.stats["invalidations"]
    await ledger.attach_subscriber(account_id, "2100", "cache.example")
    await eventually(lambda: cache.stats["invalidations"] > seen, "the notification")
    assert await cache.display_balance("2100", "cache.example") == shown


async def test_reservations_and_moving_a_subscriber_invalidate(
    db_pool: asyncpg.Pool, cache: BalanceCache
) -> None:
    ledger = Ledger(db_pool)
    account_id = await _account(ledger, "cache-reserve", "2102", "10.00")
    other = await ledger.create_account("cache-other", "EUR", initial_balance=Decimal("1.00"))
    await quiet(cache, db_pool)
    assert (await cache.display_balance("2102", "cache.example")) is not None

    async def changed(statement: str, *args: object) -> DisplayBalance | None:
        seen = cache.stats["invalidations"]
        async with db_pool.acquire() as conn:
            await conn.execute(statement, *args)
        await eventually(lambda: cache.stats["invalidations"] > seen, statement)
        return await cache.display_balance("2102", "cache.example")

    shown = await changed(
        "INSERT INTO reservations (call_id, account_id, amount, max_duration, created_at, node)"
        " VALUES ('cache-call', $1, 3.25, 60, $2, 'test')", account_id, datetime.now(UTC))
    assert shown is not None and shown.amount == Decimal("6.75")
    shown = await changed("UPDATE reservations SET amount = 1 WHERE call_id = 'cache-call'")
    assert shown is not None and shown.amount == Decimal("9.00")
    shown = await changed("DELETE FROM reservations WHERE call_id = 'cache-call'")
    assert shown is not None and shown.amount == Decimal("10.00")
    shown = await changed(
        "UPDATE account_subscribers SET account_id = $1 WHERE username = '2102'", other.id)
    assert shown == DisplayBalance(other.id, "EUR", Decimal("1.00"))
    # An update that changes neither balance nor currency is not a change of the figure.
    seen = cache.stats["invalidations"]
    async with db_pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET name = 'cache-other-2' WHERE id = $1", other.id)
    await asyncio.sleep(0.2)
    assert cache.stats["invalidations"] == seen and len(cache) == 1


async def test_a_lost_listen_connection_empties_the_cache_until_a_new_one_listens(
    db_pool: asyncpg.Pool
) -> None:
    ledger = Ledger(db_pool)
    balances = BalanceCache(ledger)
    account_id = await _account(ledger, "cache-lost", "2103", "4.00")
    async with listening(balances, db_pool) as hub:
        await quiet(balances, db_pool)
        assert await balances.display_balance("2103", "cache.example") is not None
        assert len(balances) == 1
        # The listening connection is lost while the topup's notification is sent: nothing
        # tells the cache, so it must not keep the old figure.  The hub listens again by
        # itself; what the cache holds from then on is read after that.
        async with db_pool.acquire() as conn:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()")
        await ledger.topup(account_id, Decimal("1.00"))
        await eventually(lambda: balances.stats["listen_lost"] == 1, "the lost connection")
        assert len(balances) == 0  # forgotten at once, not when a new connection listens
        await eventually(lambda: balances.listening and hub.listening, "listening again")
        assert hub.stats == {"lost": 1, "restored": 1}
        shown = await balances.display_balance("2103", "cache.example")
        assert shown is not None and shown.amount == Decimal("5.00")
        await quiet(balances, db_pool)  # the new connection hears changes again
        seen = balances.stats["invalidations"]
        await ledger.topup(account_id, Decimal("1.00"))
        await eventually(lambda: balances.stats["invalidations"] > seen, "the notification")
        shown = await balances.display_balance("2103", "cache.example")
        assert shown is not None and shown.amount == Decimal("6.00")
    # Nobody listens: a change is still seen, since nothing is stored meanwhile.
    assert not balances.listening
    await ledger.topup(account_id, Decimal("1.00"))
    for _ in range(2):
        shown = await balances.display_balance("2103", "cache.example")
        assert shown is not None and shown.amount == Decimal("7.00") and len(balances) == 0
    async with listening(balances, db_pool):
        assert await balances.display_balance("2103", "cache.example") == shown
        assert len(balances) == 1


async def test_a_change_during_a_miss_is_not_stored(db_pool: asyncpg.Pool) -> None:
    class RacingLedger(Ledger):
        """Reads the figure, then another transaction changes it before the read returns."""

        async def display_balances(
            self, subscribers: Sequence[tuple[str, str]]
        ) -> dict[tuple[str, str], DisplayBalance]:
            found = await super().display_balances(subscribers)
            if found and not raced:
                raced.append(True)
                seen = balances.stats["invalidations"]
                shown = next(iter(found.values()))
                await Ledger(db_pool).topup(shown.account_id, Decimal("1.00"))
                await eventually(lambda: balances.stats["invalidations"] > seen, "the change")
            return found

    raced: list[bool] = []
    ledger = RacingLedger(db_pool)
    balances = BalanceCache(ledger)
    async with listening(balances, db_pool):
        await _account(ledger, "cache-race", "2104", "2.00")
        await quiet(balances, db_pool)
        stale = await balances.display_balance("2104", "cache.example")
        assert stale is not None and stale.amount == Decimal("2.00")
        assert len(balances) == 0  # the read spanned a notification: used, not kept
        fresh = await balances.display_balance("2104", "cache.example")
        assert fresh is not None and fresh.amount == Decimal("3.00") and len(balances) == 1


async def test_misses_arriving_together_share_one_query(db_pool: asyncpg.Pool) -> None:
    ledger = Ledger(db_pool)
    balances = BalanceCache(ledger)
    async with listening(balances, db_pool):
        for i in range(5):
            await _account(ledger, f"cache-storm-{i}", f"22{i}0", f"{i}.50")
        await quiet(balances, db_pool)
        names = [f"22{i}0" for i in range(5)] + ["2299", "2210"]  # no account; a repeat
        shown = await asyncio.gather(*(balances.display_balance(n, "cache.example")
                                       for n in names))
        assert balances.stats["reads"] == 1 and balances.stats["misses"] == 7
        assert [s.amount if s else None for s in shown] == [
            Decimal("0.50"), Decimal("1.50"), Decimal("2.50"), Decimal("3.50"),
            Decimal("4.50"), None, Decimal("1.50")]
        assert len(balances) == 6  # cached, the one without an account as such
        assert balances.peek("2299", "cache.example") is None
        assert await balances.display_balance("2230", "cache.example") == shown[3]
        assert balances.stats["reads"] == 1


async def test_the_subscribers_of_an_account_share_its_balance(
    db_pool: asyncpg.Pool, cache: BalanceCache
) -> None:
    ledger = Ledger(db_pool)
    seen = cache.stats["invalidations"]
    account_id = await _account(ledger, "cache-shared", "2105", "7.00")
    await ledger.attach_subscriber(account_id, "2106", "cache.example")
    await eventually(lambda: cache.stats["invalidations"] >= seen + 2, "the attachments")
    await quiet(cache, db_pool)
    first = await cache.display_balance("2105", "cache.example")
    second = await cache.display_balance("2106", "cache.example")
    assert first == DisplayBalance(account_id, "EUR", Decimal("7.00"))
    assert second is first  # one object per account, not per subscriber
    assert cache._entries["cache.example"]["2106"] is first.account_id
    assert len(cache) == 2 and len(cache._accounts) == 1

    # A posting drops the account's figure, not which account the subscribers belong to.
    seen = cache.stats["invalidations"]
    await ledger.topup(account_id, Decimal("1.00"))
    await eventually(lambda: cache.stats["invalidations"] > seen, "the notification")
    assert len(cache) == 2 and not cache._accounts
    hits = cache.stats["hits"]
    third = await cache.display_balance("2106", "cache.example")
    assert third is not None and third.amount == Decimal("8.00")
    assert await cache.display_balance("2105", "cache.example") is third
    assert cache.stats["hits"] == hits + 1


async def test_a_full_cache_starts_over_and_keeps_what_it_just_read(
    db_pool: asyncpg.Pool,
) -> None:
    ledger = Ledger(db_pool)
    ids = [await _account(ledger, f"cache-full-{n}", f"215{n}", f"{n}.00") for n in range(3)]
    balances = BalanceCache(ledger, max_entries=2)
    async with listening(balances, db_pool):
        await quiet(balances, db_pool)
        for n in range(2):
            assert (await balances.display_balance(f"215{n}", "cache.example")
                    == DisplayBalance(ids[n], "EUR", Decimal(f"{n}.00")))
        assert len(balances) == 2 and balances.peek("2150", "cache.example") is not MISS
        # The third subscriber does not fit: the cache starts over with it alone, and its
        # figure (stored after the clearing, not wiped by it) is a hit from now on.
        third = await balances.display_balance("2152", "cache.example")
        assert third == DisplayBalance(ids[2], "EUR", Decimal("2.00"))
        assert len(balances) == 1 and list(balances._accounts) == [ids[2]]
        assert balances.peek("2150", "cache.example") is MISS
        assert balances.peek("2152", "cache.example") is third
