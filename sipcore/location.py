"""The location service: bindings of addresses-of-record to contacts (RFC 3261 §10, §16.5).

A REGISTER (:mod:`sipcore.registrar`) creates, refreshes and removes *bindings*; the proxy's
LOCATION stage turns a Request-URI naming a local address-of-record into the contacts bound to
it.  Each :class:`Binding` also records the transport address the REGISTER came from
(RFC 3581 §4, RFC 3261 §18.2.1): requests for the contact are sent there, which is what
reaches a phone behind NAT, and the RFC 3327 Path the REGISTER collected.

Theory of operation
-------------------
*Memory is a cache, the database is the truth* (ARCHITECTURE.md principle 5).  Every binding
lives in ``dict[aor, tuple[Binding, ...]]``: a lookup is one dict probe returning a tuple that
is never mutated (a change installs a new tuple), so the hot path allocates nothing.  A second
dict indexes bindings by contact URI for in-dialog requests whose Request-URI is a contact.

*Writes go through, in groups.*  :meth:`LocationService.update` lets the caller plan a change
against the current bindings of one AoR, queues the rows to write and waits until they are
committed; only then is the change installed in memory and the caller told, so a 200 OK never
claims a binding the database does not hold (RFC 3261 §10.3: "The binding updates MUST be
committed ... if and only if all binding updates and additions succeed").  Queued changes are
flushed together -- one SQL statement (data-modifying CTEs over ``unnest`` arrays, so one round
trip and one implicit transaction) for everything queued -- whenever no flush is running, after
``flush_delay`` or as soon as ``max_batch`` are queued.  While a flush is in flight the next
batch accumulates, so the batch size follows the load.  A failed flush fails every change in
it (:class:`LocationWriteError`; the registrar answers 500) and leaves memory as it was.

*One change per AoR at a time.*  A planned change holds its AoR until its flush completed
(``_inflight``); a second REGISTER for the same AoR waits for it and then plans against the
result (later ones queue in arrival order behind a per-AoR lock, which exists only while an
AoR has more than one update; the first plans at once).  This is what lets a plan read
memory without a lock, keeps an AoR's rows out of two sub-statements of one flush
(PostgreSQL leaves the order of two modifications of one row in a statement undefined) and
keeps replies in CSeq order.

*Expiry* uses a heap of ``(time, aor, contact)`` for the bindings due within a horizon a
minute or two ahead, and one ``call_later`` at the earliest entry.  Each binding's ``_sched``
is when expiry looks at it next; every binding with ``_sched`` up to the horizon has exactly
one live entry.  A scan every ``_SCAN_INTERVAL`` moves the horizon on and pushes the entries
of the bindings that came within it, so the heap holds a few percent of the bindings (phones
register for an hour and refresh long before): a tuple per binding cost 80 bytes of the
memory target.  A refresh does not push: the new binding inherits the pending entry, and
when that entry comes due early it is re-pushed at the binding's real expiry (if that is
within the horizon; otherwise a later scan pushes it).  So the heap does not grow however
often phones refresh.  An expired binding leaves memory at once and is deleted from the
database by a conditional ``DELETE ... WHERE expires_at <= <what we saw>`` in the next flush;
the node whose delete removed the row emits :class:`ContactExpired`, so with several nodes
the event is raised once.

*Memory per binding* is a target of its own (< 1 KB per registered phone, issue 3).  Strings
that repeat across bindings are one object: the AoR string is the ``_by_aor`` key and every
binding's ``aor``, the contact string the ``_by_contact`` key; user agents, transport names,
source hosts and whole source addresses (many phones behind one NAT or edge proxy) are shared
through small bounded caches; ``q`` 1.0 is one float.  Start-up streams the rows through a
cursor rather than fetching them all, so the transient records of 100,000 rows do not leave
freed holes between the bindings that stay.

*Other nodes* (and the worker processes of one node) learn of changes by ``NOTIFY
location_changed`` with the AoR as payload, sent by the flush in its own transaction, and reload
that AoR.  A plain refresh (same contacts from the same source and Call-ID: most REGISTERs)
carries its new expiry, CSeq and time in the payload, and any other REGISTER change (a new
contact, one from a new source, a removal) carries the bindings it wrote and the contacts it
removed (JSON): both are applied without a query.  Only expiry, ``Contact: *``/administrative
removal and a change too large for a notification are reloaded.
Notifications from our own flushes are recognised by the backend pid and skipped.
The listening connection is the process's one :class:`sipcore.pglisten.NotifyHub`, shared
with the other caches; if it is lost, a new one is opened and everything is reloaded.

This module is compiled with mypyc (:data:`sipcore.COMPILED`), so it defines no coroutine:
the service's methods that wait return coroutines of :mod:`sipcore.location_io`, which also
holds the SQL of the flush and of loading.

Events are emitted by the node that made the change: the registrar emits the events of its
REGISTER after it has answered (:meth:`BindingChange.events`), this service emits those of
expiry and administrative removal.  A reload caused by another node that changes which contacts
an AoR has emits only :class:`ContactsReloaded` (for per-node state such as presence watchers).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from sipcore import location_io
from sipcore.errors import SipParseError
from sipcore.headers import split_values
from sipcore.pglisten import NotifyHub, Subscription
from sipcore.pipeline import EventBus
from sipcore.transport_types import Peer
from sipcore.uri import SipUri, TelUri, parse_uri

__all__ = [
    "Binding",
    "BindingChange",
    "ContactExpired",
    "ContactRefreshed",
    "ContactRegistered",
    "ContactRemoved",
    "LocationEvent",
    "LocationService",
    "LocationWriteError",
    "aor_of",
]

log = logging.getLogger("sipcore.location")


def aor_of(uri: str | SipUri | TelUri) -> str:
    """The canonical address-of-record of a SIP URI: ``sip:user@domain``.

    RFC 3261 §10.3 step 5 canonicalises the To URI of a REGISTER ("all URI parameters MUST be
    removed ... and all escaped characters MUST be converted to their unescaped form"); the
    registrar, the location lookup and every module key bindings by this string.  The scheme
    is always ``sip`` (a ``sips:`` AoR names the same user), the domain is lower-cased, port,
    parameters and headers are dropped, and the user part keeps its case (§19.1.4) and the one
    canonical escaping :class:`~sipcore.uri.SipUri` writes.  A URI without user part gives
    ``sip:domain``.  Raises :class:`~sipcore.errors.SipParseError` for text that is not a
    SIP/SIPS URI, ``ValueError`` for a TEL URI (it has no domain).
    """
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if isinstance(parsed, TelUri):
        raise ValueError(f"a tel: URI has no address-of-record: {parsed}")
    user = parsed.user
    if user is not None and user.isascii() and user.isalnum():
        # The usual case (numbers, plain names): nothing to escape, skip the general path.
        return f"sip:{user}@{parsed.host.lower()}"
    aor = parsed.aor  # scheme:user@host, unescaped then canonically escaped, host lower-cased
    return aor if parsed.scheme == "sip" else "sip" + aor[len(parsed.scheme) :]


class Binding:
    """One contact bound to an AoR.  Treat as immutable: a refresh creates a new Binding.

    ``expires_at`` and ``received_at`` are wall-clock seconds (``time.time()``), the same on
    every node.  ``source`` is the transport address the REGISTER came from.  ``path`` holds
    the RFC 3327 Path values of that REGISTER (each one a name-addr, first = nearest to us).
    ``instance`` is the RFC 5626 ``+sip.instance`` value as written, ``reg_id`` its reg-id.
    """

    __slots__ = (
        "_sched",
        "aor",
        "call_id",
        "contact",
        "cseq",
        "expires_at",
        "instance",
        "path",
        "q",
        "received_at",
        "reg_id",
        "source",
        "user_agent",
    )

    aor: str
    contact: str
    source: Peer
    expires_at: float
    q: float
    call_id: str
    cseq: int
    path: tuple[str, ...]
    user_agent: str
    instance: str | None
    reg_id: int | None
    received_at: float
    _sched: float  # when expiry looks at this binding next (its heap entry, if in the horizon)

    def __init__(
        self,
        aor: str,
        contact: str,
        source: Peer,
        expires_at: float,
        *,
        q: float = 1.0,
        call_id: str = "",
        cseq: int = 0,
        path: tuple[str, ...] = (),
        user_agent: str = "",
        instance: str | None = None,
        reg_id: int | None = None,
        received_at: float = 0.0,
    ) -> None:
        self.aor = aor
        self.contact = contact
        self.source = source
        self.expires_at = expires_at
        self.q = q
        self.call_id = call_id
        self.cseq = cseq
        self.path = path
        self.user_agent = user_agent
        self.instance = instance
        self.reg_id = reg_id
        self.received_at = received_at
        self._sched = expires_at

    def expires_in(self, now: float) -> int:
        """Whole seconds left at ``now`` (rounded, never negative): the 200 OK's ``expires``."""
        left = int(self.expires_at - now + 0.5)
        return left if left > 0 else 0

    def as_dict(self, now: float) -> dict[str, Any]:
        """Plain data for the control socket and logs (msgpack/JSON friendly)."""
        return {
            "aor": self.aor,
            "contact": self.contact,
            "source": str(self.source),
            "expires": self.expires_in(now),
            "expires_at": self.expires_at,
            "q": self.q,
            "call_id": self.call_id,
            "cseq": self.cseq,
            "path": list(self.path),
            "user_agent": self.user_agent,
            "instance": self.instance,
            "reg_id": self.reg_id,
            "received_at": self.received_at,
        }

    def __repr__(self) -> str:
        return (
            f"Binding({self.aor!r}, {self.contact!r}, source={self.source}, "
            f"expires_at={self.expires_at:.3f}, q={self.q}, cseq={self.cseq})"
        )


# ------------------------------------------------------------------------------------- events


@dataclass(init=False, unsafe_hash=True, slots=True)
class _BindingEvent:
    """What the events of one binding carry: its AoR and the binding.  Listeners subscribe to
    the subclasses (:meth:`EventBus.emit` goes by the exact type)."""

    aor: Final[str]
    binding: Final[Binding]

    def __init__(self, aor: str, binding: Binding) -> None:
        self.aor = aor
        self.binding = binding


@dataclass(init=False, unsafe_hash=True, slots=True)
class ContactRegistered(_BindingEvent):
    """A REGISTER bound a contact that was not bound to the AoR before."""


@dataclass(init=False, unsafe_hash=True, slots=True)
class ContactRefreshed(_BindingEvent):
    """A REGISTER renewed (or changed) an existing binding; ``binding`` is the new one."""


@dataclass(init=False, unsafe_hash=True, slots=True)
class ContactRemoved(_BindingEvent):
    """A binding was removed before it expired: Expires 0, ``Contact: *``, or ``remove()``."""


@dataclass(init=False, unsafe_hash=True, slots=True)
class ContactExpired(_BindingEvent):
    """A binding's expiry time passed without a refresh (raised by the node that deleted it)."""


@dataclass(init=False, unsafe_hash=True, slots=True)
class ContactsReloaded:
    """Another node (or worker process) changed which contacts the AoR has, seen here by
    reloading it after its ``location_changed`` notification. ``bindings`` are the new set.
    It does not repeat that node's events (msilo must deliver once); it lets state that is
    per node, such as presence subscriptions, follow changes made elsewhere."""

    aor: Final[str]
    bindings: Final[tuple[Binding, ...]]

    def __init__(self, aor: str, bindings: tuple[Binding, ...]) -> None:
        self.aor = aor
        self.bindings = bindings


LocationEvent = (
    ContactRegistered | ContactRefreshed | ContactRemoved | ContactExpired | ContactsReloaded
)


class LocationWriteError(Exception):
    """The database did not commit a change; it was not applied (answer 500)."""


@dataclass(init=False, slots=True)
class BindingChange:
    """A planned (then committed) change of one AoR's bindings.

    ``bindings`` is the complete set after the change, in the order the 200 OK lists them;
    ``added``/``refreshed``/``removed`` say what differs from before (a refreshed binding is the
    new object that replaces the one with the same contact).  ``remove_all`` deletes every
    stored row of the AoR, also rows another node wrote that this one has not loaded yet.
    """

    bindings: tuple[Binding, ...]
    added: tuple[Binding, ...]
    refreshed: tuple[Binding, ...]
    removed: tuple[Binding, ...]
    remove_all: bool

    def __init__(
        self,
        bindings: tuple[Binding, ...],
        added: tuple[Binding, ...] = (),
        refreshed: tuple[Binding, ...] = (),
        removed: tuple[Binding, ...] = (),
        remove_all: bool = False,
    ) -> None:
        self.bindings = bindings
        self.added = added
        self.refreshed = refreshed
        self.removed = removed
        self.remove_all = remove_all

    @property
    def changed(self) -> bool:
        return bool(self.added or self.refreshed or self.removed or self.remove_all)

    def events(self, aor: str,
               wanted: Callable[[type[Any]], bool] | None = None) -> list[LocationEvent]:
        """The events this change raises, removals first; with ``wanted`` (e.g.
        :meth:`EventBus.listens`) only those of the kinds it accepts, so a refresh builds no
        ContactRefreshed that nobody listens to."""
        out: list[LocationEvent] = []
        if self.removed and (wanted is None or wanted(ContactRemoved)):
            out += [ContactRemoved(aor, b) for b in self.removed]
        if self.added and (wanted is None or wanted(ContactRegistered)):
            out += [ContactRegistered(aor, b) for b in self.added]
        if self.refreshed and (wanted is None or wanted(ContactRefreshed)):
            out += [ContactRefreshed(aor, b) for b in self.refreshed]
        return out


Plan = Callable[[tuple[Binding, ...]], BindingChange | None]
#: ``update_soon``'s callback: the change, and None or the LocationWriteError.
Committed = Callable[[BindingChange, "LocationWriteError | None"], None]


class _Op:
    """One AoR's queued write: a committed-on-success change, or expired rows to delete."""

    __slots__ = ("aor", "change", "committed", "done", "expired", "waiter")

    def __init__(
        self,
        aor: str,
        change: BindingChange | None,
        expired: tuple[Binding, ...],
        done: asyncio.Future[None],
        waiter: asyncio.Future[None] | None = None,
        committed: Committed | None = None,
    ) -> None:
        self.aor = aor
        self.change = change
        self.expired = expired
        #: Set when the write is over, either way (never an exception): the AoR's in-flight
        #: marker, which the next update or reload of the AoR waits for.
        self.done = done
        #: The updating caller's own future (result, or LocationWriteError).  Cancelling the
        #: caller cancels only this, so the marker still holds the next update back until
        #: the queued change is written.
        self.waiter = waiter
        #: Or the updating caller's callback (:meth:`LocationService.update_soon`).
        self.committed = committed

    def finish(self, error: LocationWriteError | None = None) -> None:
        if not self.done.done():
            self.done.set_result(None)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
        committed = self.committed
        if committed is not None and self.change is not None:
            self.committed = None
            try:
                committed(self.change, error)
            except Exception:
                # The caller's bug must not stop the flush that called it.
                log.exception("event=location_callback_failed aor=%s", self.aor)


# Strings repeated across many bindings (transport names, user agents) are shared, not copied
# per binding: the memory target is < 1 KB per binding.
_SHARED_MAX: Final = 4096
# Source addresses and hosts: many phones behind one NAT share a host, all phones behind an
# edge proxy one address.  Most sources are distinct, so these caches start over when full
# (their entries are mostly the objects live bindings hold anyway: a full cache costs its dict).
_SOURCES_MAX: Final = 4096
#: The one ``q`` float of the bindings without a q-value (nearly all), when this module runs
#: as Python; compiled, a float attribute is a C double inside the object.
_Q_DEFAULT: Final = 1.0
#: Seconds between the scans that push the heap entries of bindings due within twice this.
#: A scan looks at every binding (some milliseconds for 100,000); the heap holds the bindings
#: due within the horizon, 2 * 60 s of the usual 3,600 s registrations.
_SCAN_INTERVAL: Final = 60.0
#: Longest ``location_changed`` payload sent (PostgreSQL allows 8,000 bytes).
_NOTICE_MAX: Final = 7000


class LocationService:
    """In-memory bindings with write-through to PostgreSQL, expiry and multi-node sync.

    ``pool`` is an asyncpg pool on a database migrated with ``0002_location.sql``; ``bus``
    receives :class:`ContactExpired` and :class:`ContactRemoved` raised here.  ``clock`` is
    wall-clock seconds (``time.time``; expiry times are shared with other nodes).
    ``flush_delay`` (seconds) lets a few changes gather before a flush when none is running;
    ``max_batch`` caps a flush.  ``notify`` sends ``NOTIFY location_changed`` for other nodes;
    a single-node deployment may switch it off (NOTIFY serialises commits in PostgreSQL).
    ``write_timeout`` bounds one flush, connecting included.
    """

    CHANNEL: Final = "location_changed"

    def __init__(
        self,
        pool: asyncpg.Pool,
        bus: EventBus,
        *,
        clock: Callable[[], float] = time.time,
        flush_delay: float = 0.0,
        max_batch: int = 500,
        notify: bool = True,
        write_timeout: float = 5.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be positive")
        if flush_delay < 0 or write_timeout <= 0:
            raise ValueError("flush_delay must not be negative, write_timeout must be positive")
        self.pool = pool
        self.bus = bus
        self.clock = clock
        self.flush_delay = flush_delay
        self.max_batch = max_batch
        self.notify = notify
        self.write_timeout = write_timeout
        self._by_aor: dict[str, tuple[Binding, ...]] = {}
        self._by_contact: dict[str, Binding] = {}
        self._count = 0
        self._heap: list[tuple[float, str, str]] = []  # (_sched, aor, contact)
        # Every binding with _sched <= _horizon has a live heap entry; the scan at _scan_at
        # moves the horizon on.
        self._scan_at = clock() + _SCAN_INTERVAL
        self._horizon = self._scan_at + _SCAN_INTERVAL
        self._expiry_handle: asyncio.TimerHandle | None = None
        self._expiry_at: float | None = None
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._aor_locks: dict[str, location_io.AorLock] = {}
        self._queue: list[_Op] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._own_pids: set[int] = set()
        self._subscription: Subscription | None = None  # listening for other nodes' changes
        self._reloads: dict[str, bool] = {}  # aor -> reload again when the current one ends
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shared: dict[str, str] = {}
        self._hosts: dict[str, str] = {}
        self._sources: dict[Peer, Peer] = {}
        self._closed = False
        # The loop of the first update; asyncio.get_running_loop() costs a getpid() system
        # call per use on Python 3.11, once or twice per REGISTER otherwise.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats: dict[str, int] = {
            "flushes": 0,
            "flushed_ops": 0,
            "flush_errors": 0,
            "expired": 0,
            "reloads": 0,
            "remote_refreshes": 0,
            "remote_changes": 0,
            "resyncs": 0,
        }

    # ------------------------------------------------------------------------- reading
    def lookup(self, aor: str) -> tuple[Binding, ...]:
        """The bindings of ``aor`` (canonical, see :func:`aor_of`); ``()`` when none.

        May include a binding whose expiry is due within the timer's latency; callers that
        route compare ``expires_at`` with the clock.
        """
        return self._by_aor.get(aor, ())

    def lookup_contact(self, uri: str) -> Binding | None:
        """The binding whose contact URI is exactly ``uri`` (e.g. an in-dialog Request-URI).

        Contacts are compared as text, as the registrar does.  If two AoRs bound the same
        contact URI, the one written last is found; removing that one unindexes the contact
        until the other binding is next refreshed.
        """
        return self._by_contact.get(uri)

    @property
    def aor_count(self) -> int:
        return len(self._by_aor)

    @property
    def binding_count(self) -> int:
        return self._count

    def aors(self) -> list[str]:
        return list(self._by_aor)

    def dump(self, aor: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """All bindings (or those of ``aor``) as plain data, keyed by AoR (``ul.dump``)."""
        now = self.clock()
        items = self._by_aor.items() if aor is None else [(aor, self._by_aor.get(aor, ()))]
        return {a: [b.as_dict(now) for b in bs] for a, bs in items if bs}

    def busy(self, aor: str) -> bool:
        """Whether a change of ``aor`` is being written or reloaded right now."""
        return aor in self._inflight

    # ------------------------------------------------------------------------- writing
    def update(self, aor: str, plan: Plan) -> Coroutine[Any, Any, BindingChange]:
        """Plan a change of ``aor``'s bindings against the current ones and commit it.

        ``plan(current)`` runs synchronously once this AoR has no other change in flight; it
        returns the :class:`BindingChange` to make, or None for no change, or raises (nothing
        is written; the exception propagates).  Returns once the change is committed and
        installed in memory (None from ``plan`` returns the current bindings unchanged).
        Raises :class:`LocationWriteError` if the write failed; then nothing changed.  The
        caller emits :meth:`BindingChange.events` (after it has answered the REGISTER).
        Updates of one AoR are planned one at a time, in the order they were called.
        """
        return location_io.update(self, aor, plan)

    def update_soon(self, aor: str, plan: Plan,
                    committed: Committed) -> tuple[BindingChange, bool] | None:
        """:meth:`update` without a coroutine, for most updates: those of an AoR that no other
        update holds.  None when the AoR is held: nothing was planned, use :meth:`update`.

        Otherwise ``plan`` runs now (its exception propagates; nothing is written) and the
        change comes back with whether it was queued for writing.  If it was, the flush calls
        ``committed(change, None)`` once it is committed and installed, or
        ``committed(change, LocationWriteError)``, synchronously (so the caller answers in
        the flush's own event-loop turn); if not, ``committed`` is never called.
        """
        if aor in self._aor_locks or aor in self._inflight:
            return None
        change, write = self._plan(aor, plan)
        if write:
            done: asyncio.Future[None] = self._running_loop().create_future()
            self._enqueue(_Op(aor, change, (), done, None, committed))
        return change, write

    def _plan_and_queue(
        self, aor: str, plan: Plan
    ) -> tuple[BindingChange, asyncio.Future[None] | None]:
        """:meth:`update` once the AoR is free: the change, and the future that its write
        resolves (None when nothing is to be written)."""
        change, write = self._plan(aor, plan)
        if not write:
            return change, None
        loop = self._running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._enqueue(_Op(aor, change, (), loop.create_future(), waiter))
        return change, waiter

    def _plan(self, aor: str, plan: Plan) -> tuple[BindingChange, bool]:
        """``plan`` against the AoR's bindings: the change, and whether it is to be written."""
        current = self._by_aor.get(aor, ())
        change = plan(current)
        if change is None or not change.changed:
            return (change if change is not None else BindingChange(current)), False
        if change.remove_all and (change.added or change.refreshed):
            # One statement must not both delete and upsert an AoR's rows (order undefined).
            raise ValueError("remove_all cannot be combined with added or refreshed bindings")
        if self._closed:
            raise LocationWriteError("location service is closed")
        return change, True

    def remove(self, aor: str) -> Coroutine[Any, Any, int]:
        """Remove every binding of ``aor`` (``ul.rm``); returns how many were in memory.

        Raises :class:`ContactRemoved` for each and deletes all of the AoR's rows, also those
        this node has not loaded.
        """
        return location_io.remove(self, aor)

    @staticmethod
    def _remove_all_plan(current: tuple[Binding, ...]) -> BindingChange:
        return BindingChange((), removed=current, remove_all=True)

    def _emit_change(self, aor: str, change: BindingChange) -> None:
        bus = self.bus
        for event in change.events(aor, bus.listens):
            bus.emit(event)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _enqueue(self, op: _Op) -> None:
        self._queue.append(op)
        self._inflight[op.aor] = op.done
        if self._flush_task is not None:
            return  # the running flush takes everything queued when it is done
        if len(self._queue) >= self.max_batch or self.flush_delay <= 0:
            if self._flush_handle is not None and len(self._queue) >= self.max_batch:
                self._flush_handle.cancel()
                self._flush_handle = None
            if self._flush_handle is None:
                self._flush_handle = self._running_loop().call_soon(self._start_flush)
        elif self._flush_handle is None:
            self._flush_handle = self._running_loop().call_later(
                self.flush_delay, self._start_flush
            )

    def _start_flush(self) -> None:
        self._flush_handle = None
        if self._flush_task is None and self._queue:
            self._flush_task = self._running_loop().create_task(location_io.flush_loop(self))

    def _take_batch(self) -> list[_Op]:
        """The next flush's ops, out of the queue (empty when nothing is queued)."""
        batch = self._queue[: self.max_batch]
        del self._queue[: self.max_batch]
        return batch

    def _flush_now(self) -> None:
        """Start the flush a timer is waiting for (closing)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
            self._start_flush()

    def _flush_json(self, batch: list[_Op]) -> str:
        """``batch`` as ``location_io.FLUSH_SQL``'s parameter: ``[upserts, deletes, AoRs to clear,
        expiry deletes, notifications]`` (upserts are :func:`_row_json` rows).  Each op's
        rows are encoded once, for the document and for its notification."""
        # Each part is built as the JSON text of its elements (JSONEncoder's Python layers
        # cost more than these small arrays).
        upserts: list[str] = []  # each op's rows, encoded, without the outer brackets
        deletes: list[str] = []
        cleared: list[str] = []
        expired: list[str] = []
        notices: list[str] = []
        s = _json_str
        for op in batch:
            change = op.change
            aor = s(op.aor)
            rows = ""
            if change is not None:
                if change.added or change.refreshed:
                    inner = ",".join([*map(_row_json, change.added),
                                      *map(_row_json, change.refreshed)])
                    upserts.append(inner)
                    rows = f"[{inner}]"
                if change.remove_all:
                    cleared.append(aor)
                else:
                    deletes += [f"[{aor},{s(b.contact)}]" for b in change.removed]
            expired += [f"[{aor},{s(b.contact)},{_json_float(b.expires_at)}]" for b in op.expired]
            if self.notify:
                notices.append(s(self._notice(op, rows or "[]")))
        return (f"[[{','.join(upserts)}],[{','.join(deletes)}],[{','.join(cleared)}],"
                f"[{','.join(expired)}],[{','.join(notices)}]]")

    def _notice(self, op: _Op, rows: str) -> str:
        """The ``location_changed`` payload for ``op``: the AoR (other nodes reload it), or
        for a plain refresh -- the same contacts from the same place, only expiry, CSeq and
        time received new, which is most REGISTERs -- the AoR followed by those fields
        (``aor TAB R (TAB contact TAB expires_at TAB cseq TAB received_at)...``), or for any
        other REGISTER change ``aor TAB D TAB [[removed contact, ...], rows]`` with ``rows``
        the :func:`_row_json` of the bindings written, as JSON (ASCII, no tab), so other
        nodes apply it without a query."""
        change = op.change
        if change is None or op.expired or change.remove_all or "\t" in op.aor:
            return op.aor
        text = None
        if change.refreshed and not (change.added or change.removed):
            text = self._refresh_notice(op.aor, change)
        if text is None:
            removed = _compact_json([b.contact for b in change.removed]) if change.removed else "[]"
            text = f"{op.aor}\tD\t[{removed},{rows}]"
        return text if len(text.encode()) < _NOTICE_MAX else op.aor

    def _refresh_notice(self, aor: str, change: BindingChange) -> str | None:
        before = {b.contact: b for b in self._by_aor.get(aor, ())}
        parts = [aor, "R"]
        for b in change.refreshed:
            old = before.get(b.contact)
            if (old is None or "\t" in b.contact or old.call_id != b.call_id
                    or old.source != b.source or old.q != b.q or old.path != b.path
                    or old.user_agent != b.user_agent or old.instance != b.instance
                    or old.reg_id != b.reg_id):
                return None
            parts += (b.contact, repr(b.expires_at), str(b.cseq), repr(b.received_at))
        text = "\t".join(parts)
        return text if len(text.encode()) < _NOTICE_MAX else None

    def _commit(self, batch: list[_Op], deleted: set[tuple[str, str]]) -> None:
        """``batch`` was written; ``deleted`` are the expired rows its DELETE removed."""
        self.stats["flushes"] += 1
        self.stats["flushed_ops"] += len(batch)
        # The whole batch is in memory before any caller hears of its change: a callback
        # answers right here (update_soon), and what it triggers may read other AoRs.
        for op in batch:
            if op.change is not None:
                self._install(op.aor, op.change.bindings)
            if self._inflight.get(op.aor) is op.done:
                del self._inflight[op.aor]
        for op in batch:
            op.finish()
            for b in op.expired:
                # Only the node whose DELETE removed the row raises the event.
                if (op.aor, b.contact) in deleted:
                    self.bus.emit(ContactExpired(op.aor, b))
        self._arm_expiry()

    def _fail(self, batch: list[_Op], exc: BaseException) -> None:
        """Writing ``batch`` raised ``exc``: nothing of it was committed."""
        self.stats["flush_errors"] += 1
        log.error("event=location_flush_failed ops=%d error=%s", len(batch), type(exc).__name__)
        error = LocationWriteError(f"location write failed: {type(exc).__name__}: {exc}")
        for op in batch:
            if self._inflight.get(op.aor) is op.done:
                del self._inflight[op.aor]
            if op.expired:
                # Already out of memory; the row stays in the database, expired, which every
                # reader ignores and start-up deletes.  Listeners still need to hear of it.
                for b in op.expired:
                    self.bus.emit(ContactExpired(op.aor, b))
                op.finish()
            else:
                op.finish(error)

    # ------------------------------------------------------------------------- memory
    def _install(self, aor: str, bindings: tuple[Binding, ...]) -> None:
        """Make ``bindings`` the AoR's set: contact index and expiry heap follow."""
        old = self._by_aor.get(aor, ())
        if old and old[0].aor == aor:
            aor = old[0].aor  # the key string
        index = self._by_contact
        for b in old:
            if index.get(b.contact) is b:
                del index[b.contact]
        horizon = self._horizon
        for b in bindings:
            index[b.contact] = b
            if b in old:
                continue
            if b.aor is not aor and b.aor == aor:
                b.aor = aor  # one string per AoR
            b.source = self._share_source(b.source)
            previous = next((o for o in old if o.contact == b.contact), None)
            if (previous is not None and previous._sched <= horizon
                    and previous._sched <= b.expires_at):
                # The pending heap entry comes due no later than this binding: inherit it
                # (it is re-pushed at the real expiry when it fires).
                b._sched = previous._sched
            else:
                b._sched = b.expires_at
                if b.expires_at <= horizon:
                    heapq.heappush(self._heap, (b.expires_at, aor, b.contact))
        self._count += len(bindings) - len(old)
        if bindings:
            self._by_aor[aor] = bindings
        else:
            self._by_aor.pop(aor, None)

    def _shared_str(self, text: str) -> str:
        shared = self._shared.get(text)
        if shared is not None:
            return shared
        if len(self._shared) < _SHARED_MAX:
            self._shared[text] = text
        return text

    def _share_source(self, source: Peer) -> Peer:
        """``source``, or an equal Peer already held; its host and transport shared too."""
        sources = self._sources
        shared = sources.get(source)
        if shared is not None:
            return shared
        if len(sources) >= _SOURCES_MAX:
            sources.clear()
        transport = self._shared_str(source.transport)
        hosts = self._hosts
        host = hosts.get(source.host)
        if host is None:
            if len(hosts) >= _SOURCES_MAX:
                hosts.clear()
            host = hosts[source.host] = source.host
        if transport is not source.transport or host is not source.host:
            source = Peer(transport, host, source.port)
        sources[source] = source
        return source

    def binding_from_row(self, row: Any) -> Binding:
        """A :class:`Binding` from a ``location`` row (``location_io.SELECT_COLUMNS``)."""
        shared = self._shared_str
        path_text: str = row["path"]
        q: float = row["q"]
        return Binding(
            row["aor"],
            row["contact"],
            self._share_source(Peer(row["transport"], row["source_host"], row["source_port"])),
            row["expires_at"],
            q=_Q_DEFAULT if q == _Q_DEFAULT else q,
            call_id=row["call_id"],
            cseq=row["cseq"],
            path=tuple(split_values(path_text)) if path_text else (),
            user_agent=shared(row["user_agent"]),
            instance=row["instance"],
            reg_id=row["reg_id"],
            received_at=row["received_at"],
        )

    def shared_user_agent(self, text: str) -> str:
        """``text``, or an equal string already held (user agents repeat across phones)."""
        return self._shared_str(text)

    # ------------------------------------------------------------------------- expiry
    def _arm_expiry(self) -> None:
        if self._closed:
            return
        heap = self._heap
        if heap:
            due = heap[0][0]
            if self._count and self._scan_at < due:
                due = self._scan_at
        elif self._count:
            due = self._scan_at  # nothing due within the horizon: move it on then
        else:
            if self._expiry_handle is not None:
                self._expiry_handle.cancel()
                self._expiry_handle = self._expiry_at = None
            return
        if self._expiry_at is not None and self._expiry_at <= due:
            return
        if self._expiry_handle is not None:
            self._expiry_handle.cancel()
        loop = asyncio.get_running_loop()
        self._expiry_at = due
        self._expiry_handle = loop.call_later(max(0.0, due - self.clock()), self._expire_due)

    def _scan(self, now: float) -> None:
        """Move the horizon on: push the entries of the bindings that came within it."""
        old = self._horizon
        new = max(old, now + 2 * _SCAN_INTERVAL)
        heap = self._heap
        for aor, bindings in self._by_aor.items():
            for b in bindings:
                if old < b._sched <= new:
                    heapq.heappush(heap, (b._sched, aor, b.contact))
        self._horizon = new
        self._scan_at = now + _SCAN_INTERVAL

    def _expire_due(self) -> None:
        self._expiry_handle = self._expiry_at = None
        now = self.clock()
        if now >= self._scan_at:
            self._scan(now)
        heap = self._heap
        horizon = self._horizon
        by_aor = self._by_aor
        expired: dict[str, list[Binding]] = {}
        retry: list[tuple[float, str, str]] = []
        while heap and heap[0][0] <= now:
            due, aor, contact = heapq.heappop(heap)
            binding = next((b for b in by_aor.get(aor, ()) if b.contact == contact), None)
            if binding is None or binding._sched != due:
                continue  # removed or superseded entry
            if binding.expires_at > now:
                # Refreshed since: wait for the real expiry (a later scan pushes it when it
                # comes within the horizon).
                binding._sched = binding.expires_at
                if binding.expires_at <= horizon:
                    heapq.heappush(heap, (binding.expires_at, aor, contact))
            elif aor in self._inflight:
                # A write for this AoR is in flight (it may be this binding's refresh); look
                # again shortly rather than race it.
                binding._sched = now + 0.5
                retry.append((binding._sched, aor, contact))
            else:
                expired.setdefault(aor, []).append(binding)
        for entry in retry:
            heapq.heappush(heap, entry)
        loop = asyncio.get_running_loop()
        for aor, gone in expired.items():
            keep = tuple(b for b in by_aor[aor] if b not in gone)
            self._install(aor, keep)
            self.stats["expired"] += len(gone)
            log.info("event=contact_expired aor=%s contacts=%d", aor, len(gone))
            self._enqueue(_Op(aor, None, tuple(gone), loop.create_future()))
        self._arm_expiry()

    # ------------------------------------------------------------------------- start-up
    def load(self) -> Coroutine[Any, Any, int]:
        """Load every unexpired binding (start-up); drop rows that expired meanwhile.

        Bindings that expired while no node was running are deleted without events.
        Returns the number of bindings loaded.
        """
        return location_io.load(self)

    def _announce_reload(
        self, aor: str, before: tuple[Binding, ...], after: tuple[Binding, ...]
    ) -> None:
        """ContactsReloaded when a reload changed the AoR's contacts (not for a refresh)."""
        if {b.contact for b in before} != {b.contact for b in after}:
            self.bus.emit(ContactsReloaded(aor, after))

    def _replace_all(
        self, grouped: dict[str, tuple[Binding, ...]], *, announce: bool = False
    ) -> None:
        for aor in [a for a in self._by_aor if a not in grouped and a not in self._inflight]:
            before = self._by_aor.get(aor, ())
            self._install(aor, ())
            if announce:
                self._announce_reload(aor, before, ())
        for aor, bindings in grouped.items():
            if aor not in self._inflight:
                before = self._by_aor.get(aor, ())
                self._install(aor, bindings)
                if announce:
                    self._announce_reload(aor, before, self._by_aor.get(aor, ()))
        self._arm_expiry()

    # ------------------------------------------------------------------------- other nodes
    def listen(self, hub: NotifyHub | None = None) -> Coroutine[Any, Any, None]:
        """LISTEN on ``location_changed`` (on ``hub``, the process's shared listening
        connection, or one of the service's own) so changes made by other nodes/workers show
        here; after a lost connection, everything is reloaded once a new one listens."""
        return location_io.listen(self, hub)

    @property
    def listening(self) -> bool:
        """Other nodes' changes reach this one (False before :meth:`listen` and from a lost
        connection until a new one listens and everything has been reloaded)."""
        return self._subscription is not None and self._subscription.current

    def _on_notify(self, _conn: object, pid: int, _channel: str, payload: object) -> None:
        if pid in self._own_pids or self._closed:
            return
        aor, _, change = str(payload).partition("\t")
        if aor in self._reloads:
            self._reloads[aor] = True
            return
        kind = change[:2]
        if kind == "R\t" and self._apply_refresh(aor, change):
            self.stats["remote_refreshes"] += 1
            return
        if kind == "D\t" and self._apply_delta(aor, change[2:]):
            self.stats["remote_changes"] += 1
            return
        self._reloads[aor] = False
        self._spawn(location_io.reload(self, aor))

    def _apply_delta(self, aor: str, text: str) -> bool:
        """Apply another node's change of ``aor`` (see :meth:`_notice`) in memory: its
        bindings replace or join ours, its removed contacts go.  False when it cannot be
        read or a change of ours is in flight (then the AoR is reloaded)."""
        if aor in self._inflight:
            return False
        current = self._by_aor.get(aor, ())
        key = current[0].aor if current else aor
        shared = self._shared_str
        try:
            removed, rows = json.loads(text)
            by_contact = {b.contact: b for b in current}
            for contact in removed:
                by_contact.pop(contact, None)
            for (_, contact, transport, host, port, expires_at, q, call_id, cseq, path,
                 user_agent, instance, reg_id, received_at) in rows:
                by_contact[contact] = Binding(
                    key, contact, self._share_source(Peer(transport, host, port)),
                    float(expires_at), q=_Q_DEFAULT if q == _Q_DEFAULT else float(q),
                    call_id=call_id, cseq=int(cseq),
                    path=tuple(split_values(path)) if path else (),
                    user_agent=shared(user_agent), instance=instance, reg_id=reg_id,
                    received_at=float(received_at))
        except (ValueError, TypeError, SipParseError):
            log.warning("event=location_notice_unreadable aor=%s", aor)
            return False
        after = tuple(by_contact.values())
        self._install(aor, after)
        self._announce_reload(aor, current, after)
        self._arm_expiry()
        return True

    def _apply_refresh(self, aor: str, text: str) -> bool:
        """Apply another node's plain refresh (see :meth:`_notice`) in memory; False when it
        does not fit what is here (then the AoR is reloaded)."""
        fields = text.split("\t")
        if fields[0] != "R" or len(fields) % 4 != 1 or aor in self._inflight:
            return False
        current = self._by_aor.get(aor, ())
        by_contact = {b.contact: b for b in current}
        try:
            for i in range(1, len(fields), 4):
                old = by_contact.get(fields[i])
                if old is None:
                    return False
                new = Binding(old.aor, old.contact, old.source, float(fields[i + 1]), q=old.q,
                              call_id=old.call_id, cseq=int(fields[i + 2]), path=old.path,
                              user_agent=old.user_agent, instance=old.instance,
                              reg_id=old.reg_id, received_at=float(fields[i + 3]))
                by_contact[new.contact] = new
        except ValueError:
            return False
        self._install(aor, tuple(by_contact[b.contact] for b in current))
        self._arm_expiry()
        return True

    def _reloaded(self, aor: str, rows: list[Any]) -> None:
        """Install ``rows``, the database's bindings of ``aor`` (a reload)."""
        bindings = tuple(self.binding_from_row(r) for r in rows)
        for b in bindings:
            b.aor = aor
        before = self._by_aor.get(aor, ())
        self._install(aor, bindings)
        self._announce_reload(aor, before, bindings)
        self._arm_expiry()
        self.stats["reloads"] += 1

    def resync(self) -> Coroutine[Any, Any, None]:
        """Reload every binding from the database (after a lost LISTEN connection)."""
        return location_io.resync(self)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------- shutdown
    def close(self) -> Coroutine[Any, Any, None]:
        """Write what is queued, stop the timers and the listener."""
        return location_io.close(self)

    def _stop(self) -> None:
        """Closing, once the queue is written: no more writes, no more expiry."""
        self._closed = True
        if self._expiry_handle is not None:
            self._expiry_handle.cancel()
            self._expiry_handle = self._expiry_at = None

#: json.dumps with separators builds a new encoder per call.
_compact_json: Final = json.JSONEncoder(separators=(",", ":")).encode


#: A str as a JSON string, ASCII only (what JSONEncoder writes by default); C in CPython.
_json_str: Final = json.encoder.encode_basestring_ascii


def _json_float(x: float) -> str:
    """``x`` as JSONEncoder writes a float."""
    if math.isfinite(x):
        return repr(x)
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _row_json(b: Binding) -> str:
    """One ``location`` row as a compact JSON array, in ``location_io.FLUSH_SQL``'s column
    order: aor, contact, transport, source host and port, expires_at, q, Call-ID, CSeq, Path,
    user agent, instance, reg-id, received_at.  Written directly, as ``_compact_json`` would
    write the tuple of them (its Python layers cost more than the row)."""
    source = b.source
    s = _json_str
    instance = b.instance
    reg_id = b.reg_id
    return (
        f"[{s(b.aor)},{s(b.contact)},{s(source.transport)},{s(source.host)},{source.port},"
        f"{_json_float(b.expires_at)},{_json_float(b.q)},{s(b.call_id)},{b.cseq},"
        f"{s(', '.join(b.path))},{s(b.user_agent)},{'null' if instance is None else s(instance)},"
        f"{'null' if reg_id is None else reg_id},{_json_float(b.received_at)}]"
    )
