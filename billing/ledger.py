"""The prepaid ledger: accounts, their journal, locking and statements.

Theory of operation
-------------------
An account's balance only ever changes through :func:`post_entry`, which runs inside a
transaction that holds the account row ``FOR UPDATE``: it inserts the journal row (amount,
kind, reason, reference, balance after) and updates ``accounts.balance`` to match. So at every
commit ``balance == sum(journal.amount)`` (:meth:`Ledger.verify` checks it), and every change
says why it happened (ARCHITECTURE.md principle 5).

``(kind, reference)`` is unique: posting a charge for a Call-ID, or a top-up for a payment
reference, a second time changes nothing and returns the first posting with
``applied=False``. This is what makes settlement and payment retries idempotent.

Available funds are ``balance + credit_limit - sum(reservations)``: the money a new call may
draw on while other calls of the account hold reservations (billing/credit.py).

Locking: an account is ``locked`` with a reason. A lock for ``low_balance`` is placed when a
charge takes the balance below the account's threshold and no auto-recharge succeeds
(:meth:`Ledger.check_low_balance`); a top-up that brings the balance back to the threshold
lifts it. Any other lock (``manual``) is lifted only by :meth:`Ledger.unlock`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal

import asyncpg

from billing.money import MoneyError, minor_units
from billing.payment import PaymentResult
from billing.settings import DefaultAccountSettings

if TYPE_CHECKING:
    from billing.db import Connection, Pool, Record
    from billing.payment import PaymentProvider

log = logging.getLogger("billing.ledger")

JournalKind = Literal["topup", "charge", "refund", "adjustment", "recharge"]
LowBalanceOutcome = Literal["ok", "recharged", "recharging", "locked", "already_locked"]
LOW_BALANCE: Final = "low_balance"
RECHARGE_CLAIM: Final = timedelta(minutes=5)
"""How long a claimed auto-recharge blocks another (a provider call outlasting it is stale)."""


class LedgerError(Exception):
    """A ledger operation that cannot be carried out; the message says why."""


class AccountNotFound(LedgerError):
    pass


class Keep:
    """Marker for "leave this account setting as it is" in :meth:`Ledger.update_account`."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = Keep()


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    name: str
    currency: str
    balance: Decimal
    credit_limit: Decimal
    status: str
    lock_reason: str | None
    low_balance_threshold: Decimal | None
    auto_recharge_amount: Decimal | None
    rate_table: str
    max_concurrent_calls: int
    diversion_uri: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def locked(self) -> bool:
        return self.status == "locked"

    @classmethod
    def from_record(cls, row: Record) -> Account:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class JournalEntry:
    id: int
    account_id: int
    amount: Decimal
    balance_after: Decimal
    kind: str
    reason: str
    reference: str | None
    created_at: datetime
    applied: bool = True  # False: an earlier posting with the same (kind, reference) stands

    @classmethod
    def from_record(cls, row: Record, *, applied: bool = True) -> JournalEntry:
        return cls(
            id=row["id"],
            account_id=row["account_id"],
            amount=row["amount"],
            balance_after=row["balance_after"],
            kind=row["kind"],
            reason=row["reason"],
            reference=row["reference"],
            created_at=row["created_at"],
            applied=applied,
        )

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class Statement:
    """Journal and CDRs of an account for ``[start, end)``."""

    account: Account
    start: datetime
    end: datetime
    opening_balance: Decimal
    closing_balance: Decimal
    entries: list[JournalEntry]
    cdrs: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class DisplayBalance:
    """What the phone is shown: the balance less the reservations of calls in progress."""

    account_id: int
    currency: str
    amount: Decimal


async def lock_account(conn: Connection, account_id: int) -> Record:
    """The account row, locked ``FOR UPDATE`` until the caller's transaction ends."""
    row = await conn.fetchrow("SELECT * FROM accounts WHERE id = $1 FOR UPDATE", account_id)
    if row is None:
        raise AccountNotFound(f"no account {account_id}")
    return row


