"""Low balance: auto-recharge from stored value after a charge, lock when it fails, unlock on
top-up; the voucher provider's own bookkeeping (idempotent by reference)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from billing.credit import CreditControl
from billing.ledger import Ledger
from billing.money import MoneyError
from billing.payment import PaymentResult, VoucherProvider
from billing.rating import Rate, Rating
from billing.settings import BillingSettings

T0 = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
DE = Rate("49", Decimal("0.1000"), connect_fee=Decimal("0.0500"), first_increment=1,
          next_increment=1)


async def call(credit: CreditControl, call_id: str, caller: tuple[str, str]) -> None:
    auth = await credit.authorize(call_id, caller, "+49891234", T0)
    assert auth.allowed, auth
    await credit.answered(call_id, T0)


async def test_charge_below_threshold_recharges_from_stored_value(
    db_pool: asyncpg.Pool,
) -> None:
    vouchers = VoucherProvider(db_pool)
    ledger = Ledger(db_pool, payment_provider=vouchers)
    credit = CreditControl(db_pool, Rating([DE]), BillingSettings(), ledger=ledger)
    account = await ledger.create_account(
        "recharge-ok", "EUR", initial_balance=Decimal("6.00"),
        low_balance_threshold=Decimal("5.00"), auto_recharge_amount=Decimal("10.00"),
    )
    await ledger.attach_subscriber(account.id, "rc", "example.com")
    assert await vouchers.register(account.id, Decimal("15.00"), reference="voucher-A") == 15
    assert await vouchers.register(account.id, Decimal("15.00"), reference="voucher-A") == 15

    await call(credit, "lb-1", ("rc", "example.com"))
    # 600 s on 49: 0.05 + 600/60 * 0.10 = 1.05 -> 4.95, below 5.00 -> recharge 10.00.
    result = await credit.settle("lb-1", T0 + timedelta(seconds=600), "bye")
    assert result.cost == Decimal("1.05") and result.low_balance == "recharged"
    assert await ledger.balance(account.id) == Decimal("14.95")
    assert await vouchers.stored_balance(account.id) == Decimal("5.00")
    assert not (await ledger.get_account(account.id)).locked
    async with db_pool.acquire() as conn:
        kinds = await conn.fetch(
            "SELECT kind, amount FROM journal WHERE account_id = $1 ORDER BY id", account.id
        )
    assert [(k["kind"], k["amount"]) for k in kinds] == [
        ("topup", Decimal("6.00")), ("charge", Decimal("-1.05")), ("recharge", Decimal("10.00"))
    ]
    # The same charge checked again (a retry) does not recharge again.
    assert result.journal_id is not None
    outcome = await ledger.check_low_balance(account.id, trigger=f"journal-{result.journal_id}")
    assert outcome == "ok" and await vouchers.stored_balance(account.id) == Decimal("5.00")
    assert await ledger.verify() == []


async def test_failed_recharge_locks_and_a_topup_unlocks(db_pool: asyncpg.Pool) -> None:
    vouchers = VoucherProvider(db_pool)
    ledger = Ledger(db_pool, payment_provider=vouchers)
    settings = BillingSettings(diversion_uri="sip:voicemail@example.com")
    credit = CreditControl(db_pool, Rating([DE]), settings, ledger=ledger)
    account = await ledger.create_account(
        "recharge-fails", "EUR", initial_balance=Decimal("5.50"),
        low_balance_threshold=Decimal("5.00"), auto_recharge_amount=Decimal("10.00"),
    )
    caller = ("lk", "example.com")
    await ledger.attach_subscriber(account.id, *caller)
    await vouchers.register(account.id, Decimal("4.00"))  # less than one recharge

    await call(credit, "lb-2", caller)
    result = await credit.settle("lb-2", T0 + timedelta(seconds=600), "bye")
    assert result.low_balance == "locked"  # 5.50 - 1.05 = 4.45, stored value 4.00 < 10.00
    locked = await ledger.get_account(account.id)
    assert locked.locked and locked.lock_reason == "low_balance"
    assert await vouchers.stored_balance(account.id) == Decimal("4.00")  # nothing taken
    refused = await credit.authorize("lb-3", caller, "+49891234", T0)
    assert (refused.status, refused.reason) == (403, "locked")
    assert await credit.diversion_for(*caller) == "sip:voicemail@example.com"

    await ledger.topup(account.id, Decimal("0.50"))  # 4.95: still below the threshold
    assert (await ledger.get_account(account.id)).locked
    await ledger.topup(account.id, Decimal("20.00"), reference="card-123")  # 24.95
    assert not (await ledger.get_account(account.id)).locked
    assert await credit.diversion_for(*caller) is None
    assert (await credit.authorize("lb-4", caller, "+49891234", T0)).allowed
    await credit.failed("lb-4", "cancelled", "test over", T0)


async def test_threshold_without_auto_recharge_locks(db_pool: asyncpg.Pool) -> None:
    ledger = Ledger(db_pool)  # no payment provider at all
    account = await ledger.create_account(
        "no-recharge", "EUR", initial_balance=Decimal("1.00"),
        low_balance_threshold=Decimal("2.00"), auto_recharge_amount=Decimal("5.00"),
    )
    assert await ledger.check_low_balance(account.id, trigger="x") == "locked"


async def test_voucher_provider_bookkeeping(db_pool: asyncpg.Pool) -> None:
    ledger = Ledger(db_pool)
    vouchers = VoucherProvider(db_pool)
    account = await ledger.create_account("wallet", "EUR")
    failed = await vouchers.charge(account.id, Decimal("1.00"), "r-0")
    assert not failed.ok and failed.error == "no stored value registered"
    await vouchers.register(account.id, Decimal("3.00"))
    first = await vouchers.charge(account.id, Decimal("2.00"), "r-1")
    retry = await vouchers.charge(account.id, Decimal("2.00"), "r-1")
    assert first.ok and retry.ok and await vouchers.stored_balance(account.id) == Decimal("1.00")
    short = await vouchers.charge(account.id, Decimal("2.00"), "r-2")
    assert not short.ok and "insufficient stored value" in short.error
    misuse = await vouchers.charge(account.id, Decimal("1.00"), "r-1")
    assert not misuse.ok and misuse.error == "reference already used"
    with pytest.raises(MoneyError):
        await vouchers.register(account.id, Decimal("-1"))
    with pytest.raises(MoneyError, match="too many decimals"):
        await vouchers.register(account.id, Decimal("0.001"))
    with pytest.raises(LookupError):
        await vouchers.register(999_999, Decimal("1"))


class SlowVouchers(VoucherProvider):
    """A provider that takes its time (like a card processor), to overlap two checks."""

    def __init__(self, pool: asyncpg.Pool, fail_with: Exception | None = None) -> None:
        super().__init__(pool)
        self.calls = 0
        self.fail_with = fail_with

    async def charge(self, account_id: int, amount: Decimal, reference: str) -> PaymentResult:
        self.calls += 1
        await asyncio.sleep(0.2)
        if self.fail_with is not None:
            raise self.fail_with
        return await super().charge(account_id, amount, reference)


async def test_two_charges_crossing_the_threshold_recharge_once(db_pool: asyncpg.Pool) -> None:
    vouchers = SlowVouchers(db_pool)
    ledger = Ledger(db_pool, payment_provider=vouchers)
    account = await ledger.create_account(
        "two-at-once", "EUR", initial_balance=Decimal("1.00"),
        low_balance_threshold=Decimal("5.00"), auto_recharge_amount=Decimal("10.00"),
    )
    await vouchers.register(account.id, Decimal("50.00"))
    outcomes = await asyncio.gather(
        ledger.check_low_balance(account.id, trigger="charge-1"),
        ledger.check_low_balance(account.id, trigger="charge-2"),
    )
    assert sorted(outcomes) == ["recharged", "recharging"]
    assert vouchers.calls == 1 and await ledger.balance(account.id) == Decimal("11.00")
    assert await vouchers.stored_balance(account.id) == Decimal("40.00")


async def test_provider_error_locks_and_the_retry_reuses_the_reference(
    db_pool: asyncpg.Pool,
) -> None:
    broken = SlowVouchers(db_pool, fail_with=ConnectionError("processor unreachable"))
    ledger = Ledger(db_pool, payment_provider=broken)
    account = await ledger.create_account(
        "provider-down", "EUR", initial_balance=Decimal("1.00"),
        low_balance_threshold=Decimal("5.00"), auto_recharge_amount=Decimal("10.00"),
    )
    assert await ledger.check_low_balance(account.id, trigger="c1") == "locked"
    async with db_pool.acquire() as conn:
        pending = await conn.fetchval(
            "SELECT recharge_reference FROM accounts WHERE id = $1", account.id
        )
        # The outcome is unknown: the claim stays, so the next try uses the same reference.
        assert pending == f"auto-recharge:{account.id}:c1"
        await conn.execute(
            "UPDATE accounts SET recharge_started_at = now() - interval '1 hour' WHERE id = $1",
            account.id,
        )
    await ledger.unlock(account.id)
    working = VoucherProvider(db_pool)
    await working.register(account.id, Decimal("10.00"))
    ledger.payment_provider = working
    assert await ledger.check_low_balance(account.id, trigger="c2") == "recharged"
    async with db_pool.acquire() as conn:
        reference = await conn.fetchval(
            "SELECT reference FROM journal WHERE account_id = $1 AND kind = 'recharge'",
            account.id,
        )
    assert reference == f"auto-recharge:{account.id}:c1"
