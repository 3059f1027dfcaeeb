"""The fixed request pipeline modules plug into (ARCHITECTURE.md principle 4).

Like Kamailio's default routing script, every request that starts a server transaction walks
the same stages in the same order::

    REQINIT -> IN_DIALOG -> AUTH -> REGISTRAR -> SERVICES -> AUTHORIZE -> LOCATION -> RELAY

``REQINIT``   sanity: Max-Forwards (483), Proxy-Require (420), loops (482), own-domain checks.
``IN_DIALOG`` requests with a To tag: loose routing by Route headers (§16.4, §16.12).
``AUTH``      digest authentication of local users (401 for REGISTER, 407 otherwise).
``REGISTRAR`` REGISTER for our domains (§10).
``SERVICES``  module services that answer or divert before routing (presence SUBSCRIBE, ...).
``AUTHORIZE`` policy on the authenticated caller (credit control, locked accounts, ...).
``LOCATION``  turn the Request-URI into targets: location service, gateways (§16.5).
``RELAY``     the stateful proxy forwards to the targets (§16.6-16.7); offline/unknown answered.

A handler is ``handler(ctx) -> bool | Awaitable[bool]``: True means the request was dealt with
(answered, stored, relayed) and the walk stops; False passes it on.  A handler that finishes
from another callback (the registrar, from the location service's commit) returns a
:class:`Later` and settles it there: the walk then goes on in that callback, with no task.
Handlers registered for a stage run in registration order, optionally filtered by method.
Modules add handlers through :meth:`Pipeline.add`; the core never learns their names.

Events (:class:`EventBus`) carry what happened elsewhere: ``ContactRegistered``,
``DialogConfirmed``, ``CallEnded``... Listeners are plain callables or coroutine functions.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine, Generator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from sipcore import coro
from sipcore.message import Request
from sipcore.transport_types import Peer

if TYPE_CHECKING:
    from sipcore import transaction as txn

log = logging.getLogger("sipcore.pipeline")

__all__ = ["EventBus", "Later", "Pipeline", "RequestContext", "Stage", "Target"]


class Stage(enum.IntEnum):
    REQINIT = 0
    IN_DIALOG = 1
    AUTH = 2
    REGISTRAR = 3
    SERVICES = 4
    AUTHORIZE = 5
    LOCATION = 6
    RELAY = 7


@dataclass(init=False, slots=True)
class Target:
    """Where the proxy should send one branch (§16.5): a URI and the hop to reach it."""

    uri: str                   # the Request-URI of the branch
    dest: Peer                 # the next hop (registered source address, gateway, route)
    q: float
    path: tuple[str, ...]       # RFC 3327 Path of the binding: pushed as Route headers
    kind: str                   # contact | gateway | route
    gateway: str                # gateway name, for failover and accounting

    def __init__(
        self,
        uri: str,
        dest: Peer,
        q: float = 1.0,
        path: tuple[str, ...] = (),
        kind: str = "contact",
        gateway: str = "",
    ) -> None:
        self.uri = uri
        self.dest = dest
        self.q = q
        self.path = path
        self.kind = kind
        self.gateway = gateway


Replier = Callable[["RequestContext", int, str | None, Sequence[tuple[str, str]], bytes,
                    str | None], None]


@dataclass(init=False, slots=True)
class RequestContext:
    """One request's walk through the pipeline; modules keep their state in ``attrs``."""

    request: Request
    source: Peer
    tx: txn.TxKey
    replier: Replier
    now: float
    user: str | None                 # authenticated username (local subscriber)
    user_domain: str | None
    targets: list[Target]
    serial_targets: list[list[Target]]  # failover groups
    response_headers: list[tuple[str, str]]
    attrs: dict[str, Any]
    replied: bool
    final_status: int
    #: Answer without keeping the transaction (RFC 3261 §8.2.7; non-INVITE only): set for a
    #: challenge to a request that carried no credentials, whose retransmission may as well
    #: get a fresh challenge, so it does not linger for Timer J (32 s) in memory.
    stateless: bool

    def __init__(
        self,
        request: Request,
        source: Peer,
        tx: txn.TxKey,
        replier: Replier,
        now: float = 0.0,
        user: str | None = None,
        user_domain: str | None = None,
        targets: list[Target] | None = None,
        serial_targets: list[list[Target]] | None = None,
        response_headers: list[tuple[str, str]] | None = None,
        attrs: dict[str, Any] | None = None,
        replied: bool = False,
        final_status: int = 0,
        stateless: bool = False,
    ) -> None:
        self.request = request
        self.source = source
        self.tx = tx
        self.replier = replier
        self.now = now
        self.user = user
        self.user_domain = user_domain
        self.targets = [] if targets is None else targets
        self.serial_targets = [] if serial_targets is None else serial_targets
        self.response_headers = [] if response_headers is None else response_headers
        self.attrs = {} if attrs is None else attrs
        self.replied = replied
        self.final_status = final_status
        self.stateless = stateless

    def reply(self, status: int, reason: str | None = None,
              headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
              to_tag: str | None = None) -> bool:
        """Answer the request; returns True so a handler can ``return ctx.reply(...)``."""
        if status >= 200:
            if self.replied:
                return True
            self.replied = True
            self.final_status = status
        self.replier(self, status, reason, headers, body, to_tag)
        return True


