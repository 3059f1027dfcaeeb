"""The stateful proxy core (RFC 3261 §16) and the transaction user that runs the pipeline.

Theory of operation
-------------------

:class:`ProxyCore` is the :class:`~sipcore.stack.TransactionUser`. Every new server transaction
becomes a :class:`~sipcore.pipeline.RequestContext` that walks the pipeline: synchronously as
far as the handlers answer without waiting (challenges, OPTIONS, 404, in-dialog relays), in a
task from the first handler that must wait (a database lookup). The context is dropped when the
final response goes out; the transaction repeats that response by itself for Timer J/L. The
core registers its own handlers at both ends of the walk:

* ``REQINIT`` (:meth:`ProxyCore._reqinit`): Max-Forwards (483, §16.3 step 3), loop detection
  (482, §16.3 step 4 / RFC 5393: our Via branch carries a hash of the request's routing
  fields, so a request that comes back unchanged is a loop and a spiral is not), Proxy-Require
  (420 with Unsupported, §16.3 step 5), and OPTIONS addressed to the server itself (200, §11,
  statelessly: §8.2.7).
* ``IN_DIALOG`` (:meth:`ProxyCore._in_dialog`): a request with a To tag follows the Route set
  (loose routing, §16.4/§16.12). It is only relayed to a peer of a dialog this proxy set up
  (:class:`DialogTable`), so in-dialog requests can't turn the server into an open relay.
* ``RELAY`` (:meth:`ProxyCore._relay`): forwards to ``ctx.targets`` in parallel (§16.6) inside a
  :class:`ResponseContext` that collects responses and picks the best (§16.7), cancels the
  other branches on a 2xx or 6xx (§16.7 step 10), runs Timer C per INVITE branch (§16.6 step
  11), and fails over to the next target group (``ctx.serial_targets``: gateways) on 408, 5xx
  or a timeout. No targets: 480 for a local user who is offline, 404 for an unknown one.
  When every branch failed, a module's ``failure_hooks`` (Kamailio's failure_route) may
  answer instead of the best response: msilo stores a MESSAGE the phone did not take.

CANCEL (§16.10) answers 200 at once and cancels every pending branch of the matching INVITE;
the downstream 487 then flows back as the best response. The ACK for a 2xx (its own
end-to-end transaction, §16.11 / §13.2.2.4) follows the dialog's route like any in-dialog
request; the ACK for a non-2xx is absorbed by the transaction layer.

Dialogs: when a 2xx to an INVITE passes, :class:`DialogTable` remembers both ends (the caller's
source address, the callee's address) keyed by Call-ID and tags, and emits
``DialogConfirmed``; a 2xx to BYE (or the BYE itself, if no answer arrives) emits
``DialogTerminated``. Billing listens to both, and can end a call with :meth:`ProxyCore.end_dialog`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Final

from sipcore import coro, workers
from sipcore import transaction as txn
from sipcore.checks import request_checks
from sipcore.errors import SipParseError
from sipcore.latency import LatencyHistogram
from sipcore.message import Request, Response, build_request, parse_message
from sipcore.pipeline import EventBus, Later, Pipeline, RequestContext, Stage, Target
from sipcore.stack import SipStack
from sipcore.transport_types import Peer
from sipcore.uri import SipUri

log = logging.getLogger("sipcore.proxy")

__all__ = [
    "CallAnswered", "CallFailed", "Dialog", "DialogConfirmed", "DialogTable", "DialogTerminated",
    "LocalIdentity", "ProxyCore", "ProxySettings", "ResponseContext",
]

SUPPORTED_EXTENSIONS = frozenset({"path", "outbound", "replaces", "norefersub"})
ALLOW = ("INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, MESSAGE, SUBSCRIBE, NOTIFY, REFER, "
         "INFO, UPDATE, PRACK")
_DIALOG_CREATING = frozenset({"INVITE", "SUBSCRIBE", "REFER"})
#: Methods with their own latency label; others are "other" (bounded label cardinality).
_KNOWN_METHODS = frozenset({
    "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "MESSAGE", "SUBSCRIBE", "NOTIFY",
    "REFER", "INFO", "UPDATE", "PRACK", "PUBLISH",
})

#: Kamailio's failure_route: every branch of a forwarded request ended without a 2xx.  Gets the
#: status that would go upstream and the best response (None: no response at all, a timeout or
#: transport failure of our own).  Returning True takes the answer over: the hook (or a task it
#: started) answers through ``ctx.reply`` -- msilo stores a MESSAGE the phone did not take.
FailureHook = Callable[[RequestContext, int, Response | None], bool]


@dataclass(frozen=True, slots=True)
class ProxySettings:
    record_route: bool = True
    timer_c: float = 180.0
    dialog_ttl: float = 12 * 3600.0  # forget a dialog whose BYE never came


class LocalIdentity:
    """Which hosts are us: the served domains and every listen address."""

    def __init__(self, domains: Iterable[str], listen: Iterable[tuple[str, str, int]],
                 advertised_host: str = "") -> None:
        self.domains = {d.lower() for d in domains}
        self.listen = list(listen)  # (transport, host, port)
        self.addresses = {(h, p) for _, h, p in self.listen}
        for _, h, _ in self.listen:
            self.domains.add(h.lower())
        self.advertised_host = advertised_host
        self.ports = {t: (advertised_host or h, p) for t, h, p in reversed(self.listen)}

    def is_local_domain(self, host: str) -> bool:
        return host.lower().strip("[]") in self.domains

    def is_me(self, host: str, port: int | None, transport: str = "UDP") -> bool:
        """True if a URI with this host/port addresses this server (for Route popping)."""
        h = host.lower().strip("[]")
        if port is None:
            return h in self.domains or any(a == h for a, _ in self.addresses)
        return (h, port) in self.addresses or (
            h in self.domains and any(p == port for _, p in self.addresses)
        )

    def sent_by(self, transport: str) -> tuple[str, int]:
        return self.ports.get(transport) or next(iter(self.ports.values()))

    def record_route_uri(self, transport: str) -> str:
        host, port = self.sent_by(transport)
        t = ";transport=tcp" if transport == "TCP" else ""
        # With several workers the URI names the one that holds the dialog (sipcore.workers).
        return f"<sip:{host}:{port}{t};lr{workers.uri_param()}>"


# ---------------------------------------------------------------------------- events


@dataclass(init=False, unsafe_hash=True, slots=True)
class Dialog:
    call_id: Final[str]
    caller_tag: Final[str]
    callee_tag: Final[str]
    caller: Final[Peer]      # where requests towards the caller go
    callee: Final[Peer]      # where requests towards the callee go
    caller_uri: Final[str]   # caller's Contact (remote target for requests to the caller)
    callee_uri: Final[str]   # callee's Contact
    caller_from: Final[str]  # From header value of the INVITE (caller identity, with tag)
    callee_to: Final[str]    # To header value of the 2xx (callee identity, with tag)
    invite_cseq: Final[int]
    created_at: Final[float]

    def __init__(
        self,
        call_id: str,
        caller_tag: str,
        callee_tag: str,
        caller: Peer,
        callee: Peer,
        caller_uri: str,
        callee_uri: str,
        caller_from: str,
        callee_to: str,
        invite_cseq: int,
        created_at: float | None = None,
    ) -> None:
        self.call_id = call_id
        self.caller_tag = caller_tag
        self.callee_tag = callee_tag
        self.caller = caller
        self.callee = callee
        self.caller_uri = caller_uri
        self.callee_uri = callee_uri
        self.caller_from = caller_from
        self.callee_to = callee_to
        self.invite_cseq = invite_cseq
        self.created_at = time.time() if created_at is None else created_at


@dataclass(init=False, unsafe_hash=True, slots=True)
class DialogConfirmed:
    dialog: Final[Dialog]
    request: Final[Request]    # the initial INVITE
    response: Final[Response]  # the 2xx
    ctx: Final[RequestContext]

    def __init__(
        self,
        dialog: Dialog,
        request: Request,
        response: Response,
        ctx: RequestContext,
    ) -> None:
        self.dialog = dialog
        self.request = request
        self.response = response
        self.ctx = ctx


@dataclass(init=False, unsafe_hash=True, slots=True)
class DialogTerminated:
    dialog: Final[Dialog]
    reason: Final[str]    # caller_bye | callee_bye | killed | timeout
    at: Final[float]

    def __init__(self, dialog: Dialog, reason: str, at: float) -> None:
        self.dialog = dialog
        self.reason = reason
        self.at = at


@dataclass(init=False, unsafe_hash=True, slots=True)
class CallAnswered:
    """A 2xx to an initial INVITE is on its way upstream (fires before DialogConfirmed)."""

    ctx: Final[RequestContext]
    response: Final[Response]

    def __init__(self, ctx: RequestContext, response: Response) -> None:
        self.ctx = ctx
        self.response = response


@dataclass(init=False, unsafe_hash=True, slots=True)
class CallFailed:
    """An initial INVITE got a final non-2xx (or no target at all): missed calls, billing."""

    ctx: Final[RequestContext]
    status: Final[int]
    reason: Final[str]    # busy | no_answer | rejected | offline | unknown | cancelled | failed

    def __init__(self, ctx: RequestContext, status: int, reason: str) -> None:
        self.ctx = ctx
        self.status = status
        self.reason = reason


class DialogTable:
    """Dialogs the proxy set up, keyed by (Call-ID, tag, tag) in both orders."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str, str], Dialog] = {}

    def add(self, d: Dialog) -> None:
        self._by_key[(d.call_id, d.caller_tag, d.callee_tag)] = d
        self._by_key[(d.call_id, d.callee_tag, d.caller_tag)] = d

    def find(self, call_id: str, from_tag: str | None, to_tag: str | None) -> Dialog | None:
        return self._by_key.get((call_id, from_tag or "", to_tag or ""))

    def remove(self, d: Dialog) -> bool:
        a = self._by_key.pop((d.call_id, d.caller_tag, d.callee_tag), None)
        self._by_key.pop((d.call_id, d.callee_tag, d.caller_tag), None)
        return a is not None

    def by_call_id(self, call_id: str) -> list[Dialog]:
        seen: dict[int, Dialog] = {}
        for (cid, _, _), d in self._by_key.items():
            if cid == call_id:
                seen[id(d)] = d
        return list(seen.values())

    def all(self) -> list[Dialog]:
        return list({id(d): d for d in self._by_key.values()}.values())

    def __len__(self) -> int:
        return len(self._by_key) // 2

    def expire(self, older_than: float) -> list[Dialog]:
        gone = [d for d in self.all() if d.created_at < older_than]
        for d in gone:
            self.remove(d)
        return gone


