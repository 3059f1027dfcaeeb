"""Billing plugged into the running server: credit control on the call path, CDRs, balances.

:func:`setup` is the module hook :mod:`sipbill.modules` calls with the shared context. It
seeds the demo accounts and rate table, starts crash recovery, and plugs :class:`BillingService`
into the request pipeline (RFC 3261 §16 proxy processing), the proxy's call events, the HTTP
server (:mod:`billing.http`) and the control socket (:mod:`billing.methods`).

Theory of operation
-------------------
Where it plugs in::

    AUTH -> REGISTRAR [billing.balance_header] registrar -> ... -> AUTHORIZE
         -> LOCATION  location, gateways, [billing.credit_control] -> RELAY

``billing.credit_control`` (initial INVITEs, no To tag)
    Runs at the *end* of LOCATION rather than in AUTHORIZE: whether a call is billable is
    only known once the gateway router has turned the Request-URI into a gateway target and
    set ``ctx.attrs["dialled_number"]``. A gateway call from an authenticated subscriber is
    authorised by :meth:`CreditControl.authorize` (reservation + first half of the CDR) or
    answered with its refusal: 403 locked, 402 Payment Required (RFC 3261 §21.4.3), 403/404
    with a ``Reason`` (RFC 3326) for a number without a rate, 486/403 over the call limit,
    503 when the database cannot be reached -- a billable call never goes out unbilled. A
    call to a local subscriber (found or offline) is free but still gets a CDR, so its
    outcome becomes a missed call; if the callee's account is locked and a voicemail URI is
    configured, the targets are replaced by the voicemail (with a ``Diversion`` header,
    RFC 5806).

Call events (:mod:`sipcore.proxy`)
    One :class:`_Call` per authorised Call-ID holds the authorisation, the answer time, the
    :class:`Dialog` and the credit timer. ``CallAnswered`` records the answer (written in
    batches, a tenth of a second at most after it; the settlement carries it too);
    ``DialogConfirmed`` arms a timer at ``max_duration`` that ends the call with a BYE to
    both legs (:meth:`ProxyCore.end_dialog`, reason ``credit_exhausted``);
    ``DialogTerminated`` settles (caller_bye, callee_bye, killed, credit_exhausted);
    ``CallFailed`` releases the reservation with the final status (busy, no_answer,
    rejected, offline, cancelled: the callee's missed calls). A call is forgotten by the
    event that ends it, so at most one settlement or release runs per call; it runs as a
    task and carries the answer time, so a BYE right after the 200 OK is billed from the
    answer even if the batched answer write has not happened yet. An event is matched to a
    call by its :class:`RequestContext`, so the 407 answer to an INVITE without credentials
    never closes the authenticated INVITE that follows it.

Calls between subscribers
    Cost no query and no task of their own: where the call goes (the callee's voicemail while
    its account is locked) comes from :class:`DiversionCache`, kept current by NOTIFY, and
    the CDR's open, answer and end are marked in :class:`FreeCallRecorder`, which writes
    the marked records of each tenth of a second in one statement. A caller who is to see
    a balance, or a callee not seen before, costs a lookup (usually a cache hit).

Database trouble during a call
    Timers are local and keep running. Recording the answer, settling and failing are
    retried with back-off until they go through; a settlement carries the end time it was
    given, so a late write still bills the right seconds. Calls between subscribers go
    through (undiverted if the callee's account is not cached); their CDRs wait in memory
    until the database is back.

Crash recovery
    At start-up :meth:`CreditControl.start` registers a new incarnation of this node (named
    after the host and its first SIP listen address, so a restart is recognised as the same
    node) and :meth:`CreditControl.recover` settles what an earlier incarnation left open,
    up to its last heartbeat. :meth:`CreditControl.run_maintenance` then heartbeats the
    answered calls every ``recovery.heartbeat_interval`` seconds and sweeps other nodes'
    orphans. A graceful shutdown ends and settles the calls it can no longer police.

Balance shown to the phone (seed 000)
    ``Balance-amount`` (name, decimals and methods configurable) goes into
    ``ctx.response_headers``, which the registrar's 200 OK to REGISTER and the proxy's
    forwarded 2xx to INVITE carry. It is the balance less every reservation of the account,
    the new call's own included.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from billing.balances import BalanceCache
from billing.credit import (
    CREDIT_EXHAUSTED,
    DATABASE_UNREACHABLE,
    Authorization,
    CreditControl,
    FailureStatus,
    Settlement,
)
from billing.csvimport import import_rates
from billing.diversions import DiversionCache
from billing.freecalls import FreeCall, FreeCallRecorder
from billing.ledger import DisplayBalance, Ledger
from billing.payment import VoucherProvider
from billing.rating import RATES_CHANGED_CHANNEL, Rating
from billing.settings import BillingSettings
from sipcore.errors import SipParseError
from sipcore.pglisten import NotifyHub, Subscription
from sipcore.pipeline import RequestContext, Stage, Target
from sipcore.proxy import CallAnswered, CallFailed, Dialog, DialogConfirmed, DialogTerminated
from sipcore.subscribers import MISS, Miss
from sipcore.transport_types import Peer
from sipcore.uri import SipUri, TelUri, parse_uri

if TYPE_CHECKING:
    from billing.db import Pool
    from sipbill.app import AppContext
    from sipcore.location import LocationService
    from sipcore.proxy import LocalIdentity, ProxyCore

log = logging.getLogger("billing.service")

T = TypeVar("T")

#: ``CallFailed.reason`` -> final CDR status; anything else is a plain failure.
_FAILURE_STATUS: Final[dict[str, FailureStatus]] = {
    "busy": "busy",
    "no_answer": "no_answer",
    "rejected": "rejected",
    "offline": "offline",
    "cancelled": "cancelled",
}
#: Back-off between attempts to write a call's outcome while the database is unreachable.
_RETRY_DELAYS: Final = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: Answers are written in batches: the first of a quiet moment after this many seconds,
#: together with every one that arrives meanwhile (one statement instead of one per call;
#: a crash inside the window bills the call as a crash right after its answer would).
_ANSWER_BATCH_DELAY: Final = 0.1


@dataclass(eq=False)
class _Call:
    """What this node knows about one call it authorised or recorded."""

    call_id: str
    ctx: RequestContext
    auth: Authorization | None  # None: a free call between subscribers (CDR only)
    free: FreeCall | None = None  # a free call's CDR (billing.freecalls)
    answered_at: datetime | None = None
    dialog: Dialog | None = None
    timer: asyncio.TimerHandle | None = None
    done: asyncio.Future[Settlement | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def billable(self) -> bool:
        return self.auth is not None

    @property
    def reserved(self) -> Decimal:
        """The reservation held for this call until it settles (0 for a free call)."""
        return self.auth.reserved if self.auth is not None and not self.done.done() else Decimal(0)


class BillingService:
    """The billing module of one server process (see the module docstring)."""

    def __init__(
        self,
        settings: BillingSettings,
        pool: Pool,
        proxy: ProxyCore,
        identity: LocalIdentity,
        location: LocationService,
        *,
        node_name: str,
        db_timeout: float = 5.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        hub: NotifyHub | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.proxy = proxy
        self.identity = identity
        self.location = location
        self.clock = clock
        self.db_timeout = db_timeout
        self.ledger = Ledger(pool, payment_provider=VoucherProvider(pool))
        #: Shown balances (Balance-amount, balance.php), cached and kept current by NOTIFY.
        self.balances = BalanceCache(self.ledger)
        self.rating = Rating(zone=settings.zone)
        self.credit = CreditControl(pool, self.rating, settings, ledger=self.ledger,
                                    node_name=node_name)
        #: Where calls to a subscriber go (voicemail while locked), kept current by NOTIFY.
        self.diversions = DiversionCache(pool, settings.diversion_uri)
        #: CDRs of free calls, written in groups.
        self.free_calls = FreeCallRecorder(pool, self.credit.node_id, delay=_ANSWER_BATCH_DELAY,
                                           timeout=db_timeout)
        self.calls: dict[str, _Call] = {}
        self.stats: Counter[str] = Counter()
        #: Money charged by settled calls, by currency (Prometheus revenue counter).
        self.revenue: dict[str, Decimal] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._maintenance: asyncio.Task[None] | None = None
        #: The process's listening connection (made here if not given).
        self.hub = hub
        self._subscription: Subscription | None = None
        self._stopping = False
        self._answers: dict[str, datetime] = {}  # answered, not yet written
        self._answers_pending = asyncio.Event()
        self._answer_writer: asyncio.Task[None] | None = None
        self._free_call_writer: asyncio.Task[None] | None = None

    # -- start and stop -------------------------------------------------------------------

    async def start(self, seed: list[tuple[str, str]], config_dir: Path | None = None) -> None:
        """Seed accounts and rates, load the rates, recover a previous run's calls and start
        the maintenance task. ``seed`` lists the ``(username, domain)`` of demo subscribers."""
        for username, domain in seed:
            account, created = await self.ledger.ensure_subscriber_account(
                username, domain, self.settings.default_account,
                rate_table=self.settings.rate_table,
            )
            if created:
                log.info("event=account_seeded user=%s@%s account=%s balance=%s",
                         username, domain, account.id, account.balance)
        if self.settings.rates_csv:
            await self._seed_rates(config_dir)
        loaded = await self.rating.reload(self.pool)
        log.info("event=rates_loaded rates=%d tables=%s", loaded, ",".join(self.rating.tables))
        await self._listen_for_changes()
        now = self.clock()
        await self.credit.start(now)
        recovered = await self.credit.recover(now)
        if recovered:
            log.warning("event=calls_recovered_at_start count=%d calls=%s", len(recovered),
                        ",".join(s.call_id for s in recovered))
        self.stats["recovered"] += len(recovered)
        loop = asyncio.get_running_loop()
        self._maintenance = loop.create_task(
            self.credit.run_maintenance(self.answered_call_ids, self.clock)
        )
        self._answer_writer = loop.create_task(self._write_answers())
        self._free_call_writer = loop.create_task(self.free_calls.run())

    async def _seed_rates(self, config_dir: Path | None) -> None:
        """Import ``rates_csv`` into the rate table if that table is empty (a restart, or an
        operator's own rates, are never overwritten)."""
        table = self.settings.rate_table
        async with self.pool.acquire() as conn:
            present = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM rates WHERE rate_table = $1)", table
            )
        if present:
            return
        path = rates_csv_path(self.settings.rates_csv, config_dir)
        report = await import_rates(self.pool, path, rate_table=table,
                                    currency=self.settings.currency, zone=self.settings.zone)
        log.info("event=rates_seeded table=%s rates=%d file=%s", table, report.imported, path)

    async def _listen_for_changes(self) -> None:
        """LISTEN (on the process's shared connection) for rate changes (reload the rates)
        and account changes (:class:`BalanceCache`, :class:`DiversionCache`); once a lost
        connection is replaced, the rates are reloaded, since notifications sent meanwhile
        are lost, and the caches, emptied when it was lost, fill again."""
        hub = self.hub
        if hub is None:
            hub = self.hub = NotifyHub(self.pool, "billing", private=True)
        self._subscription = await hub.subscribe(RATES_CHANGED_CHANNEL, self._rates_changed,
                                                 restore=self._reload_rates)
        await self.balances.attach(hub)
        await self.diversions.attach(hub)

    async def _reload_rates(self) -> None:
        await self.rating.reload(self.pool)

    def _rates_changed(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        log.info("event=rates_changed table=%s", payload)
        self._spawn(self._reload_quietly())

    async def _reload_quietly(self) -> None:
        try:
            await self.rating.reload(self.pool)
        except DATABASE_UNREACHABLE as exc:
            log.warning("event=rates_reload_failed error=%r", exc)

    async def stop(self) -> None:
        """Shutdown hook: end and settle the calls this process polices, stop maintenance."""
        self._stopping = True
        for state in list(self.calls.values()):
            if state.billable and state.dialog is not None and self._dialog_alive(state.dialog):
                # Nobody would cut this call after we are gone: end it now and bill it.
                self.proxy.end_dialog(state.dialog, "shutdown")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        for task in (self._maintenance, self._answer_writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(*DATABASE_UNREACHABLE):
            await self._flush_answers()  # calls still ringing into the next run
        await self.free_calls.close_writer(self._free_call_writer)
        for state in self.calls.values():
            if state.timer is not None:
                state.timer.cancel()
        await self.diversions.detach()
        await self.balances.detach()
        sub, self._subscription = self._subscription, None
        if sub is not None:
            await sub.cancel()

    def answered_call_ids(self) -> list[str]:
        """Billable calls in progress on this node (heartbeated by the maintenance task)."""
        return [cid for cid, s in self.calls.items() if s.billable and s.answered_at]

    # -- pipeline: Balance-amount on the REGISTER 200 OK ----------------------------------

    def register_balance(self, ctx: RequestContext) -> bool | Awaitable[bool]:
        """REGISTRAR stage, before the registrar: put the balance into its 200 OK.
        Synchronous when the cache holds the figure (the usual case: it is kept current by
        NOTIFY), so the REGISTER costs no coroutine and no timeout handle for it."""
        if ctx.user is None or ctx.user_domain is None:
            return False
        shown = self.balances.peek(ctx.user, ctx.user_domain)
        if shown is MISS:
            return self._register_balance_miss(ctx, ctx.user, ctx.user_domain)
        self._add_balance_header(ctx, shown)
        return False

    async def _register_balance_miss(self, ctx: RequestContext, user: str, domain: str) -> bool:
        try:
            async with asyncio.timeout(self.db_timeout):
                shown = await self.balances.display_balance(user, domain)
        except DATABASE_UNREACHABLE as exc:
            # The registration matters more than the figure: register without it.
            log.warning("event=balance_header_failed user=%s error=%r", user, exc)
            return False
        self._add_balance_header(ctx, shown)
        return False

    def _add_balance_header(self, ctx: RequestContext, shown: DisplayBalance | None) -> None:
        if shown is not None:
            header = self.settings.balance_header.header("REGISTER", shown.amount)
            if header is not None:
                ctx.response_headers.append(header)

    # -- pipeline: credit control ---------------------------------------------------------

    def credit_control(self, ctx: RequestContext) -> bool | Awaitable[bool]:
        """LOCATION stage, after the location service and the gateway router."""
        req = ctx.request
        if req.to_addr.tag or ctx.replied:
            return False
        if ctx.user is not None and "dialled_number" in ctx.attrs:
            return self._authorize(ctx)
        if ctx.attrs.get("location") in ("found", "offline") and "aor" in ctx.attrs:
            return self._local_call(ctx)
        return False

    async def _authorize(self, ctx: RequestContext) -> bool:
        req = ctx.request
        call_id = req.call_id
        assert ctx.user is not None and ctx.user_domain is not None
        dialled = _dialled(ctx)
        try:
            async with asyncio.timeout(self.db_timeout):
                auth = await self.credit.authorize(call_id, (ctx.user, ctx.user_domain),
                                                   dialled, self.clock())
        except TimeoutError:
            log.error("event=authorize_timeout call_id=%s", call_id)
            auth = Authorization(call_id, False, 503, "database_unavailable",
                                 "Billing Unavailable")
        if not auth.allowed:
            self.stats["refused:" + auth.reason] += 1
            headers: list[tuple[str, str]] = []
            if auth.reason == "unbillable":
                headers.append(("Reason", f'SIP;cause={auth.status};text="{auth.detail}"'))
            if auth.status == 503:
                headers.append(("Retry-After", "30"))
            return ctx.reply(auth.status, auth.detail, headers=headers)
        if ctx.replied or ctx.attrs.get("cancelled"):
            # CANCELled while the reservation was being taken: give the money back.
            self._spawn(self._with_retry(call_id, lambda: self.credit.failed(
                call_id, "cancelled", "cancelled before relay")))
            return True
        self.stats["authorized"] += 1
        ctx.attrs["billing"] = auth
        if auth.display_balance is not None:
            header = self.settings.balance_header.header("INVITE", auth.display_balance)
            if header is not None:
                ctx.response_headers.append(header)
        if call_id not in self.calls:  # a spiral of the same call keeps the first record
            self.calls[call_id] = _Call(call_id, ctx, auth)
        return False

    def _local_call(self, ctx: RequestContext) -> bool | Awaitable[bool]:
        """A call to one of our subscribers: free, but recorded (missed calls), diverted to
        voicemail while the callee's account is locked, and shown the caller's balance.

        Decided without waiting when the callee's account was seen before
        (:class:`DiversionCache`) and no balance is to be shown: the pipeline then needs no
        task for it. The CDR never holds the call up (:class:`FreeCallRecorder`)."""
        # "sip:1002@localhost" -> "1002@localhost": the CDR's callee and the missed-call key.
        aor = str(ctx.attrs["aor"]).removeprefix("sip:")
        callee_user, _, callee_domain = aor.partition("@")
        show_balance = ctx.user is not None and "INVITE" in self.settings.balance_header.methods
        diversion = self.diversions.peek(callee_user, callee_domain)
        if show_balance or diversion is MISS:
            return self._local_call_lookup(ctx, aor, callee_user, callee_domain, diversion,
                                           show_balance)
        return self._local_call_go(ctx, aor, diversion)

    async def _local_call_lookup(self, ctx: RequestContext, aor: str, callee_user: str,
                                 callee_domain: str, diversion: str | Literal[Miss.MISS] | None,
                                 show_balance: bool) -> bool:
        """:meth:`_local_call` with what was not cached read from the database. If that is
        unreachable the call goes through undiverted and without the balance: it costs
        nothing, and its CDR is written once the database is back."""
        shown = None
        try:
            async with asyncio.timeout(self.db_timeout):
                if diversion is MISS:
                    diversion = await self.diversions.lookup(callee_user, callee_domain)
                if show_balance:
                    assert ctx.user is not None and ctx.user_domain is not None
                    shown = await self.balances.display_balance(ctx.user, ctx.user_domain)
        except DATABASE_UNREACHABLE as exc:
            log.warning("event=free_call_lookup_failed call_id=%s error=%r",
                        ctx.request.call_id, exc)
            if diversion is MISS:
                diversion = None
        if shown is not None:
            header = self.settings.balance_header.header("INVITE", shown.amount)
            if header is not None:
                ctx.response_headers.append(header)
        return self._local_call_go(ctx, aor, diversion)

    def _local_call_go(self, ctx: RequestContext, aor: str, diversion: str | None) -> bool:
        """Divert if the callee's account is locked, and open the call's CDR."""
        if diversion is not None:
            self._divert(ctx, diversion, aor)
        call_id = ctx.request.call_id
        if call_id in self.calls:
            return False  # a spiral of the same call keeps the first record
        caller = (ctx.user, ctx.user_domain) if ctx.user and ctx.user_domain else _from(ctx)
        record = self.free_calls.open(call_id, caller, aor, self.clock())
        if record is None:
            self.stats["free_call_unrecorded"] += 1
            return False
        if ctx.replied or ctx.attrs.get("cancelled"):
            # CANCELled while the lookups were under way: recorded, not relayed.
            self.free_calls.close(record, "cancelled", self.clock(), "cancelled before relay")
            return True
        self.calls[call_id] = _Call(call_id, ctx, None, free=record)
        return False

    def _divert(self, ctx: RequestContext, uri: str, aor: str) -> None:
        """Send the call to ``uri`` (voicemail) instead of the locked callee's phones."""
        targets = self._targets_for(uri)
        if not targets:
            log.warning("event=diversion_unroutable uri=%s callee=%s", uri, aor)
            return
        ctx.targets = targets
        ctx.serial_targets = []
        ctx.attrs["diverted_to"] = uri
        branch_headers = list(ctx.attrs.get("branch_headers", ()))
        branch_headers.append(("Diversion", f"<sip:{aor}>;reason=unavailable"))
        ctx.attrs["branch_headers"] = branch_headers
        self.stats["diverted"] += 1
        log.info("event=call_diverted call_id=%s callee=%s to=%s", ctx.request.call_id, aor, uri)

    def _targets_for(self, uri: str) -> list[Target]:
        """Targets for a voicemail URI: the bindings of a local AoR, or an IP address (no
        DNS on the call path)."""
        try:
            parsed = parse_uri(uri)
        except SipParseError:
            return []
        if not isinstance(parsed, SipUri):
            return []
        ours = self.identity.is_local_domain(parsed.host) and (
            parsed.port is None or self.identity.is_me(parsed.host, parsed.port))
        if parsed.user and ours:
            # A voicemail box registered with us: its bindings under any of our names.
            now = time.time()
            for domain in (parsed.host.lower(), *sorted(self.identity.domains)):
                bindings = self.location.lookup(f"sip:{parsed.user}@{domain}")
                if bindings:
                    return [Target(b.contact, b.source, b.q, b.path) for b in bindings
                            if b.expires_at > now]
            return []
        try:
            ipaddress.ip_address(parsed.host.strip("[]"))
        except ValueError:
            return []
        transport = (parsed.params.get("transport") or "udp").upper()
        port = parsed.port or (5061 if parsed.scheme == "sips" else 5060)
        return [Target(uri, Peer(transport, parsed.host.strip("[]"), port), kind="route")]

    # -- call events ----------------------------------------------------------------------

    def on_call_answered(self, event: CallAnswered) -> None:
        state = self.calls.get(event.ctx.request.call_id)
        if state is None or state.ctx is not event.ctx or state.answered_at is not None:
            return
        state.answered_at = self.clock()
        if state.free is not None:
            self.free_calls.answered(state.free, state.answered_at)
            return
        self._answers[state.call_id] = state.answered_at
        self._answers_pending.set()

    async def _write_answers(self) -> None:
        """Write the answers of calls in batches until cancelled (see _ANSWER_BATCH_DELAY).
        A settlement does not wait for this: it carries its call's answer time itself."""
        while True:
            await self._answers_pending.wait()
            await asyncio.sleep(_ANSWER_BATCH_DELAY)
            self._answers_pending.clear()
            try:
                await self._flush_answers()
            except DATABASE_UNREACHABLE as exc:
                log.warning("event=answers_write_failed calls=%d error=%r",
                            len(self._answers), exc)
                self._answers_pending.set()
                await asyncio.sleep(1.0)

    async def _flush_answers(self) -> None:
        batch, self._answers = self._answers, {}
        try:
            await self.credit.answered_many(list(batch.items()))
        except BaseException:
            self._answers = {**batch, **self._answers}  # keep them for the next attempt
            raise

    def on_dialog_confirmed(self, event: DialogConfirmed) -> None:
        state = self.calls.get(event.dialog.call_id)
        if state is None or state.ctx is not event.ctx or state.dialog is not None:
            return
        state.dialog = event.dialog
        if state.auth is not None:
            loop = asyncio.get_running_loop()
            state.timer = loop.call_later(state.auth.max_duration, self._cut, state)

    def _cut(self, state: _Call) -> None:
        """The reserved time is used up: end the call (BYE both ways), which settles it."""
        state.timer = None
        dialog = state.dialog
        if dialog is None or self.calls.get(state.call_id) is not state:
            return
        if not self._dialog_alive(dialog):
            return
        self.stats["cut"] += 1
        log.info("event=call_cut call_id=%s reason=credit_exhausted max_duration=%s",
                 state.call_id, state.auth.max_duration if state.auth else None)
        self.proxy.end_dialog(dialog, CREDIT_EXHAUSTED)

    def _dialog_alive(self, dialog: Dialog) -> bool:
        return self.proxy.dialogs.find(dialog.call_id, dialog.caller_tag,
                                       dialog.callee_tag) is dialog

    def on_dialog_terminated(self, event: DialogTerminated) -> None:
        state = self.calls.get(event.dialog.call_id)
        if state is None or state.dialog is not event.dialog:
            return
        self._forget(state)
        end = datetime.fromtimestamp(event.at, UTC)
        if state.free is not None:
            self.stats["settled"] += 1
            status = "answered" if state.free.answer_at is not None else "cancelled"
            self.free_calls.close(state.free, status, end, event.reason, state.done)
            return
        self._answers.pop(state.call_id, None)  # the settlement writes it
        self._spawn(self._settle(state, end, event.reason))

    def on_call_failed(self, event: CallFailed) -> None:
        state = self.calls.get(event.ctx.request.call_id)
        if state is None or state.ctx is not event.ctx:
            return
        self._forget(state)
        status = _FAILURE_STATUS.get(event.reason, "failed")
        text = f"{event.status} {event.reason}"
        at = self.clock()
        self.stats["failed:" + status] += 1
        if state.free is not None:
            # A failure reported after the answer ends an answered call (as failed() does).
            answered = state.free.answer_at is not None
            self.free_calls.close(state.free, "answered" if answered else status, at, text)
            if not state.done.done():
                state.done.set_result(None)
            return

        async def fail() -> None:
            await self._with_retry(state.call_id,
                                   lambda: self.credit.failed(state.call_id, status, text, at))
            if not state.done.done():
                state.done.set_result(None)

        self._spawn(fail())

    def _forget(self, state: _Call) -> None:
        if self.calls.get(state.call_id) is state:
            del self.calls[state.call_id]
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None

    async def _settle(self, state: _Call, end: datetime, reason: str) -> None:
        answered_at = state.answered_at

        async def settle() -> Settlement:
            return await self.credit.settle(state.call_id, end, reason,
                                            authorization=state.auth, answered_at=answered_at)

        result = await self._with_retry(state.call_id, settle)
        self.stats["settled"] += 1
        auth = state.auth
        if (result is not None and not result.already_settled and auth is not None
                and auth.currency and result.cost):
            self.revenue[auth.currency] = self.revenue.get(auth.currency, Decimal(0)) + result.cost
        if not state.done.done():
            state.done.set_result(result)

    async def _with_retry(self, call_id: str, op: Callable[[], Awaitable[T]]) -> T | None:
        """``op()`` until the database takes it; None if it failed for good."""
        for delay in (*_RETRY_DELAYS, None):
            try:
                return await op()
            except DATABASE_UNREACHABLE as exc:
                if delay is None:
                    break
                log.warning("event=billing_write_retry call_id=%s delay=%s error=%r",
                            call_id, delay, exc)
                await asyncio.sleep(delay)
        # Left to the recovery sweep, which bills up to the last heartbeat.
        log.error("event=billing_write_abandoned call_id=%s", call_id)
        return None

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=billing_task_failed error=%r", task.exception())

    # -- operator actions (control socket) ------------------------------------------------

    async def kill(self, call_id: str) -> Settlement | None:
        """End an answered call on this node (BYE both ways) and settle it as ``killed``.
        Raises LookupError if this node has no such answered call."""
        state = self.calls.get(call_id)
        if state is None or state.dialog is None or not self._dialog_alive(state.dialog):
            raise LookupError(f"no answered call {call_id!r} on this node")
        self.proxy.end_dialog(state.dialog, "killed")
        return await asyncio.shield(state.done)


def _dialled(ctx: RequestContext) -> str:
    """The number as the caller dialled it (the CDR keeps it; rating normalises it)."""
    try:
        uri = ctx.request.request_uri
    except SipParseError:
        return str(ctx.attrs["dialled_number"])
    if isinstance(uri, TelUri):
        return uri.number
    if isinstance(uri, SipUri) and uri.user:
        return uri.user
    return str(ctx.attrs["dialled_number"])


def _from(ctx: RequestContext) -> tuple[str, str]:
    """An unauthenticated caller (another domain) as its From URI names it."""
    try:
        uri = ctx.request.from_addr.parsed_uri
    except SipParseError:
        return ("", "")
    if isinstance(uri, SipUri):
        return (uri.user or "", uri.host)
    if isinstance(uri, TelUri):
        return (uri.number, "")
    return ("", "")


def rates_csv_path(rates_csv: str, config_dir: Path | None) -> Path:
    """``billing.rates_csv`` as a path: relative to the working directory like
    ``server.data_dir``, else to the configuration file's directory (the demo names
    ``rates.example.csv``, next to it, and works from any directory)."""
    path = Path(rates_csv)
    if not path.is_absolute() and not path.exists() and config_dir is not None:
        return config_dir / path
    return path


async def setup(ctx: AppContext) -> None:
    """The module hook: start billing and plug it into the server (module docstring)."""
    from billing.http import BalancePage
    from billing.methods import register_methods

    settings = ctx.settings.modules.get("billing")
    if not isinstance(settings, BillingSettings):
        settings = BillingSettings()
    # The node name is per worker: each settles, and after a restart recovers, its own calls.
    service = BillingService(settings, ctx.pool, ctx.proxy, ctx.identity, ctx.location,
                             node_name=ctx.node_name,
                             db_timeout=ctx.settings.database.command_timeout,
                             hub=ctx.notify)
    default_domain = ctx.settings.server.domains[0]
    seed = [(s.username, s.domain or default_domain) for s in ctx.settings.seed.subscribers]
    config_dir = Path(ctx.settings.source).parent if ctx.settings.source else None
    await service.start(seed, config_dir)

    header = settings.balance_header
    if header.enabled and "REGISTER" in header.methods:
        ctx.pipeline.add(Stage.REGISTRAR, service.register_balance, methods={"REGISTER"},
                         first=True, name="billing.balance_header")
    ctx.pipeline.add(Stage.LOCATION, service.credit_control, methods={"INVITE"},
                     name="billing.credit_control")
    ctx.events.subscribe(CallAnswered, service.on_call_answered)
    ctx.events.subscribe(DialogConfirmed, service.on_dialog_confirmed)
    ctx.events.subscribe(DialogTerminated, service.on_dialog_terminated)
    ctx.events.subscribe(CallFailed, service.on_call_failed)
    if settings.balance_http.enabled:
        page = BalancePage(settings, service.balances, ctx.subscribers, default_domain)
        ctx.http.router.add_get(settings.balance_http.path, page.handle)
    register_methods(ctx.methods, service, default_domain)
    ctx.shutdown_hooks.append(service.stop)
    ctx.services["billing"] = service


__all__ = ["BillingService", "rates_csv_path", "setup"]
