"""The asyncio adapter that drives the sans-IO core (ARCHITECTURE.md principle 1).

:class:`SipStack` sits between :class:`~sipcore.transport.Transports` (sockets) and a
*transaction user* (the request pipeline and proxy core). For every datagram or framed stream
message it parses (bad requests get a stateless error reply, never an ACK; bad responses are
counted and dropped, RFC 3261 §18.1.2 / §18.2.1), feeds the
:class:`~sipcore.transaction.TransactionLayer`, and then *pumps*: it sends what the layer wants
sent, hands the layer's events to the user, and re-arms the layer's one timer on the loop.

Where responses go (§18.2.2): to the transport address the request came from. That is the
RFC 3581 (rport) behaviour every NATed phone needs, and it means the server only ever sends to
peers that talked to it; a Via ``maddr`` is not honoured for the same reason (it would let an
unauthenticated request direct our traffic at a third party).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from sipcore import transaction as txn
from sipcore.errors import SipParseError
from sipcore.message import Request, Response, build_response, parse_message, stateless_error_reply
from sipcore.transport import Transports
from sipcore.transport_types import Peer

log = logging.getLogger("sipcore.stack")

#: Methods counted under their own name in :attr:`SipStack.requests_in` (RFC 3261 and the
#: extension RFCs 3262, 3265/6665, 3311, 3428, 3515, 3903, 6086); anything else is "other".
KNOWN_METHODS = frozenset({
    "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE", "NOTIFY",
    "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE",
})

__all__ = ["ClientCallback", "SipStack", "TransactionUser"]


class TransactionUser(Protocol):
    """What the stack calls for events that are not answers to our own client transactions."""

    def request_received(self, tx: txn.TxKey, request: Request, source: Peer) -> None: ...

    def ack_received(self, request: Request, source: Peer) -> None: ...

    def cancel_received(self, tx: txn.TxKey, cancel: Request, invite_tx: txn.TxKey | None,
                        source: Peer) -> None: ...

    def server_transaction_ended(self, tx: txn.TxKey, timed_out: bool) -> None: ...


class ClientCallback(Protocol):
    """The owner of a client transaction (a proxy branch, a UA request)."""

    def response_received(self, tx: txn.TxKey, response: Response) -> None: ...

    def transaction_failed(self, tx: txn.TxKey, reason: str) -> None:
        """Timer B/F fired (``"timeout"``) or the transport failed (``"transport"``)."""


class SipStack:
    """Parses, matches and sends for one process; one timer handle on the loop."""

    def __init__(self, transports_factory: Callable[[SipStack], Transports],
                 layer: txn.TransactionLayer, *, server_header: str = "sipbill") -> None:
        self.layer = layer
        self.transports = transports_factory(self)
        self.loop = self.transports.loop
        self.user: TransactionUser | None = None
        self.server_header = server_header
        self._clients: dict[txn.TxKey, ClientCallback] = {}  # keyed by client tx
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pumping = False
        self.on_sent: Callable[[bytes, Peer], None] | None = None  # metrics hook
        #: With several worker processes: hands a message that another worker owns to it
        #: (``WorkerChannel.divert``, True when it did). None with one process.
        self.router: Callable[[bytes, Peer, bool], bool] | None = None
        self.stats: dict[str, int] = {
            "parse_errors": 0, "stateless_replies": 0, "responses_dropped_unparsable": 0,
            "stray_responses": 0, "overload_rejections": 0,
        }
        self.parse_error_reasons: dict[str, int] = {}
        # Traffic counters for the metrics module, read at scrape time. Keys come from
        # attributes the transaction layer parses anyway; methods outside the known set share
        # one key so a peer inventing method names cannot grow these dicts without bound.
        self.requests_in: dict[str, int] = {}
        self.responses_in: dict[int, int] = {}  # by status class (1..6)
        self.responses_out: dict[int, int] = {}  # by status class, sent on server transactions

    # ------------------------------------------------------------------ receive path
    def message_received(self, data: bytes, peer: Peer, stream: bool) -> None:
        router = self.router
        if router is not None and router(data, peer, stream):
            return
        self.receive(data, peer, stream)

    def receive(self, data: bytes, peer: Peer, stream: bool) -> None:
        """Process one message from ``peer``: from our own socket, or handed over by the
        worker whose socket it reached (never routed again)."""
        now = self.loop.time()
        try:
            msg = parse_message(data, stream=stream)
        except SipParseError as exc:
            self._parse_error(data, peer, exc)
            return
        try:
            if isinstance(msg, Request):
                method = msg.method if msg.method in KNOWN_METHODS else "other"
                self.requests_in[method] = self.requests_in.get(method, 0) + 1
                self.layer.receive_request(msg, peer, now)
            else:
                klass = msg.status // 100
                self.responses_in[klass] = self.responses_in.get(klass, 0) + 1
                self.layer.receive_response(msg, peer, now)
        except SipParseError as exc:
            # A lazily parsed header the layer needed (Via, CSeq...) was malformed.
            self._parse_error(data, peer, exc)
            return
        self.pump()

    def _parse_error(self, data: bytes, peer: Peer, exc: SipParseError) -> None:
        self.stats["parse_errors"] += 1
        key = f"{exc.status}"
        self.parse_error_reasons[key] = self.parse_error_reasons.get(key, 0) + 1
        reply = stateless_error_reply(data, exc, server=self.server_header)
        if reply is None:
            # A response, an ACK, or too broken to answer: counted and dropped.
            self.stats["responses_dropped_unparsable"] += 1
            log.debug("event=message_dropped peer=%s status=%s reason=%r", peer, exc.status,
                      exc.reason)
            return
        self.stats["stateless_replies"] += 1
        self.transports.send(reply, peer)

    def transport_failed(self, peer: Peer) -> None:
        self.layer.transport_error(peer, self.loop.time())
        self.pump()

    def stream_error(self, error: SipParseError, peer: Peer) -> None:
        self.stats["parse_errors"] += 1
        key = f"{error.status}"
        self.parse_error_reasons[key] = self.parse_error_reasons.get(key, 0) + 1

    # ------------------------------------------------------------------ send path (TU API)
    def respond(self, tx: txn.TxKey, request: Request, status: int, reason: str | None = None,
                *, headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
                to_tag: str | None = None, linger: bool = True) -> None:
        """Answer the server transaction ``tx`` with a response built from ``request``
        (``linger=False``: statelessly, see :meth:`TransactionLayer.send_response`)."""
        data = build_response(request, status, reason, to_tag=to_tag,
                              headers=[*headers, ("Server", self.server_header)]
                              if status >= 200 else headers, body=body)
        self.send_response(tx, data, status, linger=linger)

    def send_response(self, tx: txn.TxKey, data: bytes, status: int, *,
                      linger: bool = True) -> None:
        """Send ready-made response bytes (a forwarded response) on server transaction ``tx``."""
        klass = status // 100
        self.responses_out[klass] = self.responses_out.get(klass, 0) + 1
        self.layer.send_response(tx, data, status, self.loop.time(), linger=linger)
        self.pump()

    def send_request(self, data: bytes, request: Request, dest: Peer,
                     owner: ClientCallback) -> txn.ClientTxKey:
        """Start a client transaction; ``owner`` hears its responses and failures."""
        tx = self.layer.send_request(data, request, dest, self.loop.time())
        self._clients[tx] = owner
        self.pump()
        return tx

    def reassign(self, tx: txn.ClientTxKey, owner: ClientCallback) -> None:
        """Give the client transaction ``tx``, if it is still there, a new owner."""
        if tx in self._clients:
            self._clients[tx] = owner

    def cancel(self, tx: txn.ClientTxKey) -> None:
        """CANCEL the INVITE client transaction ``tx`` (§9.1; sent once it has a provisional)."""
        self.layer.cancel(tx, self.loop.time())
        self.pump()

    def send_raw(self, data: bytes, dest: Peer) -> None:
        """Send outside any transaction: ACK for 2xx (§13.2.2.4) and its forwarding (§16.11)."""
        self.transports.send(data, dest)
        if self.on_sent is not None:
            self.on_sent(data, dest)

    # ------------------------------------------------------------------ pump
    def pump(self) -> None:
        if self._pumping:
            return  # the outer pump will pick up what this call produced
        self._pumping = True
        try:
            while True:
                now = self.loop.time()
                out = self.layer.datagrams_to_send(now)
                for data, peer in out:
                    self.transports.send(data, peer)
                    if self.on_sent is not None:
                        self.on_sent(data, peer)
                event = self.layer.next_event()
                if event is None:
                    if not out:
                        break
                    continue
                self._dispatch(event)
        finally:
            self._pumping = False
        self._arm_timer()

    def _dispatch(self, event: txn.Event) -> None:
        user = self.user
        if isinstance(event, txn.ResponseReceived):
            owner = self._clients.get(event.tx_key)
            if owner is not None:
                owner.response_received(event.tx_key, event.response)
        elif isinstance(event, txn.RequestReceived):
            if user is not None:
                user.request_received(event.tx_key, event.request, event.source)
        elif isinstance(event, txn.TransactionTerminated):  # one per transaction: test early
            if self._clients.pop(event.tx_key, None) is None and user is not None:
                user.server_transaction_ended(event.tx_key, False)
        elif isinstance(event, txn.AckReceived):
            if user is not None:
                user.ack_received(event.request, event.source)
        elif isinstance(event, txn.CancelReceived):
            if user is not None:
                user.cancel_received(event.tx_key, event.request, event.invite_tx_key, event.source)
        elif isinstance(event, txn.TransactionTimedOut | txn.TransportErrorOccurred):
            reason = "timeout" if isinstance(event, txn.TransactionTimedOut) else "transport"
            owner = self._clients.get(event.tx_key)
            if owner is not None:
                owner.transaction_failed(event.tx_key, reason)
            elif user is not None:
                user.server_transaction_ended(event.tx_key, True)
        elif isinstance(event, txn.StrayResponse):
            self.stats["stray_responses"] += 1
        elif isinstance(event, txn.Overloaded):
            self.stats["overload_rejections"] += 1

    def _arm_timer(self) -> None:
        deadline = self.layer.get_timer()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.layer.handle_timer(self.loop.time())
        self.pump()

    def close(self) -> Awaitable[None]:
        """Stop the timer now; the returned awaitable closes the transports."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self.transports.close()