# ---------------------------------------------------------------------------- branches

_branch_counter = itertools.count(1)
_BRANCH_SALT = os.urandom(4).hex()


def _loop_hash(req: Request) -> str:
    """RFC 3261 §16.6 step 8 / §16.3 step 4: hash of the fields that decide routing."""
    h = hashlib.blake2s(digest_size=6)
    h.update(req.uri.encode())
    h.update(b"\0" + (req.from_addr.tag or "").encode())
    h.update(b"\0" + (req.to_addr.tag or "").encode())
    h.update(b"\0" + req.call_id.encode())
    h.update(b"\0" + str(req.cseq.number).encode())
    for r in req.header_values("Route"):
        h.update(b"\0" + r.encode())
    for p in req.header_values("Proxy-Require"):
        h.update(b"\0" + p.encode())
    return h.hexdigest()


def new_branch(loop_hash: str = "") -> str:
    # The suffix names this worker process, so a response finds it (sipcore.workers).
    return (f"z9hG4bK{loop_hash}.{_BRANCH_SALT}{next(_branch_counter):x}"
            f"{workers.branch_suffix()}")


@dataclass(init=False, slots=True)
class Branch:
    target: Target
    tx: txn.ClientTxKey | None
    status: int                # last status seen (0 none yet)
    final: bool
    cancelled: bool
    timer_c: asyncio.TimerHandle | None

    def __init__(
        self,
        target: Target,
        tx: txn.ClientTxKey | None = None,
        status: int = 0,
        final: bool = False,
        cancelled: bool = False,
        timer_c: asyncio.TimerHandle | None = None,
    ) -> None:
        self.target = target
        self.tx = tx
        self.status = status
        self.final = final
        self.cancelled = cancelled
        self.timer_c = timer_c


