"""The SIP transaction layer (RFC 3261 §17, amended by RFC 6026), sans-IO.

The layer sits between the transport and the transaction user (TU: the proxy core, the
registrar, a UA core).  It owns request and response retransmissions, the ACK for non-2xx
finals, and the matching of incoming messages to transactions.  It does no I/O and reads
no clock: every call gets ``now`` (seconds, any monotonic origin) and the caller drains
what the layer produced, like aioquic's ``QuicConnection``::

    layer.receive_request(request, source, now)     # the transport parsed the bytes
    layer.receive_response(response, source, now)
    layer.send_request(data, request, dest, now) / send_response(key, data, status, now)
    layer.handle_timer(now)                         # when get_timer()'s deadline passed
    for data, peer in layer.datagrams_to_send(now): ...   # put on the wire
    while (event := layer.next_event()) is not None: ...  # hand to the TU
    deadline = layer.get_timer()                    # arm the adapter's one timer

Theory of operation
-------------------

Every transaction is a small state machine (figures 5-8 of RFC 3261, figures 5 and 7 of
RFC 6026) keyed by a tuple that is also its matching key, so matching an incoming message
costs one dict lookup:

* Server transactions are keyed by ``ServerTxKey(branch, sent-by host, sent-by port,
  method)`` (§17.2.3), with ACK looked up under method INVITE.  A request whose top Via
  branch lacks the ``z9hG4bK`` magic cookie comes from an RFC 2543 element and is keyed by
  ``LegacyServerTxKey`` (Request-URI, To tag, From tag, Call-ID, CSeq, top Via); its ACK is
  found through a second index that leaves out the To tag, which is then compared with the
  tag of the final response the transaction sent (§17.2.3, second half).
* Client transactions are keyed by ``ClientTxKey(branch, CSeq method)`` (§17.1.3).  The
  proxy generates the branch, so the key is known before the request leaves.

A request that matches a server transaction is a retransmission: the transaction re-sends
its last response (or nothing) and the TU never hears of it.  A request that matches
nothing opens a transaction and becomes a :class:`RequestReceived` event, except ACK (an
unmatched ACK is the ACK for a 2xx, its own end-to-end "transaction", surfaced as
:class:`AckReceived`) and CANCEL (a transaction of its own, surfaced as
:class:`CancelReceived` with the key of the INVITE it targets, §9.2).  A response that
matches a client transaction advances it; retransmitted finals are absorbed; anything
unmatched is a :class:`StrayResponse` that the core drops (RFC 6026 removed the
stateless forwarding of stray 2xx, because the Accepted states below keep the
transactions alive while 2xx retransmissions can still arrive).

States and timers (``T1`` is the RTT estimate, ``T2`` the retransmit cap, ``T4`` the
network lifetime; "reliable" means TCP/TLS/WS, where no timer retransmits and the
absorbing timers D, I, J, K are zero so the transaction ends at once):

* INVITE client (§17.1.1, RFC 6026 §7.2): Calling -(1xx)-> Proceeding -(2xx)-> Accepted
  -(Timer M)-> Terminated; -(300-699, send ACK)-> Completed -(Timer D)-> Terminated.
  Timer A retransmits in Calling at T1, 2T1, 4T1... without a cap; Timer B (64*T1) times
  the transaction out in Calling.  In Accepted every 2xx (retransmissions, other forks)
  still goes to the TU.  In Completed a retransmitted final re-sends the ACK.
* non-INVITE client (§17.1.2): Trying -(1xx)-> Proceeding -(final)-> Completed -(Timer K)->
  Terminated.  Timer E retransmits at T1, 2T1, ... capped at T2 (and at T2 in Proceeding);
  Timer F (64*T1) times out Trying and Proceeding.
* INVITE server (§17.2.1, RFC 6026 §7.1): Proceeding -(2xx)-> Accepted -(Timer L)->
  Terminated; -(300-699)-> Completed -(ACK)-> Confirmed -(Timer I)-> Terminated.  Timer G
  re-sends the final at T1, 2T1, ... capped at T2; Timer H (64*T1) gives up waiting for the
  ACK.  In Accepted retransmitted INVITEs are absorbed and the TU may send further 2xx
  (a proxy relays each 2xx retransmission it receives from downstream).
* non-INVITE server (§17.2.2): Trying -(1xx)-> Proceeding -(final)-> Completed -(Timer J)->
  Terminated.

The layer also builds the two requests RFC 3261 puts below the TU: the ACK for a 3xx-6xx
(§17.1.1.3) and, through :meth:`TransactionLayer.cancel`, the CANCEL (§9.1), held back
until a provisional response has arrived and dropped if a final comes first.

Timers live in one heap of ``(deadline, seq, key, timer name)``.  A transaction remembers
the ``seq`` of its (at most two) live timers; re-arming or terminating just forgets the old
``seq`` and the stale heap entry is skipped when it surfaces (lazy deletion), so the
adapter only ever arms the one timer :meth:`TransactionLayer.get_timer` returns.  The heap
is rebuilt when stale entries outnumber live ones four to one.

Terminated transactions are removed at once and reported with
:class:`TransactionTerminated`.  Live server transactions are capped.  At the cap a new
request first ends the oldest server transaction that only lingers to absorb retransmissions
(a non-INVITE one in Completed, Timer J, or an INVITE one in Confirmed, Timer I): at 1,600
REGISTERs/s those are 100,000 after 32 s, and new work matters more than answering a rare
retransmission from memory.  Only when every live server transaction is still at work does a
new request get a stateless 503 (§21.5.4) and an :class:`Overloaded` event; the ACK for that
503 is recognised by its To tag and absorbed.

Transport errors (§17.1.4, §17.2.4) end the affected transactions with
:class:`TransportErrorOccurred` (per destination or per transaction).

Responses from server transactions go back to the transport address the request came
from (the connection, for reliable transports).  For UDP that is RFC 3581 (rport)
behaviour whether or not the client asked for it: NATed phones need it, and it means a
request cannot steer our responses at a third party, which a Via ``maddr`` or sent-by port
(§18.2.2) would allow an unauthenticated sender to do.
"""

from __future__ import annotations

import heapq
import zlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, NamedTuple, cast

from sipcore.message import Request, Response, build_request, build_response, parse_message
from sipcore.transport_types import Peer

