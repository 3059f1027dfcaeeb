"""Credit control against a real PostgreSQL: reserve, cut, settle, fail, recover, concurrency.

Every expected cost is worked out next to the assertion from the demo rate table:
1 -> 0.0200/min 60/60; 44 -> 0.0500/min 30/6; 49 -> 0.1000/min 1/1 + 0.0500 connect;
4930 -> 0.0400/min 60/1; costs round up to the cent.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from billing.credit import CreditControl, UnknownCall
from billing.ledger import Account, Ledger
from billing.rating import Rating
from billing.settings import BillingSettings, RecoverySettings

T0 = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
DEMO_RATES = [
    ("1", "USA/Canada", "0.0200", 60, 60, "0"),
    ("44", "United Kingdom", "0.0500", 30, 6, "0"),
    ("49", "Germany", "0.1000", 1, 1, "0.0500"),
    ("4930", "Germany Berlin", "0.0400", 60, 1, "0"),
]
_names = itertools.count(1)


@pytest.fixture(scope="module")
async def rating(db_pool: asyncpg.Pool) -> Rating:
    async with db_pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO rates (prefix, description, currency, price_per_minute, "
            "first_increment, next_increment, connect_fee) VALUES ($1, $2, 'EUR', $3, $4, $5, $6)",
            [(p, d, Decimal(price), f, n, Decimal(fee)) for p, d, price, f, n, fee in DEMO_RATES],
        )
    return await Rating.load(db_pool)


@pytest.fixture(scope="module")
async def second_pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A second pool: another server process sharing the database."""
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=4)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def credit(db_pool: asyncpg.Pool, rating: Rating) -> CreditControl:
    return CreditControl(db_pool, rating, BillingSettings(), node_name="node-a")


async def new_subscriber(
    pool: asyncpg.Pool, balance: str, **kwargs: Any
) -> tuple[Account, tuple[str, str]]:
    n = next(_names)
    ledger = Ledger(pool)
    account = await ledger.create_account(
        f"acct-{n}", "EUR", initial_balance=Decimal(balance), **kwargs
    )
    caller = (f"u{n}", "example.com")
    await ledger.attach_subscriber(account.id, *caller)
    return account, caller


async def journal_charges(pool: asyncpg.Pool, call_id: str) -> list[Decimal]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT amount FROM journal WHERE kind = 'charge' AND reference = $1", call_id
        )
    return [r["amount"] for r in rows]


async def test_call_is_reserved_capped_and_settled_exactly(
    credit: CreditControl, db_pool: asyncpg.Pool
) -> None:
    account, caller = await new_subscriber(db_pool, "10.00")
    auth = await credit.authorize("c-49", caller, "+49891234", T0)
    # 10.00 pays 0.05 + s/600 for s <= 5970: capped at 3600 s, reserving 0.05 + 6.00 = 6.05.
    assert auth.allowed and auth.max_duration == 3600 and auth.reserved == Decimal("6.05")
    assert auth.destination == "49891234" and auth.rate is not None and auth.rate.prefix == "49"
    assert await credit.ledger.available(account.id) == Decimal("3.95")
    shown = await credit.ledger.display_balance(*caller)
    assert shown is not None and shown.amount == Decimal("3.95")  # balance less reservation
    assert await credit.answered("c-49", T0 + timedelta(seconds=3))
    assert not await credit.answered("c-49", T0 + timedelta(seconds=4))  # 200 OK retransmitted
    # 95 s of talk: 0.05 + 95/60 * 0.10 = 0.2083.. -> 0.21
    result = await credit.settle("c-49", T0 + timedelta(seconds=98), "caller_bye")
    assert result.cost == Decimal("0.21") and result.duration == 95
    assert result.balance_after == Decimal("9.79") and not result.already_settled
    assert await credit.ledger.balance(account.id) == Decimal("9.79")
    assert await credit.ledger.available(account.id) == Decimal("9.79")
    async with db_pool.acquire() as conn:
        cdr = await conn.fetchrow("SELECT * FROM cdrs WHERE call_id = 'c-49'")
        assert await conn.fetchval("SELECT count(*) FROM reservations WHERE call_id = 'c-49'") == 0
    assert cdr is not None
    assert cdr["status"] == "answered" and cdr["cost"] == Decimal("0.21")
    assert cdr["billed_duration"] == 95 and cdr["charged_duration"] == 95
    assert cdr["disconnect_reason"] == "caller_bye" and cdr["prefix"] == "49"
    assert cdr["answer_at"] == T0 + timedelta(seconds=3) and cdr["reserved_amount"] == Decimal(
        "6.05"
    )
    # Settling again (BYE from the other side too) charges nothing more.
    again = await credit.settle("c-49", T0 + timedelta(seconds=99), "callee_bye")
    assert again.already_settled and again.cost == Decimal("0.21")
    assert await journal_charges(db_pool, "c-49") == [Decimal("-0.21")]
    assert await credit.ledger.balance(account.id) == Decimal("9.79")