Settled = Callable[[bool, "BaseException | None"], None]


class Later:
    """A verdict that comes after the call that returns it, handed on by a plain callback.

    What a handler returns when it finishes from another callback rather than a coroutine:
    the registrar answers from the location service's commit, and the walk goes on right
    there, with no task and no event-loop turn in between.  Settled once, by
    :meth:`resolve` or :meth:`fail`; one consumer, by :meth:`then` or by awaiting it.
    """

    __slots__ = ("_callback", "_consumed", "_outcome")

    def __init__(self) -> None:
        self._callback: Settled | None = None
        self._consumed = False
        self._outcome: tuple[bool, BaseException | None] | None = None

    @property
    def settled(self) -> bool:
        return self._outcome is not None

    def then(self, callback: Settled) -> None:
        """Call ``callback(done, error)`` once settled: now if it is."""
        if self._consumed:
            raise RuntimeError("a Later has one consumer")
        self._consumed = True
        outcome = self._outcome
        if outcome is None:
            self._callback = callback
        else:
            callback(*outcome)

    def resolve(self, done: bool) -> None:
        self._settle((done, None))

    def fail(self, error: BaseException) -> None:
        self._settle((False, error))

    def _settle(self, outcome: tuple[bool, BaseException | None]) -> None:
        if self._outcome is not None:
            raise RuntimeError("a Later is settled once")
        self._outcome = outcome
        callback = self._callback
        if callback is not None:
            self._callback = None
            callback(*outcome)

    def __await__(self) -> Generator[Any, None, bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def settled(done: bool, error: BaseException | None) -> None:
            if future.done():
                return
            if error is None:
                future.set_result(done)
            else:
                future.set_exception(error)

        self.then(settled)
        return future.__await__()


Handler = Callable[[RequestContext], "bool | Awaitable[bool]"]


@dataclass(init=False, slots=True)
class _Entry:
    handler: Handler
    methods: frozenset[str] | None
    name: str

    def __init__(self, handler: Handler, methods: frozenset[str] | None, name: str) -> None:
        self.handler = handler
        self.methods = methods
        self.name = name


class Pipeline:
    def __init__(self) -> None:
        self._stages: list[list[_Entry]] = [[] for _ in Stage]
        self._flat: tuple[_Entry, ...] = ()  # every entry in walk order
        self.errors = 0
        #: Tasks finishing a walk after a Later (rare: the registrar's ends the walk).
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, stage: Stage, handler: Handler, *, methods: Collection[str] | None = None,
            name: str = "", first: bool = False) -> None:
        entry = _Entry(handler, frozenset(m.upper() for m in methods) if methods else None,
                       name or getattr(handler, "__qualname__", repr(handler)))
        if first:
            self._stages[stage].insert(0, entry)
        else:
            self._stages[stage].append(entry)
        self._flat = tuple(e for entries in self._stages for e in entries)

    def handlers(self, stage: Stage) -> list[str]:
        return [e.name for e in self._stages[stage]]

    def run(self, ctx: RequestContext) -> Awaitable[None]:
        """Walk the stages; a handler error answers 500 instead of hanging the transaction."""
        return coro.run(partial(self.start, ctx))

    def start(self, ctx: RequestContext,
              first: int = 0) -> Coroutine[Any, Any, None] | Later | None:
        """Walk the stages (from entry ``first``) as far as the handlers answer synchronously.

        Returns None when the walk is over, or a coroutine that finishes it from the first
        handler that returned an awaitable, or a :class:`Later`, settled when the walk is
        over, from the first that returned one.  Most requests a server answers itself
        (401/407 challenges, OPTIONS, 404, in-dialog relays) never wait for anything, so they
        cost no task and no event-loop round trip; a REGISTER costs no task either.
        """
        method = ctx.request.method
        flat = self._flat
        try:
            for index in range(first, len(flat)):
                entry = flat[index]
                if entry.methods is not None and method not in entry.methods:
                    continue
                result = entry.handler(ctx)
                if not isinstance(result, bool):
                    if isinstance(result, Later):
                        return self._follow(ctx, result, index + 1)
                    return coro.resume(result, partial(self._resumed, ctx, index + 1),
                                       partial(self._failed, ctx))
                if result or ctx.replied:
                    return None
            if not ctx.replied:
                ctx.reply(500, "No Route Handler")
        except Exception:
            self._failed(ctx)
        return None

    def _resumed(self, ctx: RequestContext, index: int,
                 done: bool) -> Coroutine[Any, Any, None] | Later | None:
        """The rest of the walk, from entry ``index``, after a handler that awaited."""
        if done or ctx.replied:
            return None
        return self.start(ctx, index)

    def _follow(self, ctx: RequestContext, verdict: Later, index: int) -> Later:
        """The walk's end as a Later, once ``verdict`` settles and what follows it is done."""
        walk = Later()

        def settled(done: bool, error: BaseException | None) -> None:
            if error is not None:
                self._failed(ctx, error)
            elif not (done or ctx.replied):
                rest = self.start(ctx, index)
                if isinstance(rest, Later):
                    rest.then(lambda _done, _error: walk.resolve(True))
                    return
                if rest is not None:
                    task = asyncio.ensure_future(rest)
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    task.add_done_callback(lambda _task: walk.resolve(True))
                    return
            walk.resolve(True)

        verdict.then(settled)
        return walk

    def _failed(self, ctx: RequestContext, error: BaseException | None = None) -> None:
        self.errors += 1
        method = ctx.request.method
        log.error("event=pipeline_error method=%s call_id=%s", method, ctx.request.call_id,
                  exc_info=error if error is not None else True)
        if not ctx.replied and method != "ACK":
            ctx.reply(500, "Server Internal Error")


E = TypeVar("E")


class EventBus:
    """Synchronous fan-out of events to listeners; coroutine listeners run as tasks."""

    def __init__(self) -> None:
        self._listeners: dict[type[Any], list[Callable[[Any], Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def subscribe(self, event_type: type[E], listener: Callable[[E], Any]) -> None:
        self._listeners.setdefault(event_type, []).append(listener)

    def listens(self, event_type: type[Any]) -> bool:
        """Whether anyone subscribed to ``event_type`` (an event nobody hears need not be
        built)."""
        return event_type in self._listeners

    def emit(self, event: object) -> None:
        for listener in self._listeners.get(type(event), ()):
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
            except Exception:
                log.exception("event=listener_error event_type=%s", type(event).__name__)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=listener_error exc=%r", task.exception())

    def drain(self) -> Awaitable[None]:
        """Wait for running listener tasks (shutdown, tests)."""
        return coro.wait_for_all(self._tasks)