__all__ = [
    "MAGIC_COOKIE",
    "AckReceived",
    "CancelReceived",
    "ClientTxKey",
    "Event",
    "LegacyServerTxKey",
    "Overloaded",
    "RequestReceived",
    "ResponseReceived",
    "ServerKey",
    "ServerTxKey",
    "StrayResponse",
    "TimerSettings",
    "TransactionLayer",
    "TransactionStats",
    "TransactionTerminated",
    "TransactionTimedOut",
    "TransportErrorOccurred",
    "TxKey",
    "TxState",
]

#: Branch prefix that marks an RFC 3261 branch, unique per transaction (§8.1.1.7).
MAGIC_COOKIE = "z9hG4bK"

#: Name of the guard timer armed once a CANCEL is sent: §9.1 lets the UAC give the INVITE
#: up 64*T1 after the CANCEL if no final arrives, which also bounds a proxy's client
#: transaction when the downstream element never answers the INVITE.
CANCEL_GUARD = "cancel"

# Prefix of the To tag of the layer's stateless 503s; the rest is a checksum of the
# request so the ACK for such a 503 can be recognised exactly (see _stateless_tag).
_STATELESS_TAG_PREFIX = "sl"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class TimerSettings:
    """RFC 3261 timer values (table 4 of §A), in seconds.

    ``T1``, ``T2`` and ``T4`` are the base values.  The ``timer_*`` fields override a derived
    timer; ``None`` means "derive it" (64*T1 for B, F, H, J and RFC 6026's L and M; T4 for I
    and K).  Read the effective values through the upper-case properties.  On reliable
    transports the layer uses zero for D, I, J and K whatever is configured here (§17).
    Timer C belongs to the proxy (§16.6), not to the transaction layer.
    """

    T1: float = 0.5
    T2: float = 4.0
    T4: float = 5.0
    timer_b: float | None = None
    #: §17.1.1.2: "at least 32 seconds for unreliable transports"; not tied to T1.
    timer_d: float = 32.0
    timer_f: float | None = None
    timer_h: float | None = None
    timer_i: float | None = None
    timer_j: float | None = None
    timer_k: float | None = None
    timer_l: float | None = None
    timer_m: float | None = None

    def __post_init__(self) -> None:
        # A zero T1 would make handle_timer re-arm retransmissions at `now` forever.
        if not self.T1 > 0 or not self.T4 > 0:
            raise ValueError("T1 and T4 must be positive")
        if not self.T2 >= self.T1:
            raise ValueError("T2 must be at least T1")
        for name in ("timer_b", "timer_f", "timer_h", "timer_i", "timer_j", "timer_k",
                     "timer_l", "timer_m", "timer_d"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def TIMER_A(self) -> float:
        """Initial INVITE request retransmission interval (§17.1.1.2)."""
        return self.T1

    @property
    def TIMER_B(self) -> float:
        """INVITE client transaction timeout (§17.1.1.2)."""
        return 64 * self.T1 if self.timer_b is None else self.timer_b

    @property
    def TIMER_D(self) -> float:
        """Wait for response retransmissions after a non-2xx final, unreliable (§17.1.1.2)."""
        return self.timer_d

    @property
    def TIMER_E(self) -> float:
        """Initial non-INVITE request retransmission interval (§17.1.2.2)."""
        return self.T1

    @property
    def TIMER_F(self) -> float:
        """Non-INVITE client transaction timeout (§17.1.2.2)."""
        return 64 * self.T1 if self.timer_f is None else self.timer_f

    @property
    def TIMER_G(self) -> float:
        """Initial INVITE final response retransmission interval (§17.2.1)."""
        return self.T1

    @property
    def TIMER_H(self) -> float:
        """Wait for the ACK to a non-2xx final (§17.2.1)."""
        return 64 * self.T1 if self.timer_h is None else self.timer_h

    @property
    def TIMER_I(self) -> float:
        """Absorb ACK retransmissions, unreliable (§17.2.1)."""
        return self.T4 if self.timer_i is None else self.timer_i

    @property
    def TIMER_J(self) -> float:
        """Absorb non-INVITE request retransmissions, unreliable (§17.2.2)."""
        return 64 * self.T1 if self.timer_j is None else self.timer_j

    @property
    def TIMER_K(self) -> float:
        """Absorb non-INVITE response retransmissions, unreliable (§17.1.2.2)."""
        return self.T4 if self.timer_k is None else self.timer_k

    @property
    def TIMER_L(self) -> float:
        """Absorb INVITE retransmissions after a 2xx was sent (RFC 6026 §8.7)."""
        return 64 * self.T1 if self.timer_l is None else self.timer_l

    @property
    def TIMER_M(self) -> float:
        """Keep passing 2xx responses to the TU after the first one (RFC 6026 §8.4)."""
        return 64 * self.T1 if self.timer_m is None else self.timer_m


@dataclass(slots=True)
class TransactionStats:
    """Counters the metrics module exports; they only ever grow."""

    #: Retransmitted requests answered (or ignored) by a server transaction, never seen by the TU.
    requests_absorbed: int = 0
    #: ACKs for non-2xx finals (and their retransmissions) absorbed by the transaction layer.
    acks_absorbed: int = 0
    #: Retransmitted responses absorbed by a client transaction.
    responses_absorbed: int = 0
    #: Timer A, E and G retransmissions put on the wire.
    retransmissions_sent: int = 0
    #: Responses that matched no client transaction.
    stray_responses: int = 0
    #: New requests refused with a stateless 503 because of the server transaction cap.
    overload_rejections: int = 0
    #: Lingering server transactions (Timer I/J) ended early to make room under the cap.
    lingering_evicted: int = 0
    #: Transactions ended by Timer B, F or H (or the CANCEL guard).
    timeouts: int = 0
    #: Transactions ended by a transport error.
    transport_errors: int = 0


# --------------------------------------------------------------------------- keys and states


class ServerTxKey(NamedTuple):
    """RFC 3261 server transaction key (§17.2.3): branch, sent-by and method (ACK -> INVITE).

    The layer itself keys by the plain tuple of these fields (equal to this, see
    ``_server_key``), so an event's ``tx_key`` is compared with ``==``, not by type."""

    branch: str
    host: str
    port: int | None
    method: str


class LegacyServerTxKey(NamedTuple):
    """RFC 2543 server transaction key (§17.2.3, for a branch without the magic cookie)."""

    request_uri: str
    to_tag: str | None
    from_tag: str | None
    call_id: str
    cseq_number: int
    method: str
    top_via: str


class ClientTxKey(NamedTuple):
    """Client transaction key (§17.1.3): the branch we generated and the CSeq method."""

    branch: str
    method: str


# The per-message paths build keys with tuple.__new__: a NamedTuple's generated __new__ is a
# Python-level call that costs more than the dict lookup the key is for.
_new_key = tuple.__new__

# Server keys are built as plain tuples, equal (and hashing equal) to the ServerTxKey of the
# same fields.  A plain tuple of strings and ints is one the garbage collector stops tracking
# at its first collection, and so is the timer-heap entry holding it; a NamedTuple instance
# stays tracked for life.  Every answered request lingers for Timer J (32 s on UDP), so at
# 1,600 REGISTERs/s the two made ~100,000 of the objects every middle-generation collection
# walked, half of all.  (``tuple(t)`` of a tuple is ``t`` itself: no copy.)
_server_key = cast(Callable[[tuple[str, str, int | None, str]], "ServerTxKey"], tuple)

ServerKey = ServerTxKey | LegacyServerTxKey
TxKey = ServerTxKey | LegacyServerTxKey | ClientTxKey

# RFC 2543 ACK index: the legacy INVITE key without the To tag and the method (§17.2.3).
_LegacyAckKey = tuple[str, str | None, str, int, str]


class TxState(Enum):
    """Transaction states named as in RFC 3261 §17 and RFC 6026."""

    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


_CALLING = TxState.CALLING
_TRYING = TxState.TRYING
_PROCEEDING = TxState.PROCEEDING
_COMPLETED = TxState.COMPLETED
_CONFIRMED = TxState.CONFIRMED
_ACCEPTED = TxState.ACCEPTED
_TERMINATED = TxState.TERMINATED
#: States of a server transaction that only absorbs retransmissions (what _lingering holds).
_ABSORBING = frozenset({_COMPLETED, _CONFIRMED})


# --------------------------------------------------------------------------- events


@dataclass(init=False, unsafe_hash=True, slots=True)
class RequestReceived:
    """A new request opened server transaction ``tx_key``; answer with ``send_response``."""

    tx_key: Final[ServerKey]
    request: Final[Request]
    source: Final[Peer]

    def __init__(self, tx_key: ServerKey, request: Request, source: Peer) -> None:
        self.tx_key = tx_key
        self.request = request
        self.source = source


@dataclass(init=False, unsafe_hash=True, slots=True)
class AckReceived:
    """An ACK that belongs to no transaction: the ACK for a 2xx, to be routed end to end."""

    request: Final[Request]
    source: Final[Peer]

    def __init__(self, request: Request, source: Peer) -> None:
        self.request = request
        self.source = source


@dataclass(init=False, unsafe_hash=True, slots=True)
class CancelReceived:
    """A CANCEL opened server transaction ``tx_key`` (answer it with ``send_response``).

    ``invite_tx_key`` is the live INVITE server transaction it targets (§9.2), or None when
    there is none (a proxy then forwards the CANCEL statelessly, §16.10).
    """

    tx_key: Final[ServerKey]
    request: Final[Request]
    invite_tx_key: Final[ServerKey | None]
    source: Final[Peer]

    def __init__(
        self,
        tx_key: ServerKey,
        request: Request,
        invite_tx_key: ServerKey | None,
        source: Peer,
    ) -> None:
        self.tx_key = tx_key
        self.request = request
        self.invite_tx_key = invite_tx_key
        self.source = source


@dataclass(init=False, unsafe_hash=True, slots=True)
class ResponseReceived:
    """A response for client transaction ``tx_key`` that the TU must see."""

    tx_key: Final[ClientTxKey]
    response: Final[Response]
    source: Final[Peer]

    def __init__(self, tx_key: ClientTxKey, response: Response, source: Peer) -> None:
        self.tx_key = tx_key
        self.response = response
        self.source = source


@dataclass(init=False, unsafe_hash=True, slots=True)
class StrayResponse:
    """A response that matched no client transaction; drop and count it (RFC 6026 §7.2)."""

    response: Final[Response]
    source: Final[Peer]

    def __init__(self, response: Response, source: Peer) -> None:
        self.response = response
        self.source = source


@dataclass(init=False, unsafe_hash=True, slots=True)
class TransactionTimedOut:
    """Timer B, F, H (or the CANCEL guard, ``CANCEL_GUARD``) fired; ``timer`` says which.

    For a client transaction the TU treats it as a 408 (§8.1.3.1, §16.8).  For an INVITE
    server transaction (Timer H) the ACK for its non-2xx final never came.
    """

    tx_key: Final[TxKey]
    timer: Final[str]

    def __init__(self, tx_key: TxKey, timer: str) -> None:
        self.tx_key = tx_key
        self.timer = timer


@dataclass(init=False, unsafe_hash=True, slots=True)
class TransportErrorOccurred:
    """The transport could not deliver for this transaction (§17.1.4, §17.2.4)."""

    tx_key: Final[TxKey]

    def __init__(self, tx_key: TxKey) -> None:
        self.tx_key = tx_key


@dataclass(init=False, unsafe_hash=True, slots=True)
class TransactionTerminated:
    """The transaction is gone; the TU can free whatever it keyed on ``tx_key``."""

    tx_key: Final[TxKey]

    def __init__(self, tx_key: TxKey) -> None:
        self.tx_key = tx_key


@dataclass(init=False, unsafe_hash=True, slots=True)
class Overloaded:
    """The server transaction cap was reached: ``request`` got a stateless 503 (§21.5.4)."""

    request: Final[Request]
    source: Final[Peer]

    def __init__(self, request: Request, source: Peer) -> None:
        self.request = request
        self.source = source


Event = (
    RequestReceived
    | AckReceived
    | CancelReceived
    | ResponseReceived
    | StrayResponse
    | TransactionTimedOut
    | TransportErrorOccurred
    | TransactionTerminated
    | Overloaded
)


# --------------------------------------------------------------------------- transactions


class _Tx(ABC):
    """What every transaction has: its key, state, where it sends, and its two timer slots.

    ``rtx_seq`` is the live retransmission timer (A, E or G), ``life_seq`` the live timer that
    ends a state (B, D, F, H, I, J, K, L, M or the CANCEL guard); 0 means none.
    """

    __slots__ = ("dest", "interval", "key", "life_seq", "reliable", "rtx_seq", "state")

    key: TxKey
    state: TxState
    dest: Peer
    reliable: bool
    rtx_seq: int
    life_seq: int
    interval: float

    def __init__(self, key: TxKey, state: TxState, dest: Peer) -> None:
        self.key = key
        self.state = state
        self.dest = dest
        self.reliable = dest.reliable
        self.rtx_seq = 0
        self.life_seq = 0
        self.interval = 0.0

    @abstractmethod
    def on_timer(self, layer: TransactionLayer, name: str, now: float) -> None:
        """A timer of this transaction fired (``name`` is "A".."M" or ``CANCEL_GUARD``)."""


class _ServerTx(_Tx):
    """Responses go to ``dest``, the request's source (see the module docstring)."""

    # No reference to the request: a finished transaction lingers up to 64*T1 (Timer J, I)
    # only to repeat ``last_response``, and the parsed request (its cached headers, URIs and
    # lists) kept that long made the young-generation garbage collections walk hundreds of
    # thousands of objects (100-200 ms pauses at 1,600 requests/s).
    __slots__ = ("last_response",)

    key: ServerKey
    last_response: bytes | None

    def __init__(self, key: ServerKey, state: TxState, source: Peer) -> None:
        super().__init__(key, state, source)
        self.last_response = None

    @abstractmethod
    def on_retransmission(self, layer: TransactionLayer) -> None:
        """The request arrived again: re-send the last response, if any."""

    @abstractmethod
    def on_send_response(self, layer: TransactionLayer, data: bytes, status: int,
                         now: float, linger: bool = True) -> bool:
        """The TU responds; False when the state allows no such response.  ``linger=False``
        (non-INVITE only) ends the transaction with its final response (§8.2.7)."""


class _InviteServerTx(_ServerTx):
    """§17.2.1 / RFC 6026 §7.1 (figure 7 of RFC 6026)."""

    __slots__ = ("ack_index_key", "final_to_tag")

    ack_index_key: _LegacyAckKey | None
    final_to_tag: str | None

    def __init__(self, key: ServerKey, source: Peer) -> None:
        super().__init__(key, _PROCEEDING, source)
        self.ack_index_key = None
        self.final_to_tag = None

    def on_retransmission(self, layer: TransactionLayer) -> None:
        # Proceeding: the most recent provisional; Completed: the final.  Accepted: RFC 6026
        # absorbs without answering (the UAS core retransmits its 2xx); Confirmed: nothing.
        if self.state is _PROCEEDING or self.state is _COMPLETED:
            last = self.last_response
            if last is not None:
                layer._datagrams.append((last, self.dest))
        layer.stats.requests_absorbed += 1

    def on_send_response(self, layer: TransactionLayer, data: bytes, status: int,
                         now: float, linger: bool = True) -> bool:
        state = self.state
        if state is _PROCEEDING:
            layer._datagrams.append((data, self.dest))
            if status < 200:
                self.last_response = data
            elif status < 300:
                self.state = _ACCEPTED
                self.last_response = None
                layer._arm_life(self, layer._timer_l, "L", now)
            else:
                self.state = _COMPLETED
                self.last_response = data
                if self.ack_index_key is not None:
                    # RFC 2543 ACK matching compares the ACK's To tag with this response's.
                    self.final_to_tag = parse_message(data).to_addr.tag
                if not self.reliable:
                    self.interval = layer._t1
                    layer._arm_rtx(self, layer._t1, "G", now)
                layer._arm_life(self, layer._timer_h, "H", now)
            return True
        if state is _ACCEPTED and 200 <= status < 300:
            # A proxy relays every 2xx retransmission from downstream (RFC 6026 §8.7).
            layer._datagrams.append((data, self.dest))
            return True
        return False

    def on_ack(self, layer: TransactionLayer, now: float) -> bool:
        """Feed a matching ACK; False means "not ours, surface it to the TU"."""
        state = self.state
        if state is _COMPLETED:
            self.state = _CONFIRMED
            layer._disarm(self)
            layer.stats.acks_absorbed += 1
            layer._linger(self, layer._timer_i, "I", now)
            return True
        if state is _ACCEPTED:
            # Only a 2xx was sent, so this is the ACK for it (an RFC 2543 peer, or a UAC
            # reusing the INVITE's branch): the TU routes it end to end.
            return False
        # Confirmed: an ACK retransmission.  Proceeding: no final was sent, so an ACK here
        # acknowledges nothing of ours; dropping it is all that is left.
        layer.stats.acks_absorbed += 1
        return True

    def on_timer(self, layer: TransactionLayer, name: str, now: float) -> None:
        state = self.state
        if name == "G" and state is _COMPLETED:
            last = self.last_response
            if last is not None:
                layer._datagrams.append((last, self.dest))
                layer.stats.retransmissions_sent += 1
            self.interval = min(2 * self.interval, layer._t2)
            layer._arm_rtx(self, self.interval, "G", now)
        elif name == "H" and state is _COMPLETED:
            layer._time_out(self, "H")
        elif (name == "I" and state is _CONFIRMED) or (name == "L" and state is _ACCEPTED):
            layer._terminate(self)


class _NonInviteServerTx(_ServerTx):
    """§17.2.2 (figure 8)."""

    __slots__ = ()

    def __init__(self, key: ServerKey, source: Peer) -> None:
        super().__init__(key, _TRYING, source)

    def on_retransmission(self, layer: TransactionLayer) -> None:
        # Trying: nothing to repeat yet; Proceeding/Completed: the last response sent.
        last = self.last_response
        if last is not None:
            layer._datagrams.append((last, self.dest))
        layer.stats.requests_absorbed += 1

    def on_send_response(self, layer: TransactionLayer, data: bytes, status: int,
                         now: float, linger: bool = True) -> bool:
        if self.state is _COMPLETED:
            return False
        layer._datagrams.append((data, self.dest))
        self.last_response = data
        if status < 200:
            self.state = _PROCEEDING
        elif linger:
            self.state = _COMPLETED
            layer._linger(self, layer._timer_j, "J", now)
        else:
            layer._terminate(self)
        return True

    def on_timer(self, layer: TransactionLayer, name: str, now: float) -> None:
        if name == "J" and self.state is _COMPLETED:
            layer._terminate(self)


_NO_CANCEL = 0
_CANCEL_PENDING = 1
_CANCEL_SENT = 2


class _ClientTx(_Tx):
    __slots__ = ("request_bytes",)

    key: ClientTxKey
    request_bytes: bytes

    def __init__(self, key: ClientTxKey, state: TxState, request_bytes: bytes,
                 dest: Peer) -> None:
        super().__init__(key, state, dest)
        self.request_bytes = request_bytes

    @abstractmethod
    def on_response(self, layer: TransactionLayer, response: Response, source: Peer,
                    now: float) -> None:
        """A response matched this client transaction."""


class _InviteClientTx(_ClientTx):
    """§17.1.1 / RFC 6026 §7.2 (figure 5 of RFC 6026)."""

    __slots__ = ("ack", "cancel_state", "request")

    # The parsed INVITE builds the ACK for a non-2xx and the CANCEL, both only up to the
    # final response; it is dropped then rather than kept for Timer D/M (64*T1).
    request: Request | None
    ack: bytes | None
    cancel_state: int

    def __init__(self, key: ClientTxKey, request_bytes: bytes, request: Request,
                 dest: Peer) -> None:
        super().__init__(key, _CALLING, request_bytes, dest)
        self.request = request
        self.ack = None
        self.cancel_state = _NO_CANCEL

    def on_response(self, layer: TransactionLayer, response: Response, source: Peer,
                    now: float) -> None:
        status = response.status
        state = self.state
        if state is _CALLING or state is _PROCEEDING:
            if status < 200:
                if state is _CALLING:
                    self.state = _PROCEEDING
                    # Timer B only guards Calling; from here the proxy's Timer C rules.
                    layer._disarm(self)
                    if self.cancel_state == _CANCEL_PENDING:
                        layer._send_cancel(self, now)
                layer._events.append(ResponseReceived(self.key, response, source))
                return
            # Leaving Calling also drops a CANCEL still waiting for a provisional: §9.1 says
            # not to send one once a final has arrived.
            layer._disarm(self)
            layer._events.append(ResponseReceived(self.key, response, source))
            request = self.request
            self.request = None
            if status < 300:
                self.state = _ACCEPTED
                layer._arm_life(self, layer._timer_m, "M", now)
                return
            self.state = _COMPLETED
            assert request is not None  # set until the first final response
            ack = _build_ack(request, response)
            self.ack = ack
            layer._datagrams.append((ack, self.dest))
            layer._linger(self, layer._timer_d, "D", now)
            return
        if state is _ACCEPTED:
            if 200 <= status < 300:
                # RFC 6026 §8.4: 2xx retransmissions and 2xx from other forks go to the TU,
                # which owns their ACKs.
                layer._events.append(ResponseReceived(self.key, response, source))
            else:
                layer.stats.responses_absorbed += 1
            return
        # Completed.
        if status >= 300:
            if self.ack is not None:
                layer._datagrams.append((self.ack, self.dest))
            layer.stats.responses_absorbed += 1
        elif status >= 200:
            # A 2xx from another fork after a non-2xx: figure 5 has no arc for it, but
            # dropping it would leave a dialog nobody ACKs, so the TU decides.
            layer._events.append(ResponseReceived(self.key, response, source))
        else:
            layer.stats.responses_absorbed += 1

    def on_timer(self, layer: TransactionLayer, name: str, now: float) -> None:
        state = self.state
        if name == "A" and state is _CALLING:
            layer._datagrams.append((self.request_bytes, self.dest))
            layer.stats.retransmissions_sent += 1
            # §17.1.1.2: INVITE retransmissions double without the T2 cap.
            self.interval *= 2
            layer._arm_rtx(self, self.interval, "A", now)
        elif name == "B" and state is _CALLING:
            layer._time_out(self, "B")
        elif name == CANCEL_GUARD and state is _PROCEEDING:
            layer._time_out(self, CANCEL_GUARD)
        elif (name == "D" and state is _COMPLETED) or (name == "M" and state is _ACCEPTED):
            layer._terminate(self)


class _NonInviteClientTx(_ClientTx):
    """§17.1.2 (figure 6)."""

    __slots__ = ()

    def __init__(self, key: ClientTxKey, request_bytes: bytes, dest: Peer) -> None:
        super().__init__(key, _TRYING, request_bytes, dest)

    def on_response(self, layer: TransactionLayer, response: Response, source: Peer,
                    now: float) -> None:
        if self.state is _COMPLETED:
            layer.stats.responses_absorbed += 1
            return
        layer._events.append(ResponseReceived(self.key, response, source))
        if response.status < 200:
            self.state = _PROCEEDING
            return
        self.state = _COMPLETED
        layer._disarm(self)
        layer._linger(self, layer._timer_k, "K", now)

    def on_timer(self, layer: TransactionLayer, name: str, now: float) -> None:
        state = self.state
        if name == "E" and (state is _TRYING or state is _PROCEEDING):
            layer._datagrams.append((self.request_bytes, self.dest))
            layer.stats.retransmissions_sent += 1
            # §17.1.2.2: double up to T2 while Trying; a provisional means the server is
            # alive, so Proceeding retransmits every T2.
            if state is _TRYING:
                self.interval = min(2 * self.interval, layer._t2)
            else:
                self.interval = layer._t2
            layer._arm_rtx(self, self.interval, "E", now)
        elif name == "F" and (state is _TRYING or state is _PROCEEDING):
            layer._time_out(self, "F")
        elif name == "K" and state is _COMPLETED:
            layer._terminate(self)


# --------------------------------------------------------------------------- the layer


class TransactionLayer:
    """All transactions of one SIP element; see the module docstring.

    ``auto_100``: answer every new INVITE with 100 Trying at once (§17.2.1 requires one
    within 200 ms unless the TU answers first; a proxy cannot know that it will).
    ``max_server_transactions``: live server transactions allowed before new requests get a
    stateless 503 with ``Retry-After: overload_retry_after`` (None leaves the header out).
    """

    def __init__(
        self,
        timers: TimerSettings | None = None,
        *,
        auto_100: bool = True,
        max_server_transactions: int = 100_000,
        overload_retry_after: int | None = 5,
    ) -> None:
        if max_server_transactions < 0:
            raise ValueError("max_server_transactions must not be negative")
        self.timers = timers if timers is not None else TimerSettings()
        self.auto_100 = auto_100
        self.max_server_transactions = max_server_transactions
        self.overload_retry_after = overload_retry_after
        self.stats = TransactionStats()

        # Resolved once: the properties are too slow for the per-message path.
        t = self.timers
        self._t1 = t.T1
        self._t2 = t.T2
        self._timer_b = t.TIMER_B
        self._timer_d = t.TIMER_D
        self._timer_f = t.TIMER_F
        self._timer_h = t.TIMER_H
        self._timer_i = t.TIMER_I
        self._timer_j = t.TIMER_J
        self._timer_k = t.TIMER_K
        self._timer_l = t.TIMER_L
        self._timer_m = t.TIMER_M

        self._txs: dict[TxKey, _Tx] = {}
        self._server_count = 0
        #: Server transactions in the order they started to linger (Timer I, J); those that
        #: ended since are dropped from the front as they get there.
        self._lingering: deque[_ServerTx] = deque()
        self._legacy_acks: dict[_LegacyAckKey, _InviteServerTx] = {}
        self._events: deque[Event] = deque()
        self._datagrams: list[tuple[bytes, Peer]] = []
        self._heap: list[tuple[float, int, TxKey, str]] = []
        self._seq = 0
        self._live_timers = 0

    # ----------------------------------------------------------------- introspection

    def state_of(self, tx_key: TxKey) -> TxState | None:
        """State of a live transaction, None once it is terminated (or never existed)."""
        tx = self._txs.get(tx_key)
        return tx.state if tx is not None else None

    @property
    def transaction_count(self) -> int:
        """Live transactions, client and server."""
        return len(self._txs)

    @property
    def server_transaction_count(self) -> int:
        """Live server transactions (what ``max_server_transactions`` caps)."""
        return self._server_count

    # ----------------------------------------------------------------- input from the wire

    def receive_request(self, request: Request, source: Peer, now: float) -> None:
        """Match a parsed request to a server transaction (§17.2.3) or open one.

        May raise ``SipParseError`` if a header needed for matching (Via, CSeq, From, To,
        Call-ID) turns out malformed when the lazy message parses it.
        """
        method = request.method
        via = request.top_via
        branch = via.branch
        invite_key: ServerKey
        # RFC 4475 §3.2.1: a bare cookie is no unique branch, so it gets RFC 2543 matching.
        if branch is not None and len(branch) > 7 and branch.startswith(MAGIC_COOKIE):
            host, port = via.sent_by
            host = host.lower()
            if method == "ACK":
                matched = self._txs.get(_server_key((branch, host, port, "INVITE")))
                self._receive_ack(matched, request, source, now)
                return
            key: ServerKey = _server_key((branch, host, port, method))
            tx = self._txs.get(key)
            if tx is not None:
                assert isinstance(tx, _ServerTx)
                tx.on_retransmission(self)
                return
            invite_key = _server_key((branch, host, port, "INVITE"))
        else:
            if method == "ACK":
                self._receive_legacy_ack(request, source, now)
                return
            key = _legacy_key(request, method, request.to_addr.tag)
            tx = self._txs.get(key)
            if tx is not None:
                assert isinstance(tx, _ServerTx)
                tx.on_retransmission(self)
                return
            invite_key = key._replace(method="INVITE")

        if method == "CANCEL":
            target = invite_key if invite_key in self._txs else None
            # A CANCEL for a live INVITE relieves load, so the cap does not apply to it.
            if (target is None and self._server_count >= self.max_server_transactions
                    and not self._evict_lingering()):
                self._reject_overload(request, source)
                return
            cancel_tx = _NonInviteServerTx(key, source)
            self._add_server_tx(cancel_tx)
            self._events.append(CancelReceived(key, request, target, source))
            return

        if self._server_count >= self.max_server_transactions and not self._evict_lingering():
            self._reject_overload(request, source)
            return
        server_tx: _ServerTx
        if method == "INVITE":
            invite_tx = _InviteServerTx(key, source)
            if isinstance(key, LegacyServerTxKey):
                ack_key = _legacy_ack_key(request)
                invite_tx.ack_index_key = ack_key
                self._legacy_acks[ack_key] = invite_tx
            server_tx = invite_tx
        else:
            server_tx = _NonInviteServerTx(key, source)
        self._add_server_tx(server_tx)
        self._events.append(RequestReceived(key, request, source))
        if method == "INVITE" and self.auto_100:
            trying = build_response(request, 100, "Trying")
            server_tx.last_response = trying
            self._datagrams.append((trying, source))

    def receive_response(self, response: Response, source: Peer, now: float) -> None:
        """Match a parsed response to a client transaction (§17.1.3)."""
        branch = response.top_via.branch
        tx = (self._txs.get(_new_key(ClientTxKey, (branch, response.cseq.method)))
              if branch is not None else None)
        if tx is None:
            self.stats.stray_responses += 1
            self._events.append(StrayResponse(response, source))
            return
        assert isinstance(tx, _ClientTx)
        tx.on_response(self, response, source, now)

    def transport_error(self, dest: Peer, now: float) -> None:
        """Sending to ``dest`` failed: end every transaction that sends there (§17.1.4)."""
        failed = [tx for tx in self._txs.values() if tx.dest == dest]
        for tx in failed:
            self._fail(tx)

    def report_transport_error(self, tx_key: TxKey, now: float) -> bool:
        """Sending failed for one transaction (§17.1.4, §17.2.4); False if it is gone."""
        tx = self._txs.get(tx_key)
        if tx is None:
            return False
        self._fail(tx)
        return True

    # ----------------------------------------------------------------- input from the TU

    def send_response(self, tx_key: TxKey, response_bytes: bytes, status: int,
                      now: float, *, linger: bool = True) -> bool:
        """Send a response through server transaction ``tx_key``.

        Returns False (and sends nothing) if the transaction is gone, is not a server
        transaction, or its state allows no such response (a non-2xx after a 2xx, anything
        after a non-INVITE final), so a TU racing a timeout needs no exception handling.

        ``linger=False`` answers a non-INVITE request statelessly (RFC 3261 §8.2.7, "the
        most common use ... is to respond to an unauthenticated request with a challenge"):
        the transaction ends with its final response instead of absorbing retransmissions
        for Timer J, so a retransmission is a new request and gets a new answer.  An INVITE
        transaction always keeps its state (its ACK must be matched).
        """
        if not 100 <= status <= 699:
            raise ValueError(f"not a SIP status code: {status}")
        tx = self._txs.get(tx_key)
        if not isinstance(tx, _ServerTx):
            return False
        return tx.on_send_response(self, response_bytes, status, now, linger)

    def send_request(self, request_bytes: bytes, request: Request, dest: Peer,
                     now: float) -> ClientTxKey:
        """Open a client transaction that sends ``request_bytes`` to ``dest``.

        ``request`` is the parsed form of ``request_bytes`` (its top Via branch and CSeq
        method make the key; an INVITE's headers also build the ACK and CANCEL).
        """
        method = request.cseq.method
        if method == "ACK":
            raise ValueError("ACK opens no transaction (§17.1.1.3); use send_stateless")
        branch = request.top_via.branch
        if not branch:
            raise ValueError("a client transaction needs a branch in the top Via (§8.1.1.7)")
        key = ClientTxKey(branch, method)
        if key in self._txs:
            raise ValueError(f"client transaction {key} already exists")
        if method == "INVITE":
            self._start_client_tx(_InviteClientTx(key, request_bytes, request, dest), now)
        else:
            self._start_client_tx(_NonInviteClientTx(key, request_bytes, dest), now)
        return key

    def cancel(self, tx_key: TxKey, now: float) -> ClientTxKey | None:
        """Cancel INVITE client transaction ``tx_key`` (§9.1); returns the CANCEL's key.

        The CANCEL goes out now if a provisional response has arrived, otherwise as soon as
        one does (and never if a final response comes first).  Returns None when there is
        nothing left to cancel: the transaction is gone or already has a final response.
        Calling it again returns the same key without sending a second CANCEL.
        """
        tx = self._txs.get(tx_key)
        if tx is None:
            return None
        if not isinstance(tx, _InviteClientTx):
            raise ValueError("only INVITE client transactions can be cancelled (§9.1)")
        state = tx.state
        if state is _CALLING:
            if tx.cancel_state == _NO_CANCEL:
                tx.cancel_state = _CANCEL_PENDING
        elif state is _PROCEEDING:
            if tx.cancel_state != _CANCEL_SENT:
                self._send_cancel(tx, now)
        else:
            return None
        return ClientTxKey(tx.key.branch, "CANCEL")

    def send_stateless(self, data: bytes, dest: Peer) -> None:
        """Queue bytes that belong to no transaction (the ACK for a 2xx, a stateless reply)."""
        self._datagrams.append((data, dest))

    # ----------------------------------------------------------------- output and timers

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Peer]]:
        """Everything to put on the wire since the last call, in order."""
        out = self._datagrams
        self._datagrams = []
        return out

    def next_event(self) -> Event | None:
        """The next event for the TU, or None."""
        events = self._events
        return events.popleft() if events else None

    def get_timer(self) -> float | None:
        """The earliest live timer deadline, or None if no timer is armed."""
        heap = self._heap
        txs = self._txs
        while heap:
            _, seq, key, _ = heap[0]
            tx = txs.get(key)
            if tx is not None and (tx.rtx_seq == seq or tx.life_seq == seq):
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def handle_timer(self, now: float) -> None:
        """Fire every timer whose deadline is at or before ``now``."""
        heap = self._heap
        txs = self._txs
        while heap and heap[0][0] <= now:
            _, seq, key, name = heapq.heappop(heap)
            tx = txs.get(key)
            if tx is None:
                continue
            if tx.rtx_seq == seq:
                tx.rtx_seq = 0
            elif tx.life_seq == seq:
                tx.life_seq = 0
            else:
                continue
            self._live_timers -= 1
            tx.on_timer(self, name, now)

    # ----------------------------------------------------------------- internals

    def _arm_rtx(self, tx: _Tx, delay: float, name: str, now: float) -> None:
        self._seq += 1
        seq = self._seq
        if not tx.rtx_seq:
            self._live_timers += 1
        tx.rtx_seq = seq
        heapq.heappush(self._heap, (now + delay, seq, tx.key, name))
        self._maybe_compact()

    def _arm_life(self, tx: _Tx, delay: float, name: str, now: float) -> None:
        self._seq += 1
        seq = self._seq
        if not tx.life_seq:
            self._live_timers += 1
        tx.life_seq = seq
        heapq.heappush(self._heap, (now + delay, seq, tx.key, name))
        self._maybe_compact()

    def _linger(self, tx: _Tx, delay: float, name: str, now: float) -> None:
        """Start Timer D, I, J or K: how long a finished transaction absorbs retransmissions.

        Reliable transports do not retransmit, so these timers are zero there (§17.1.1.2,
        §17.1.2.2, §17.2.1, §17.2.2) and the transaction ends at once; so it does when the
        configuration sets one to zero.
        """
        if tx.reliable or delay <= 0:
            self._terminate(tx)
        else:
            self._arm_life(tx, delay, name, now)
            if isinstance(tx, _ServerTx):
                self._lingering.append(tx)

    def _evict_lingering(self) -> bool:
        """At the cap: end the oldest server transaction that only absorbs retransmissions
        (see the module docstring); False if there is none."""
        lingering = self._lingering
        txs = self._txs
        while lingering:
            tx = lingering.popleft()
            if txs.get(tx.key) is tx and tx.state in _ABSORBING:
                self.stats.lingering_evicted += 1
                self._terminate(tx)
                return True
        return False

    def _disarm(self, tx: _Tx) -> None:
        if tx.rtx_seq:
            tx.rtx_seq = 0
            self._live_timers -= 1
        if tx.life_seq:
            tx.life_seq = 0
            self._live_timers -= 1

    def _maybe_compact(self) -> None:
        # Lazy deletion leaves an entry per disarmed timer until its deadline (up to 64*T1);
        # rebuilding when they dominate keeps the heap O(live timers) at an amortised O(1).
        heap = self._heap
        if len(heap) < 1024 or len(heap) < 4 * self._live_timers:
            return
        txs = self._txs
        live = []
        for entry in heap:
            tx = txs.get(entry[2])
            if tx is not None and (tx.rtx_seq == entry[1] or tx.life_seq == entry[1]):
                live.append(entry)
        heapq.heapify(live)
        # In place: handle_timer and get_timer may be iterating over this very list.
        heap[:] = live

    def _start_client_tx(self, tx: _ClientTx, now: float) -> None:
        """Send the request and start A+B (§17.1.1.2) or E+F (§17.1.2.2)."""
        self._txs[tx.key] = tx
        self._datagrams.append((tx.request_bytes, tx.dest))
        invite = isinstance(tx, _InviteClientTx)
        if not tx.reliable:
            tx.interval = self._t1
            self._arm_rtx(tx, self._t1, "A" if invite else "E", now)
        if invite:
            self._arm_life(tx, self._timer_b, "B", now)
        else:
            self._arm_life(tx, self._timer_f, "F", now)

    def _add_server_tx(self, tx: _ServerTx) -> None:
        self._txs[tx.key] = tx
        self._server_count += 1

    def _terminate(self, tx: _Tx) -> None:
        tx.state = _TERMINATED
        self._disarm(tx)
        key = tx.key
        if self._txs.get(key) is tx:
            del self._txs[key]
            if isinstance(tx, _ServerTx):
                self._server_count -= 1
                lingering = self._lingering
                while lingering and lingering[0].state is _TERMINATED:
                    lingering.popleft()
                if (isinstance(tx, _InviteServerTx) and tx.ack_index_key is not None
                        and self._legacy_acks.get(tx.ack_index_key) is tx):
                    del self._legacy_acks[tx.ack_index_key]
        self._events.append(TransactionTerminated(key))

    def _time_out(self, tx: _Tx, timer: str) -> None:
        self.stats.timeouts += 1
        self._events.append(TransactionTimedOut(tx.key, timer))
        self._terminate(tx)

    def _fail(self, tx: _Tx) -> None:
        self.stats.transport_errors += 1
        self._events.append(TransportErrorOccurred(tx.key))
        self._terminate(tx)

    def _receive_ack(self, tx: _Tx | None, request: Request, source: Peer, now: float) -> None:
        if isinstance(tx, _InviteServerTx) and tx.on_ack(self, now):
            return
        if tx is None and self._is_ack_for_stateless_reply(request):
            self.stats.acks_absorbed += 1
            return
        self._events.append(AckReceived(request, source))

    def _receive_legacy_ack(self, request: Request, source: Peer, now: float) -> None:
        tx = self._legacy_acks.get(_legacy_ack_key(request))
        if tx is not None and tx.state is not _ACCEPTED \
                and tx.final_to_tag != request.to_addr.tag:
            # §17.2.3: the ACK's To tag must be the one of the response we sent; any other
            # ACK acknowledges something else and is not ours to absorb.
            tx = None
        self._receive_ack(tx, request, source, now)

    def _is_ack_for_stateless_reply(self, request: Request) -> bool:
        tag = request.to_addr.tag
        return (tag is not None and tag.startswith(_STATELESS_TAG_PREFIX)
                and tag == _stateless_tag(request))

    def _reject_overload(self, request: Request, source: Peer) -> None:
        headers: list[tuple[str, str]] = []
        if self.overload_retry_after is not None:
            headers.append(("Retry-After", str(self.overload_retry_after)))
        data = build_response(request, 503, "Service Unavailable",
                              to_tag=_stateless_tag(request), headers=headers)
        self._datagrams.append((data, source))
        self.stats.overload_rejections += 1
        self._events.append(Overloaded(request, source))

    def _send_cancel(self, tx: _InviteClientTx, now: float) -> None:
        tx.cancel_state = _CANCEL_SENT
        key = ClientTxKey(tx.key.branch, "CANCEL")
        if key not in self._txs:
            assert tx.request is not None  # cancelling is for Calling/Proceeding only
            self._start_client_tx(_NonInviteClientTx(key, _build_cancel(tx.request), tx.dest),
                                  now)
        self._arm_life(tx, self._timer_b, CANCEL_GUARD, now)