@pytest.mark.parametrize(
    ("number", "talk", "expected"),
    [
        # 44, 30/6: 31 s -> 36 s billed -> 36/60 * 0.05 = 0.03
        ("00442079460000", 31, "0.03"),
        # 44: 95 s -> 30 + 11*6 = 96 s -> 0.08
        ("+442079460000", 95, "0.08"),
        # 1, 60/60: 61 s -> 120 s -> 2 * 0.02 = 0.04
        ("+12125550100", 61, "0.04"),
        # 4930, 60/1: 61 s -> 61/60 * 0.04 = 0.0406.. -> 0.05
        ("004930123456", 61, "0.05"),
        # 49, 1/1 + fee: 0 s of talk (answered and hung up at once) costs nothing
        ("+49891234", 0, "0.00"),
    ],
)
async def test_increments_settle_to_the_expected_cost(
    credit: CreditControl, db_pool: asyncpg.Pool, number: str, talk: int, expected: str
) -> None:
    account, caller = await new_subscriber(db_pool, "5.00")
    call_id = f"inc-{number}-{talk}"
    assert (await credit.authorize(call_id, caller, number, T0)).allowed
    await credit.answered(call_id, T0 + timedelta(seconds=5))
    result = await credit.settle(call_id, T0 + timedelta(seconds=5 + talk), "bye")
    assert result.cost == Decimal(expected)
    assert await credit.ledger.balance(account.id) == Decimal("5.00") - Decimal(expected)
    assert await credit.ledger.verify() == []


async def test_call_cut_at_the_limit_is_billed_up_to_the_reserved_duration(
    credit: CreditControl, db_pool: asyncpg.Pool
) -> None:
    account, caller = await new_subscriber(db_pool, "0.21")
    auth = await credit.authorize("cut", caller, "+49891234", T0)
    # 0.21 pays 96 s (0.05 + 0.16); 97 s would cost 0.2116.. -> 0.22.
    assert auth.max_duration == 96 and auth.reserved == Decimal("0.21")
    await credit.answered("cut", T0)
    # The proxy's BYE at the limit arrives 0.4 s late: that time is not billed.
    result = await credit.settle("cut", T0 + timedelta(seconds=96.4), "credit_exhausted")
    assert result.duration == 96 and result.cost == Decimal("0.21")
    assert await credit.ledger.balance(account.id) == 0


