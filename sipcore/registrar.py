"""The registrar (RFC 3261 §10.3) and the location lookup of the proxy (§16.5).

:class:`Registrar` is the REGISTRAR stage handler for REGISTER.  It follows §10.3 step by step:

1. Only AoRs of our domains are served (the To URI's host); for any other domain the answer
   is 403 and nothing is relayed -- this server is nobody's open registrar.
2. ``Require`` is checked (§8.2.2.3): the only extension understood is ``path`` (RFC 3327),
   anything else is 420 Bad Extension with ``Unsupported``.
3. Authentication happened in the AUTH stage (:mod:`sipcore.auth`).
4. The authenticated user must own the AoR (same user and domain), else 403.
5. The AoR is the canonical To URI (:func:`~sipcore.location.aor_of`); a To URI without user
   part names no AoR: 404.
6. ``Contact: *`` is only valid with ``Expires: 0`` and alone (else 400); it removes every
   binding, each subject to the Call-ID/CSeq rule of step 7.
7. Each contact's interval is its ``expires`` parameter, else the Expires header, else
   ``default_expires``; an interval that is not zero but below ``min_expires`` (and below an
   hour) is refused with 423 Interval Too Brief and ``Min-Expires`` (§10.3, §20.23), one above
   ``max_expires`` is shortened.  For an existing binding with the same Call-ID the CSeq must
   be higher, else "the update MUST be aborted and the request fails": 500 (the status the
   paragraph after it gives for a failed update), and nothing changes.  Expires 0 removes.
   The change is all or nothing and is committed to the database before anything is
   answered; if the commit fails the answer is 500 (§10.3: "If any one of them fails ... the
   request MUST fail with a 500 (Server Error) response").
8. The 200 OK lists every current binding with its ``expires`` (and ``q`` when not 1), a
   ``Date`` header, the REGISTER's Path when the UA said ``Supported: path`` (RFC 3327 §5.3),
   and the headers other modules put in ``ctx.response_headers`` (billing's balance).

Policy choices: more than ``max_contacts`` bindings for one AoR is refused with 403 "Too Many
Registered Contacts" (Kamailio answers 503, but 503 tells an RFC 3263 client to fail over to
another server and retry later, which is wrong for a per-account limit that no other server
would lift); a Path without ``Supported: path`` is stored and used but not echoed (RFC 3327
§5.3 allows the registrar to accept it; an edge proxy that adds Path knows what it does).
Contacts are compared as text, as Kamailio does, rather than by §19.1.4 URI equality, which is
not transitive and so cannot key a store.  The binding records the transport address the
REGISTER came from (RFC 3581), so requests reach a phone behind NAT where it registered from.

:class:`LocationLookup` is the LOCATION stage handler: a Request-URI naming a local AoR gets a
:class:`~sipcore.pipeline.Target` per live binding (sent to the binding's source address, with
its Path), and a verdict in ``ctx.attrs["location"]``: ``"found"``, ``"offline"`` (a subscriber
without bindings: 480 later) or ``"unknown"`` (no such subscriber: 404, or a number for the
gateways).  It never answers itself, so msilo, gateways and the relay decide.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from email.utils import formatdate
from functools import partial
from typing import Final

from sipcore import coro
from sipcore.errors import SipParseError
from sipcore.location import (
    Binding,
    BindingChange,
    LocationService,
    LocationWriteError,
    Plan,
    aor_of,
)
from sipcore.pipeline import Later, RequestContext, Target
from sipcore.settings import RegistrarSettings
from sipcore.subscribers import Subscriber, SubscriberStore
from sipcore.uri import SipUri

__all__ = ["LocationLookup", "Registrar", "RegistrarSettings"]

log = logging.getLogger("sipcore.registrar")

#: RFC 3261 §10.3 step 7: 423 only for intervals "smaller than one hour".
_ONE_HOUR: Final = 3600
_USER_AGENT_MAX: Final = 256


class _Reject(Exception):
    """A final non-2xx answer to the REGISTER, with a metrics label."""

    def __init__(
        self, status: int, reason: str, label: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.label = label
        self.headers = headers


#: What the registrar answers itself when planning or writing a change raises it.
_ANSWERED: Final = (_Reject, SipParseError, LocationWriteError)


class _Contact:
    """One Contact of the REGISTER, validated."""

    __slots__ = ("expires", "instance", "q", "reg_id", "uri")

    def __init__(
        self, uri: str, expires: int, q: float, instance: str | None, reg_id: int | None
    ) -> None:
        self.uri = uri
        self.expires = expires
        self.q = q
        self.instance = instance
        self.reg_id = reg_id


# qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )  (RFC 3261 §25.1)
_Q_CACHE: dict[str, float] = {}


def _qvalue(text: str | None) -> float:
    if text is None:
        return 1.0
    cached = _Q_CACHE.get(text)
    if cached is not None:
        return cached
    whole, _, frac = text.partition(".")
    if (
        whole not in ("0", "1")
        or len(frac) > 3
        or (frac and not (frac.isascii() and frac.isdigit()))
        or (whole == "1" and frac.strip("0"))
    ):
        raise _Reject(400, "Bad q Value", "bad_q")
    value = float(text)
    if len(_Q_CACHE) < 1000:
        _Q_CACHE[text] = value  # the few values phones use are shared by every binding
    return value


def _format_q(q: float) -> str:
    return f"{q:.3f}".rstrip("0").rstrip(".")


def _storable(text: str) -> bool:
    """Text PostgreSQL can store: headers are decoded with surrogate escapes, so a byte
    sequence that is not UTF-8 would only fail in the database, failing a whole batch."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _HttpDate:
    """RFC 3261 §20.17 Date (RFC 1123 form), formatted once per second."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = formatdate(second, usegmt=True)
        return self._text


class Registrar:
    """REGISTRAR stage handler for REGISTER: ``pipeline.add(Stage.REGISTRAR, registrar,
    methods={"REGISTER"})``.  ``domains`` are the domains whose AoRs we keep."""

    SUPPORTED: Final = frozenset({"path"})

    def __init__(
        self,
        location: LocationService,
        domains: Iterable[str],
        settings: RegistrarSettings | None = None,
        *,
        clock: Callable[[], float] | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.location = location
        self.aliases = {a.lower(): d.lower() for a, d in (aliases or {}).items()}
        self.domains = frozenset(d.lower() for d in domains) | frozenset(self.aliases)
        self.settings = settings if settings is not None else RegistrarSettings()
        problems = self.settings.validate()
        if problems:
            raise ValueError("; ".join(f"{k}: {v}" for k, v in problems))
        self._clock = location.clock if clock is None else clock  # wall clock, like expiry
        self._date = _HttpDate()
        #: Outcomes by label ("ok", "423", "foreign_domain", ...) for metrics.
        self.stats: Counter[str] = Counter()
        #: REGISTERs waiting behind another update of their AoR (rare).
        self._tasks: set[asyncio.Task[bool]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, ctx: RequestContext) -> bool | Awaitable[bool]:
        """The REGISTRAR stage: a REGISTER is answered through the :class:`Later` returned
        (settled once it is, mostly from the location commit, with no task); anything else
        passes (False).

        The work starts in the next event-loop turn, after the other datagrams of this one:
        measured under SIPp (4,200 pairs/s, 100,000 contacts), that cost 1-4 % less CPU per
        REGISTER pair than the task it replaces, and running it inline cost 1-8 % more,
        although it takes the fewest instructions (README run 9).
        """
        if ctx.request.method != "REGISTER":
            return False
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        later = Later()
        loop.call_soon(self._begin, ctx, later)
        return later

    def _begin(self, ctx: RequestContext, later: Later) -> None:
        try:
            done = self._start(ctx, later)
        except Exception as exc:  # a bug: the pipeline logs it and answers 500
            later.fail(exc)
            return
        if done is not None:
            later.resolve(done)

    def _start(self, ctx: RequestContext, later: Later) -> bool | None:
        """Plan and queue the change: the verdict, or None when ``later`` gets it later."""
        try:
            aor, plan, now, path = self._prepare(ctx)
            started = self.location.update_soon(
                aor, plan, partial(self._committed, ctx, aor, now, path, later)
            )
        except _ANSWERED as exc:
            return self._rejected(ctx, exc)
        if started is None:  # the AoR has an update in flight: queue behind it
            task = asyncio.ensure_future(coro.recover(
                self.location.update(aor, plan),
                partial(self._answer, ctx, aor, now, path),
                _ANSWERED,
                partial(self._rejected, ctx),
            ))
            self._tasks.add(task)
            task.add_done_callback(partial(self._queued_done, later))
            return None
        change, queued = started
        return None if queued else self._answer(ctx, aor, now, path, change)

    def _queued_done(self, later: Later, task: asyncio.Task[bool]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            later.resolve(True)  # the server is stopping: nothing more to answer
            return
        error = task.exception()
        if error is not None:
            later.fail(error)
        else:
            later.resolve(task.result())

    def _committed(self, ctx: RequestContext, aor: str, now: float, path: tuple[str, ...],
                   later: Later, change: BindingChange, error: LocationWriteError | None) -> None:
        if error is not None:
            later.resolve(self._rejected(ctx, error))
            return
        try:
            done = self._answer(ctx, aor, now, path, change)
        except Exception as exc:  # a bug: the pipeline logs it and answers 500
            later.fail(exc)
            return
        later.resolve(done)

    def _rejected(self, ctx: RequestContext, exc: Exception) -> bool:
        if isinstance(exc, _Reject):
            self.stats[exc.label] += 1
            log.info(
                "event=register_rejected status=%d reason=%s call_id=%s source=%s",
                exc.status,
                exc.label,
                ctx.request.call_id,
                ctx.source,
            )
            return ctx.reply(exc.status, exc.reason, exc.headers)
        if isinstance(exc, SipParseError):
            self.stats["bad_request"] += 1
            return ctx.reply(exc.status, exc.reason, exc.headers)
        self.stats["db_error"] += 1  # LocationWriteError
        return ctx.reply(500, "Server Internal Error")

    def _prepare(self, ctx: RequestContext) -> tuple[str, Plan, float, tuple[str, ...]]:
        """Steps 1-7 of §10.3 up to the change itself: the AoR, the plan of its change (which
        raises :class:`_Reject` for what depends on the current bindings), the time and the
        Path.  Raises :class:`_Reject` or :class:`SipParseError`."""
        req = ctx.request
        settings = self.settings

        # Steps 1, 5: our domain, an AoR with a user part.
        to_uri = req.to_addr.parsed_uri
        if not isinstance(to_uri, SipUri) or to_uri.host.lower() not in self.domains:
            raise _Reject(403, "Domain Not Served Here", "foreign_domain")
        if not to_uri.user:
            raise _Reject(404, "Not Found", "no_aor")

        # Step 2: extensions the UA requires of us.
        required = req.header_values("Require")
        if required:
            unsupported = [tag for tag in required if tag.lower() not in self.SUPPORTED]
            if unsupported:
                raise _Reject(
                    420, "Bad Extension", "bad_extension", [("Unsupported", ", ".join(unsupported))]
                )

        # Step 4: the authenticated identity must own the AoR.
        if (
            ctx.user is None
            or ctx.user != to_uri.user
            or ((ctx.user_domain or "").lower() != _canonical(to_uri.host, self.aliases))
        ):
            raise _Reject(403, "Not Authorized For This AoR", "not_owner")
        aor = canonical_aor(to_uri, self.aliases)

        # Steps 6, 7: validate every contact before changing anything.
        contacts = req.contacts
        header_expires = req.expires
        star = bool(contacts) and contacts[0].is_star
        entries: dict[str, _Contact] = {}
        default_expires = header_expires if header_expires is not None else settings.default_expires
        if star:
            if header_expires != 0:
                raise _Reject(400, "Contact: * Requires Expires: 0", "bad_star")
        else:
            for contact in contacts:
                uri = contact.uri
                try:
                    parsed = contact.parsed_uri
                except SipParseError as exc:
                    # 416 is about the Request-URI; a contact we cannot route to is a 400.
                    raise _Reject(400, "Contact Must Be A SIP URI", "bad_contact") from exc
                if not isinstance(parsed, SipUri):
                    raise _Reject(400, "Contact Must Be A SIP URI", "bad_contact")
                expires = contact.expires
                if expires is None:
                    expires = default_expires
                if expires:
                    if expires < settings.min_expires and expires < _ONE_HOUR:
                        raise _Reject(
                            423,
                            "Interval Too Brief",
                            "interval_too_brief",
                            [("Min-Expires", str(settings.min_expires))],
                        )
                    if expires > settings.max_expires:
                        expires = settings.max_expires
                params = contact.params
                instance = params.get("+sip.instance")
                reg_id_text = params.get("reg-id")
                reg_id = (
                    int(reg_id_text)
                    if reg_id_text is not None
                    and reg_id_text.isascii()
                    and reg_id_text.isdigit()
                    and len(reg_id_text) < 10
                    else None
                )
                if not _storable(uri) or (instance is not None and not _storable(instance)):
                    raise _Reject(400, "Bad Contact", "bad_contact")
                if instance is not None and expires:
                    # One device, one binding: of its contacts in one REGISTER the last counts.
                    for other in [e.uri for e in entries.values() if e.expires
                                  and e.instance == instance and e.reg_id == reg_id]:
                        del entries[other]
                # A contact listed twice: the last one counts.
                entries[uri] = _Contact(uri, expires, _qvalue(params.get("q")), instance, reg_id)

        path = tuple(req.header_values("Path"))
        user_agent = (req.header("User-Agent") or "")[:_USER_AGENT_MAX]
        call_id = req.call_id
        if not all(map(_storable, (call_id, user_agent, *path))):
            raise _Reject(400, "Bad Header Encoding", "bad_encoding")
        user_agent = self.location.shared_user_agent(user_agent)
        cseq = req.cseq.number
        source = ctx.source
        now = self._clock()
        max_contacts = settings.max_contacts

        def plan(current: tuple[Binding, ...]) -> BindingChange | None:
            # Runs with the AoR to itself (LocationService.update): current is up to date.
            for existing in current:
                if (
                    existing.call_id == call_id
                    and cseq <= existing.cseq
                    and (star or existing.contact in entries)
                ):
                    raise _Reject(500, "Out Of Order Request", "out_of_order")
            if star:
                return BindingChange((), removed=current) if current else None
            key = current[0].aor if current else aor  # one AoR string per AoR in memory
            by_contact = {b.contact: b for b in current}
            added: list[Binding] = []
            refreshed: list[Binding] = []
            removed: list[Binding] = []
            for entry in entries.values():
                old = by_contact.get(entry.uri)
                if not entry.expires:
                    if old is not None:
                        removed.append(old)
                        del by_contact[entry.uri]
                    continue
                if entry.instance is not None:
                    # RFC 5626 §6 / RFC 5627 §7.1.2.1: the same device (+sip.instance, and
                    # reg-id if any) registering a new contact, e.g. a phone rebooted onto a
                    # new port, replaces its old binding rather than adding a dead one.
                    for stale in [b for b in by_contact.values()
                                  if b.instance == entry.instance and b.reg_id == entry.reg_id
                                  and b.contact not in entries]:
                        removed.append(stale)
                        del by_contact[stale.contact]
                binding = Binding(
                    key,
                    entry.uri,
                    source,
                    now + entry.expires,
                    q=entry.q,
                    call_id=call_id,
                    cseq=cseq,
                    path=path,
                    user_agent=user_agent,
                    instance=entry.instance,
                    reg_id=entry.reg_id,
                    received_at=now,
                )
                (added if old is None else refreshed).append(binding)
                by_contact[entry.uri] = binding
            if added and len(by_contact) > max_contacts:
                raise _Reject(403, "Too Many Registered Contacts", "too_many_contacts")
            if not (added or refreshed or removed):
                return None
            return BindingChange(
                tuple(by_contact.values()), tuple(added), tuple(refreshed), tuple(removed)
            )

        return aor, plan, now, path

    def _answer(self, ctx: RequestContext, aor: str, now: float, path: tuple[str, ...],
                change: BindingChange) -> bool:
        """Step 8: the 200 OK with the bindings, then the events."""
        req = ctx.request
        headers: list[tuple[str, str]] = []
        for b in change.bindings:
            value = f"<{b.contact}>;expires={b.expires_in(now)}"
            if b.q != 1.0:
                value += f";q={_format_q(b.q)}"
            headers.append(("Contact", value))
        if path and any(tag.lower() == "path" for tag in req.header_values("Supported")):
            headers.extend(("Path", value) for value in path)
        headers.append(("Date", self._date(now)))
        headers.extend(ctx.response_headers)
        self.stats["ok"] += 1
        ctx.reply(200, "OK", headers)
        # After the answer, so that listeners (msilo delivering stored messages) act on a
        # phone that already knows it is registered.
        bus = self.location.bus
        for event in change.events(aor, bus.listens):
            bus.emit(event)
        return True


class LocationLookup:
    """LOCATION stage handler: ``pipeline.add(Stage.LOCATION, lookup)``, before the gateways.

    For a Request-URI ``sip:user@<our domain>``: live bindings become ``ctx.targets`` (best q
    first) and ``ctx.attrs["location"] = "found"``; otherwise ``"offline"`` for a subscriber
    and ``"unknown"`` for anyone else.  ``ctx.attrs["aor"]`` holds the AoR.  Always returns
    False: answering 480/404, storing messages and trying gateways belong to later handlers.
    Requests for other domains, without a user part, or with a tel: URI are left untouched.
    """

    def __init__(
        self,
        location: LocationService,
        subscribers: SubscriberStore,
        domains: Iterable[str],
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.location = location
        self.subscribers = subscribers
        self.aliases = {a.lower(): d.lower() for a, d in (aliases or {}).items()}
        self.domains = frozenset(d.lower() for d in domains) | frozenset(self.aliases)

    def __call__(self, ctx: RequestContext) -> bool | Awaitable[bool]:
        try:
            uri = ctx.request.request_uri
        except SipParseError as exc:
            return ctx.reply(exc.status, exc.reason, exc.headers)
        if not isinstance(uri, SipUri) or not uri.user:
            return False
        host = uri.host.lower()
        if host not in self.domains:
            return False
        host = _canonical(host, self.aliases)
        aor = canonical_aor(uri, self.aliases)
        attrs = ctx.attrs
        attrs["aor"] = aor
        bindings = self.location.lookup(aor)
        if bindings:
            now = self.location.clock()
            targets = [
                Target(b.contact, b.source, b.q, b.path) for b in bindings if b.expires_at > now
            ]
            if targets:
                if len(targets) > 1:
                    targets.sort(key=_minus_q)  # stable: equal q keep registration order
                ctx.targets = targets
                attrs["location"] = "found"
                return False
        return coro.apply(self.subscribers.get(uri.user, host), partial(_offline_or_unknown, ctx))


def _offline_or_unknown(ctx: RequestContext, subscriber: Subscriber | None) -> bool:
    ctx.attrs["location"] = "offline" if subscriber is not None else "unknown"
    return False


def _minus_q(target: Target) -> float:
    return -target.q


def _canonical(host: str, aliases: Mapping[str, str]) -> str:
    host = host.lower()
    return aliases.get(host, host)


def canonical_aor(uri: SipUri, aliases: Mapping[str, str]) -> str:
    """:func:`aor_of` with an alias host (``127.0.0.1``) replaced by its domain."""
    aor = aor_of(uri)
    host = uri.host.lower()
    if host in aliases:
        return aor[: len(aor) - len(host)] + aliases[host]
    return aor
