"""Real-time credit control of calls: reserve at INVITE, settle at BYE, recover after a crash.

Theory of operation
-------------------
This is AstBill's credit control (seed 003) over PostgreSQL, for the proxy to call at the
points of a call's life (RFC 3261 §13 INVITE, §15 BYE, §16 proxying):

``authorize`` (initial INVITE from an authenticated caller)
    Find the caller's account and the rate of the normalised number. Then, in one
    transaction holding the account row ``FOR UPDATE``: refuse a locked account (403), a
    caller over the per-account simultaneous call limit (486 or 403), or funds that cannot
    pay the first increment (402 Payment Required, RFC 3261 §21.4.3); otherwise compute the
    longest duration the *available* funds (balance + credit limit - other reservations)
    pay for, capped by ``max_call_duration``, insert a reservation of its cost tied to the
    Call-ID (AstBill's ``astcreditres``) and the first half of the CDR (``astcdr``). The row
    lock serialises every authorisation of an account, across connections and across
    server processes sharing the database, so two calls can never both spend the last money.
    A number without a rate is *unbillable*: refused (403 or 404, configured) and recorded.

``answered`` (2xx to the INVITE)
    Records the answer time; billing runs from here.

``settle`` (BYE from either side, or the proxy cutting the call at ``max_duration``)
    In one transaction: cost of the seconds from answer to end (capped at the reserved
    duration, so the proxy's own reaction time is never billed) with the rate snapshot the
    call started with, a ``charge`` journal row with ``reference = Call-ID``, the reservation
    deleted, the CDR completed. The journal's unique ``(kind, reference)`` and the deleted
    reservation make settling twice charge once. After the commit, a balance that fell below
    the account's threshold triggers the low-balance handling of :mod:`billing.ledger`.

``failed`` (final non-2xx, CANCEL, callee offline)
    Releases the reservation; the CDR gets the final status (busy, no_answer, rejected,
    offline, cancelled, failed). These are the callee's missed calls.

``heartbeat`` / ``recover``
    Each node heartbeats its calls in progress (the last moment each was known to be
    alive). ``recover`` settles reservations whose node has stopped heartbeating (crashed,
    or restarted under a new incarnation) or that outlived their maximum duration: billed up
    to the last known point, flagged ``recovered``. It takes the same locks as ``settle``
    and deletes the reservation in the same transaction, so a call is never billed twice even
    when several nodes sweep at once.

If the database cannot be reached, ``authorize`` answers 503 (a billable call is never let
through unbilled); calls already authorised keep their timers in the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal

import asyncpg

from billing.ledger import Account, Ledger, LowBalanceOutcome, cdr_dict, post_entry
from billing.rating import (
    Rate,
    Rating,
    billed_duration,
    cost,
    max_duration,
    normalise_number,
    rate_from_snapshot,
)
from billing.settings import BillingSettings

if TYPE_CHECKING:
    from billing.db import Connection, Pool, Record

log = logging.getLogger("billing.credit")

FailureStatus = Literal["busy", "no_answer", "rejected", "offline", "cancelled", "failed"]
FAILURE_STATUSES: Final = frozenset(
    {"busy", "no_answer", "rejected", "offline", "cancelled", "failed"}
)
# The callee's missed calls (issue 5): offline, unanswered (timeout or the caller's CANCEL),
# busy or declined. "failed" (a server or network error) is not something the callee missed.
MISSED_STATUSES: Final = ("busy", "no_answer", "rejected", "offline", "cancelled")
CREDIT_EXHAUSTED: Final = "credit_exhausted"
RECOVERED: Final = "recovered"

# What "the database is unreachable" looks like through asyncpg.
DATABASE_UNREACHABLE: Final = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
)
_DB_DOWN = DATABASE_UNREACHABLE


#: A call's reservation and CDR, both locked ``FOR UPDATE`` (after its account row: every
#: writer takes the account first, so two of them never wait for each other in a circle).
_LOCK_CALL: Final = """
    SELECT r.*, c.id AS cdr_id, c.rate AS cdr_rate, c.destination AS cdr_destination
    FROM reservations r JOIN cdrs c ON c.call_id = r.call_id
    WHERE r.call_id = $1
    FOR UPDATE OF r, c