async def test_refusals(credit: CreditControl, db_pool: asyncpg.Pool) -> None:
    _, poor_caller = await new_subscriber(db_pool, "0.05")
    # 0.05 pays the connect fee but not the first second: 0.05 + 1/600 -> 0.06.
    refused = await credit.authorize("r-402", poor_caller, "+49891234", T0)
    assert (refused.allowed, refused.status, refused.reason) == (False, 402, "insufficient_funds")
    # The same money pays 60 s to the US: 60/60 * 0.02 = 0.02.
    assert (await credit.authorize("r-us", poor_caller, "+12125550100", T0)).allowed
    await credit.failed("r-us", "cancelled", "caller_cancel", T0)

    locked, locked_caller = await new_subscriber(db_pool, "10.00")
    await credit.ledger.lock(locked.id)
    refused = await credit.authorize("r-403", locked_caller, "+49891234", T0)
    assert (refused.status, refused.reason) == (403, "locked")

    _, caller = await new_subscriber(db_pool, "10.00")
    refused = await credit.authorize("r-404", caller, "+33123456789", T0)
    assert (refused.status, refused.reason) == (404, "unbillable")
    refused = await credit.authorize("r-nan", caller, "alice", T0)
    assert (refused.status, refused.reason) == (404, "unbillable")
    refused = await credit.authorize("r-none", ("ghost", "example.com"), "+49891234", T0)
    assert (refused.status, refused.reason) == (403, "no_account")
    strict = CreditControl(db_pool, credit.rating, BillingSettings(unbillable_status=403))
    assert (await strict.authorize("r-404b", caller, "+33123", T0)).status == 403
    async with db_pool.acquire() as conn:
        attempts = await conn.fetch(
            "SELECT call_id, destination, reason FROM unbillable_attempts ORDER BY id"
        )
        statuses = await conn.fetch(
            "SELECT status FROM cdrs WHERE call_id IN ('r-404', 'r-nan', 'r-404b')"
        )
        assert await conn.fetchval("SELECT count(*) FROM reservations") == 0
    assert [(a["call_id"], a["destination"]) for a in attempts][:2] == [
        ("r-404", "33123456789"),
        ("r-nan", None),
    ]
    assert {s["status"] for s in statuses} == {"unbillable"}


async def test_rate_in_another_currency_is_unbillable(
    credit: CreditControl, db_pool: asyncpg.Pool
) -> None:
    ledger = Ledger(db_pool)
    account = await ledger.create_account("yen", "JPY", initial_balance=Decimal(1000))
    await ledger.attach_subscriber(account.id, "yen", "example.com")
    refused = await credit.authorize("jpy", ("yen", "example.com"), "+49891234", T0)
    assert refused.reason == "unbillable"


async def test_two_processes_never_both_spend_the_last_money(
    db_pool: asyncpg.Pool, second_pool: asyncpg.Pool, rating: Rating
) -> None:
    settings = BillingSettings()
    node_a = CreditControl(db_pool, rating, settings, node_name="a")
    node_b = CreditControl(second_pool, rating, settings, node_name="b")
    account, caller = await new_subscriber(db_pool, "0.21")
    # 0.21 buys exactly one call to 49 (96 s); both nodes try at the same moment.
    results = await asyncio.gather(
        node_a.authorize("race-a", caller, "+49891234", T0),
        node_b.authorize("race-b", caller, "+49891234", T0),
    )
    assert sorted(r.allowed for r in results) == [False, True]
    assert {r.status for r in results if not r.allowed} == {402}
    assert await node_a.ledger.available(account.id) == 0
    for r in results:
        if r.allowed:
            await node_a.failed(r.call_id, "cancelled", "test over", T0)

    # Many calls at once over both pools: the reservations never exceed the money.
    account, caller = await new_subscriber(db_pool, "1.00")
    nodes = [node_a, node_b]
    many = await asyncio.gather(
        *(nodes[i % 2].authorize(f"many-{i}", caller, "+49891234", T0) for i in range(12))
    )
    allowed = [r for r in many if r.allowed]
    assert allowed and sum(r.reserved for r in allowed) <= Decimal("1.00")
    assert await node_a.ledger.available(account.id) >= 0
    for r in allowed:
        await nodes[0].answered(r.call_id, T0)
    settled = await asyncio.gather(
        *(nodes[i % 2].settle(r.call_id, T0 + timedelta(seconds=r.max_duration), "bye")
          for i, r in enumerate(allowed))
    )
    assert sum(s.cost for s in settled) <= Decimal("1.00")
    assert await node_a.ledger.balance(account.id) >= 0
    assert await node_a.ledger.verify() == []


