"""Where calls to a subscriber go, cached (billing.diversions) against a real PostgreSQL: a hit
costs no query, locking, unlocking and a new voicemail URI are heard by NOTIFY (migration
0006), balance changes are not, moving a subscriber is, a lost LISTEN connection empties the
cache and a change racing a miss is not stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from decimal import Decimal

import asyncpg
import pytest

from billing.balances import BalanceCache
from billing.diversions import DiversionCache
from billing.ledger import Ledger
from sipcore.subscribers import MISS
from tests.billing.notifycache import listening, quiet
from tests.support import eventually

VM = "sip:voicemail@example.com"
DOMAIN = "divert.example"


@pytest.fixture
async def cache(db_pool: asyncpg.Pool) -> AsyncIterator[DiversionCache]:
    diversions = DiversionCache(db_pool, VM)
    async with listening(diversions, db_pool):
        yield diversions


async def _account(ledger: Ledger, user: str) -> int:
    account = await ledger.create_account(f"divert-{user}", "EUR",
                                          initial_balance=Decimal("5.00"))
    await ledger.attach_subscriber(account.id, user, DOMAIN)
    return account.id


async def _changed(cache: DiversionCache, change: Callable[[], object]) -> None:
    seen = cache.stats["invalidations"]
    result = change()
    if asyncio.iscoroutine(result):
        await result
    await eventually(lambda: cache.stats["invalidations"] > seen, "the notification")


async def test_lock_unlock_and_voicemail_uri_are_heard(
    db_pool: asyncpg.Pool, cache: DiversionCache
) -> None:
    ledger = Ledger(db_pool)
    account_id = await _account(ledger, "3001")
    await quiet(cache, db_pool)
    assert cache.peek("3001", DOMAIN) is MISS
    assert await cache.lookup("3001", DOMAIN) is None
    assert cache.peek("3001", DOMAIN) is None  # cached: the call path needs no await
    assert (cache.stats["misses"], len(cache)) == (1, 1)

    await _changed(cache, lambda: ledger.lock(account_id, "low_balance"))
    assert cache.peek("3001", DOMAIN) is MISS
    assert await cache.lookup("3001", DOMAIN) == VM  # the configured voicemail
    assert cache.peek("3001", DOMAIN) == VM

    await _changed(cache, lambda: ledger.update_account(account_id,
                                                        diversion_uri="sip:own@example.com"))
    assert await cache.lookup("3001", DOMAIN) == "sip:own@example.com"

    await _changed(cache, lambda: ledger.unlock(account_id))
    assert await cache.lookup("3001", DOMAIN) is None
    # Without a configured voicemail a locked account's calls are not diverted.
    plain = DiversionCache(db_pool, "")
    await ledger.update_account(account_id, diversion_uri=None)
    await ledger.lock(account_id, "manual")
    try:
        assert await plain.lookup("3001", DOMAIN) is None
    finally:
        await ledger.unlock(account_id)


async def test_balance_changes_keep_the_entry_and_moves_drop_it(
    db_pool: asyncpg.Pool, cache: DiversionCache
) -> None:
    ledger = Ledger(db_pool)
    account_id = await _account(ledger, "3002")
    await quiet(cache, db_pool)
    assert await cache.lookup("3002", DOMAIN) is None
    # Every charge and reservation notifies the account: that is not a reason to ask again.
    balances = BalanceCache(ledger)
    async with listening(balances, db_pool):
        await ledger.topup(account_id, Decimal("1.00"))
        await eventually(lambda: balances.stats["invalidations"] > 0, "the notification")
        # The balance cache reads the routing payload as a change of the account too.
        seen = balances.stats["invalidations"]
        await ledger.lock(account_id, "manual")
        await eventually(lambda: balances.stats["invalidations"] > seen, "routing")
        await ledger.unlock(account_id)
    await eventually(lambda: cache.stats["invalidations"] >= 2, "lock and unlock")
    assert await cache.lookup("3002", DOMAIN) is None

    hits = cache.stats["hits"]
    await ledger.topup(account_id, Decimal("1.00"))
    await asyncio.sleep(0.2)
    assert cache.peek("3002", DOMAIN) is None and cache.stats["hits"] == hits + 1

    # A subscriber without an account is cached as such until it is given one.
    assert await cache.lookup("3003", DOMAIN) is None
    assert cache.peek("3003", DOMAIN) is None
    locked = await ledger.create_account("divert-locked", "EUR")
    await ledger.lock(locked.id, "manual")
    await _changed(cache, lambda: ledger.attach_subscriber(locked.id, "3003", DOMAIN))
    assert cache.peek("3003", DOMAIN) is MISS
    assert await cache.lookup("3003", DOMAIN) == VM
    await _changed(cache, lambda: ledger.detach_subscriber("3003", DOMAIN))
    assert await cache.lookup("3003", DOMAIN) is None


async def test_nothing_is_stored_without_a_listener_or_across_a_change(
    db_pool: asyncpg.Pool,
) -> None:
    ledger = Ledger(db_pool)
    account_id = await _account(ledger, "3004")
    cache = DiversionCache(db_pool, VM)
    assert await cache.lookup("3004", DOMAIN) is None
    assert cache.peek("3004", DOMAIN) is MISS and len(cache) == 0  # not listening

    async with listening(cache, db_pool):
        await quiet(cache, db_pool)
        assert await cache.lookup("3004", DOMAIN) is None
        assert len(cache) == 1
        # A notification while a miss is in flight: the answer is used, not stored.
        cache.connection_lost()
        assert len(cache) == 0 and not cache.listening
    cache2 = DiversionCache(db_pool, VM)
    async with listening(cache2, db_pool):
        original = cache2._pool.acquire

        def racing_acquire() -> object:
            cache2._on_notify(None, 0, "billing_account_changed", f"{account_id}\trouting")
            return original()

        cache2._pool = type("P", (), {"acquire": staticmethod(racing_acquire)})()  # type: ignore[assignment]
        assert await cache2.lookup("3004", DOMAIN) is None
        assert cache2.peek("3004", DOMAIN) is MISS and len(cache2) == 0


async def test_a_bad_payload_empties_the_cache(db_pool: asyncpg.Pool,
                                               cache: DiversionCache) -> None:
    ledger = Ledger(db_pool)
    await _account(ledger, "3005")
    await quiet(cache, db_pool)
    assert await cache.lookup("3005", DOMAIN) is None
    cache._on_notify(None, 0, "billing_account_changed", "garbage")
    assert cache.peek("3005", DOMAIN) is MISS and len(cache) == 0


async def test_a_full_cache_starts_over(db_pool: asyncpg.Pool) -> None:
    ledger = Ledger(db_pool)
    locked = await _account(ledger, "3160")
    await ledger.lock(locked, "manual")
    try:
        await _account(ledger, "3161")
        diversions = DiversionCache(db_pool, VM, max_entries=2)
        async with listening(diversions, db_pool):
            await quiet(diversions, db_pool)
            assert await diversions.lookup("3160", DOMAIN) == VM
            assert await diversions.lookup("3161", DOMAIN) is None
            assert await diversions.lookup("3199", DOMAIN) is None  # no account: over the cap
            assert len(diversions) == 1
            assert diversions.peek("3160", DOMAIN) is MISS
            assert diversions.peek("3199", DOMAIN) is None  # cached: no account
            assert await diversions.lookup("3160", DOMAIN) == VM  # read again
            assert diversions.stats["misses"] == 4 and len(diversions) == 2
    finally:
        await ledger.unlock(locked)