class ResponseContext:
    """§16.7: the branches of one forwarded request and the choice of the best response."""

    def __init__(self, core: ProxyCore, ctx: RequestContext) -> None:
        self.core = core
        self.ctx = ctx
        self.request = ctx.request
        self.is_invite = ctx.request.method == "INVITE"
        self.branches: dict[txn.ClientTxKey, Branch] = {}
        self.best: Response | None = None
        self.best_status = 0
        self.final_sent = False
        self.got_2xx = False
        self.cancelled = False
        self.groups = [list(ctx.targets), *[list(g) for g in ctx.serial_targets]]
        self.group_index = 0
        self.auth_headers: list[tuple[str, str]] = []

    # -- forwarding
    def start(self) -> None:
        self._start_group()
        if self.final_sent:
            self._retire()

    def _start_group(self) -> None:
        group = sorted(self.groups[self.group_index], key=lambda t: -t.q)
        for target in group:
            self._fork(target)
        if not self.branches or all(b.final for b in self.branches.values()):
            self._maybe_finish()

    def _fork(self, target: Target) -> None:
        core = self.core
        req = self.request
        transport = target.dest.transport
        host, port = core.identity.sent_by(transport)
        branch_id = new_branch(_loop_hash(req))
        via = f"SIP/2.0/{transport} {host}:{port};branch={branch_id};rport"
        rr = None
        if core.settings.record_route and req.method in _DIALOG_CREATING and not req.to_addr.tag:
            rr = core.identity.record_route_uri(transport)
            if transport != self.ctx.source.transport:
                # Bridging transports (RFC 5658 double Record-Route): the callee uses the
                # Record-Route values top first, the caller bottom first, so the entry facing
                # the callee goes on top and the one facing the caller below it.
                rr = f"{rr}, {core.identity.record_route_uri(self.ctx.source.transport)}"
        pop, remove_routes, rest = _route_edits(req, self.ctx.attrs.get("own_routes", 0))
        add = [("Route", p) for p in target.path] + rest
        remove = {*self.ctx.attrs.get("remove_headers", ()), *remove_routes}
        try:
            data = req.forward(via=via, request_uri=target.uri, record_route=rr,
                               pop_route=pop,
                               add_headers=add + list(self.ctx.attrs.get("branch_headers", ())),
                               remove_headers=remove)
            fwd = parse_message(data)
        except SipParseError as exc:
            log.warning("event=forward_failed reason=%r target=%s", exc.reason, target.uri)
            return
        assert isinstance(fwd, Request)
        b = Branch(target)
        tx = core.stack.send_request(data, fwd, target.dest, self)
        b.tx = tx
        self.branches[tx] = b
        core.stats["branches"] += 1
        if self.is_invite:
            b.timer_c = core.loop.call_later(core.settings.timer_c, self._timer_c, tx)

    # -- ClientCallback
    def response_received(self, tx: txn.TxKey, response: Response) -> None:
        self._response(tx, response)
        if self.final_sent:
            self._retire()

    def _response(self, tx: txn.TxKey, response: Response) -> None:
        b = self.branches.get(tx)  # type: ignore[arg-type]
        if b is None:
            return
        status = response.status
        b.status = status
        if status < 200:
            if self.is_invite and b.timer_c is not None and status > 100:
                b.timer_c.cancel()
                assert b.tx is not None
                b.timer_c = self.core.loop.call_later(self.core.settings.timer_c,
                                                      self._timer_c, b.tx)
            if status > 100 and not self.final_sent:
                self._forward_upstream(response)
            return
        if not b.final:
            b.final = True
            if b.timer_c is not None:
                b.timer_c.cancel()
                b.timer_c = None
        if status < 300:
            # §16.7 step 5: every 2xx is forwarded at once, retransmissions too.
            first = not self.got_2xx
            self.got_2xx = True
            self._forward_upstream(response)
            self.final_sent = True
            if first:
                self.core.answered(self, b, response)
                self._cancel_others(tx)
            return
        if self.final_sent:
            return
        if status in (401, 407):
            name = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
            self.auth_headers += [(name, v) for v in _raw_values(response, name)]
        if status >= 600:
            self._cancel_others(tx)
        if self._better(status):
            self.best, self.best_status = response, status
        self._maybe_finish()

    def transaction_failed(self, tx: txn.TxKey, reason: str) -> None:
        b = self.branches.get(tx)  # type: ignore[arg-type]
        if b is None or b.final:
            return
        self._failed(b, tx, reason)
        if self.final_sent:
            self._retire()

    def _failed(self, b: Branch, tx: txn.TxKey, reason: str) -> None:
        b.final = True
        if b.timer_c is not None:
            b.timer_c.cancel()
            b.timer_c = None
        status = 408 if reason == "timeout" else 503
        b.status = status
        if self._better(status) and self.best is None:
            self.best_status = status
        elif self._better(status):
            self.best, self.best_status = None, status
        if reason == "transport" and b.target.kind == "contact":
            self.core.stats["contact_unreachable"] += 1
        self._maybe_finish()

    def _retire(self) -> None:
        """Once the final response has gone upstream and every branch has its own, hand the
        client transactions that still linger (an INVITE's for Timer M, 32 s, to pass on 2xx
        retransmissions) to an :class:`_Answered` and let go of this context, the request
        and its targets: kept for those 32 s they were most of what the garbage collector
        walked (tens of objects per call, pauses of hundreds of ms at a few hundred calls/s).
        """
        branches = self.branches
        for b in branches.values():
            if not b.final:
                return
        answered = _Answered(self.core, self.ctx.tx, self.ctx.response_headers)
        reassign = self.core.stack.reassign
        for tx in branches:
            reassign(tx, answered)
        self.core.responses.pop(self.ctx.tx, None)

    def _better(self, status: int) -> bool:
        """§16.7 step 6: prefer 6xx, then the lowest class (3xx < 4xx < 5xx), 503 last."""
        cur = self.best_status
        if cur == 0:
            return True
        def rank(s: int) -> tuple[int, int]:
            if s >= 600:
                return (0, s)
            if s == 503:
                return (9, s)  # 503 is mapped to 500 upstream and least useful
            if s == 408:
                return (8, s)
            return (s // 100, s)
        return rank(status) < rank(cur)

    def _timer_c(self, tx: txn.ClientTxKey) -> None:
        b = self.branches.get(tx)
        if b is None or b.final:
            return
        b.timer_c = None
        if b.status >= 100:
            # §16.8: CANCEL; the 487 completes the branch, or the transaction layer's CANCEL
            # guard (64*T1) ends it as a timeout if the UAS never answers.
            self.core.stack.cancel(tx)
        else:
            self.transaction_failed(tx, "timeout")

    def _cancel_others(self, except_tx: txn.TxKey | None) -> None:
        if not self.is_invite:
            return
        for tx, b in self.branches.items():
            if tx != except_tx and not b.final and not b.cancelled:
                b.cancelled = True
                self.core.stack.cancel(tx)

    def cancel_all(self) -> None:
        self.cancelled = True
        self._cancel_others(None)

    def _maybe_finish(self) -> None:
        if self.final_sent or any(not b.final for b in self.branches.values()):
            return
        status = self.best_status
        failover = status in (408, 500, 502, 503, 504) or status == 0
        if (failover and not self.cancelled
                and self.group_index + 1 < len(self.groups)):
            self.group_index += 1
            self.core.stats["failovers"] += 1
            self._start_group()
            return
        self.final_sent = True
        self.core.finished(self)
        if not self.cancelled:
            for hook in self.core.failure_hooks:
                if hook(self.ctx, status or 408, self.best):
                    return
        best, self.best = self.best, None  # not needed after this; the context may linger
        if best is not None:
            headers = self.auth_headers if self.best_status in (401, 407) else ()
            self._forward_upstream(best, merge_auth=headers)
        else:
            code = status or 408
            if code == 503:
                code = 500  # §16.7 step 6: a proxy MUST NOT forward 503 upstream as such
            self.ctx.reply(code, "Request Timeout" if code == 408 else None)

    def _forward_upstream(self, response: Response,
                          merge_auth: Iterable[tuple[str, str]] = ()) -> None:
        status = response.status
        if status == 503:
            # §16.7 step 6: translate 503 into 500 so the caller doesn't back off from us.
            self.ctx.reply(500, "Service Unavailable Downstream")
            return
        add = list(self.ctx.response_headers) if status >= 200 and status < 300 else []
        remove: tuple[str, ...] = ()
        merged = list(merge_auth)
        if merged:
            add += merged
            remove = ("WWW-Authenticate", "Proxy-Authenticate")
        try:
            data = response.forward(add_headers=add, remove_headers=remove)
        except SipParseError:
            self.core.stats["bad_responses"] += 1
            return
        if status >= 200:
            self.ctx.replied = True
            self.ctx.final_status = status
            self.core.contexts.pop(self.ctx.tx, None)  # answered (see ProxyCore._reply)
        self.core.stack.send_response(self.ctx.tx, data, status)


def _route_edits(req: Request, own: int) -> tuple[bool, tuple[str, ...], list[tuple[str, str]]]:
    """Splice arguments that drop our ``own`` leading Route values (§16.4).

    One is a plain pop; more (a double Record-Route) rewrites the Route header with the rest,
    in order.
    """
    if own <= 1:
        return own == 1, (), []
    rest = req.header_values("Route")[own:]
    return False, ("Route",), [("Route", value) for value in rest]


def _raw_values(msg: Response | Request, name: str) -> list[str]:
    """Header values without comma splitting (challenges contain commas)."""
    return msg.header_values(name, split=False)


# ---------------------------------------------------------------------------- core


class ProxyCore:
    """Transaction user: runs the pipeline per request and relays like §16 says."""

    def __init__(self, stack: SipStack, pipeline: Pipeline, events: EventBus,
                 identity: LocalIdentity, settings: ProxySettings | None = None) -> None:
        self.stack = stack
        self.loop = stack.loop
        self.pipeline = pipeline
        self.events = events
        self.identity = identity
        self.settings = settings or ProxySettings()
        self.dialogs = DialogTable()
        #: Pipeline processing time per method (exported as a Prometheus histogram).
        self.latency = LatencyHistogram()
        self.contexts: dict[txn.TxKey, RequestContext] = {}
        self.responses: dict[txn.TxKey, ResponseContext] = {}
        self.failure_hooks: list[FailureHook] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = {k: 0 for k in (
            "requests", "branches", "failovers", "loops", "acks_forwarded", "acks_dropped",
            "cancels", "in_dialog_relayed", "in_dialog_rejected", "bad_responses",
            "contact_unreachable",
        )}
        stack.user = self
        pipeline.add(Stage.REQINIT, self._reqinit, name="core.reqinit", first=True)
        pipeline.add(Stage.IN_DIALOG, self._in_dialog, name="core.in_dialog")
        pipeline.add(Stage.RELAY, self._relay, name="core.relay")

    # -- TransactionUser
    def request_received(self, tx: txn.TxKey, request: Request, source: Peer) -> None:
        self.stats["requests"] += 1
        request.stamp_received(source)  # §18.2.1 / RFC 3581: received/rport in our copy
        ctx = RequestContext(request, source, tx, self._reply, now=time.time())
        self.contexts[tx] = ctx
        started = self.loop.time()
        # The walk runs here as far as it can without waiting; only a request that waits
        # (for the database, say) gets a task.
        rest = self.pipeline.start(ctx)
        if rest is None:
            self._walked(ctx, started)
            return
        if isinstance(rest, Later):
            rest.then(partial(self._walked_later, ctx, started))
            return
        task = self.loop.create_task(
            coro.finish(rest, partial(self._walked, ctx, started), self._tasks))
        self._tasks.add(task)

    def _walked_later(self, ctx: RequestContext, started: float, done: bool,
                      error: BaseException | None) -> None:
        self._walked(ctx, started)

    def _walked(self, ctx: RequestContext, started: float) -> None:
        """Time the pipeline walk: from the request's arrival until it was answered or
        relayed (downstream answer time is not ours and is not counted)."""
        method = ctx.request.method
        self.latency.observe(method if method in _KNOWN_METHODS else "other",
                             self.loop.time() - started)

    def _reply(self, ctx: RequestContext, status: int, reason: str | None,
               headers: Iterable[tuple[str, str]], body: bytes, to_tag: str | None) -> None:
        hdrs = list(headers)
        if 200 <= status < 300:
            # A handler may have put them in itself (the registrar lists them in its 200 OK
            # so it works without the proxy core): add only what is not there yet.
            hdrs += [h for h in ctx.response_headers if h not in hdrs]
        if status >= 300 and ctx.request.method == "INVITE" and not ctx.request.to_addr.tag:
            self.events.emit(CallFailed(ctx, status, _failure_reason(status, ctx)))
        self.stack.respond(ctx.tx, ctx.request, status, reason, headers=hdrs, body=body,
                           to_tag=to_tag or (None if status < 200 else _local_tag(ctx.request)),
                           linger=not ctx.stateless)
        if status >= 200:
            # Answered: the transaction repeats the response by itself from now on (up to
            # 64*T1), and holding the context that long kept every parsed request alive
            # into the garbage collector's older generations (100-200 ms pauses under load).
            self.contexts.pop(ctx.tx, None)

    def ack_received(self, request: Request, source: Peer) -> None:
        d = self.dialogs.find(request.call_id, request.from_addr.tag, request.to_addr.tag)
        if d is None:
            self.stats["acks_dropped"] += 1
            return
        dest = d.callee if request.from_addr.tag == d.caller_tag else d.caller
        try:
            data = self._in_dialog_bytes(request, dest)
        except SipParseError:
            self.stats["acks_dropped"] += 1
            return
        self.stats["acks_forwarded"] += 1
        self.stack.send_raw(data, dest)

    def cancel_received(self, tx: txn.TxKey, cancel: Request, invite_tx: txn.TxKey | None,
                        source: Peer) -> None:
        self.stats["cancels"] += 1
        if invite_tx is None:
            self.stack.respond(tx, cancel, 481, "Call/Transaction Does Not Exist")
            return
        self.stack.respond(tx, cancel, 200)
        rc = self.responses.get(invite_tx)
        ctx = self.contexts.get(invite_tx)
        if rc is not None:
            rc.cancel_all()
        elif ctx is not None and not ctx.replied:
            # Still in the pipeline (e.g. waiting for the database): answer 487 now.
            ctx.attrs["cancelled"] = True
            ctx.reply(487, "Request Terminated")

    def server_transaction_ended(self, tx: txn.TxKey, timed_out: bool) -> None:
        self.contexts.pop(tx, None)
        rc = self.responses.pop(tx, None)
        if rc is not None and not rc.final_sent:
            rc.cancel_all()

    # -- pipeline stages owned by the core
    def _reqinit(self, ctx: RequestContext) -> bool:
        req = ctx.request
        to_me = req.method == "OPTIONS" and self._addressed_to_me(req)
        try:
            # §16.3 steps 1, 3, 5: header syntax, Max-Forwards (483), Proxy-Require (420).
            request_checks(req, supported=SUPPORTED_EXTENSIONS, local_target=to_me)
        except SipParseError as exc:
            return ctx.reply(exc.status, exc.reason, headers=exc.headers)
        if self._is_loop(req):
            self.stats["loops"] += 1
            return ctx.reply(482, "Loop Detected")
        if to_me:
            return self._options(ctx)
        ctx.attrs["own_routes"] = self._own_routes(req)
        return False

    def _options(self, ctx: RequestContext) -> bool:
        # Stateless (§8.2.7): the same request always gets the same answer (the To tag is a
        # hash of the request), so a retransmission may as well be answered again, and the
        # keep-alive OPTIONS of phones and trunks leave no transaction for Timer J.
        ctx.stateless = True
        return ctx.reply(200, "OK", headers=[
            ("Allow", ALLOW), ("Accept", "application/sdp, text/plain, application/pidf+xml"),
            ("Supported", "path, outbound, replaces"),
        ])

    def _addressed_to_me(self, req: Request) -> bool:
        try:
            uri = req.request_uri
        except SipParseError:
            return False
        if not isinstance(uri, SipUri) or uri.user:
            return False
        return self.identity.is_local_domain(uri.host) and (
            uri.port is None or self.identity.is_me(uri.host, uri.port))

    def _own_routes(self, req: Request) -> int:
        """How many Route values at the top address this server (§16.4): one normally, two
        when we double-record-routed a transport bridge."""
        if not req.has_header("Route"):
            return 0
        n = 0
        for route in req.routes:
            try:
                uri = route.parsed_uri
            except SipParseError:
                break
            if not (isinstance(uri, SipUri) and self.identity.is_me(uri.host, uri.port)):
                break
            n += 1
        return n

    def _is_loop(self, req: Request) -> bool:
        if req.one_via:
            return False  # from the UA itself: nobody forwarded it, so not we
        vias = req.vias
        if len(vias) < 2:
            return False
        mine = None
        for via in vias[1:]:
            host, port = via.sent_by
            if self.identity.is_me(host, port or 5060, via.transport):
                branch = via.branch or ""
                if branch.startswith("z9hG4bK"):
                    mine = branch[7:].split(".", 1)[0]
                    if mine == _loop_hash(req):
                        return True
        return False

    def _in_dialog(self, ctx: RequestContext) -> bool:
        req = ctx.request
        if not req.to_addr.tag:
            return False
        d = self.dialogs.find(req.call_id, req.from_addr.tag, req.to_addr.tag)
        if d is None:
            if req.method in ("ACK",):
                return True
            # Not one of ours: either a dialog a module serves (its handlers run earlier)
            # or a request we must not relay on the sender's say-so.
            self.stats["in_dialog_rejected"] += 1
            return ctx.reply(481, "Call/Transaction Does Not Exist")
        from_caller = req.from_addr.tag == d.caller_tag
        dest = d.callee if from_caller else d.caller
        ctx.targets = [Target(req.uri, dest, kind="dialog")]
        ctx.attrs["dialog"] = d
        ctx.attrs["dialog_from_caller"] = from_caller
        if req.method == "BYE":
            self._end(d, "caller_bye" if from_caller else "callee_bye")
        self.stats["in_dialog_relayed"] += 1
        # In-dialog requests skip authentication and location: straight to RELAY.
        return self._relay(ctx)

    def _relay(self, ctx: RequestContext) -> bool:
        if ctx.attrs.get("cancelled"):
            return ctx.reply(487, "Request Terminated")
        if not ctx.targets and not ctx.serial_targets:
            where = ctx.attrs.get("location")
            if where == "offline":
                return ctx.reply(480, "Temporarily Unavailable")
            if where == "foreign":
                return ctx.reply(403, "Relaying Denied")
            return ctx.reply(404, "Not Found")
        if not ctx.targets:
            ctx.targets = ctx.serial_targets.pop(0)
        rc = ResponseContext(self, ctx)
        if rc.is_invite:
            # For a CANCEL (and for the end of the server transaction), until the final
            # response has gone upstream (ResponseContext._retire).
            self.responses[ctx.tx] = rc
        rc.start()
        return True

    def _in_dialog_bytes(self, req: Request, dest: Peer) -> bytes:
        host, port = self.identity.sent_by(dest.transport)
        via = f"SIP/2.0/{dest.transport} {host}:{port};branch={new_branch(_loop_hash(req))}"
        pop, remove, rest = _route_edits(req, self._own_routes(req))
        return req.forward(via=via, pop_route=pop, remove_headers=remove, add_headers=rest)

    # -- outcomes reported by response contexts
    def answered(self, rc: ResponseContext, b: Branch, response: Response) -> None:
        req = rc.request
        if req.method == "INVITE" and not req.to_addr.tag:
            self.events.emit(CallAnswered(rc.ctx, response))
            contact = response.contacts[0].uri if response.contacts else b.target.uri
            caller_contact = req.contacts[0].uri if req.contacts else req.from_addr.uri
            d = Dialog(
                call_id=req.call_id, caller_tag=req.from_addr.tag or "",
                callee_tag=response.to_addr.tag or "", caller=rc.ctx.source,
                callee=b.target.dest, caller_uri=caller_contact, callee_uri=contact,
                caller_from=req.header("From") or "", callee_to=response.header("To") or "",
                invite_cseq=req.cseq.number,
            )
            self.dialogs.add(d)
            self.events.emit(DialogConfirmed(d, req, response, rc.ctx))

    def finished(self, rc: ResponseContext) -> None:
        req = rc.request
        if req.method == "INVITE" and not req.to_addr.tag and not rc.got_2xx:
            status = rc.best_status or 408
            reason = "cancelled" if rc.cancelled else _failure_reason(status, rc.ctx)
            self.events.emit(CallFailed(rc.ctx, status, reason))

    def _end(self, d: Dialog, reason: str) -> None:
        if self.dialogs.remove(d):
            self.events.emit(DialogTerminated(d, reason, time.time()))

    def end_dialog(self, d: Dialog, reason: str = "killed",
                   extra_headers: Iterable[tuple[str, str]] = ()) -> None:
        """End a call from the middle: BYE to both legs (billing's credit cut, ``calls.kill``).

        Each BYE is built as the UA on the other side would send it: From/To with the right
        tags, the remote target as Request-URI, a CSeq above anything that side used (we
        don't see every CSeq the UAs use, so we jump well ahead of the INVITE's).
        """
        extra = list(extra_headers)
        for to_callee in (True, False):
            if to_callee:
                uri, dest, frm, to = d.callee_uri, d.callee, d.caller_from, d.callee_to
            else:
                uri, dest, frm, to = d.caller_uri, d.caller, d.callee_to, d.caller_from
            host, port = self.identity.sent_by(dest.transport)
            headers = [
                ("Via", f"SIP/2.0/{dest.transport} {host}:{port};branch={new_branch()}"),
                ("From", frm), ("To", to), ("Call-ID", d.call_id),
                ("CSeq", f"{d.invite_cseq + 1000} BYE"), ("Max-Forwards", "70"),
                *extra,
            ]
            data = build_request("BYE", uri, headers)
            parsed = parse_message(data)
            assert isinstance(parsed, Request)
            self.stack.send_request(data, parsed, dest, _IgnoreResponses())
        self._end(d, reason)

    def close(self) -> Awaitable[None]:
        """Cancels the tasks still finishing walks, and waits for them, when awaited."""
        return coro.cancel_and_wait(self._tasks)


class _IgnoreResponses:
    """Owner of BYEs the proxy originates: the dialog is over whatever the answer."""

    def response_received(self, tx: txn.TxKey, response: Response) -> None:
        return None

    def transaction_failed(self, tx: txn.TxKey, reason: str) -> None:
        return None


class _Answered:
    """Owner of a forwarded request's client transactions after its final response went
    upstream (:meth:`ResponseContext._retire`).  The only thing still to do is §16.7 step 5
    for a 2xx that comes again (a retransmission, or another dialog of a downstream fork):
    forward it upstream like the first, with the same extra headers."""

    __slots__ = ("core", "headers", "server_tx")

    def __init__(self, core: ProxyCore, server_tx: txn.TxKey,
                 headers: list[tuple[str, str]]) -> None:
        self.core = core
        self.server_tx = server_tx
        self.headers = headers

    def response_received(self, tx: txn.TxKey, response: Response) -> None:
        status = response.status
        if not 200 <= status < 300:
            return
        try:
            data = response.forward(add_headers=self.headers)
        except SipParseError:
            self.core.stats["bad_responses"] += 1
            return
        self.core.stack.send_response(self.server_tx, data, status)

    def transaction_failed(self, tx: txn.TxKey, reason: str) -> None:
        return None


def _local_tag(req: Request) -> str:
    """A To tag for our own final responses: stable per request so retransmissions match."""
    h = hashlib.blake2s(f"{req.call_id}|{req.from_addr.tag}|{req.cseq.number}".encode(),
                        digest_size=6)
    return "sb" + h.hexdigest()


def _failure_reason(status: int, ctx: RequestContext) -> str:
    if status == 480 and ctx.attrs.get("location") == "offline":
        return "offline"
    if status == 404:
        return "unknown"
    if status == 487:
        return "cancelled"
    if status in (486, 600):
        return "busy"
    if status in (408, 480):
        return "no_answer"
    if status in (603, 403):
        return "rejected"
    return "failed"