# --------------------------------------------------------------------------- helpers


def _legacy_key(request: Request, method: str, to_tag: str | None) -> LegacyServerTxKey:
    from_addr = request.from_addr
    return LegacyServerTxKey(request.uri, to_tag, from_addr.tag, request.call_id,
                             request.cseq.number, method, str(request.top_via))


def _legacy_ack_key(request: Request) -> _LegacyAckKey:
    return (request.uri, request.from_addr.tag, request.call_id, request.cseq.number,
            str(request.top_via))


def _stateless_tag(request: Request) -> str:
    # Deterministic, so a retransmitted request gets the same tag, and recomputable from the
    # ACK, which repeats Call-ID, From tag, CSeq number and (RFC 3261) the branch.
    seed = "\x00".join((request.call_id, request.from_addr.tag or "",
                        str(request.cseq.number), request.top_via.branch or ""))
    return f"{_STATELESS_TAG_PREFIX}{zlib.crc32(seed.encode()):08x}"


def _first_via(request: Request) -> str:
    return request.header_values("Via")[0]


def _build_ack(invite: Request, response: Response) -> bytes:
    """The ACK for a 3xx-6xx response to ``invite`` (§17.1.1.3)."""
    headers = [
        ("Via", _first_via(invite)),
        ("From", invite.header("From") or str(invite.from_addr)),
        ("To", response.header("To") or str(response.to_addr)),
        ("Call-ID", invite.call_id),
        ("CSeq", f"{invite.cseq.number} ACK"),
    ]
    headers.extend(("Route", route) for route in invite.header_values("Route"))
    return build_request("ACK", invite.uri, headers)


def _build_cancel(invite: Request) -> bytes:
    """The CANCEL for ``invite`` (§9.1)."""
    headers = [
        ("Via", _first_via(invite)),
        ("From", invite.header("From") or str(invite.from_addr)),
        ("To", invite.header("To") or str(invite.to_addr)),
        ("Call-ID", invite.call_id),
        ("CSeq", f"{invite.cseq.number} CANCEL"),
    ]
    headers.extend(("Route", route) for route in invite.header_values("Route"))
    return build_request("CANCEL", invite.uri, headers)