"""


async def _lock_account_of_call(conn: Connection, call_id: str) -> Record | None:
    """The account row of the call's reservation, locked; None without a reservation."""
    return await conn.fetchrow(
        "SELECT * FROM accounts WHERE id = "
        "(SELECT account_id FROM reservations WHERE call_id = $1) FOR UPDATE",
        call_id,
    )


class UnknownCall(LookupError):
    """No reservation or CDR exists for this Call-ID."""


@dataclass(frozen=True, slots=True)
class Authorization:
    """Answer to :meth:`CreditControl.authorize`.

    ``allowed``: forward the INVITE and end the call after ``max_duration`` seconds of talk.
    Otherwise answer ``status`` with ``detail`` as the reason phrase; ``reason`` is a stable
    label for metrics and logs.
    """

    call_id: str
    allowed: bool
    status: int
    reason: str
    detail: str
    account_id: int | None = None
    destination: str | None = None
    rate: Rate | None = None
    max_duration: int = 0
    reserved: Decimal = Decimal(0)
    currency: str | None = None
    # Balance less every reservation of the account, this call's included, as read under
    # the row lock: what the phone is shown on the 200 OK (no second query on the hot path).
    display_balance: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Settlement:
    """Outcome of settling a call (``settle`` or the recovery sweep)."""

    call_id: str
    account_id: int | None
    status: str
    duration: int  # seconds from answer to end, capped at the reserved maximum
    charged_duration: int  # after increments and minimum duration
    cost: Decimal
    balance_after: Decimal | None
    journal_id: int | None
    recovered: bool
    already_settled: bool = False
    low_balance: LowBalanceOutcome | None = None
    # The charge took the balance below the account's low-balance threshold.
    below_threshold: bool = False


def _refused(call_id: str, status: int, reason: str, detail: str, **extra: Any) -> Authorization:
    return Authorization(call_id, False, status, reason, detail, **extra)