async def post_entry(
    conn: Connection,
    account: Record,
    amount: Decimal,
    kind: JournalKind,
    reason: str,
    reference: str | None,
) -> JournalEntry:
    """Post ``amount`` to the locked ``account`` row: journal row + balance, same transaction.

    The caller holds the row from :func:`lock_account` inside its transaction. If
    ``(kind, reference)`` was posted before, nothing changes and that posting is returned with
    ``applied=False``; a reference reused for another account or amount is an error.
    """
    if amount == 0:
        raise LedgerError("a journal entry must move money (amount is 0)")
    balance_after: Decimal = account["balance"] + amount
    # One round trip: the journal row and the balance it leads to, or neither (a posting
    # with this reference exists). Call settlement runs this for every call.
    row = await conn.fetchrow(
        """
        WITH entry AS (
            INSERT INTO journal (account_id, amount, balance_after, kind, reason, reference)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (kind, reference) DO NOTHING
            RETURNING *
        ), moved AS (
            UPDATE accounts SET balance = $3, updated_at = now()
            WHERE id = $1 AND EXISTS (SELECT 1 FROM entry)
        )
        SELECT * FROM entry
        """,
        account["id"],
        amount,
        balance_after,
        kind,
        reason,
        reference,
    )
    if row is None:
        earlier = await conn.fetchrow(
            "SELECT * FROM journal WHERE kind = $1 AND reference = $2", kind, reference
        )
        assert earlier is not None  # the conflict that made the insert do nothing
        if earlier["account_id"] != account["id"] or earlier["amount"] != amount:
            raise LedgerError(
                f"{kind} reference {reference!r} already posted as {earlier['amount']} "
                f"on account {earlier['account_id']}"
            )
        return JournalEntry.from_record(earlier, applied=False)
    return JournalEntry.from_record(row)


def _check_minor_units(amount: Decimal, currency: str) -> None:
    if not amount.is_finite():
        raise MoneyError(f"not a finite amount: {amount}")
    places = minor_units(currency)
    if amount != amount.quantize(Decimal(1).scaleb(-places)):
        raise MoneyError(f"too many decimals for {currency} ({places}): {amount}")