async def test_simultaneous_call_limit(db_pool: asyncpg.Pool, rating: Rating) -> None:
    credit = CreditControl(
        db_pool, rating, BillingSettings(max_concurrent_calls_per_account=1), node_name="lim"
    )
    _, caller = await new_subscriber(db_pool, "10.00")
    assert (await credit.authorize("lim-1", caller, "+12125550100", T0)).allowed
    second = await credit.authorize("lim-2", caller, "+12125550100", T0)
    assert (second.status, second.reason) == (486, "too_many_calls")
    await credit.failed("lim-1", "busy", "486 Busy Here", T0)
    assert (await credit.authorize("lim-3", caller, "+12125550100", T0)).allowed
    await credit.failed("lim-3", "no_answer", "timeout", T0)


async def test_failed_calls_release_and_are_missed_calls(
    credit: CreditControl, db_pool: asyncpg.Pool
) -> None:
    account, caller = await new_subscriber(db_pool, "1.00")
    auth = await credit.authorize("busy-1", caller, "+12125550199", T0)
    assert auth.allowed and await credit.ledger.available(account.id) < Decimal("1.00")
    assert await credit.failed("busy-1", "busy", "486 Busy Here", T0 + timedelta(seconds=2))
    assert not await credit.failed("busy-1", "busy", "486 Busy Here")  # already closed
    assert await credit.ledger.available(account.id) == Decimal("1.00")
    assert await credit.ledger.balance(account.id) == Decimal("1.00")
    missed = await credit.missed_calls("+12125550199")
    assert [m["call_id"] for m in missed] == ["busy-1"] and missed[0]["status"] == "busy"
    assert await credit.mark_seen("+12125550199") == 1
    assert await credit.missed_calls("+12125550199") == []
    with pytest.raises(ValueError):
        await credit.failed("busy-1", "answered", "x")  # type: ignore[arg-type]
    # A Call-ID may be reused after a failure (a new attempt), never after a charge.
    assert (await credit.authorize("busy-1", caller, "+12125550199", T0)).allowed
    await credit.answered("busy-1", T0)
    await credit.settle("busy-1", T0 + timedelta(seconds=10), "bye")
    reuse = await credit.authorize("busy-1", caller, "+12125550199", T0)
    assert reuse.reason == "duplicate_call_id"
    with pytest.raises(UnknownCall):
        await credit.settle("never-seen", T0, "bye")


async def test_failure_after_answer_is_still_paid(
    credit: CreditControl, db_pool: asyncpg.Pool
) -> None:
    account, caller = await new_subscriber(db_pool, "1.00")
    await credit.authorize("late-fail", caller, "+12125550100", T0)
    await credit.answered("late-fail", T0)
    # A failure reported for an answered call settles it: 30 s -> 60 s -> 0.02.
    assert await credit.failed("late-fail", "failed", "transport error", T0 + timedelta(seconds=30))
    assert await credit.ledger.balance(account.id) == Decimal("0.98")


async def test_unanswered_settle_and_free_calls(
    credit: CreditControl, db_pool: asyncpg.Pool
) -> None:
    account, caller = await new_subscriber(db_pool, "1.00")
    await credit.authorize("never-answered", caller, "+12125550100", T0)
    result = await credit.settle("never-answered", T0 + timedelta(seconds=20), "cancel")
    assert result.status == "cancelled" and result.cost == 0
    assert await credit.ledger.available(account.id) == Decimal("1.00")

    assert await credit.open_free_call("free-1", caller, "1002", T0)
    assert await credit.answered("free-1", T0 + timedelta(seconds=2))
    free = await credit.settle("free-1", T0 + timedelta(seconds=62.5), "bye")
    assert (free.status, free.duration, free.cost) == ("answered", 61, Decimal(0))
    assert await credit.open_free_call("free-2", caller, "1002", T0)
    assert await credit.failed("free-2", "offline", "not registered", T0)
    assert [m["call_id"] for m in await credit.missed_calls("1002")] == ["free-2"]


