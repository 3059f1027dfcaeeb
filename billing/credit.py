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
    Records the answer time; billing runs from here. The proxy writes the answers of a busy
    moment in one statement (``answered_many``) and hands each settlement its call's answer
    time, so a settlement never waits for, or depends on, that write.

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

Round trips
-----------
Every call pays for its database work in proxy CPU, so the locked steps run server-side as
two plpgsql functions (migration 0004): ``billing_reserve`` (lock the account, sum its
reservations with a fresh snapshot, check, write CDR and reservation) and ``billing_settle``
(lock, charge, delete, complete). All arithmetic stays here; the functions compare and write.
``authorize`` reads the account first unless this node remembers its available funds from
the caller's last call, in which case the reservation goes straight to ``billing_reserve``
with the remembered figure, which answers ``stale`` (and reserves nothing) unless it equals
what it finds under the lock. A typical call is then three statements: reserve, a share of
a batched answer write, settle (bench/billing_calls.py measures what that costs).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal

import asyncpg

from billing.ledger import Account, Ledger, LowBalanceOutcome, cdr_dict
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


#: A call's reservation with what settling needs from its CDR (read without locks;
#: billing_settle checks under the locks that the answer time has not moved since).
_READ_CALL: Final = """
    SELECT r.call_id, r.answered_at, r.max_duration, r.amount, r.heartbeat_at, r.created_at,
           c.rate AS cdr_rate, c.destination AS cdr_destination
    FROM reservations r JOIN cdrs c ON c.call_id = r.call_id
    WHERE r.call_id = $1
"""
@dataclass(frozen=True, slots=True)
class _AccountView:
    """The account a subscriber's calls were last charged to, as this node saw it."""

    id: int
    currency: str
    rate_table: str


#: Subscribers whose accounts a node remembers (beyond it forgets them all and re-reads).
_REMEMBERED_ACCOUNTS: Final = 100_000
#: Tries of a reservation whose funds shrank, or a settlement whose answer time moved,
#: between the read and the locked write.
_RESERVE_ATTEMPTS: Final = 5


@dataclass(frozen=True, slots=True)
class _Known:
    """What settling a call needs: from its reservation and CDR, or from the proxy."""

    answered_at: datetime | None
    max_duration: int
    reserved: Decimal
    rate: Rate
    destination: str | None


def _plan(call: _Known, end_at: datetime, recovered: bool) -> tuple[str, int, int, Decimal]:
    """(status, billed seconds, charged seconds, cost) of ``call`` ending at ``end_at``."""
    if call.answered_at is None:
        return ("failed" if recovered else "cancelled"), 0, 0, Decimal(0)
    talked = max(0.0, (end_at - call.answered_at).total_seconds())
    # Started seconds count (a 95.2 s call is 96 s), but never beyond what was reserved:
    # the proxy's BYE at the limit arrives a little late, and that is not the caller's.
    duration = min(math.ceil(talked), call.max_duration)
    return ("answered", duration, billed_duration(call.rate, duration),
            min(cost(call.rate, duration), call.reserved))


