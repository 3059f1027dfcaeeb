"""msilo: store MESSAGEs for offline users and deliver them when they register (RFC 3428).

What SER's msilo module did (``m_store`` when ``lookup("location")`` fails, ``m_dump`` after
``save("location")``), done as a module of this server:

Storing (RFC 3428 §7, a UAS on behalf of the recipient):

* A MESSAGE outside a dialog for a local subscriber without a binding (the LOCATION stage says
  ``offline``) is stored and answered **202 Accepted** -- RFC 3428 §7: 202 tells the sender
  the message was accepted but not yet delivered to the recipient.  Storing fails: **503**.
  A body above ``max_message_size``: **413** (§7).  The recipient's quota used up:
  ``quota_status`` (486 or 503), reason phrase "Message Store Full" and an RFC 3326 Reason
  header, so the sender's user sees why.
* A MESSAGE forwarded to a registered contact whose every branch failed with 408 or 480, or
  got no answer at all (timeout, transport error: the phone vanished without unregistering),
  is stored through the proxy's failure hook and the sender gets 202 instead of the failure.
  It is stored once: the row's ``dedup_key`` (Call-ID, From tag, CSeq, recipient) makes a
  second offer of the same MESSAGE a no-op.  (Over UDP a sender whose own Timer F fires with
  ours -- both 64*T1 -- may already have given up when the 202 comes; the message is stored
  and delivered all the same.)
* Optionally (``offline_notice``) the sender gets a MESSAGE from ``notice_from`` saying the
  recipient is offline and the message will be delivered later.

Delivering (RFC 3428 §4 for the request, RFC 3261 §20.17 for Date):

* :class:`~sipcore.location.ContactRegistered` (a new binding) starts a delivery run for the
  AoR to that contact.  A periodic check (``retry_interval``) purges expired and delivered
  rows and starts runs for registered recipients whose messages wait (failed attempts, runs a
  crash interrupted, messages stored while the REGISTER raced the lookup).
* A run sends the recipient's messages one at a time, in the order received, each as a
  MESSAGE *from the original sender* (From = stored display name and URI, To = the AoR,
  Date = when it was received, the original Content-Type and the body byte for byte), from
  this server's own user agent client (:mod:`sipcore.uac`).  Only a 2xx marks a message
  delivered.  408, 480, 486, 5xx, 600, a timeout or a transport error mean the phone cannot
  take messages now: the run stops and the rest wait for the next registration or check.
  Any other final answer refuses this message: it is counted, the run goes on with the next
  one, and after ``max_refusals`` refusals the message is dropped.
* Runs of different recipients go in parallel up to ``delivery_concurrency``; a recipient
  never has two runs (one per AoR in this process, and the lease of
  :mod:`msilo.store` across processes and nodes).

Control-socket methods: ``msilo.list USER`` (pending messages, oldest first) and
``msilo.count [USER]``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Coroutine, Iterable, Mapping
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from msilo.settings import MsiloSettings
from msilo.store import MessageStore, StoredMessage, StoreResult
from sipcore.errors import SipParseError
from sipcore.headers import quote_string
from sipcore.location import Binding, ContactRegistered, LocationService
from sipcore.message import Response
from sipcore.pipeline import RequestContext, Stage
from sipcore.registrar import canonical_aor
from sipcore.uac import (
    Destination,
    UacError,
    UserAgentClient,
    new_call_id,
)
from sipcore.uri import SipUri, parse_uri

if TYPE_CHECKING:
    from sipbill.app import AppContext

__all__ = ["Msilo", "setup"]

log = logging.getLogger("msilo")

#: Answers meaning "this phone cannot take messages now": stop the run, retry later.
UNREACHABLE: Final = frozenset({408, 480, 486, 491, 500, 503, 504, 600})
#: Failures of a forwarded MESSAGE that mean the phone vanished: store instead.
_STORE_ON_FAILURE: Final = frozenset({408, 480})
_DB_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def best_binding(bindings: Iterable[Binding]) -> Binding | None:
    """The contact to deliver to: highest q, then the most recently registered."""
    return max(bindings, key=lambda b: (b.q, b.received_at), default=None)


def http_date(ts: float) -> str:
    """RFC 3261 §20.17 Date: RFC 1123 form, always GMT."""
    return formatdate(ts, usegmt=True)


def dedup_key(call_id: str, from_tag: str | None, cseq: int, recipient: str) -> str:
    h = hashlib.blake2s(f"{call_id}|{from_tag or ''}|{cseq}|{recipient}".encode(),
                        digest_size=16)
    return h.hexdigest()


class Msilo:
    """The message store's pipeline handler, failure hook, event listener and delivery runs.

    ``lease_seconds`` must exceed the longest client transaction (Timer F = 64*T1).
    """

    def __init__(self, settings: MsiloSettings, store: MessageStore, uac: UserAgentClient,
                 location: LocationService, *, domain: str, aliases: Mapping[str, str],
                 lease_seconds: float) -> None:
        self.settings = settings
        self.store = store
        self.uac = uac
        self.location = location
        self.domain = domain
        self.aliases = dict(aliases)
        self.lease_seconds = lease_seconds
        self.notice_from = settings.notice_from or f"sip:msilo@{domain}"
        self.stats: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(settings.delivery_concurrency)
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._again: dict[str, Destination] = {}  # a trigger came while the AoR's run ran
        self._to_check: dict[str, Destination] = {}  # new bindings not yet looked up
        self._checking = False  # a task will look them up
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ storing
    async def on_message(self, ctx: RequestContext) -> bool:
        """LOCATION stage handler (after the lookup): MESSAGE to an offline subscriber."""
        req = ctx.request
        if (req.method != "MESSAGE" or req.to_addr.tag or ctx.targets
                or ctx.attrs.get("location") != "offline"):
            return False
        aor: str = ctx.attrs["aor"]
        result = await self._store(ctx, aor)
        if result is None:
            return ctx.reply(503, "Service Unavailable")
        if result == "too_large":
            return ctx.reply(413, "Request Entity Too Large")
        if result is StoreResult.FULL:
            return self._reply_full(ctx)
        ctx.reply(202, "Accepted")
        self._after_store(ctx, aor, result)
        return True

    def on_failure(self, ctx: RequestContext, status: int, response: Response | None) -> bool:
        """Proxy failure hook: a MESSAGE the registered phone did not take is stored."""
        req = ctx.request
        if (req.method != "MESSAGE" or req.to_addr.tag or ctx.attrs.get("location") != "found"
                or ctx.attrs.get("msilo_stored")
                or not (status in _STORE_ON_FAILURE or response is None)):
            return False
        ctx.attrs["msilo_stored"] = True
        self._spawn(self._store_after_failure(ctx, ctx.attrs["aor"], status))
        return True

    async def _store_after_failure(self, ctx: RequestContext, aor: str, status: int) -> None:
        result = await self._store(ctx, aor)
        if result is None:
            ctx.reply(503, "Service Unavailable")
        elif result == "too_large":
            ctx.reply(status)  # not ours to keep: the phone's failure stands
        elif result is StoreResult.FULL:
            self._reply_full(ctx)
        else:
            self.stats["stored_after_failure"] += 1
            ctx.reply(202, "Accepted")
            # Not straight back to the contact that just failed: the next registration or
            # the periodic check delivers it.
            self._after_store(ctx, aor, result, deliver_now=False)

    def _reply_full(self, ctx: RequestContext) -> bool:
        self.stats["refused_full"] += 1
        status = self.settings.quota_status
        return ctx.reply(status, "Message Store Full",
                         [("Reason", f'SIP ;cause={status} ;text="Message Store Full"')])

    async def _store(self, ctx: RequestContext, aor: str) -> StoreResult | str | None:
        """Store the request for ``aor``: a StoreResult, ``"too_large"``, or None when the
        database failed."""
        req = ctx.request
        if len(req.body) > self.settings.max_message_size:
            self.stats["refused_too_large"] += 1
            return "too_large"
        sender = req.from_addr
        try:
            result = await self.store.store(
                aor, sender.uri, sender.display, req.content_type, req.body,
                dedup_key=dedup_key(req.call_id, sender.tag, req.cseq.number, aor),
                delivery_call_id=new_call_id(self.domain),
            )
        except _DB_ERRORS as exc:
            self.stats["store_errors"] += 1
            log.error("event=msilo_store_failed aor=%s call_id=%s error=%r", aor,
                      req.call_id, exc)
            return None
        self.stats[f"store_{result.value}"] += 1
        if result is StoreResult.STORED:
            log.info("event=msilo_stored aor=%s sender=%s size=%d", aor, sender.uri,
                     len(req.body))
        return result

    def _after_store(self, ctx: RequestContext, aor: str, result: StoreResult | str, *,
                     deliver_now: bool = True) -> None:
        if result is StoreResult.STORED and self.settings.offline_notice:
            self._spawn(self._offline_notice(ctx, aor))
        if not deliver_now:
            return
        # The REGISTER may have completed between the lookup and the commit of the row:
        # its ContactRegistered found nothing to deliver, so look again now.
        binding = best_binding(self.location.lookup(aor))
        if binding is not None:
            self.schedule(aor, Destination.of_binding(binding))

    async def _offline_notice(self, ctx: RequestContext, aor: str) -> None:
        sender = ctx.request.from_addr
        try:
            uri = sender.parsed_uri
        except SipParseError:
            return
        dest: Destination | None = None
        if isinstance(uri, SipUri) and uri.user:
            binding = best_binding(self.location.lookup(canonical_aor(uri, self.aliases)))
            if binding is not None:
                dest = Destination.of_binding(binding)
        if dest is None:
            # Not one of ours, or not registered: back where the MESSAGE came from (the
            # sender's proxy routes it by the Request-URI).
            dest = Destination(sender.uri, ctx.source)
        text = self.settings.notice_text.format(recipient=aor.removeprefix("sip:"))
        try:
            response = await self.uac.request(
                "MESSAGE", dest, from_addr=f"<{self.notice_from}>", to_addr=f"<{sender.uri}>",
                headers=[("Date", http_date(time.time()))], body=text.encode(),
                content_type="text/plain;charset=utf-8")
            self.stats[f"notice_{response.status // 100}xx"] += 1
        except (UacError, SipParseError, ValueError) as exc:
            self.stats["notice_failed"] += 1
            log.info("event=msilo_notice_failed aor=%s error=%r", aor, exc)

    # ------------------------------------------------------------------ delivering
    def on_registered(self, event: ContactRegistered) -> None:
        """A new binding: deliver what is stored for its AoR.  The new bindings of one turn of
        the event loop (a flush commits many; a registration storm after an outage or a
        restart brings thousands) are looked up with one query, and delivery runs (a claim,
        an UPDATE, each) start only for the AoRs that have messages waiting."""
        if self._closed:
            return
        self._to_check[event.aor] = Destination.of_binding(event.binding)
        if not self._checking:
            self._checking = True
            self._spawn(self._check_registered())

    async def _check_registered(self) -> None:
        # A task's first step runs after the callbacks already queued: the bindings committed
        # together are all in the batch by now.
        batch, self._to_check = self._to_check, {}
        self._checking = False
        try:
            waiting = await self.store.recipients_waiting(list(batch))
        except _DB_ERRORS as exc:
            # The periodic check (``retry_interval``) finds them once the database is back.
            log.error("event=msilo_check_failed aors=%d error=%r", len(batch), exc)
            return
        self.stats["registration_checks"] += 1
        for aor in waiting:
            self.schedule(aor, batch[aor])

    def schedule(self, aor: str, dest: Destination) -> None:
        """Start a delivery run for ``aor`` to ``dest``, or queue one after the running one."""
        if self._closed:
            return
        if aor in self._runs:
            self._again[aor] = dest
            return
        task = asyncio.get_running_loop().create_task(self._run(aor, dest), name=aor)
        self._runs[aor] = task
        task.add_done_callback(self._run_done)

    def _run_done(self, task: asyncio.Task[None]) -> None:
        aor = task.get_name()
        if self._runs.get(aor) is task:
            del self._runs[aor]
        dest = self._again.pop(aor, None)
        if dest is not None:
            self.schedule(aor, dest)

    async def _run(self, aor: str, dest: Destination) -> None:
        async with self._slots:
            after = 0
            while not self._closed:
                try:
                    message = await self.store.claim_next(aor, after, self.lease_seconds)
                except _DB_ERRORS as exc:
                    log.error("event=msilo_claim_failed aor=%s error=%r", aor, exc)
                    return
                if message is None:
                    return
                outcome = await self._deliver(message, dest)
                if outcome == "unreachable":
                    return
                after = message.id

    async def _deliver(self, message: StoredMessage, dest: Destination) -> str:
        """One attempt: ``"delivered"``, ``"refused"`` or ``"unreachable"``."""
        self.stats["attempts"] += 1
        frm = f"<{message.sender_uri}>"
        if message.sender_display is not None:
            frm = f"{quote_string(message.sender_display)} {frm}"
        try:
            outgoing = self.uac.build(
                "MESSAGE", dest, from_addr=frm, to_addr=f"<{message.recipient}>",
                call_id=message.delivery_call_id, cseq=message.attempts,
                headers=[("Date", http_date(message.received_at))], body=message.body,
                content_type=message.content_type,
            )
        except (SipParseError, ValueError) as exc:
            # A stored value no longer makes a valid request: refusing it is all we can do.
            log.warning("event=msilo_unsendable id=%d error=%r", message.id, exc)
            return await self._failed(message, 400, refused=True)
        try:
            response = await self.uac.send(outgoing)
        except UacError as exc:
            return await self._failed(message, 408 if exc.reason == "timeout" else 503,
                                      refused=False)
        status = response.status
        if status < 300:
            await self._delivered(message, status)
            return "delivered"
        return await self._failed(message, status, refused=status not in UNREACHABLE)

    async def _delivered(self, message: StoredMessage, status: int) -> None:
        self.stats["delivered"] += 1
        log.info("event=msilo_delivered id=%d aor=%s status=%d attempts=%d", message.id,
                 message.recipient, status, message.attempts)
        # A 2xx was seen: the row must say so before the lease lapses, or the message would
        # go out again.  Keep trying for half the lease.
        deadline = time.monotonic() + self.lease_seconds / 2
        delay = 0.1
        while True:
            try:
                await self.store.mark_delivered(message.id, status)
                return
            except _DB_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    self.stats["mark_delivered_failed"] += 1
                    log.error("event=msilo_mark_delivered_failed id=%d error=%r", message.id,
                              exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _failed(self, message: StoredMessage, status: int, *, refused: bool) -> str:
        self.stats["refused" if refused else "unreachable"] += 1
        log.info("event=msilo_attempt_failed id=%d aor=%s status=%d refused=%s", message.id,
                 message.recipient, status, refused)
        try:
            dropped = await self.store.mark_failed(message.id, status, refused=refused,
                                                   max_refusals=self.settings.max_refusals)
        except _DB_ERRORS as exc:
            log.error("event=msilo_mark_failed_failed id=%d error=%r", message.id, exc)
            return "unreachable"  # the lease lapses and the message is tried again
        if dropped:
            self.stats["dropped"] += 1
            log.warning("event=msilo_dropped id=%d aor=%s sender=%s refusals=%d",
                        message.id, message.recipient, message.sender_uri,
                        self.settings.max_refusals)
        return "refused" if refused else "unreachable"

    # ------------------------------------------------------------------ periodic check
    async def check(self) -> int:
        """Purge expired and delivered rows, start runs for registered recipients whose
        messages wait; returns the number of runs started."""
        try:
            expired, delivered = await self.store.sweep()
            self.stats["purged_delivered"] += delivered
            recipients = await self.store.pending_recipients(self.settings.retry_interval)
        except _DB_ERRORS as exc:
            log.error("event=msilo_check_failed error=%r", exc)
            return 0
        if expired:
            self.stats["expired"] += expired
            log.info("event=msilo_expired count=%d", expired)
        started = 0
        for aor in recipients:
            binding = best_binding(self.location.lookup(aor))
            if binding is not None and binding.expires_at > time.time():
                self.schedule(aor, Destination.of_binding(binding))
                started += 1
        return started

    async def _check_loop(self) -> None:
        await asyncio.sleep(min(1.0, self.settings.retry_interval))
        while not self._closed:
            await self.check()
            await asyncio.sleep(self.settings.retry_interval)

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._check_loop())

    async def close(self) -> None:
        """Stop the check and the runs; a run cut short leaves its lease to lapse."""
        self._closed = True
        tasks = [t for t in (self._sweeper, *self._runs.values(), *self._tasks) if t]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until no delivery run and no store task is running (tests, benchmarks)."""
        while self._runs or self._tasks:
            await asyncio.gather(*self._runs.values(), *self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ control socket
    def aor(self, text: str) -> str:
        """``1001``, ``1001@domain`` or ``sip:1001@domain`` -> the canonical AoR."""
        t = text if text.startswith(("sip:", "sips:")) else "sip:" + text
        if "@" not in t:
            t = f"{t}@{self.domain}"
        uri = parse_uri(t)  # SipParseError for garbage
        if not isinstance(uri, SipUri) or not uri.user:
            raise ValueError(f"not an address of record: {text!r}")
        return canonical_aor(uri, self.aliases)


async def setup(ctx: AppContext) -> Msilo:
    """Wire msilo into the server: handler, failure hook, events, methods, check loop."""
    from sipbill.control import ControlError

    settings: MsiloSettings = ctx.settings.modules.get("msilo") or MsiloSettings()
    store = MessageStore(ctx.pool, expiry=settings.expiry, quota=settings.quota)
    uac = UserAgentClient(ctx.stack, ctx.identity, user_agent=ctx.settings.server.user_agent)
    timer_f = 64 * ctx.settings.sip.timers.t1
    msilo = Msilo(settings, store, uac, ctx.location, domain=ctx.settings.server.domains[0],
                  aliases=ctx.settings.server.domain_aliases, lease_seconds=timer_f + 10.0)
    ctx.pipeline.add(Stage.LOCATION, msilo.on_message, methods={"MESSAGE"}, name="msilo.store")
    ctx.proxy.failure_hooks.append(msilo.on_failure)
    ctx.events.subscribe(ContactRegistered, msilo.on_registered)

    def aor_param(user: str) -> str:
        try:
            return msilo.aor(user)
        except (SipParseError, ValueError) as exc:
            raise ControlError(400, f"not an address of record: {user!r}") from exc

    async def list_(user: str) -> list[dict[str, Any]]:
        return [m.as_dict() for m in await store.list(aor_param(user))]

    async def count(user: str | None = None) -> int:
        return await store.count(None if user is None else aor_param(user))

    async def check() -> int:
        return await msilo.check()

    user_doc = {"user": "1001, 1001@domain or sip:1001@domain"}
    ctx.methods.register("msilo.list", list_, help="Stored messages of a user, oldest first.",
                         params_doc=user_doc)
    ctx.methods.register("msilo.count", count,
                         help="Number of stored messages of a user, or of everybody.",
                         params_doc={"user": "1001, 1001@domain or sip:1001@domain (optional)"})
    ctx.methods.register("msilo.check", check,
                         help="Purge expired messages and retry deliveries now.")
    ctx.services["msilo"] = msilo
    ctx.shutdown_hooks.append(msilo.close)
    msilo.start()
    return msilo
