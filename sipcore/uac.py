"""A user agent client for requests the server originates itself (RFC 3261 §8.1).

The proxy core only relays; some services speak as a user agent of their own: msilo delivers
stored MESSAGEs (RFC 3428), presence sends NOTIFYs (RFC 6665 §4.2.2), click-to-dial sends
INVITE and REFER (RFC 3515).  :class:`UserAgentClient` is the one piece they share:

* :func:`build_uac_request` (sans-IO) writes the request as §8.1.1 wants it: a Via naming this
  server with a fresh ``z9hG4bK`` branch and ``rport`` (§8.1.1.7, RFC 3581 §3), From with a
  tag (§8.1.1.3), To, Call-ID (§8.1.1.4), CSeq (§8.1.1.5), Max-Forwards 70 (§8.1.1.6), an
  optional Contact (§8.1.1.8; MESSAGE has none, NOTIFY and INVITE need one) and a Route set.
* :class:`Destination` is where the request goes: the Request-URI, the transport address of
  the next hop and the Route set.  For a registered contact (:meth:`Destination.of_binding`)
  that is the contact URI, the address the REGISTER came from (RFC 3581: what reaches a phone
  behind NAT; the proxy's LOCATION stage sends there too) and the binding's RFC 3327 Path as
  Route headers (RFC 3327 §5.3: requests to the contact traverse the recorded path).
* :meth:`UserAgentClient.send` starts a client transaction on the :class:`~sipcore.stack.SipStack`
  (which retransmits, §17.1) and returns an :class:`asyncio.Future` that resolves to the first
  final response, or fails with :class:`UacTimeout` (Timer B/F, §17.1.1.2/§17.1.2.2) or
  :class:`UacTransportError` (§8.1.3.1, §18.4).  Provisional responses and later finals (a
  forked INVITE's further 2xx) go to an optional ``on_response`` callback.

The UAC does not authenticate: requests the server originates are trusted by its own
subscribers' phones and relayed by peers that know the server.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from sipcore import transaction as txn
from sipcore import workers
from sipcore.message import Request, Response, build_request, parse_message
from sipcore.transport_types import Peer

if TYPE_CHECKING:
    from sipcore.location import Binding
    from sipcore.stack import SipStack

__all__ = [
    "Destination",
    "Identity",
    "OutgoingRequest",
    "UacError",
    "UacTimeout",
    "UacTransportError",
    "UserAgentClient",
    "build_uac_request",
    "new_call_id",
    "new_tag",
]

BRANCH_COOKIE: Final = "z9hG4bK"  # RFC 3261 §8.1.1.7


class Identity(Protocol):
    """Where this server can be reached (``sipcore.proxy.LocalIdentity`` satisfies this)."""

    def sent_by(self, transport: str) -> tuple[str, int]: ...


class UacError(Exception):
    """The request got no final response; ``reason`` is ``"timeout"`` or ``"transport"``."""

    reason = "failed"


class UacTimeout(UacError):
    """Timer B or F fired: nobody answered (§17.1.1.2, §17.1.2.2)."""

    reason = "timeout"


class UacTransportError(UacError):
    """The transport could not deliver the request (§8.1.3.1: treat like 503)."""

    reason = "transport"


def new_tag() -> str:
    """A From/To tag with 48 random bits (§19.3: "at least 32 bits of randomness")."""
    return secrets.token_hex(6)


def new_call_id(host: str) -> str:
    """A globally unique Call-ID (§8.1.1.4): 96 random bits at our host."""
    return f"{secrets.token_hex(12)}@{host}"


def new_branch() -> str:
    # The suffix names this worker process, so a response finds it (sipcore.workers).
    return BRANCH_COOKIE + "uac" + secrets.token_hex(8) + workers.branch_suffix()


@dataclass(frozen=True, slots=True)
class Destination:
    """Request-URI, next hop and Route set of one request."""

    uri: str
    peer: Peer
    route: tuple[str, ...] = ()

    @classmethod
    def of_binding(cls, binding: Binding) -> Destination:
        """The registered contact of ``binding``: sent where its REGISTER came from, along
        its Path (RFC 3327 §5.3, RFC 3581)."""
        return cls(binding.contact, binding.source, binding.path)


@dataclass(frozen=True, slots=True)
class OutgoingRequest:
    """A request ready for the wire: its bytes, the parsed form and where it goes."""

    data: bytes
    request: Request
    dest: Peer


def build_uac_request(
    method: str,
    dest: Destination,
    *,
    sent_by: tuple[str, int],
    from_addr: str,
    to_addr: str,
    call_id: str,
    cseq: int = 1,
    from_tag: str | None = None,
    branch: str | None = None,
    contact: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    content_type: str | None = None,
) -> bytes:
    """The bytes of a new request (sans-IO).

    ``from_addr`` and ``to_addr`` are name-addr values (``"Bob" <sip:bob@example.com>`` or a
    bare ``<sip:...>``); a ``;tag=`` is appended to From when ``from_tag`` is given or From
    carries none (a fresh one), and To is written as given (in-dialog requests pass the
    remote tag in it).  ``headers`` come after the mandatory ones, in order, then
    ``Content-Type`` when ``content_type`` is given (§20.15: required with a body).
    """
    transport = dest.peer.transport
    host, port = sent_by
    via = f"SIP/2.0/{transport} {_host(host)}:{port};branch={branch or new_branch()};rport"
    frm = from_addr
    if from_tag is not None:
        frm = f"{from_addr};tag={from_tag}"
    elif ";tag=" not in from_addr.rpartition(">")[2]:
        frm = f"{from_addr};tag={new_tag()}"
    lines: list[tuple[str, str]] = [
        ("Via", via),
        ("Max-Forwards", "70"),
        *(("Route", r) for r in dest.route),
        ("From", frm),
        ("To", to_addr),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} {method}"),
    ]
    if contact is not None:
        lines.append(("Contact", contact))
    lines.extend(headers)
    if content_type is not None:
        lines.append(("Content-Type", content_type))
    return build_request(method, dest.uri, lines, body)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _Pending:
    """The owner of one client transaction (:class:`~sipcore.stack.ClientCallback`)."""

    __slots__ = ("future", "on_response")

    def __init__(
        self, future: asyncio.Future[Response], on_response: Callable[[Response], None] | None
    ) -> None:
        self.future = future
        self.on_response = on_response

    def response_received(self, tx: txn.TxKey, response: Response) -> None:
        if response.status >= 200 and not self.future.done():
            self.future.set_result(response)
            return
        if self.on_response is not None:
            self.on_response(response)

    def transaction_failed(self, tx: txn.TxKey, reason: str) -> None:
        if self.future.done():
            return
        error: UacError = UacTimeout() if reason == "timeout" else UacTransportError()
        self.future.set_exception(error)


class UserAgentClient:
    """Builds and sends requests for the server's own services; see the module docstring.

    ``identity`` says which host/port to put in Via and Contact per transport;
    ``user_agent`` goes into a User-Agent header (§20.41) when not empty.
    """

    def __init__(self, stack: SipStack, identity: Identity, *, user_agent: str = "") -> None:
        self.stack = stack
        self.identity = identity
        self.user_agent = user_agent
        self.stats: dict[str, int] = {"sent": 0, "final": 0, "timeout": 0, "transport": 0}

    def contact(self, transport: str, user: str | None = None) -> str:
        """A Contact for requests that need one: this server on ``transport``."""
        host, port = self.identity.sent_by(transport)
        param = "" if transport == "UDP" else f";transport={transport.lower()}"
        userinfo = f"{user}@" if user else ""
        # Requests to this Contact reach the worker that holds the dialog (sipcore.workers).
        return f"<sip:{userinfo}{_host(host)}:{port}{param}{workers.uri_param()}>"

    def build(
        self,
        method: str,
        dest: Destination,
        *,
        from_addr: str,
        to_addr: str,
        call_id: str | None = None,
        cseq: int = 1,
        from_tag: str | None = None,
        contact: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        content_type: str | None = None,
    ) -> OutgoingRequest:
        """A request for ``dest`` with our Via; raises ``SipParseError``/``ValueError`` for
        values that do not make a valid request (the parser checks what we built)."""
        sent_by = self.identity.sent_by(dest.peer.transport)
        extra = list(headers)
        if self.user_agent:
            extra.append(("User-Agent", self.user_agent))
        data = build_uac_request(
            method, dest, sent_by=sent_by, from_addr=from_addr, to_addr=to_addr,
            call_id=call_id or new_call_id(sent_by[0]), cseq=cseq, from_tag=from_tag,
            contact=contact, headers=extra, body=body, content_type=content_type,
        )
        parsed = parse_message(data)
        if not isinstance(parsed, Request):  # build_request always starts with a request line
            raise ValueError("built message is not a request")
        return OutgoingRequest(data, parsed, dest.peer)

    def send(
        self, outgoing: OutgoingRequest, on_response: Callable[[Response], None] | None = None
    ) -> asyncio.Future[Response]:
        """Start the client transaction; the future gets the first final response.

        Cancelling the future does not stop the transaction (§17.1: it runs to completion,
        its responses are then ignored).
        """
        future: asyncio.Future[Response] = self.stack.loop.create_future()
        future.add_done_callback(self._count)
        self.stack.send_request(outgoing.data, outgoing.request, outgoing.dest,
                                _Pending(future, on_response))
        self.stats["sent"] += 1
        return future

    async def request(
        self,
        method: str,
        dest: Destination,
        *,
        from_addr: str,
        to_addr: str,
        call_id: str | None = None,
        cseq: int = 1,
        from_tag: str | None = None,
        contact: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        content_type: str | None = None,
    ) -> Response:
        """Build, send and wait: the final response, or :class:`UacError`."""
        outgoing = self.build(
            method, dest, from_addr=from_addr, to_addr=to_addr, call_id=call_id, cseq=cseq,
            from_tag=from_tag, contact=contact, headers=headers, body=body,
            content_type=content_type,
        )
        return await self.send(outgoing)

    def _count(self, future: asyncio.Future[Response]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self.stats["final"] += 1
        elif isinstance(error, UacError):
            self.stats[error.reason] += 1