class Ledger:
    """Accounts and their money, as a Python API over an asyncpg pool.

    ``payment_provider`` is used for auto-recharges (:meth:`check_low_balance`); without one
    an account that drops below its threshold is locked.
    """

    def __init__(self, pool: Pool, *, payment_provider: PaymentProvider | None = None) -> None:
        self._pool = pool
        self.payment_provider = payment_provider

    # -- accounts -----------------------------------------------------------------------

    async def create_account(
        self,
        name: str,
        currency: str = "EUR",
        *,
        initial_balance: Decimal = Decimal(0),
        credit_limit: Decimal = Decimal(0),
        low_balance_threshold: Decimal | None = None,
        auto_recharge_amount: Decimal | None = None,
        rate_table: str = "default",
        max_concurrent_calls: int = 0,
        diversion_uri: str | None = None,
    ) -> Account:
        """Create an account; a non-zero ``initial_balance`` is posted as a top-up."""
        currency = currency.upper()
        minor_units(currency)  # refuses unknown currencies
        _check_minor_units(initial_balance, currency)
        if credit_limit < 0:
            raise MoneyError("credit_limit must not be negative")
        if auto_recharge_amount is not None and auto_recharge_amount <= 0:
            raise MoneyError("auto_recharge_amount must be positive")
        async with self._pool.acquire() as conn, conn.transaction():
            try:
                row = await conn.fetchrow(
                    """
                    INSERT INTO accounts (name, currency, credit_limit, low_balance_threshold,
                        auto_recharge_amount, rate_table, max_concurrent_calls, diversion_uri)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                    RETURNING *
                    """,
                    name,
                    currency,
                    credit_limit,
                    low_balance_threshold,
                    auto_recharge_amount,
                    rate_table,
                    max_concurrent_calls,
                    diversion_uri,
                )
            except asyncpg.UniqueViolationError as exc:
                raise LedgerError(f"an account named {name!r} exists already") from exc
            except asyncpg.CheckViolationError as exc:
                raise LedgerError(f"invalid account: {exc}") from exc
            assert row is not None
            if initial_balance:
                await post_entry(conn, row, initial_balance, "topup", "initial balance", None)
                row = await conn.fetchrow("SELECT * FROM accounts WHERE id = $1", row["id"])
                assert row is not None
        log.info("event=account_created account=%s currency=%s", row["id"], currency)
        return Account.from_record(row)

    async def update_account(
        self,
        account_id: int,
        *,
        credit_limit: Decimal | Keep = KEEP,
        low_balance_threshold: Decimal | Keep | None = KEEP,
        auto_recharge_amount: Decimal | Keep | None = KEEP,
        rate_table: str | Keep = KEEP,
        max_concurrent_calls: int | Keep = KEEP,
        diversion_uri: str | Keep | None = KEEP,
    ) -> Account:
        """Change account settings; arguments left at ``KEEP`` stay as they are."""
        changes: dict[str, Any] = {
            key: value
            for key, value in {
                "credit_limit": credit_limit,
                "low_balance_threshold": low_balance_threshold,
                "auto_recharge_amount": auto_recharge_amount,
                "rate_table": rate_table,
                "max_concurrent_calls": max_concurrent_calls,
                "diversion_uri": diversion_uri,
            }.items()
            if not isinstance(value, Keep)
        }
        async with self._pool.acquire() as conn, conn.transaction():
            row = await lock_account(conn, account_id)
            if changes:
                # Column names come from the fixed dict above, never from the caller.
                assignments = ", ".join(f"{col} = ${i}" for i, col in enumerate(changes, 2))
                try:
                    updated = await conn.fetchrow(
                        f"UPDATE accounts SET {assignments}, updated_at = now() "
                        "WHERE id = $1 RETURNING *",
                        account_id,
                        *changes.values(),
                    )
                except asyncpg.CheckViolationError as exc:
                    raise LedgerError(f"invalid account setting: {exc}") from exc
                assert updated is not None
                row = updated
        return Account.from_record(row)

    async def ensure_subscriber_account(
        self,
        username: str,
        domain: str,
        defaults: DefaultAccountSettings,
        *,
        rate_table: str = "default",
    ) -> tuple[Account, bool]:
        """The subscriber's account, created from ``defaults`` if it has none.

        For seeded demo subscribers: an existing account (and its balance) is never touched,
        so a restart does not reset anybody's money. Returns ``(account, created)``.
        """
        existing = await self.account_for_subscriber(username, domain)
        if existing is not None:
            return existing, False
        name = f"{username}@{domain}"
        try:
            account = await self.create_account(
                name,
                defaults.currency,
                initial_balance=Decimal(defaults.initial_balance),
                credit_limit=Decimal(defaults.credit_limit),
                low_balance_threshold=(
                    Decimal(defaults.low_balance_threshold)
                    if defaults.low_balance_threshold
                    else None
                ),
                auto_recharge_amount=(
                    Decimal(defaults.auto_recharge_amount)
                    if defaults.auto_recharge_amount
                    else None
                ),
                rate_table=rate_table,
            )
            created = True
        except LedgerError:
            # Another node seeded it first (the name is unique): use that one.
            account = await self.find_account(name)
            created = False
        await self.attach_subscriber(account.id, username, domain, move=False, exist_ok=True)
        final = await self.account_for_subscriber(username, domain)
        assert final is not None
        return final, created

    async def attach_subscriber(
        self,
        account_id: int,
        username: str,
        domain: str,
        *,
        move: bool = False,
        exist_ok: bool = False,
    ) -> None:
        """Make ``account_id`` pay for ``username@domain``'s calls.

        A subscriber belongs to one account; attaching it to another is refused unless
        ``move`` (``exist_ok``: silently keep an existing attachment).
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await lock_account(conn, account_id)
            current = await conn.fetchval(
                "SELECT account_id FROM account_subscribers WHERE username = $1 AND domain = $2",
                username,
                domain,
            )
            if current == account_id or (current is not None and exist_ok):
                return
            if current is not None and not move:
                raise LedgerError(f"{username}@{domain} belongs to account {current} already")
            await conn.execute(
                """
                INSERT INTO account_subscribers (username, domain, account_id)
                VALUES ($1, $2, $3)
                ON CONFLICT (username, domain) DO UPDATE SET account_id = EXCLUDED.account_id
                """,
                username,
                domain,
                account_id,
            )

    async def detach_subscriber(self, username: str, domain: str) -> bool:
        async with self._pool.acquire() as conn:
            status = await conn.execute(
                "DELETE FROM account_subscribers WHERE username = $1 AND domain = $2",
                username,
                domain,
            )
        return status != "DELETE 0"

    async def subscribers(self, account_id: int) -> list[tuple[str, str]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT username, domain FROM account_subscribers WHERE account_id = $1 "
                "ORDER BY domain, username",
                account_id,
            )
        return [(r["username"], r["domain"]) for r in rows]

    async def get_account(self, account_id: int) -> Account:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM accounts WHERE id = $1", account_id)
        if row is None:
            raise AccountNotFound(f"no account {account_id}")
        return Account.from_record(row)

    async def find_account(self, ref: str) -> Account:
        """An account by id (digits), by name, or by an attached ``user@domain``."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM accounts WHERE name = $1", ref)
            if row is None and ref.isdigit():
                row = await conn.fetchrow("SELECT * FROM accounts WHERE id = $1", int(ref))
            if row is None and "@" in ref:
                username, _, domain = ref.rpartition("@")
                row = await conn.fetchrow(
                    "SELECT a.* FROM accounts a JOIN account_subscribers s ON s.account_id = a.id"
                    " WHERE s.username = $1 AND s.domain = $2",
                    username,
                    domain,
                )
        if row is None:
            raise AccountNotFound(f"no account {ref!r}")
        return Account.from_record(row)

    async def account_for_subscriber(self, username: str, domain: str) -> Account | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT a.* FROM accounts a JOIN account_subscribers s ON s.account_id = a.id "
                "WHERE s.username = $1 AND s.domain = $2",
                username,
                domain,
            )
        return None if row is None else Account.from_record(row)

    async def list_accounts(self) -> list[Account]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM accounts ORDER BY id")
        return [Account.from_record(r) for r in rows]

    # -- money --------------------------------------------------------------------------

    async def _post(
        self,
        account_id: int,
        amount: Decimal,
        kind: JournalKind,
        reason: str,
        reference: str | None,
    ) -> JournalEntry:
        async with self._pool.acquire() as conn, conn.transaction():
            account = await lock_account(conn, account_id)
            _check_minor_units(amount, account["currency"])
            entry = await post_entry(conn, account, amount, kind, reason, reference)
            if entry.applied and amount > 0:
                await _lift_low_balance_lock(conn, account, entry.balance_after)
        log.info(
            "event=journal_posted account=%s kind=%s amount=%s applied=%s",
            account_id,
            kind,
            amount,
            entry.applied,
        )
        return entry

    async def topup(
        self,
        account_id: int,
        amount: Decimal,
        *,
        reason: str = "top-up",
        reference: str | None = None,
    ) -> JournalEntry:
        """Credit ``amount`` (> 0). A low-balance lock is lifted if the balance gets back to
        the threshold. With a ``reference`` (payment id) a repeated top-up is a no-op."""
        if amount <= 0:
            raise MoneyError(f"a top-up must be positive, got {amount}")
        return await self._post(account_id, amount, "topup", reason, reference)

    async def adjust(
        self,
        account_id: int,
        amount: Decimal,
        *,
        reason: str,
        reference: str | None = None,
    ) -> JournalEntry:
        """An operator's signed correction; the reason is mandatory."""
        if not reason.strip():
            raise LedgerError("an adjustment needs a reason")
        return await self._post(account_id, amount, "adjustment", reason, reference)

    async def refund(
        self,
        account_id: int,
        amount: Decimal,
        *,
        reason: str,
        reference: str | None = None,
    ) -> JournalEntry:
        """Give back ``amount`` (> 0), e.g. for a call of bad quality (reference: its Call-ID)."""
        if amount <= 0:
            raise MoneyError(f"a refund must be positive, got {amount}")
        if not reason.strip():
            raise LedgerError("a refund needs a reason")
        return await self._post(account_id, amount, "refund", reason, reference)

    async def balance(self, account_id: int) -> Decimal:
        return (await self.get_account(account_id)).balance

    async def reserved(self, account_id: int) -> Decimal:
        """Sum of the reservations of the account's calls in progress."""
        async with self._pool.acquire() as conn:
            value = await conn.fetchval(
                "SELECT COALESCE(sum(amount), 0) FROM reservations WHERE account_id = $1",
                account_id,
            )
        return Decimal(value)

    async def available(self, account_id: int) -> Decimal:
        """``balance + credit_limit - reservations``: what a new call may draw on."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                """
                SELECT a.balance + a.credit_limit
                       - COALESCE((SELECT sum(amount) FROM reservations r
                                   WHERE r.account_id = a.id), 0) AS available
                FROM accounts a WHERE a.id = $1
                """,
                account_id,
            )
        if row is None:
            raise AccountNotFound(f"no account {account_id}")
        return Decimal(row["available"])

    async def display_balance(self, username: str, domain: str) -> DisplayBalance | None:
        """The subscriber's balance less reservations (the ``Balance-amount`` header and the
        HTTP balance page), or None when the subscriber has no account."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                """
                SELECT a.id, a.currency,
                       a.balance - COALESCE((SELECT sum(amount) FROM reservations r
                                             WHERE r.account_id = a.id), 0) AS amount
                FROM accounts a JOIN account_subscribers s ON s.account_id = a.id
                WHERE s.username = $1 AND s.domain = $2
                """,
                username,
                domain,
            )
        if row is None:
            return None
        return DisplayBalance(row["id"], row["currency"], Decimal(row["amount"]))

    async def display_balances(
        self, subscribers: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], DisplayBalance]:
        """:meth:`display_balance` of several ``(username, domain)`` in one query; those
        without an account are not in the answer."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT s.username, s.domain, a.id, a.currency,
                       a.balance - COALESCE((SELECT sum(amount) FROM reservations r
                                             WHERE r.account_id = a.id), 0) AS amount
                FROM accounts a JOIN account_subscribers s ON s.account_id = a.id
                WHERE (s.username, s.domain) IN (SELECT * FROM unnest($1::text[], $2::text[]))
                """,
                [u for u, _ in subscribers],
                [d for _, d in subscribers],
            )
        return {(r["username"], r["domain"]): DisplayBalance(r["id"], r["currency"],
                                                             Decimal(r["amount"]))
                for r in rows}

    # -- locking ------------------------------------------------------------------------

    async def lock(self, account_id: int, reason: str = "manual") -> Account:
        """Lock the account: its subscribers' outgoing billable calls are refused (403)."""
        if not reason:
            raise LedgerError("a lock needs a reason")
        async with self._pool.acquire() as conn, conn.transaction():
            await lock_account(conn, account_id)
            row = await _set_lock(conn, account_id, reason)
        log.info("event=account_locked account=%s reason=%s", account_id, reason)
        return Account.from_record(row)

    async def unlock(self, account_id: int) -> Account:
        async with self._pool.acquire() as conn, conn.transaction():
            await lock_account(conn, account_id)
            row = await _set_lock(conn, account_id, None)
        log.info("event=account_unlocked account=%s", account_id)
        return Account.from_record(row)

    async def check_low_balance(self, account_id: int, *, trigger: str) -> LowBalanceOutcome:
        """After a charge: if the balance is below the threshold, auto-recharge or lock.

        Three steps, so no database connection or row lock is held while the payment
        provider works (a card processor may take seconds): claim the recharge on the
        account row, ask the provider, then post the recharge or lock the account. The
        claim makes a second charge crossing the threshold meanwhile answer ``recharging``
        instead of paying twice. ``trigger`` names the charge; the payment reference derives
        from it, so checking the same charge twice never pays twice.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            account = await lock_account(conn, account_id)
            threshold: Decimal | None = account["low_balance_threshold"]
            if threshold is None or account["balance"] >= threshold:
                return "ok"
            if account["status"] == "locked":
                return "already_locked"
            amount: Decimal | None = account["auto_recharge_amount"]
            provider = self.payment_provider
            if amount is None or provider is None:
                await _set_lock(conn, account_id, LOW_BALANCE)
                log.warning("event=account_locked account=%s reason=low_balance "
                            "detail=no_auto_recharge", account_id)
                return "locked"
            pending: str | None = account["recharge_reference"]
            started: datetime | None = account["recharge_started_at"]
            now: datetime = await conn.fetchval("SELECT now()")
            if pending is not None and started is not None and now - started < RECHARGE_CLAIM:
                return "recharging"
            # A stale claim is a recharge whose outcome was never recorded: retry it under
            # the same reference, so a payment that did go through is credited, not repeated.
            reference = pending or f"auto-recharge:{account_id}:{trigger}"
            await conn.execute(
                "UPDATE accounts SET recharge_reference = $2, recharge_started_at = now() "
                "WHERE id = $1",
                account_id,
                reference,
            )
        outcome_known = True
        try:
            result = await provider.charge(account_id, amount, reference)
        except Exception as exc:  # the provider's failure must not leave the charge unhandled
            outcome_known = False
            result = PaymentResult(False, amount, reference, provider.name, f"error: {exc!r}")
        async with self._pool.acquire() as conn, conn.transaction():
            account = await lock_account(conn, account_id)
            if outcome_known:
                await conn.execute(
                    "UPDATE accounts SET recharge_reference = NULL, recharge_started_at = NULL "
                    "WHERE id = $1",
                    account_id,
                )
            why = f"auto-recharge failed: {result.error}"
            if result.ok:
                entry = await post_entry(conn, account, result.amount, "recharge",
                                         f"auto-recharge via {result.provider}", reference)
                if entry.balance_after >= threshold:
                    log.info("event=auto_recharged account=%s amount=%s provider=%s",
                             account_id, result.amount, result.provider)
                    return "recharged"
                why = "auto-recharge did not reach the threshold"
            if account["status"] != "locked":
                await _set_lock(conn, account_id, LOW_BALANCE)
        log.warning("event=account_locked account=%s reason=low_balance detail=%r",
                    account_id, why)
        return "locked"

    # -- reporting ----------------------------------------------------------------------

    async def statement(self, account_id: int, start: datetime, end: datetime) -> Statement:
        """Journal entries and CDRs of ``[start, end)`` with opening and closing balances."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            account_row = await conn.fetchrow("SELECT * FROM accounts WHERE id = $1", account_id)
            if account_row is None:
                raise AccountNotFound(f"no account {account_id}")
            opening = await conn.fetchval(
                "SELECT balance_after FROM journal WHERE account_id = $1 AND created_at < $2 "
                "ORDER BY created_at DESC, id DESC LIMIT 1",
                account_id,
                start,
            )
            rows = await conn.fetch(
                "SELECT * FROM journal WHERE account_id = $1 AND created_at >= $2 "
                "AND created_at < $3 ORDER BY created_at, id",
                account_id,
                start,
                end,
            )
            cdrs = await conn.fetch(
                "SELECT * FROM cdrs WHERE account_id = $1 AND start_at >= $2 AND start_at < $3 "
                "ORDER BY start_at, id",
                account_id,
                start,
                end,
            )
        entries = [JournalEntry.from_record(r) for r in rows]
        opening_balance = Decimal(0) if opening is None else Decimal(opening)
        closing = entries[-1].balance_after if entries else opening_balance
        return Statement(
            account=Account.from_record(account_row),
            start=start,
            end=end,
            opening_balance=opening_balance,
            closing_balance=closing,
            entries=entries,
            cdrs=[cdr_dict(r) for r in cdrs],
        )

    async def verify(self) -> list[tuple[int, Decimal, Decimal]]:
        """Accounts whose balance differs from the sum of their journal (should be none):
        ``(account_id, balance, journal_sum)``."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows = await conn.fetch(
                """
                SELECT a.id, a.balance, COALESCE(j.total, 0) AS total
                FROM accounts a
                LEFT JOIN (SELECT account_id, sum(amount) AS total FROM journal
                           GROUP BY account_id) j ON j.account_id = a.id
                WHERE a.balance <> COALESCE(j.total, 0)
                ORDER BY a.id
                """
            )
        return [(r["id"], Decimal(r["balance"]), Decimal(r["total"])) for r in rows]


def cdr_dict(row: Record) -> dict[str, Any]:
    """A ``cdrs`` row as a dict, its rate snapshot decoded from JSON."""
    data = dict(row.items())
    if isinstance(data.get("rate"), str):
        data["rate"] = json.loads(data["rate"])
    return data


async def _set_lock(conn: Connection, account_id: int, reason: str | None) -> Record:
    row = await conn.fetchrow(
        "UPDATE accounts SET status = $2, lock_reason = $3, updated_at = now() "
        "WHERE id = $1 RETURNING *",
        account_id,
        "active" if reason is None else "locked",
        reason,
    )
    assert row is not None
    return row


async def _lift_low_balance_lock(conn: Connection, account: Record, balance: Decimal) -> None:
    """A top-up lifts a low-balance lock once the balance is back at the threshold."""
    if account["status"] != "locked" or account["lock_reason"] != LOW_BALANCE:
        return
    threshold: Decimal | None = account["low_balance_threshold"]
    if threshold is None or balance >= threshold:
        await _set_lock(conn, account["id"], None)
        log.info("event=account_unlocked account=%s reason=topped_up", account["id"])
