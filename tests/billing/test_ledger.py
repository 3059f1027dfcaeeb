"""The ledger against a real PostgreSQL: postings, idempotency, locks, statements, invariant."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from billing.ledger import AccountNotFound, Ledger, LedgerError
from billing.money import MoneyError
from billing.settings import DefaultAccountSettings


async def test_create_account_posts_the_initial_balance(db_pool: asyncpg.Pool) -> None:
    ledger = Ledger(db_pool)
    account = await ledger.create_account("alice", "EUR", initial_balance=Decimal("10.00"))
    assert account.balance == Decimal("10.00") and account.status == "active"
    assert account.credit_limit == 0 and account.currency == "EUR"
    async with db_pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM journal WHERE account_id = $1", account.id)
    assert [(r["kind"], r["amount"], r["balance_after"]) for r in rows] == [
        ("topup", Decimal("10.00"), Decimal("10.00"))
    ]
    with pytest.raises(LedgerError, match="exists already"):
        await ledger.create_account("alice", "EUR")
    with pytest.raises(MoneyError, match="unknown currency"):
        await ledger.create_account("bob", "XYZ")
    with pytest.raises(MoneyError, match="too many decimals"):
        await ledger.create_account("bob", "JPY", initial_balance=Decimal("1.5"))


async def test_topup_adjust_refund_and_idempotent_references(db_pool: asyncpg.Pool) -> None:
    ledger = Ledger(db_pool)
    account = await ledger.create_account("carol", "EUR")
    first = await ledger.topup(account.id, Decimal("5.00"), reference="pay-1")
    again = await ledger.topup(account.id, Decimal("5.00"), reference="pay-1")
    assert first.applied and not again.applied and again.id == first.id
    assert await ledger.balance(account.id) == Decimal("5.00")
    with pytest.raises(LedgerError, match="already posted"):
        await ledger.topup(account.id, Decimal("6.00"), reference="pay-1")
    entry = await ledger.adjust(account.id, Decimal("-1.50"), reason="goodwill reversal")
    assert entry.balance_after == Decimal("3.50") and entry.kind == "adjustment"
    await ledger.refund(account.id, Decimal("0.25"), reason="bad line", reference="call-x")
    assert await ledger.balance(account.id) == Decimal("3.75")
    with pytest.raises(LedgerError, match="needs a reason"):
        await ledger.adjust(account.id, Decimal("1"), reason=" ")
    with pytest.raises(MoneyError, match="must be positive"):
        await ledger.topup(account.id, Decimal("-1"))
    with pytest.raises(MoneyError, match="too many decimals"):
        await ledger.topup(account.id, Decimal("0.001"))
    with pytest.raises(AccountNotFound):
        await ledger.topup(999_999, Decimal("1"))


async def test_subscribers_share_an_account_but_belong_to_one(db_pool: asyncpg.Pool) -> None:
    ledger = Ledger(db_pool)
    family = await ledger.create_account("family", "EUR", initial_balance=Decimal("3.00"))
    other = await ledger.create_account("other", "EUR")
    await ledger.attach_subscriber(family.id, "1001", "example.com")
    await ledger.attach_subscriber(family.id, "1002", "example.com")
    await ledger.attach_subscriber(family.id, "1002", "example.com")  # no-op
    assert await ledger.subscribers(family.id) == [
        ("1001", "example.com"), ("1002", "example.com")
    ]
    with pytest.raises(LedgerError, match="belongs to account"):
        await ledger.attach_subscriber(other.id, "1001", "example.com")
    await ledger.attach_subscriber(other.id, "1001", "example.com", move=True)
    found = await ledger.account_for_subscriber("1001", "example.com")
    assert found is not None and found.id == other.id
    assert (await ledger.find_account("1002@example.com")).id == family.id
    assert (await ledger.find_account(str(family.id))).name == "family"
    shown = await ledger.display_balance("1002", "example.com")
    assert shown is not None and shown.amount == Decimal("3.00") and shown.currency == "EUR"
    assert await ledger.display_balance("nobody", "example.com") is None
    assert await ledger.detach_subscriber("1002", "example.com")
    assert not await ledger.detach_subscriber("1002", "example.com")


async def test_available_funds_count_credit_limit_and_reservations(
    db_pool: asyncpg.Pool,
) -> None:
    ledger = Ledger(db_pool)
    account = await ledger.create_account(
        "postpaid", "EUR", initial_balance=Decimal("1.00"), credit_limit=Decimal("5.00")
    )
    async with db_pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO reservations (call_id, account_id, amount, max_duration, created_at,"
            " node) VALUES ('r1', $1, 2.50, 60, now(), 'n')",
            account.id,
        )
    assert await ledger.reserved(account.id) == Decimal("2.50")
    assert await ledger.available(account.id) == Decimal("3.50")
    async with db_pool.acquire() as conn:
        await conn.execute("DELETE FROM reservations WHERE call_id = 'r1'")


async def test_lock_unlock_and_low_balance_lock_lifted_by_topup(db_pool: asyncpg.Pool) -> None:
    ledger = Ledger(db_pool)
    account = await ledger.create_account(
        "lowbal", "EUR", initial_balance=Decimal("1.00"), low_balance_threshold=Decimal("2.00")
    )
    assert await ledger.check_low_balance(account.id, trigger="t1") == "locked"
    locked = await ledger.get_account(account.id)
    assert locked.locked and locked.lock_reason == "low_balance"
    assert await ledger.check_low_balance(account.id, trigger="t2") == "already_locked"
    await ledger.topup(account.id, Decimal("0.50"))
    assert (await ledger.get_account(account.id)).locked  # 1.50 < 2.00
    await ledger.topup(account.id, Decimal("0.50"))
    assert not (await ledger.get_account(account.id)).locked  # 2.00 is back at the threshold
    manual = await ledger.lock(account.id, "fraud review")
    assert manual.lock_reason == "fraud review"
    await ledger.topup(account.id, Decimal("10.00"))
    assert (await ledger.get_account(account.id)).locked  # only an unlock lifts a manual lock
    assert not (await ledger.unlock(account.id)).locked


async def test_statement_covers_the_period(db_pool: asyncpg.Pool) -> None:
    ledger = Ledger(db_pool)
    account = await ledger.create_account("stmt", "EUR", initial_balance=Decimal("4.00"))
    async with db_pool.acquire() as conn:
        # Backdate the opening top-up so it falls before the period.
        await conn.execute(
            "UPDATE journal SET created_at = now() - interval '2 days' WHERE account_id = $1",
            account.id,
        )
        await conn.execute(
            "INSERT INTO cdrs (call_id, account_id, caller_username, caller_domain, callee, "
            "start_at, status, cost) VALUES ('stmt-call', $1, 'u', 'd', '4930', now(), "
            "'answered', 0.21)",
            account.id,
        )
    await ledger.topup(account.id, Decimal("1.00"))
    await ledger.adjust(account.id, Decimal("-0.21"), reason="manual charge")
    now = datetime.now(UTC)
    start, end = now - timedelta(days=1), now + timedelta(hours=1)
    statement = await ledger.statement(account.id, start, end)
    assert statement.opening_balance == Decimal("4.00")
    assert statement.closing_balance == Decimal("4.79")
    assert [e.amount for e in statement.entries] == [Decimal("1.00"), Decimal("-0.21")]
    assert [c["call_id"] for c in statement.cdrs] == ["stmt-call"]


async def test_ensure_subscriber_account_never_resets_a_balance(db_pool: asyncpg.Pool) -> None:
    ledger = Ledger(db_pool)
    defaults = DefaultAccountSettings(initial_balance="10.00")
    account, created = await ledger.ensure_subscriber_account("1003", "demo", defaults)
    assert created and account.balance == Decimal("10.00")
    await ledger.adjust(account.id, Decimal("-2.00"), reason="spent")
    again, created = await ledger.ensure_subscriber_account("1003", "demo", defaults)
    assert not created and again.id == account.id and again.balance == Decimal("8.00")


async def test_balance_equals_sum_of_journal_after_random_concurrent_operations(
    db_pool: asyncpg.Pool,
) -> None:
    ledger = Ledger(db_pool)
    accounts = [
        await ledger.create_account(f"inv-{i}", "EUR", initial_balance=Decimal("1.00"))
        for i in range(3)
    ]
    rng = random.Random(4)

    async def worker(seed: int) -> None:
        local = random.Random(seed)
        for n in range(40):
            account = local.choice(accounts)
            amount = Decimal(local.randint(1, 500)).scaleb(-2)
            op = local.choice(["topup", "adjust", "refund", "topup-ref"])
            if op == "topup":
                await ledger.topup(account.id, amount)
            elif op == "adjust":
                await ledger.adjust(account.id, -amount, reason="random")
            elif op == "refund":
                await ledger.refund(account.id, amount, reason="random")
            else:  # a retried payment: same reference, posted at most once
                await ledger.topup(account.id, Decimal("1.00"), reference=f"p-{account.id}-{n % 5}")

    await asyncio.gather(*(worker(rng.randint(0, 10**6)) for _ in range(4)))
    assert await ledger.verify() == []
    async with db_pool.acquire() as conn:
        for account in accounts:
            total = await conn.fetchval(
                "SELECT sum(amount) FROM journal WHERE account_id = $1", account.id
            )
            last = await conn.fetchval(
                "SELECT balance_after FROM journal WHERE account_id = $1 ORDER BY id DESC "
                "LIMIT 1",
                account.id,
            )
            assert await ledger.balance(account.id) == total == last
