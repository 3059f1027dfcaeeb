"""Payment providers for auto-recharge: the interface, and a stored-value (voucher) provider.

When a charge takes an account below its low-balance threshold the ledger asks a
:class:`PaymentProvider` for money (``charge(account_id, amount, reference)``). The interface
is the shape of a card processor's "charge a saved card" call: it is asynchronous, it may
fail with a human-readable reason, and it is idempotent by ``reference`` so a retry after a
crash never takes the money twice.

:class:`VoucherProvider` is the provider shipped here: it draws on a stored-value balance the
customer registered in advance (vouchers, prepaid cards), kept in PostgreSQL in
``stored_value`` / ``stored_value_journal`` (billing/migrations/0001_ledger.sql).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from billing.money import MoneyError, minor_units

if TYPE_CHECKING:
    from billing.db import Pool


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """Outcome of one charge attempt; ``reference`` identifies it at the provider."""

    ok: bool
    amount: Decimal
    reference: str
    provider: str
    error: str = ""


class PaymentProvider(Protocol):
    """Takes money from a customer's payment source for an account. Idempotent by reference:
    charging the same reference again returns the first successful result unchanged."""

    name: str

    async def charge(self, account_id: int, amount: Decimal, reference: str) -> PaymentResult:
        ...


class VoucherProvider:
    """Draws on the stored value registered for an account (table ``stored_value``)."""

    name = "voucher"

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def register(
        self, account_id: int, amount: Decimal, *, reference: str | None = None
    ) -> Decimal:
        """Add ``amount`` of stored value (a redeemed voucher) for ``account_id``, in the
        account's currency; returns the new stored balance. Idempotent by ``reference``."""
        if amount <= 0:
            raise MoneyError(f"stored value must be positive, got {amount}")
        async with self._pool.acquire() as conn, conn.transaction():
            currency = await conn.fetchval(
                "SELECT currency FROM accounts WHERE id = $1", account_id
            )
            if currency is None:
                raise LookupError(f"no account {account_id}")
            if amount != amount.quantize(Decimal(1).scaleb(-minor_units(currency))):
                raise MoneyError(f"too many decimals for {currency}: {amount}")
            await conn.execute(
                """
                INSERT INTO stored_value (account_id, currency) VALUES ($1, $2)
                ON CONFLICT (account_id) DO NOTHING
                """,
                account_id,
                currency,
            )
            await conn.execute(
                "SELECT 1 FROM stored_value WHERE account_id = $1 FOR UPDATE", account_id
            )
            inserted = await conn.fetchval(
                """
                INSERT INTO stored_value_journal (account_id, amount, reference)
                VALUES ($1, $2, $3) ON CONFLICT (reference) DO NOTHING RETURNING id
                """,
                account_id,
                amount,
                reference,
            )
            if inserted is not None:
                await conn.execute(
                    "UPDATE stored_value SET balance = balance + $2, updated_at = now() "
                    "WHERE account_id = $1",
                    account_id,
                    amount,
                )
            balance: Decimal = await conn.fetchval(
                "SELECT balance FROM stored_value WHERE account_id = $1", account_id
            )
            return balance

    async def stored_balance(self, account_id: int) -> Decimal:
        """Stored value left for ``account_id`` (0 if none was ever registered)."""
        async with self._pool.acquire() as conn:
            value = await conn.fetchval(
                "SELECT balance FROM stored_value WHERE account_id = $1", account_id
            )
        return Decimal(0) if value is None else Decimal(value)

    async def charge(self, account_id: int, amount: Decimal, reference: str) -> PaymentResult:
        if amount <= 0:
            return PaymentResult(False, amount, reference, self.name, "amount must be positive")
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT balance FROM stored_value WHERE account_id = $1 FOR UPDATE", account_id
            )
            if row is None:
                return PaymentResult(
                    False, amount, reference, self.name, "no stored value registered"
                )
            earlier = await conn.fetchrow(
                "SELECT account_id, amount FROM stored_value_journal WHERE reference = $1",
                reference,
            )
            if earlier is not None:
                # A retry of a charge that went through: report it, take nothing more.
                if earlier["account_id"] != account_id or -earlier["amount"] != amount:
                    return PaymentResult(
                        False, amount, reference, self.name, "reference already used"
                    )
                return PaymentResult(True, amount, reference, self.name)
            balance: Decimal = row["balance"]
            if balance < amount:
                return PaymentResult(
                    False,
                    amount,
                    reference,
                    self.name,
                    f"insufficient stored value ({balance} < {amount})",
                )
            await conn.execute(
                "INSERT INTO stored_value_journal (account_id, amount, reference) "
                "VALUES ($1, $2, $3)",
                account_id,
                -amount,
                reference,
            )
            await conn.execute(
                "UPDATE stored_value SET balance = balance - $2, updated_at = now() "
                "WHERE account_id = $1",
                account_id,
                amount,
            )
        return PaymentResult(True, amount, reference, self.name)