async def test_database_outage_refuses_with_503(db_dsn: str, rating: Rating) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1)
    assert pool is not None
    credit = CreditControl(pool, rating, BillingSettings())
    await pool.close()
    refused = await credit.authorize("down", ("u", "example.com"), "+49891234", T0)
    assert (refused.allowed, refused.status, refused.reason) == (
        False, 503, "database_unavailable"
    )


async def test_recovery_bills_a_crashed_node_once(
    db_pool: asyncpg.Pool, second_pool: asyncpg.Pool, rating: Rating
) -> None:
    recovery = RecoverySettings(heartbeat_interval=15, node_timeout=60, grace=30)
    settings = BillingSettings(recovery=recovery)
    crashed = CreditControl(db_pool, rating, settings, node_name="crashy")
    account, caller = await new_subscriber(db_pool, "10.00")
    await crashed.start(T0)
    assert (await crashed.authorize("crash-1", caller, "+12125550100", T0)).allowed
    assert (await crashed.authorize("crash-ring", caller, "+12125550100", T0)).allowed
    await crashed.answered("crash-1", T0 + timedelta(seconds=5))
    assert await crashed.heartbeat(["crash-1", "crash-ring"], T0 + timedelta(seconds=50)) == 1
    # ... and the node dies. Another node, still within node_timeout: nothing to do.
    survivor = CreditControl(second_pool, rating, settings, node_name="survivor")
    other = CreditControl(db_pool, rating, settings, node_name="other")
    assert await survivor.recover(T0 + timedelta(seconds=100)) == []
    # After node_timeout both sweepers run at once: each call is settled exactly once.
    later = T0 + timedelta(seconds=200)
    first, second = await asyncio.gather(survivor.recover(later), other.recover(later))
    results = {s.call_id: s for s in first + second}
    assert sorted(results) == ["crash-1", "crash-ring"] and len(first) + len(second) == 2
    # Billed up to the last heartbeat: 45 s of talk -> 60 s on 60/60 -> 0.02.
    talked = results["crash-1"]
    assert talked.recovered and talked.duration == 45 and talked.cost == Decimal("0.02")
    assert results["crash-ring"].status == "failed" and results["crash-ring"].cost == 0
    assert await survivor.recover(later + timedelta(seconds=10)) == []
    assert await journal_charges(db_pool, "crash-1") == [Decimal("-0.02")]
    assert await crashed.ledger.balance(account.id) == Decimal("9.98")
    assert await crashed.ledger.available(account.id) == Decimal("9.98")
    async with db_pool.acquire() as conn:
        cdr = await conn.fetchrow("SELECT * FROM cdrs WHERE call_id = 'crash-1'")
    assert cdr is not None and cdr["recovered"] and cdr["disconnect_reason"] == "recovered"
    # The crashed node's late BYE changes nothing.
    late = await crashed.settle("crash-1", later, "bye")
    assert late.already_settled and await crashed.ledger.balance(account.id) == Decimal("9.98")


async def test_restarted_node_recovers_its_previous_incarnation_at_once(
    db_pool: asyncpg.Pool, rating: Rating
) -> None:
    before = CreditControl(db_pool, rating, BillingSettings(), node_name="restart")
    _, caller = await new_subscriber(db_pool, "10.00")
    await before.start(T0)
    await before.authorize("restart-1", caller, "+4930123456", T0)
    await before.answered("restart-1", T0)
    await before.heartbeat(["restart-1"], T0 + timedelta(seconds=61))
    after = CreditControl(db_pool, rating, BillingSettings(), node_name="restart")
    await after.start(T0 + timedelta(seconds=62))
    (result,) = await after.recover(T0 + timedelta(seconds=62))
    # 4930 on 60/1: 61 s -> 61/60 * 0.04 = 0.0406.. -> 0.05
    assert result.recovered and result.duration == 61 and result.cost == Decimal("0.05")


