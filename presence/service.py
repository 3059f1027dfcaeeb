"""Presence: subscriber status from registrations, and the presence event package as notifier.

Status (serweb's phonebook column, RFC 3856 §3 "presentity"): :meth:`Presence.status` says
``online`` (the AoR has a live binding), ``offline`` (a local subscriber without one),
``non-local`` (not one of our domains) or ``unknown`` (our domain, no such subscriber).  A
subscriber may hide (``presence.hide USER on``): to everybody else they then appear offline,
which is what "invisible" means in every IM client.  Other modules and the web portal use
``ctx.services["presence"].status(aor)``; the control socket has ``presence.status``.

SUBSCRIBE/NOTIFY (RFC 6665, RFC 3856): this server is the notifier for the presentities of
its domains.

Theory of operation
-------------------
* *New subscription* (SERVICES stage, after AUTH challenged local watchers with 407): the
  watcher must be an authenticated local subscriber (RFC 3856 §6.6 asks the notifier to
  authorise; someone from another domain has no credentials here: 403).  ``Event`` must name
  ``presence`` (489 Bad Event with ``Allow-Events``, RFC 6665 §4.2.1.1 / §8.2.2); an
  ``Accept`` without ``application/pidf+xml`` gets 406 (RFC 3856 §6.7); the presentity must
  exist (404); the duration is the Expires asked for, or ``default_expires``, shortened to
  ``max_expires``, and one below ``min_expires`` gets 423 with Min-Expires.  The 200 OK
  creates the dialog (our To tag, our Contact, §12.1.1) and says the granted ``Expires``;
  the first NOTIFY follows at once (RFC 6665 §4.2.1.2) with ``Subscription-State:
  active;expires=N`` and the PIDF document.  An initial SUBSCRIBE with Expires 0 is a fetch:
  200, one NOTIFY with ``terminated;reason=timeout``, no subscription.
* *In-dialog SUBSCRIBE* (IN_DIALOG stage, ahead of the proxy core which would answer 481 to a
  dialog it did not set up): a refresh gets 200 with the new Expires and a NOTIFY with the
  current state; Expires 0 is an unsubscribe: 200, a ``terminated;reason=timeout`` NOTIFY,
  and the subscription is gone.  A CSeq not above the last one gets 500 (§12.2.2).  In-dialog
  requests for dialogs that are not ours are left to the core.
* *State changes*: every :class:`~sipcore.location.ContactRegistered`, ``ContactRemoved`` and
  ``ContactExpired`` of a watched AoR sends each of its watchers a NOTIFY with the full
  current document at once -- the events fire right after the registrar's 200 OK, so watchers
  learn within the round trip of the NOTIFY.  Hiding and unhiding notify too.  A registration
  made through another node or worker process arrives as ``ContactsReloaded`` (the location
  service reloading that AoR after its notification) and notifies this node's watchers.
* *Expiry*: one timer per subscription; when it fires the watcher gets a
  ``terminated;reason=timeout`` NOTIFY (RFC 6665 §4.2.2) and the subscription is removed.
  A NOTIFY answered 481, or that times out or cannot be sent, removes the subscription too
  (RFC 6665 §4.2.2: the watcher is gone).
* *Persistence*: subscriptions are written to ``presence_subscriptions`` when created,
  refreshed and removed, and loaded at start-up; the loaded ones get a NOTIFY with the
  current state, since registrations may have changed while the server was down.  Each
  NOTIFY's CSeq is written before the NOTIFY leaves, and is at least the seconds since
  2020, so CSeqs keep increasing across a restart (§12.2.1.1) even when that write failed.
  NOTIFYs go to the address the
  SUBSCRIBE came from (the watcher or its edge proxy, RFC 3581 style) along the dialog's
  route set to the watcher's Contact.

Scope: subscriptions live in the process that accepted them (in-dialog SUBSCRIBEs reach it by
the worker tag of its Contact), stored with its node name (``AppContext.node_name``: host, SIP
address, worker); a restarted process loads only its own, and worker 0 claims rows stored
before they had an owner. A registration handled by another node or worker reaches this
one's watchers as ``ContactsReloaded``. The subscriptions of a node that never comes back
are not taken over: their watchers re-subscribe when they expire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import asyncpg

from presence.pidf import CONTENT_TYPE, Basic, pidf_document
from presence.settings import PresenceSettings
from sipcore.errors import SipParseError
from sipcore.headers import split_values
from sipcore.location import (
    ContactExpired,
    ContactRegistered,
    ContactRemoved,
    ContactsReloaded,
    LocationService,
)
from sipcore.message import Request
from sipcore.pipeline import RequestContext, Stage
from sipcore.registrar import canonical_aor
from sipcore.subscribers import SubscriberStore
from sipcore.transport_types import Peer
from sipcore.uac import Destination, UacError, UserAgentClient, new_tag
from sipcore.uri import SipUri, parse_uri

if TYPE_CHECKING:
    from sipbill.app import AppContext

__all__ = ["Presence", "Status", "Subscription", "setup"]

log = logging.getLogger("presence")

Status = Literal["online", "offline", "non-local", "unknown"]
EVENT: Final = "presence"
_CSEQ_EPOCH: Final = 1_577_836_800  # 2020-01-01: NOTIFY CSeqs stay below 2**31 until 2088
_DB_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

DialogKey = tuple[str, str, str]  # Call-ID, the watcher's tag, our tag


@dataclass(slots=True)
class Subscription:
    """One subscription dialog, notifier side (RFC 6665 §4.2)."""

    call_id: str
    remote_tag: str
    local_tag: str
    presentity: str  # canonical AoR
    presentity_uri: str  # as the watcher wrote it: the NOTIFY From URI
    watcher: str
    watcher_from: str  # the SUBSCRIBE From value, with tag: the NOTIFY To
    remote_target: str
    route_set: tuple[str, ...]
    peer: Peer
    event_id: str | None
    remote_cseq: int
    expires_at: float
    local_cseq: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    sending: bool = False  # a NOTIFY transaction is in progress
    again: bool = False  # the state changed meanwhile: one more NOTIFY when it completes
    terminate: bool = False  # the next NOTIFY ends the subscription

    @property
    def key(self) -> DialogKey:
        return (self.call_id, self.remote_tag, self.local_tag)

    def next_cseq(self, now: float) -> int:
        self.local_cseq = max(self.local_cseq + 1, int(now) - _CSEQ_EPOCH)
        return self.local_cseq

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"presentity": self.presentity, "watcher": self.watcher,
                "call_id": self.call_id, "expires": max(0, int(self.expires_at - now + 0.5)),
                "contact": self.remote_target, "peer": str(self.peer)}


class _Reject(Exception):
    def __init__(self, status: int, reason: str,
                 headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers)


class Presence:
    """Status queries, hiding, and the notifier; see the module docstring."""

    def __init__(self, settings: PresenceSettings, pool: asyncpg.Pool,
                 location: LocationService, subscribers: SubscriberStore,
                 uac: UserAgentClient, *, domains: Iterable[str],
                 aliases: Mapping[str, str], node: str = "", claim_unowned: bool = True,
                 clock: Any = time.time) -> None:
        self.settings = settings
        #: The server process serving the subscriptions this one creates and loads.
        self.node = node
        self.claim_unowned = claim_unowned
        self.pool = pool
        self.location = location
        self.subscribers = subscribers
        self.uac = uac
        self.aliases = {a.lower(): d.lower() for a, d in aliases.items()}
        self.domains = frozenset(d.lower() for d in domains) | frozenset(self.aliases)
        self.default_domain = next(iter(domains))
        self.clock = clock
        self.hidden: set[str] = set()
        self.subscriptions: dict[DialogKey, Subscription] = {}
        self.by_presentity: dict[str, set[DialogKey]] = {}
        self.stats: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # ------------------------------------------------------------------ status
    def aor(self, text: str) -> str:
        """``1001``, ``1001@domain`` or ``sip:1001@domain`` -> canonical AoR (ValueError)."""
        t = text if text.startswith(("sip:", "sips:")) else "sip:" + text
        if "@" not in t:
            t = f"{t}@{self.default_domain}"
        try:
            uri = parse_uri(t)
        except SipParseError as exc:
            raise ValueError(f"not an address of record: {text!r}") from exc
        if not isinstance(uri, SipUri) or not uri.user:
            raise ValueError(f"not an address of record: {text!r}")
        return canonical_aor(uri, self.aliases)

    def is_local(self, aor: str) -> bool:
        return aor.rpartition("@")[2].lower() in self.domains

    def registered(self, aor: str) -> bool:
        now = self.clock()
        return any(b.expires_at > now for b in self.location.lookup(aor))

    async def status(self, aor: str, *, reveal: bool = False) -> Status:
        """The status others see (``reveal`` ignores hiding: the subscriber's own view)."""
        if not self.is_local(aor):
            return "non-local"
        if self.registered(aor):
            return "online" if reveal or aor not in self.hidden else "offline"
        user, _, domain = aor.removeprefix("sip:").rpartition("@")
        if await self.subscribers.get(user, domain) is None:
            return "unknown"
        return "offline"

    def basic(self, aor: str) -> Basic:
        return "open" if self.registered(aor) and aor not in self.hidden else "closed"

    async def set_hidden(self, aor: str, hidden: bool) -> bool:
        """Hide or show ``aor``; returns whether it changed.  Watchers are notified."""
        async with self.pool.acquire() as conn:
            if hidden:
                changed = await conn.fetchval(
                    "INSERT INTO presence_hidden (aor) VALUES ($1) ON CONFLICT DO NOTHING "
                    "RETURNING true", aor)
                self.hidden.add(aor)
            else:
                changed = await conn.fetchval(
                    "DELETE FROM presence_hidden WHERE aor = $1 RETURNING true", aor)
                self.hidden.discard(aor)
        if changed:
            self.notify_watchers(aor)
        return bool(changed)

    # ------------------------------------------------------------------ new subscriptions
    async def on_subscribe(self, ctx: RequestContext) -> bool:
        """SERVICES stage: an initial SUBSCRIBE to a presentity of our domains."""
        req = ctx.request
        if req.method != "SUBSCRIBE" or req.to_addr.tag:
            return False
        try:
            uri = req.request_uri
        except SipParseError:
            return False
        if not isinstance(uri, SipUri) or not uri.user or uri.host.lower() not in self.domains:
            return False  # not a presentity of ours: the proxy routes (or refuses) it
        try:
            return await self._subscribe(ctx, canonical_aor(uri, self.aliases))
        except _Reject as rej:
            self.stats[f"rejected_{rej.status}"] += 1
            return ctx.reply(rej.status, rej.reason, rej.headers)
        except SipParseError as exc:
            self.stats["rejected_400"] += 1
            return ctx.reply(exc.status, exc.reason, exc.headers)

    async def _subscribe(self, ctx: RequestContext, presentity: str) -> bool:
        req = ctx.request
        event_id = _check_event(req)
        if ctx.user is None:
            # AUTH challenged every local watcher; who is left comes from another domain.
            raise _Reject(403, "Only Local Subscribers May Watch")
        _check_accept(req)
        expires = self._granted_expires(req)
        if not req.contacts or req.contacts[0].is_star:
            raise _Reject(400, "Missing Contact")
        if await self.status(presentity, reveal=True) == "unknown":
            raise _Reject(404, "Not Found")
        watcher = f"sip:{ctx.user}@{ctx.user_domain or self.default_domain}"
        now = self.clock()
        local_tag = new_tag()
        sub = Subscription(
            call_id=req.call_id, remote_tag=req.from_addr.tag or "", local_tag=local_tag,
            presentity=presentity, presentity_uri=req.to_addr.uri, watcher=watcher,
            watcher_from=req.header("From") or "", remote_target=req.contacts[0].uri,
            route_set=tuple(req.header_values("Record-Route")), peer=ctx.source,
            event_id=event_id, remote_cseq=req.cseq.number, expires_at=now + expires,
        )
        if expires == 0:
            # A fetch (RFC 6665 §4.4.3): the current state once, no subscription.
            self._reply_ok(ctx, sub, 0)
            self.stats["fetches"] += 1
            self._queue_notify(sub, terminated=True)
            return True
        held = sum(1 for s in self.subscriptions.values() if s.watcher == watcher)
        if held >= self.settings.max_per_watcher:
            raise _Reject(403, "Too Many Subscriptions")
        try:
            await self._save(sub)
        except _DB_ERRORS as exc:
            log.error("event=presence_save_failed presentity=%s error=%r", presentity, exc)
            raise _Reject(500, "Server Internal Error") from exc
        self._add(sub)
        self._reply_ok(ctx, sub, expires)
        self.stats["subscribed"] += 1
        log.info("event=presence_subscribed presentity=%s watcher=%s expires=%d", presentity,
                 watcher, expires)
        self._queue_notify(sub)
        return True

    def _granted_expires(self, req: Request) -> int:
        asked = req.expires
        if asked is None:
            return self.settings.default_expires
        if asked == 0:
            return 0
        if asked < self.settings.min_expires:
            raise _Reject(423, "Interval Too Brief",
                          [("Min-Expires", str(self.settings.min_expires))])
        return min(asked, self.settings.max_expires)

    def _reply_ok(self, ctx: RequestContext, sub: Subscription, expires: int) -> None:
        ctx.reply(200, "OK", [("Expires", str(expires)),
                              ("Contact", self.uac.contact(ctx.source.transport))],
                  to_tag=sub.local_tag)

    # ------------------------------------------------------------------ in-dialog
    async def on_in_dialog(self, ctx: RequestContext) -> bool:
        """IN_DIALOG stage (ahead of the core): refresh or end one of our subscriptions."""
        req = ctx.request
        if req.method != "SUBSCRIBE" or not req.to_addr.tag:
            return False
        sub = self.subscriptions.get((req.call_id, req.from_addr.tag or "", req.to_addr.tag))
        if sub is None:
            return False  # not ours: the core decides (481 or relay)
        try:
            _check_event(req)
        except _Reject as rej:
            return ctx.reply(rej.status, rej.reason, rej.headers)
        if req.cseq.number <= sub.remote_cseq:
            return ctx.reply(500, "Out Of Order Request")  # RFC 3261 §12.2.2
        sub.remote_cseq = req.cseq.number
        try:
            expires = self._granted_expires(req)
        except _Reject as rej:
            return ctx.reply(rej.status, rej.reason, rej.headers)
        if req.contacts and not req.contacts[0].is_star:
            sub.remote_target = req.contacts[0].uri  # a target refresh (§12.2.2)
        if expires == 0:
            self._reply_ok(ctx, sub, 0)
            self.stats["unsubscribed"] += 1
            log.info("event=presence_unsubscribed presentity=%s watcher=%s", sub.presentity,
                     sub.watcher)
            await self._end(sub, notify=True)
            return True
        sub.expires_at = self.clock() + expires
        try:
            await self._save(sub)
        except _DB_ERRORS as exc:
            log.error("event=presence_save_failed presentity=%s error=%r", sub.presentity, exc)
            return ctx.reply(500, "Server Internal Error")
        self._arm(sub)
        self._reply_ok(ctx, sub, expires)
        self.stats["refreshed"] += 1
        self._queue_notify(sub)
        return True

    # ------------------------------------------------------------------ notifying
    def on_location(
        self, event: ContactRegistered | ContactRemoved | ContactExpired | ContactsReloaded
    ) -> None:
        self.notify_watchers(event.aor)

    def notify_watchers(self, presentity: str) -> int:
        """Send every watcher of ``presentity`` the current state; returns how many."""
        keys = self.by_presentity.get(presentity, ())
        for key in list(keys):
            sub = self.subscriptions.get(key)
            if sub is not None:
                self._queue_notify(sub)
        return len(keys)

    def _queue_notify(self, sub: Subscription, *, terminated: bool = False) -> None:
        """NOTIFY ``sub`` now, or right after the one in progress (one at a time per
        subscription, so CSeqs arrive in order and the last NOTIFY has the latest state)."""
        if terminated:
            sub.terminate = True
        if sub.sending:
            sub.again = True
            return
        sub.sending = True
        self._spawn(self._notify_loop(sub))

    async def _notify_loop(self, sub: Subscription) -> None:
        try:
            while True:
                sub.again = False
                final = sub.terminate
                await self._notify(sub, terminated=final)
                if final or not sub.again:
                    return
                if self.subscriptions.get(sub.key) is not sub and not sub.terminate:
                    return  # removed meanwhile (481, failure): nothing more to say
        finally:
            sub.sending = False

    async def _notify(self, sub: Subscription, *, terminated: bool = False) -> None:
        now = self.clock()
        if terminated:
            state = "terminated;reason=timeout"
        else:
            state = f"active;expires={max(1, int(sub.expires_at - now + 0.5))}"
        event = EVENT if sub.event_id is None else f"{EVENT};id={sub.event_id}"
        body = pidf_document(sub.presentity_uri, self.basic(sub.presentity), now=now)
        dest = Destination(sub.remote_target, sub.peer, sub.route_set)
        try:
            outgoing = self.uac.build(
                "NOTIFY", dest, from_addr=f"<{sub.presentity_uri}>", from_tag=sub.local_tag,
                to_addr=sub.watcher_from, call_id=sub.call_id, cseq=sub.next_cseq(now),
                contact=self.uac.contact(sub.peer.transport),
                headers=[("Event", event), ("Subscription-State", state)], body=body,
                content_type=CONTENT_TYPE)
        except (SipParseError, ValueError) as exc:
            log.warning("event=presence_notify_unsendable presentity=%s error=%r",
                        sub.presentity, exc)
            await self._end(sub, notify=False)
            return
        if self.subscriptions.get(sub.key) is sub:
            try:
                async with self.pool.acquire() as conn:
                    await conn.execute(
                        "UPDATE presence_subscriptions SET local_cseq = GREATEST(local_cseq, $4) "
                        "WHERE call_id = $1 AND remote_tag = $2 AND local_tag = $3",
                        *sub.key, sub.local_cseq)
            except _DB_ERRORS as exc:
                log.warning("event=presence_cseq_not_saved presentity=%s error=%r",
                            sub.presentity, exc)
        self.stats["notify_sent"] += 1
        try:
            response = await self.uac.send(outgoing)
        except UacError as exc:
            self.stats["notify_failed"] += 1
            log.info("event=presence_notify_failed presentity=%s watcher=%s reason=%s",
                     sub.presentity, sub.watcher, exc.reason)
            await self._end(sub, notify=False)
            return
        if response.status == 481:
            # RFC 6665 §4.2.2: the watcher no longer has this subscription.
            self.stats["notify_rejected"] += 1
            await self._end(sub, notify=False)

    # ------------------------------------------------------------------ lifecycle
    def _add(self, sub: Subscription) -> None:
        self.subscriptions[sub.key] = sub
        self.by_presentity.setdefault(sub.presentity, set()).add(sub.key)
        self._arm(sub)

    def _arm(self, sub: Subscription) -> None:
        if sub.timer is not None:
            sub.timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, sub.expires_at - self.clock())
        sub.timer = loop.call_later(delay, self._expired, sub.key)

    def _expired(self, key: DialogKey) -> None:
        sub = self.subscriptions.get(key)
        if sub is None:
            return
        sub.timer = None
        self.stats["expired"] += 1
        log.info("event=presence_subscription_expired presentity=%s watcher=%s",
                 sub.presentity, sub.watcher)
        self._spawn(self._end(sub, notify=True))

    async def _end(self, sub: Subscription, *, notify: bool) -> None:
        """Remove ``sub``; with ``notify``, the watcher gets a terminated NOTIFY first."""
        if self.subscriptions.get(sub.key) is not sub:
            return
        del self.subscriptions[sub.key]
        keys = self.by_presentity.get(sub.presentity)
        if keys is not None:
            keys.discard(sub.key)
            if not keys:
                del self.by_presentity[sub.presentity]
        if sub.timer is not None:
            sub.timer.cancel()
            sub.timer = None
        if notify:
            self._queue_notify(sub, terminated=True)
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(
                    "DELETE FROM presence_subscriptions WHERE call_id = $1 AND remote_tag = $2 "
                    "AND local_tag = $3", *sub.key)
        except _DB_ERRORS as exc:
            # The row stays, expired: start-up deletes it.
            log.error("event=presence_delete_failed presentity=%s error=%r", sub.presentity,
                      exc)

    async def _save(self, sub: Subscription) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                """
                INSERT INTO presence_subscriptions (call_id, remote_tag, local_tag, presentity,
                    presentity_uri, watcher, watcher_from, remote_target, route_set, transport,
                    peer_host, peer_port, event_id, remote_cseq, expires_at, node)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                        to_timestamp($15::float8), $16)
                ON CONFLICT (call_id, remote_tag, local_tag) DO UPDATE SET
                    remote_target = EXCLUDED.remote_target, remote_cseq = EXCLUDED.remote_cseq,
                    expires_at = EXCLUDED.expires_at, node = EXCLUDED.node
                """,
                sub.call_id, sub.remote_tag, sub.local_tag, sub.presentity, sub.presentity_uri,
                sub.watcher, sub.watcher_from, sub.remote_target, ", ".join(sub.route_set),
                sub.peer.transport, sub.peer.host, sub.peer.port, sub.event_id,
                sub.remote_cseq, sub.expires_at, self.node)

    async def load(self) -> int:
        """Start-up: the hidden set and the unexpired subscriptions this server process
        serves (``node``; each gets a NOTIFY). With ``claim_unowned`` it first takes over the
        rows written before subscriptions had an owner."""
        now = self.clock()
        async with self.pool.acquire() as conn:
            hidden = await conn.fetch("SELECT aor FROM presence_hidden")
            await conn.execute(
                "DELETE FROM presence_subscriptions WHERE expires_at <= to_timestamp($1)", now)
            if self.claim_unowned and self.node:
                await conn.execute(
                    "UPDATE presence_subscriptions SET node = $1 WHERE node = ''", self.node)
            rows = await conn.fetch(
                "SELECT *, extract(epoch FROM expires_at)::float8 AS expires_epoch "
                "FROM presence_subscriptions WHERE node = $1", self.node)
        self.hidden = {r["aor"] for r in hidden}
        for r in rows:
            sub = Subscription(
                call_id=r["call_id"], remote_tag=r["remote_tag"], local_tag=r["local_tag"],
                presentity=r["presentity"], presentity_uri=r["presentity_uri"],
                watcher=r["watcher"], watcher_from=r["watcher_from"],
                remote_target=r["remote_target"],
                route_set=tuple(split_values(r["route_set"])) if r["route_set"] else (),
                peer=Peer(r["transport"], r["peer_host"], r["peer_port"]),
                event_id=r["event_id"], remote_cseq=r["remote_cseq"],
                expires_at=r["expires_epoch"], local_cseq=r["local_cseq"],
            )
            self._add(sub)
            self._queue_notify(sub)
        return len(rows)

    async def close(self) -> None:
        """Stop timers and NOTIFYs; subscriptions stay in the database for the next start."""
        self._closed = True
        for sub in self.subscriptions.values():
            if sub.timer is not None:
                sub.timer.cancel()
                sub.timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait for NOTIFYs in flight (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _check_event(req: Request) -> str | None:
    """The Event header must name ``presence``; returns its ``id`` parameter."""
    value = req.header("Event")
    package, _, params = (value or "").partition(";")
    if package.strip().lower() != EVENT:
        raise _Reject(489, "Bad Event", [("Allow-Events", EVENT)])
    for param in params.split(";"):
        name, _, val = param.partition("=")
        if name.strip().lower() == "id" and val.strip():
            return val.strip()
    return None


def _check_accept(req: Request) -> None:
    accept = [a.partition(";")[0].strip().lower() for a in req.header_values("Accept")]
    if accept and not any(a in (CONTENT_TYPE, "application/*", "*/*") for a in accept):
        raise _Reject(406, "Not Acceptable", [("Accept", CONTENT_TYPE)])


async def setup(ctx: AppContext) -> Presence:
    """Wire presence in: SUBSCRIBE handlers, location events, control methods."""
    from sipbill.control import ControlError

    settings: PresenceSettings = ctx.settings.modules.get("presence") or PresenceSettings()
    uac = UserAgentClient(ctx.stack, ctx.identity, user_agent=ctx.settings.server.user_agent)
    presence = Presence(settings, ctx.pool, ctx.location, ctx.subscribers, uac,
                        domains=ctx.settings.server.domains,
                        aliases=ctx.settings.server.domain_aliases, node=ctx.node_name,
                        claim_unowned=ctx.services.get("worker_index", 0) == 0)
    loaded = await presence.load()
    log.info("event=presence_loaded subscriptions=%d hidden=%d", loaded, len(presence.hidden))
    ctx.pipeline.add(Stage.IN_DIALOG, presence.on_in_dialog, methods={"SUBSCRIBE"},
                     name="presence.in_dialog", first=True)
    ctx.pipeline.add(Stage.SERVICES, presence.on_subscribe, methods={"SUBSCRIBE"},
                     name="presence.subscribe")
    ctx.events.subscribe(ContactRegistered, presence.on_location)
    ctx.events.subscribe(ContactRemoved, presence.on_location)
    ctx.events.subscribe(ContactExpired, presence.on_location)
    # Registrations made through another node or worker process reach this node's watchers.
    ctx.events.subscribe(ContactsReloaded, presence.on_location)

    def aor_param(text: str) -> str:
        try:
            return presence.aor(text)
        except ValueError as exc:
            raise ControlError(400, str(exc)) from exc

    async def status(aor: str) -> dict[str, Any]:
        key = aor_param(aor)
        return {"aor": key, "status": await presence.status(key),
                "hidden": key in presence.hidden,
                "watchers": len(presence.by_presentity.get(key, ()))}

    async def hide(user: str, state: Literal["on", "off"]) -> dict[str, Any]:
        key = aor_param(user)
        if state == "on" and await presence.status(key, reveal=True) in ("unknown",
                                                                          "non-local"):
            raise ControlError(404, f"no local subscriber {key}")
        await presence.set_hidden(key, state == "on")
        return {"aor": key, "hidden": key in presence.hidden}

    async def subscriptions(aor: str | None = None) -> list[dict[str, Any]]:
        now = time.time()
        key = None if aor is None else aor_param(aor)
        return [s.as_dict(now) for s in presence.subscriptions.values()
                if key is None or s.presentity == key]

    ctx.methods.register("presence.status", status,
                         help="online, offline, non-local or unknown, as others see it.",
                         params_doc={"aor": "1001, 1001@domain or sip:1001@domain"})
    ctx.methods.register("presence.hide", hide,
                         help="Hide a subscriber's status (appears offline) or show it again.",
                         params_doc={"user": "1001, 1001@domain or sip:1001@domain",
                                     "state": "on or off"})
    ctx.methods.register("presence.subscriptions", subscriptions,
                         help="Active presence subscriptions, optionally of one presentity.",
                         params_doc={"aor": "only watchers of this address of record"})
    ctx.services["presence"] = presence
    ctx.shutdown_hooks.append(presence.close)
    return presence