class CreditControl:
    """The credit control API the proxy calls (see the module docstring).

    One instance per server process. ``node_name`` identifies the machine/service across
    restarts (default: the host name); each instance also gets a fresh incarnation id, so
    the calls of a previous incarnation are recognised as orphans after a restart.
    """

    def __init__(
        self,
        pool: Pool,
        rating: Rating,
        settings: BillingSettings,
        *,
        ledger: Ledger | None = None,
        node_name: str | None = None,
    ) -> None:
        self._pool = pool
        self.rating = rating
        self.settings = settings
        self.ledger = ledger or Ledger(pool)
        self.node_name = node_name or socket.gethostname()
        self.node_id = f"{self.node_name}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._started_at: datetime | None = None

    # -- node registration ----------------------------------------------------------------

    async def start(self, now: datetime) -> None:
        """Register this incarnation; earlier incarnations of ``node_name`` count as gone."""
        async with self._pool.acquire() as conn:
            await self._register(conn, now)

    async def _register(self, conn: Connection, now: datetime) -> None:
        if self._started_at is None:
            self._started_at = now
        await conn.execute(
            """
            INSERT INTO billing_nodes (node_id, name, started_at, seen_at)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (node_id) DO UPDATE SET seen_at = greatest(billing_nodes.seen_at, $4)
            """,
            self.node_id,
            self.node_name,
            self._started_at,
            now,
        )

    # -- the call's life ------------------------------------------------------------------

    async def authorize(
        self,
        call_id: str,
        caller: tuple[str, str],
        callee_number: str,
        now: datetime,
    ) -> Authorization:
        """Decide an initial INVITE from ``caller`` (username, domain) to ``callee_number``
        and, if it may go ahead, reserve its maximum cost. Never raises for a database outage:
        that is a 503 refusal."""
        try:
            return await self._authorize(call_id, caller, callee_number, now)
        except _DB_DOWN as exc:
            log.error("event=authorize_failed call_id=%s error=%r", call_id, exc)
            return _refused(call_id, 503, "database_unavailable", "Billing Unavailable")

    async def _authorize(
        self, call_id: str, caller: tuple[str, str], callee_number: str, now: datetime
    ) -> Authorization:
        username, domain = caller
        if self._started_at is None:
            await self.start(now)
        # One connection, one transaction, four statements on the common path: the account
        # row locked, the reservations it holds, the CDR and reservation written together.
        unbillable: tuple[Account, str | None, str] | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT a.* FROM accounts a JOIN account_subscribers s "
                "ON s.account_id = a.id WHERE s.username = $1 AND s.domain = $2 "
                "FOR UPDATE OF a",
                username, domain,
            )
            if row is None:
                log.info("event=call_refused call_id=%s reason=no_account caller=%s@%s",
                         call_id, username, domain)
                return _refused(call_id, self.settings.no_account_status, "no_account",
                                "No Billing Account")
            account = Account.from_record(row)
            if account.locked:
                # Before rating: a locked account's attempts stay out of the unbillable
                # report.
                log.info("event=call_refused call_id=%s reason=locked account=%s",
                         call_id, account.id)
                return _refused(call_id, 403, "locked", "Account Locked",
                                account_id=account.id, currency=account.currency)
            destination = normalise_number(callee_number, self.settings.numbers)
            rate = (
                self.rating.lookup(destination, now, account.rate_table)
                if destination is not None
                else None
            )
            why = ""
            if destination is None:
                why = "not a telephone number"
            elif rate is None:
                why = "no rate"
            elif rate.currency != account.currency:
                # A rate priced in another currency cannot be charged to the account.
                why = f"rate in {rate.currency}, account in {account.currency}"
                rate = None
            if rate is None:
                unbillable = (account, destination, why)
            else:
                return await self._reserve(conn, account, call_id, caller, callee_number,
                                           destination, rate, now)
        # Recorded outside the account's lock: nothing about the account changes.
        assert unbillable is not None
        account, destination, why = unbillable
        await self._record_unbillable(call_id, account.id, account.rate_table, caller,
                                      callee_number, destination, why, now)
        return _refused(call_id, self.settings.unbillable_status, "unbillable",
                        "No Rate For Destination", account_id=account.id,
                        destination=destination, currency=account.currency)

    async def _reserve(
        self,
        conn: Connection,
        account: Account,
        call_id: str,
        caller: tuple[str, str],
        callee_number: str,
        destination: str | None,
        rate: Rate,
        now: datetime,
    ) -> Authorization:
        """The part of :meth:`authorize` that runs under the account's row lock."""
        # Read after the lock is held (a statement of its own): in READ COMMITTED a new
        # statement sees every reservation committed before the lock was granted.
        rows = await conn.fetch(
            "SELECT call_id, account_id, amount, max_duration FROM reservations "
            "WHERE account_id = $1 OR call_id = $2",
            account.id, call_id,
        )
        held = [r for r in rows if r["account_id"] == account.id]
        reserved: Decimal = sum((r["amount"] for r in held), Decimal(0))
        existing = next((r for r in rows if r["call_id"] == call_id), None)
        if existing is not None:
            # The same INVITE authorised again (a retry after a lost reply): same answer.
            return Authorization(
                call_id, True, 0, "ok", "OK", account_id=existing["account_id"],
                destination=destination, rate=rate, max_duration=existing["max_duration"],
                reserved=existing["amount"], currency=account.currency,
                display_balance=account.balance - reserved,
            )
        limit = account.max_concurrent_calls or self.settings.max_concurrent_calls_per_account
        if limit and len(held) >= limit:
            log.info("event=call_refused call_id=%s reason=too_many_calls account=%s",
                     call_id, account.id)
            return _refused(call_id, self.settings.concurrent_calls_status, "too_many_calls",
                            "Too Many Simultaneous Calls", account_id=account.id,
                            destination=destination, currency=account.currency)
        funds = account.balance + account.credit_limit - reserved
        seconds = max_duration(funds, rate, self.settings.max_call_duration)
        if seconds == 0:
            log.info("event=call_refused call_id=%s reason=insufficient_funds account=%s "
                     "available=%s", call_id, account.id, funds)
            return _refused(call_id, 402, "insufficient_funds", "Payment Required",
                            account_id=account.id, destination=destination, rate=rate,
                            currency=account.currency)
        amount = cost(rate, seconds)
        reservation_id = await conn.fetchval(
            """
            WITH cdr AS (
                INSERT INTO cdrs (call_id, account_id, caller_username, caller_domain, callee,
                    destination, prefix, rate_id, rate, currency, reserved_amount,
                    max_duration, start_at, status, node)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13,
                        'in_progress', $14)
                ON CONFLICT (call_id) DO UPDATE SET
                    account_id = EXCLUDED.account_id, callee = EXCLUDED.callee,
                    destination = EXCLUDED.destination, prefix = EXCLUDED.prefix,
                    rate_id = EXCLUDED.rate_id, rate = EXCLUDED.rate,
                    currency = EXCLUDED.currency, reserved_amount = EXCLUDED.reserved_amount,
                    max_duration = EXCLUDED.max_duration, start_at = EXCLUDED.start_at,
                    answer_at = NULL, end_at = NULL, billed_duration = NULL,
                    charged_duration = NULL, cost = NULL, status = 'in_progress',
                    disconnect_reason = NULL, node = EXCLUDED.node
                -- A Call-ID may be reused after a failed attempt (RFC 3261 §8.1.3.5), never
                -- after it was charged.
                WHERE cdrs.journal_id IS NULL AND cdrs.answer_at IS NULL
                  AND cdrs.status <> 'in_progress'
                RETURNING id
            )
            INSERT INTO reservations (call_id, account_id, amount, max_duration, created_at,
                                      node)
            SELECT $1, $2, $11, $12, $13, $14 FROM cdr
            RETURNING id
            """,
            call_id, account.id, caller[0], caller[1], callee_number, destination,
            rate.prefix, rate.id, rate.snapshot_json(), account.currency, amount, seconds,
            now, self.node_id,
        )
        if reservation_id is None:
            return _refused(call_id, 403, "duplicate_call_id", "Call-ID Already Used",
                            account_id=account.id, destination=destination,
                            currency=account.currency)
        log.info("event=call_authorized call_id=%s account=%s destination=%s prefix=%s "
                 "max_duration=%s reserved=%s", call_id, account.id, destination, rate.prefix,
                 seconds, amount)
        return Authorization(call_id, True, 0, "ok", "OK", account_id=account.id,
                             destination=destination, rate=rate, max_duration=seconds,
                             reserved=amount, currency=account.currency,
                             display_balance=account.balance - reserved - amount)

    async def _record_unbillable(
        self,
        call_id: str,
        account_id: int,
        rate_table: str,
        caller: tuple[str, str],
        callee: str,
        destination: str | None,
        reason: str,
        now: datetime,
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                """
                INSERT INTO cdrs (call_id, account_id, caller_username, caller_domain, callee,
                    destination, start_at, end_at, status, disconnect_reason, node)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $7, 'unbillable', $8, $9)
                ON CONFLICT (call_id) DO NOTHING RETURNING id
                """,
                call_id, account_id, caller[0], caller[1], callee, destination, now, reason,
                self.node_id,
            )
            if inserted is None:
                return  # the same attempt seen before: record it once
            await conn.execute(
                """
                INSERT INTO unbillable_attempts (call_id, account_id, caller_username,
                    caller_domain, callee, destination, rate_table, reason, attempted_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                """,
                call_id, account_id, caller[0], caller[1], callee, destination, rate_table,
                reason, now,
            )
        log.info("event=call_refused call_id=%s reason=unbillable destination=%s",
                 call_id, destination)

    async def answered(self, call_id: str, at: datetime) -> bool:
        """The call was answered (2xx) at ``at``: its billing starts. Idempotent; returns
        False for an unknown or already answered call."""
        async with self._pool.acquire() as conn:
            # One statement, so one round trip and atomic without a transaction block.
            status = await conn.execute(
                """
                WITH res AS (
                    UPDATE reservations SET answered_at = $2, heartbeat_at = $2
                    WHERE call_id = $1 AND answered_at IS NULL
                )
                UPDATE cdrs SET answer_at = $2
                WHERE call_id = $1 AND status = 'in_progress' AND answer_at IS NULL
                """,
                call_id, at,
            )
        return status != "UPDATE 0"

    async def settle(
        self, call_id: str, end_at: datetime, disconnect_reason: str
    ) -> Settlement:
        """End of an answered call: charge it, release its reservation, complete its CDR.

        Idempotent: a second call returns the first settlement with ``already_settled``.
        A call that was never answered is closed as ``cancelled`` at no cost.
        """
        settlement = await self._settle(call_id, end_at, disconnect_reason, recovered=False)
        if settlement is not None:
            return await self._after_charge(settlement)
        free = await self._settle_free(call_id, end_at, disconnect_reason)
        if free is not None:
            return free
        return await self._settled_before(call_id)

    async def _settle_free(
        self, call_id: str, end_at: datetime, disconnect_reason: str
    ) -> Settlement | None:
        """Close the CDR of a call opened with :meth:`open_free_call`, at no cost."""
        async with self._pool.acquire() as conn:
            cdr = await conn.fetchrow(
                """
                UPDATE cdrs SET
                    status = CASE WHEN answer_at IS NULL THEN 'cancelled' ELSE 'answered' END,
                    end_at = $2, disconnect_reason = $3, cost = 0, charged_duration = 0,
                    billed_duration = CASE WHEN answer_at IS NULL THEN 0 ELSE
                        greatest(0, ceil(extract(epoch FROM $2 - answer_at)))::integer END
                WHERE call_id = $1 AND status = 'in_progress' AND account_id IS NULL
                RETURNING *
                """,
                call_id, end_at, disconnect_reason,
            )
        if cdr is None:
            return None
        return Settlement(call_id, None, cdr["status"], cdr["billed_duration"], 0,
                          Decimal(0), None, None, False)

    async def _settle(
        self, call_id: str, end_at: datetime, disconnect_reason: str, *, recovered: bool
    ) -> Settlement | None:
        """Settle in one transaction; None if there is no reservation (settled already)."""
        async with self._pool.acquire() as conn, conn.transaction():
            account = await _lock_account_of_call(conn, call_id)
            if account is None:
                return None
            res = await conn.fetchrow(_LOCK_CALL, call_id)
            if res is None:
                return None  # another settle or recovery won the race
            return await self._settle_locked(conn, account, res, end_at,
                                             disconnect_reason, recovered)

    async def _settle_locked(
        self,
        conn: Connection,
        account: Record,
        res: Record,
        end_at: datetime,
        disconnect_reason: str,
        recovered: bool,
    ) -> Settlement:
        """``res`` is a row of :data:`_LOCK_CALL` (reservation and CDR, both locked)."""
        call_id: str = res["call_id"]
        answered_at: datetime | None = res["answered_at"]
        if answered_at is None:
            status = "failed" if recovered else "cancelled"
            await conn.execute(
                "WITH gone AS (DELETE FROM reservations WHERE id = $6) "
                "UPDATE cdrs SET status = $2, end_at = $3, disconnect_reason = $4, "
                "recovered = $5, billed_duration = 0, charged_duration = 0, cost = 0 "
                "WHERE id = $1",
                res["cdr_id"], status, end_at, disconnect_reason, recovered, res["id"],
            )
            return Settlement(call_id, account["id"], status, 0, 0, Decimal(0), None, None,
                              recovered)
        rate = rate_from_snapshot(res["cdr_rate"])
        talked = max(0.0, (end_at - answered_at).total_seconds())
        # Started seconds count (a 95.2 s call is 96 s), but never beyond what was reserved:
        # the proxy's BYE at the limit arrives a little late, and that is not the caller's.
        duration = min(math.ceil(talked), res["max_duration"])
        charged = billed_duration(rate, duration)
        amount = min(cost(rate, duration), res["amount"])
        entry_id: int | None = None
        balance_after: Decimal = account["balance"]
        if amount > 0:
            entry = await post_entry(conn, account, -amount, "charge",
                                     f"call to {res['cdr_destination']}", call_id)
            entry_id, balance_after = entry.id, entry.balance_after
        await conn.execute(
            """
            WITH gone AS (DELETE FROM reservations WHERE id = $9)
            UPDATE cdrs SET status = 'answered', end_at = $2, billed_duration = $3,
                charged_duration = $4, cost = $5, journal_id = $6, disconnect_reason = $7,
                recovered = $8
            WHERE id = $1
            """,
            res["cdr_id"], end_at, duration, charged, amount, entry_id, disconnect_reason,
            recovered, res["id"],
        )
        threshold: Decimal | None = account["low_balance_threshold"]
        log.info("event=call_settled call_id=%s account=%s duration=%s cost=%s recovered=%s",
                 call_id, account["id"], duration, amount, recovered)
        return Settlement(call_id, account["id"], "answered", duration, charged, amount,
                          balance_after, entry_id, recovered,
                          below_threshold=threshold is not None and balance_after < threshold)

    async def _after_charge(self, settlement: Settlement) -> Settlement:
        """Low-balance handling once the charge is committed (never inside its transaction:
        a payment provider may be slow, and the charge must stand whatever it answers)."""
        if (settlement.journal_id is None or settlement.account_id is None
                or not settlement.below_threshold):
            return settlement
        try:
            outcome = await self.ledger.check_low_balance(
                settlement.account_id, trigger=f"journal-{settlement.journal_id}"
            )
        except Exception:
            # The call is settled; a failing provider must not make it look unsettled.
            log.exception("event=low_balance_check_failed account=%s", settlement.account_id)
            return settlement
        return replace(settlement, low_balance=outcome)

    async def _settled_before(self, call_id: str) -> Settlement:
        async with self._pool.acquire() as conn:
            cdr = await conn.fetchrow("SELECT * FROM cdrs WHERE call_id = $1", call_id)
            balance = None
            if cdr is not None and cdr["journal_id"] is not None:
                balance = await conn.fetchval(
                    "SELECT balance_after FROM journal WHERE id = $1", cdr["journal_id"]
                )
        if cdr is None:
            raise UnknownCall(f"no call {call_id!r}")
        return Settlement(call_id, cdr["account_id"], cdr["status"],
                          cdr["billed_duration"] or 0, cdr["charged_duration"] or 0,
                          cdr["cost"] or Decimal(0), balance, cdr["journal_id"],
                          cdr["recovered"], already_settled=True)

    async def failed(
        self,
        call_id: str,
        status: FailureStatus,
        reason: str,
        at: datetime | None = None,
    ) -> bool:
        """The call ended without being answered: release its reservation and record its
        final status. An answered call is settled instead (it must be paid for). Returns
        False if the call was already closed."""
        if status not in FAILURE_STATUSES:
            raise ValueError(f"not a failure status: {status!r}")
        async with self._pool.acquire() as conn, conn.transaction():
            res = await conn.fetchrow(
                "DELETE FROM reservations WHERE call_id = $1 AND answered_at IS NULL "
                "RETURNING id",
                call_id,
            )
            updated = await conn.execute(
                "UPDATE cdrs SET status = $2, disconnect_reason = $3, "
                "end_at = COALESCE($4, end_at, now()), cost = 0, billed_duration = 0, "
                "charged_duration = 0 "
                "WHERE call_id = $1 AND status = 'in_progress' AND answer_at IS NULL",
                call_id, status, reason, at,
            )
        if res is None and updated == "UPDATE 0":
            if await self._still_open(call_id):
                # Answered after all (a failure reported after the 2xx): it must be paid.
                await self.settle(call_id, at or datetime.now(UTC), reason)
                return True
            return False
        log.info("event=call_failed call_id=%s status=%s reason=%s", call_id, status, reason)
        return True

    async def _still_open(self, call_id: str) -> bool:
        async with self._pool.acquire() as conn:
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM cdrs WHERE call_id = $1 AND status = "
                "'in_progress')",
                call_id,
            ))

    async def open_free_call(
        self, call_id: str, caller: tuple[str, str], callee: str, now: datetime
    ) -> bool:
        """The first half of a CDR for a call that is not billed (between local
        subscribers), so its outcome (e.g. a missed call) is recorded like any other.
        Complete it with :meth:`answered`/:meth:`settle`/:meth:`failed`."""
        async with self._pool.acquire() as conn:
            cdr_id = await conn.fetchval(
                """
                INSERT INTO cdrs (call_id, caller_username, caller_domain, callee, start_at,
                                  status, node)
                VALUES ($1, $2, $3, $4, $5, 'in_progress', $6)
                ON CONFLICT (call_id) DO NOTHING RETURNING id
                """,
                call_id, caller[0], caller[1], callee, now, self.node_id,
            )
        return cdr_id is not None

    # -- crash recovery -------------------------------------------------------------------

    async def heartbeat(self, call_ids: list[str], now: datetime) -> int:
        """Record that this node's calls ``call_ids`` were alive at ``now`` (and that the node
        is). Recovery bills a call up to its last heartbeat. Returns the calls updated."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self._register(conn, now)
            status = await conn.execute(
                "UPDATE reservations SET heartbeat_at = greatest(heartbeat_at, $2) "
                "WHERE call_id = ANY($1::text[]) AND node = $3 AND answered_at IS NOT NULL",
                call_ids, now, self.node_id,
            )
        return int(status.rsplit(" ", 1)[-1])

    async def recover(self, now: datetime) -> list[Settlement]:
        """Settle orphaned reservations: their node is gone (silent for
        ``recovery.node_timeout``, or an earlier incarnation of this node), or the call
        outlived its maximum duration plus ``recovery.grace``. Billed up to the last known
        point, flagged recovered. Safe to run on every node at once."""
        cfg = self.settings.recovery
        async with self._pool.acquire() as conn:
            await self._register(conn, now)
            rows = await conn.fetch(
                """
                SELECT r.call_id
                FROM reservations r LEFT JOIN billing_nodes n ON n.node_id = r.node
                WHERE (r.node <> $1 AND (n.node_id IS NULL
                                         OR n.seen_at < $2::timestamptz
                                                        - make_interval(secs => $3::float8)
                                         OR (n.name = $4 AND n.started_at < $5::timestamptz)))
                   OR COALESCE(r.answered_at, r.created_at)
                      + make_interval(secs => r.max_duration + $6::float8) < $2::timestamptz
                ORDER BY r.id
                """,
                self.node_id, now, cfg.node_timeout, self.node_name, self._started_at,
                cfg.grace,
            )
        settled: list[Settlement] = []
        for row in rows:
            result = await self._recover_one(row["call_id"])
            if result is not None:
                settled.append(await self._after_charge(result))
        if settled:
            log.warning("event=calls_recovered count=%s", len(settled))
        return settled

    async def _recover_one(self, call_id: str) -> Settlement | None:
        async with self._pool.acquire() as conn, conn.transaction():
            account = await _lock_account_of_call(conn, call_id)
            if account is None:
                return None
            res = await conn.fetchrow(_LOCK_CALL, call_id)
            if res is None:
                return None  # settled meanwhile, by its node or another sweep
            answered_at: datetime | None = res["answered_at"]
            if answered_at is None:
                end_at: datetime = res["heartbeat_at"] or res["created_at"]
            else:
                last_known: datetime = max(res["heartbeat_at"] or answered_at, answered_at)
                end_at = min(last_known,
                             answered_at + timedelta(seconds=res["max_duration"]))
            return await self._settle_locked(conn, account, res, end_at, RECOVERED,
                                             recovered=True)

    async def run_maintenance(
        self,
        active_call_ids: Callable[[], Iterable[str]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """Heartbeat this node's answered calls and sweep orphaned reservations every
        ``recovery.heartbeat_interval`` seconds, until cancelled (run it as a task).

        Without it, other nodes consider this one gone after ``recovery.node_timeout`` and
        settle its calls, so a server that authorises calls must run it.
        """
        interval = self.settings.recovery.heartbeat_interval
        while True:
            try:
                await self.heartbeat(list(active_call_ids()), clock())
                await self.recover(clock())
            except _DB_DOWN as exc:
                # Calls in progress keep their timers in the proxy; try again next round.
                log.warning("event=billing_maintenance_failed error=%r", exc)
            await asyncio.sleep(interval)

    # -- unbillable destinations ----------------------------------------------------------

    async def rerate_unbillable(self, *, reload: bool = True) -> list[tuple[str, str, str]]:
        """Match recorded unbillable attempts against the current rates (after an operator
        added the missing ranges). Matched attempts and their CDRs get the rate they would
        have had; the calls were refused, so nothing is charged. Returns
        ``(call_id, destination, prefix)`` for each attempt newly rated."""
        if reload:
            await self.rating.reload(self._pool)
        matched: list[tuple[str, str, str]] = []
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """
                SELECT u.*, a.currency FROM unbillable_attempts u
                LEFT JOIN accounts a ON a.id = u.account_id
                WHERE u.rerated_at IS NULL AND u.destination IS NOT NULL
                ORDER BY u.id FOR UPDATE OF u SKIP LOCKED
                """
            )
            for row in rows:
                rate = self.rating.lookup(row["destination"], row["attempted_at"],
                                          row["rate_table"] or self.settings.rate_table)
                if rate is None or (row["currency"] and rate.currency != row["currency"]):
                    continue
                await conn.execute(
                    "UPDATE unbillable_attempts SET rerated_at = now(), rate_id = $2, "
                    "prefix = $3 WHERE id = $1",
                    row["id"], rate.id, rate.prefix,
                )
                await conn.execute(
                    "UPDATE cdrs SET prefix = $2, rate_id = $3, rate = $4::jsonb, "
                    "currency = $5 WHERE call_id = $1 AND status = 'unbillable'",
                    row["call_id"], rate.prefix, rate.id, rate.snapshot_json(), rate.currency,
                )
                matched.append((row["call_id"], row["destination"], rate.prefix))
        if matched:
            log.info("event=unbillable_rerated count=%s", len(matched))
        return matched

    # -- queries for the proxy, the control socket and presence ---------------------------

    async def active_calls(self, account_id: int | None = None) -> list[dict[str, Any]]:
        """Calls holding a reservation now, with who calls whom from their CDR (AstBill:
        query the database, not the switch), oldest first."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT r.*, c.caller_username, c.caller_domain, c.callee, c.destination, "
                "c.start_at FROM reservations r LEFT JOIN cdrs c ON c.call_id = r.call_id "
                "WHERE $1::bigint IS NULL OR r.account_id = $1 ORDER BY r.id",
                account_id,
            )
        return [dict(r.items()) for r in rows]

    async def diversion_for(self, username: str, domain: str) -> str | None:
        """Where to divert a call *to* this subscriber: the voicemail URI of a locked
        account (its own, else the configured one); None if calls go through normally."""
        account = await self.ledger.account_for_subscriber(username, domain)
        if account is None or not account.locked:
            return None
        return account.diversion_uri or self.settings.diversion_uri or None

    async def missed_calls(
        self,
        callee: str,
        *,
        unseen_only: bool = True,
        offset: int = 0,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Calls to ``callee`` that ended busy, declined, unanswered, offline or cancelled,
        newest first; ``offset``/``limit`` page through them."""
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError("offset and limit must not be negative")
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM cdrs WHERE callee = $1 AND status = ANY($2::text[]) "
                "AND (NOT $3 OR NOT seen) ORDER BY start_at DESC, id DESC "
                "OFFSET $4 LIMIT $5",
                callee, list(MISSED_STATUSES), unseen_only, offset, limit,
            )
        return [cdr_dict(r) for r in rows]

    async def mark_seen(self, callee: str, cdr_ids: list[int] | None = None) -> int:
        """Mark missed calls to ``callee`` as seen (all of them, or ``cdr_ids``)."""
        async with self._pool.acquire() as conn:
            status = await conn.execute(
                "UPDATE cdrs SET seen = true WHERE callee = $1 AND status = ANY($2::text[]) "
                "AND NOT seen AND ($3::bigint[] IS NULL OR id = ANY($3::bigint[]))",
                callee, list(MISSED_STATUSES), cdr_ids,
            )
        return int(status.rsplit(" ", 1)[-1])