async def test_overdue_call_of_a_live_node_is_closed_at_its_maximum(
    db_pool: asyncpg.Pool, rating: Rating
) -> None:
    credit = CreditControl(db_pool, rating, BillingSettings(), node_name="live")
    account, caller = await new_subscriber(db_pool, "0.10")
    auth = await credit.authorize("overdue", caller, "+12125550100", T0)
    assert auth.max_duration == 300  # 0.10 buys five minutes at 0.02
    await credit.answered("overdue", T0)
    await credit.heartbeat(["overdue"], T0 + timedelta(seconds=400))  # proxy never cut it
    assert await credit.recover(T0 + timedelta(seconds=320)) == []  # within grace
    (result,) = await credit.recover(T0 + timedelta(seconds=400))
    assert result.duration == 300 and result.cost == Decimal("0.10")
    assert await credit.ledger.balance(account.id) == 0


async def test_rerate_unbillable_after_the_range_is_added(
    credit: CreditControl, db_pool: asyncpg.Pool
) -> None:
    _, caller = await new_subscriber(db_pool, "10.00")
    refused = await credit.authorize("fr-1", caller, "+33612345678", T0)
    assert refused.reason == "unbillable"
    assert await credit.rerate_unbillable() == []
    async with db_pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO rates (prefix, description, currency, price_per_minute) "
            "VALUES ('336', 'France mobile', 'EUR', 0.15)"
        )
    matched = await credit.rerate_unbillable()
    assert ("fr-1", "33612345678", "336") in matched
    assert await credit.rerate_unbillable() == []  # once
    async with db_pool.acquire() as conn:
        cdr = await conn.fetchrow("SELECT * FROM cdrs WHERE call_id = 'fr-1'")
    assert cdr is not None and cdr["prefix"] == "336" and cdr["status"] == "unbillable"
    # The new range is live for the next call.
    assert (await credit.authorize("fr-2", caller, "+33612345678", T0)).allowed
    await credit.failed("fr-2", "cancelled", "test", T0)


async def test_diversion_for_locked_accounts(credit: CreditControl, db_pool: asyncpg.Pool) -> None:
    account, callee = await new_subscriber(db_pool, "1.00")
    assert await credit.diversion_for(*callee) is None
    await credit.ledger.lock(account.id, "low_balance")
    assert await credit.diversion_for(*callee) is None  # no voicemail configured
    with_vm = CreditControl(
        db_pool, credit.rating, BillingSettings(diversion_uri="sip:voicemail@example.com")
    )
    assert await with_vm.diversion_for(*callee) == "sip:voicemail@example.com"
    await credit.ledger.update_account(account.id, diversion_uri="sip:vm-own@example.com")
    assert await with_vm.diversion_for(*callee) == "sip:vm-own@example.com"


async def test_maintenance_task_heartbeats_and_sweeps(
    db_pool: asyncpg.Pool, rating: Rating
) -> None:
    recovery = RecoverySettings(heartbeat_interval=0.05, node_timeout=1, grace=0)
    credit = CreditControl(db_pool, rating, BillingSettings(recovery=recovery), node_name="mt")
    _, caller = await new_subscriber(db_pool, "10.00")
    started = datetime.now(UTC)
    await credit.authorize("mt-1", caller, "+12125550100", started)
    await credit.answered("mt-1", started)
    task = asyncio.create_task(credit.run_maintenance(lambda: ["mt-1"]))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with db_pool.acquire() as conn:
        beat = await conn.fetchval("SELECT heartbeat_at FROM reservations WHERE call_id = 'mt-1'")
        seen = await conn.fetchval(
            "SELECT seen_at FROM billing_nodes WHERE node_id = $1", credit.node_id
        )
    assert beat > started and seen > started
    await credit.settle("mt-1", datetime.now(UTC), "bye")
