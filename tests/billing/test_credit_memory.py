"""Credit control's one-round-trip paths against a real PostgreSQL: a node reserves from the
funds it remembers of the caller's account only when the database, under the account's lock,
still agrees; answers written in batches; a settlement that carries its call's answer time.

Rate 49 of the demo table: 0.1000/min, 1/1, connect fee 0.0500; costs round up to the cent.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from billing.credit import CreditControl
from billing.ledger import Ledger
from billing.rating import Rate, Rating
from billing.settings import BillingSettings

T0 = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
GERMANY = Rate("49", Decimal("0.1000"), connect_fee=Decimal("0.0500"), first_increment=1,
               next_increment=1, id=1)


@pytest.fixture
def credit(db_pool: asyncpg.Pool) -> CreditControl:
    return CreditControl(db_pool, Rating([GERMANY]), BillingSettings(), node_name="mem")


async def subscriber(pool: asyncpg.Pool, name: str, balance: str) -> tuple[int, tuple[str, str]]:
    ledger = Ledger(pool)
    account = await ledger.create_account(name, "EUR", initial_balance=Decimal(balance))
    await ledger.attach_subscriber(account.id, name, "example.com")
    return account.id, (name, "example.com")


async def test_remembered_funds_are_used_only_while_they_are_right(
    credit: CreditControl, db_pool: asyncpg.Pool
) -> None:
    account_id, caller = await subscriber(db_pool, "mem-a", "0.06")
    # 0.06 pays the connect fee and 6 s (0.05 + 0.10 * 6/60 = 0.06).
    first = await credit.authorize("m-1", caller, "+4989", T0)
    assert first.allowed and first.max_duration == 6
    await credit.answered("m-1", T0)
    done = await credit.settle("m-1", T0 + timedelta(seconds=2), "bye")
    assert done.cost == Decimal("0.06") and done.balance_after == Decimal("0.00")
    # Remembered: nothing left -> a fresh read confirms the refusal.
    assert (await credit.authorize("m-2", caller, "+4989", T0)).status == 402
    # Another node (here: the ledger API) tops up: the remembered 0.00 is stale, the lock
    # says so, and the call gets what the new money pays for (0.12: 42 s).
    await Ledger(db_pool).topup(account_id, Decimal("0.12"))
    third = await credit.authorize("m-3", caller, "+4989", T0)
    assert third.allowed and third.max_duration == 42 and third.reserved == Decimal("0.12")
    assert third.display_balance == Decimal("0.00")
    await credit.failed("m-3", "busy", "486")


async def test_a_moved_subscriber_is_charged_to_its_new_account(
    credit: CreditControl, db_pool: asyncpg.Pool
) -> None:
    old_id, caller = await subscriber(db_pool, "mem-b", "1.00")
    first = await credit.authorize("mv-1", caller, "+4989", T0)
    assert first.account_id == old_id
    await credit.failed("mv-1", "cancelled", "487")
    ledger = Ledger(db_pool)
    new = await ledger.create_account("mem-b-new", "EUR", initial_balance=Decimal("5.00"))
    await ledger.attach_subscriber(new.id, *caller, move=True)
    second = await credit.authorize("mv-2", caller, "+4989", T0)
    assert second.allowed and second.account_id == new.id
    await credit.failed("mv-2", "cancelled", "487")


async def test_answers_in_a_batch_and_a_settlement_that_brings_its_own(
    credit: CreditControl, db_pool: asyncpg.Pool
) -> None:
    _, caller = await subscriber(db_pool, "mem-c", "100.00")  # three 6.05 reservations
    auths = [await credit.authorize(f"b-{n}", caller, "+4989", T0) for n in range(3)]
    assert all(a.allowed for a in auths)
    assert await credit.answered_many([("b-0", T0), ("b-1", T0 + timedelta(seconds=1))]) == 2
    assert await credit.answered_many([("b-0", T0)]) == 0  # once only
    # b-2's answer was never written: the settlement carries it (10 s at 1/1 -> 0.07).
    done = await credit.settle("b-2", T0 + timedelta(seconds=12), "bye",
                               authorization=auths[2], answered_at=T0 + timedelta(seconds=2))
    assert (done.status, done.duration, done.cost) == ("answered", 10, Decimal("0.07"))
    async with db_pool.acquire() as conn:
        answer = await conn.fetchval("SELECT answer_at FROM cdrs WHERE call_id = 'b-2'")
    assert answer == T0 + timedelta(seconds=2)
    # A settlement whose answer time disagrees with the recorded one is recomputed from the
    # database's (b-1 was answered at T0 + 1 s: 11 s -> 0.05 + 0.10 * 11/60 -> 0.07).
    other = await credit.settle("b-1", T0 + timedelta(seconds=12), "bye",
                                authorization=auths[1], answered_at=T0 + timedelta(seconds=5))
    assert (other.duration, other.cost) == (11, Decimal("0.07"))
    again = await credit.settle("b-1", T0 + timedelta(seconds=30), "bye")
    assert again.already_settled and again.cost == Decimal("0.07")
    await credit.settle("b-0", T0 + timedelta(seconds=1), "bye")
    assert await Ledger(db_pool).verify() == []