def _last_known_point(res: Record) -> datetime:
    """Where the recovery sweep ends an orphaned call: its last heartbeat, never beyond its
    reserved time; an unanswered one at its last sign of life."""
    answered_at: datetime | None = res["answered_at"]
    if answered_at is None:
        end: datetime = res["heartbeat_at"] or res["created_at"]
        return end
    last_known: datetime = max(res["heartbeat_at"] or answered_at, answered_at)
    return min(last_known, answered_at + timedelta(seconds=res["max_duration"]))


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
        # What this node last saw of its callers' accounts, so the next call of one can be
        # reserved in one round trip. Only ever a guess: billing_reserve compares it with
        # the account under its lock and answers 'stale' if anything differs.
        self._views: dict[tuple[str, str], _AccountView] = {}
        self._available: dict[int, Decimal] = {}

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
        # One round trip when this node saw the account last (its funds as remembered,
        # checked under the row lock by billing_reserve, migration 0004), else two: read the
        # account and what it has reserved, then reserve under the lock, which checks the
        # funds again and sends the computation round once more if they shrank.
        async with self._pool.acquire() as conn:
            view = self._views.get(caller)
            remembered = self._available.get(view.id) if view is not None else None
            if view is not None and remembered is not None:
                fast = await self._reserve_remembered(conn, view, remembered, call_id, caller,
                                                      callee_number, now)
                if fast is not None:
                    return fast
            row = await conn.fetchrow(
                "SELECT a.*, COALESCE((SELECT sum(amount) FROM reservations r "
                "WHERE r.account_id = a.id), 0) AS reserved_now "
                "FROM accounts a JOIN account_subscribers s ON s.account_id = a.id "
                "WHERE s.username = $1 AND s.domain = $2",
                username, domain,
            )
            if row is None:
                return self._no_account(call_id, caller)
            account = Account.from_record(row)
            self._remember(caller, account,
                           account.balance + account.credit_limit - row["reserved_now"])
            if account.locked:
                # Before rating: a locked account's attempts stay out of the unbillable
                # report.
                return self._locked(call_id, account)
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
            if rate is not None:
                funds = account.balance + account.credit_limit - row["reserved_now"]
                return await self._reserve(conn, account, funds, call_id, caller,
                                           callee_number, destination, rate, now)
        await self._record_unbillable(call_id, account.id, account.rate_table, caller,
                                      callee_number, destination, why, now)
        return _refused(call_id, self.settings.unbillable_status, "unbillable",
                        "No Rate For Destination", account_id=account.id,
                        destination=destination, currency=account.currency)

    def _remember(self, caller: tuple[str, str], account: Account, available: Decimal) -> None:
        if len(self._views) >= _REMEMBERED_ACCOUNTS:
            self._views.clear()  # bound memory; the next call of each reads again
            self._available.clear()
        self._views[caller] = _AccountView(account.id, account.currency, account.rate_table)
        self._available[account.id] = available

    async def _reserve_remembered(
        self,
        conn: Connection,
        view: _AccountView,
        funds: Decimal,
        call_id: str,
        caller: tuple[str, str],
        callee_number: str,
        now: datetime,
    ) -> Authorization | None:
        """Reserve from what this node remembers of the account; None when that is not
        enough to decide (a refusal is only ever made from a fresh read)."""
        destination = normalise_number(callee_number, self.settings.numbers)
        rate = (self.rating.lookup(destination, now, view.rate_table)
                if destination is not None else None)
        if rate is None or rate.currency != view.currency:
            return None
        seconds = max_duration(funds, rate, self.settings.max_call_duration)
        if seconds == 0:
            return None
        amount = cost(rate, seconds)
        out = await self._call_reserve(conn, call_id, view.id, view.currency, amount, seconds,
                                       caller, callee_number, destination, rate, now,
                                       expected=(funds, view.rate_table))
        outcome: str = out["o_outcome"]
        if outcome == "ok":
            self._available[view.id] = out["o_available"] - amount
            return self._authorized(call_id, view.id, view.currency, destination, rate,
                                    seconds, amount, out)
        if outcome == "existing":
            return self._again(call_id, view.currency, destination, rate, out)
        if outcome == "too_many_calls":
            return self._too_many(call_id, view.id, view.currency, destination)
        if outcome == "duplicate_call_id":
            return _refused(call_id, 403, "duplicate_call_id", "Call-ID Already Used",
                            account_id=view.id, destination=destination,
                            currency=view.currency)
        # stale, locked, no_account, funds: decide from a fresh read.
        self._views.pop(caller, None)
        self._available.pop(view.id, None)
        return None

    async def _call_reserve(
        self,
        conn: Connection,
        call_id: str,
        account_id: int,
        currency: str,
        amount: Decimal,
        seconds: int,
        caller: tuple[str, str],
        callee_number: str,
        destination: str | None,
        rate: Rate,
        now: datetime,
        expected: tuple[Decimal, str] | None = None,
    ) -> Record:
        out = await conn.fetchrow(
            "SELECT * FROM billing_reserve($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, "
            "$12::jsonb, $13, $14, $15, $16, $17)",
            call_id, account_id, amount, seconds,
            self.settings.max_concurrent_calls_per_account, caller[0], caller[1],
            callee_number, destination, rate.prefix, rate.id, rate.snapshot_json(), currency,
            now, self.node_id, expected[0] if expected else None,
            expected[1] if expected else None,
        )
        assert out is not None
        return out

    @staticmethod
    def _authorized(call_id: str, account_id: int, currency: str, destination: str | None,
                    rate: Rate, seconds: int, amount: Decimal, out: Record) -> Authorization:
        log.info("event=call_authorized call_id=%s account=%s destination=%s prefix=%s "
                 "max_duration=%s reserved=%s", call_id, account_id, destination, rate.prefix,
                 seconds, amount)
        return Authorization(call_id, True, 0, "ok", "OK", account_id=account_id,
                             destination=destination, rate=rate, max_duration=seconds,
                             reserved=amount, currency=currency,
                             display_balance=out["o_balance"] - out["o_reserved"])

    @staticmethod
    def _again(call_id: str, currency: str, destination: str | None, rate: Rate,
               out: Record) -> Authorization:
        """The same INVITE authorised again (a retry after a lost reply): same answer."""
        return Authorization(
            call_id, True, 0, "ok", "OK", account_id=out["o_existing_account"],
            destination=destination, rate=rate, max_duration=out["o_existing_max_duration"],
            reserved=out["o_existing_amount"], currency=currency,
            display_balance=out["o_balance"] - out["o_reserved"],
        )

    def _too_many(self, call_id: str, account_id: int, currency: str,
                  destination: str | None) -> Authorization:
        log.info("event=call_refused call_id=%s reason=too_many_calls account=%s",
                 call_id, account_id)
        return _refused(call_id, self.settings.concurrent_calls_status, "too_many_calls",
                        "Too Many Simultaneous Calls", account_id=account_id,
                        destination=destination, currency=currency)

    def _no_account(self, call_id: str, caller: tuple[str, str]) -> Authorization:
        log.info("event=call_refused call_id=%s reason=no_account caller=%s@%s",
                 call_id, *caller)
        return _refused(call_id, self.settings.no_account_status, "no_account",
                        "No Billing Account")

    @staticmethod
    def _locked(call_id: str, account: Account) -> Authorization:
        log.info("event=call_refused call_id=%s reason=locked account=%s", call_id, account.id)
        return _refused(call_id, 403, "locked", "Account Locked", account_id=account.id,
                        currency=account.currency)

    async def _reserve(
        self,
        conn: Connection,
        account: Account,
        funds: Decimal,
        call_id: str,
        caller: tuple[str, str],
        callee_number: str,
        destination: str | None,
        rate: Rate,
        now: datetime,
    ) -> Authorization:
        """Reserve the longest call ``funds`` pay for; ``funds`` as last read, checked again
        under the account's row lock."""
        refused = {"destination": destination, "currency": account.currency,
                   "account_id": account.id}
        for _ in range(_RESERVE_ATTEMPTS):
            seconds = max_duration(funds, rate, self.settings.max_call_duration)
            if seconds == 0:
                log.info("event=call_refused call_id=%s reason=insufficient_funds account=%s "
                         "available=%s", call_id, account.id, funds)
                return _refused(call_id, 402, "insufficient_funds", "Payment Required",
                                rate=rate, **refused)
            amount = cost(rate, seconds)
            out = await self._call_reserve(conn, call_id, account.id, account.currency, amount,
                                           seconds, caller, callee_number, destination, rate,
                                           now)
            outcome: str = out["o_outcome"]
            if outcome == "ok":
                self._available[account.id] = out["o_available"] - amount
                return self._authorized(call_id, account.id, account.currency, destination,
                                        rate, seconds, amount, out)
            if outcome == "funds":
                funds = out["o_available"]  # another call took some: fit into what is left
                continue
            if outcome == "existing":
                return self._again(call_id, account.currency, destination, rate, out)
            if outcome == "locked":
                return self._locked(call_id, account)
            if outcome == "no_account":
                return self._no_account(call_id, caller)
            if outcome == "too_many_calls":
                return self._too_many(call_id, account.id, account.currency, destination)
            return _refused(call_id, 403, "duplicate_call_id", "Call-ID Already Used",
                            **refused)
        # Funds kept shrinking under us: many calls of one account starting at once.
        log.info("event=call_refused call_id=%s reason=insufficient_funds account=%s "
                 "detail=contention", call_id, account.id)
        return _refused(call_id, 402, "insufficient_funds", "Payment Required", rate=rate,
                        **refused)

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
        return await self.answered_many([(call_id, at)]) > 0

    async def answered_many(self, answers: Sequence[tuple[str, datetime]]) -> int:
        """:meth:`answered` for many calls in one statement (the proxy batches the answers
        of a busy moment); returns how many CDRs got their answer time."""
        if not answers:
            return 0
        call_ids = [call_id for call_id, _ in answers]
        times = [at for _, at in answers]
        async with self._pool.acquire() as conn:
            # One statement, so one round trip and atomic without a transaction block.
            status = await conn.execute(
                """
                WITH answer AS (
                    SELECT * FROM unnest($1::text[], $2::timestamptz[]) AS a(call_id, at)
                ), res AS (
                    UPDATE reservations r SET answered_at = answer.at, heartbeat_at = answer.at
                    FROM answer WHERE r.call_id = answer.call_id AND r.answered_at IS NULL
                )
                UPDATE cdrs c SET answer_at = answer.at FROM answer
                WHERE c.call_id = answer.call_id AND c.status = 'in_progress'
                  AND c.answer_at IS NULL
                """,
                call_ids, times,
            )
        return int(status.rsplit(" ", 1)[-1])

    async def settle(
        self,
        call_id: str,
        end_at: datetime,
        disconnect_reason: str,
        *,
        authorization: Authorization | None = None,
        answered_at: datetime | None = None,
    ) -> Settlement:
        """End of an answered call: charge it, release its reservation, complete its CDR.

        Idempotent: a second call returns the first settlement with ``already_settled``.
        A call that was never answered is closed as ``cancelled`` at no cost.

        The proxy passes the call's ``authorization`` and its ``answered_at``: the cost is
        then worked out without reading the call back (one round trip fewer), and an answer
        not yet written by :meth:`answered` (the proxy batches them) is written now. The
        database still checks under the lock that no other answer time was recorded.
        """
        known = None
        if authorization is not None and authorization.rate is not None:
            known = _Known(answered_at, authorization.max_duration, authorization.reserved,
                           authorization.rate, authorization.destination)
        settlement = await self._settle(call_id, end_at, disconnect_reason, recovered=False,
                                        known=known)
        if settlement is not None:
            return await self._after_charge(settlement)
        free = await self._settle_free(call_id, end_at, disconnect_reason, answered_at)
        if free is not None:
            return free
        return await self._settled_before(call_id)

    async def _settle_free(
        self, call_id: str, end_at: datetime, disconnect_reason: str,
        answered_at: datetime | None = None,
    ) -> Settlement | None:
        """Close the CDR of a call opened with :meth:`open_free_call`, at no cost (with the
        caller's ``answered_at`` if the answer was not written yet)."""
        async with self._pool.acquire() as conn:
            cdr = await conn.fetchrow(
                """
                WITH answered AS (
                    SELECT id, COALESCE(answer_at, $4::timestamptz) AS at FROM cdrs
                    WHERE call_id = $1 AND status = 'in_progress' AND account_id IS NULL
                )
                UPDATE cdrs SET
                    answer_at = answered.at,
                    status = CASE WHEN answered.at IS NULL THEN 'cancelled' ELSE 'answered' END,
                    end_at = $2, disconnect_reason = $3, cost = 0, charged_duration = 0,
                    billed_duration = CASE WHEN answered.at IS NULL THEN 0 ELSE
                        greatest(0, ceil(extract(epoch FROM $2 - answered.at)))::integer END
                FROM answered WHERE cdrs.id = answered.id
                RETURNING cdrs.*
                """,
                call_id, end_at, disconnect_reason, answered_at,
            )
        if cdr is None:
            return None
        return Settlement(call_id, None, cdr["status"], cdr["billed_duration"], 0,
                          Decimal(0), None, None, False)

    async def _settle(
        self,
        call_id: str,
        end_at: datetime | Callable[[Record], datetime],
        disconnect_reason: str,
        *,
        recovered: bool,
        known: _Known | None = None,
    ) -> Settlement | None:
        """Settle in one round trip after reading the call (billing_settle, migration 0004),
        or in one round trip with what the caller ``known``s of it; None if there is no
        reservation (settled already). ``end_at`` may be worked out from the reservation
        row (the recovery sweep's last known point)."""
        async with self._pool.acquire() as conn:
            for _ in range(_RESERVE_ATTEMPTS):
                if known is None:
                    res = await conn.fetchrow(_READ_CALL, call_id)
                    if res is None:
                        return None
                    known = _Known(res["answered_at"], res["max_duration"], res["amount"],
                                   rate_from_snapshot(res["cdr_rate"]), res["cdr_destination"])
                    end = end_at(res) if callable(end_at) else end_at
                else:
                    assert not callable(end_at)
                    end = end_at
                status, duration, charged, amount = _plan(known, end, recovered)
                out = await conn.fetchrow(
                    "SELECT * FROM billing_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    call_id, known.answered_at, status, end, duration, charged, amount,
                    disconnect_reason, recovered, f"call to {known.destination}",
                )
                known = None  # if anything moved, read the call back and try again
                assert out is not None
                if out["o_outcome"] == "gone":
                    return None  # another settle or recovery won the race
                if out["o_outcome"] == "changed":
                    continue  # answered meanwhile: bill what is known now
                log.info("event=call_settled call_id=%s account=%s status=%s duration=%s "
                         "cost=%s recovered=%s", call_id, out["o_account_id"], status,
                         duration, amount, recovered)
                if out["o_account_id"] in self._available:
                    self._available[out["o_account_id"]] = out["o_available"]
                answered = status == "answered"
                return Settlement(call_id, out["o_account_id"], status, duration, charged,
                                  amount, out["o_balance_after"] if answered else None,
                                  out["o_journal_id"], recovered,
                                  below_threshold=bool(out["o_below_threshold"]))
        raise RuntimeError(f"call {call_id!r}: its answer time kept changing while settling")

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
                "RETURNING id, account_id",
                call_id,
            )
            if res is not None:
                self._available.pop(res["account_id"], None)  # its funds grew back
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
        Complete it with :meth:`answered`/:meth:`settle`/:meth:`failed`. One round trip
        each: the running server writes these records in groups instead
        (:class:`billing.freecalls.FreeCallRecorder`)."""
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
        return await self._settle(call_id, _last_known_point, RECOVERED, recovered=True)

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

    async def unbillable_attempts(self, *, pending_only: bool = True,
                                  limit: int = 100) -> list[dict[str, Any]]:
        """Recorded attempts to numbers without a rate, newest first: what the operator
        needs to add ranges for (``pending_only``: not matched by a re-rating yet)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT call_id, caller_username || '@' || caller_domain AS caller, callee,
                       destination, reason, attempted_at, rerated_at, prefix
                FROM unbillable_attempts
                WHERE NOT $1 OR rerated_at IS NULL
                ORDER BY attempted_at DESC, id DESC LIMIT $2
                """,
                pending_only, limit,
            )
        return [dict(r) for r in rows]

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
        account (its own, else the configured one); None if calls go through normally.
        A query each time; the running server asks :class:`billing.diversions.DiversionCache`."""
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


