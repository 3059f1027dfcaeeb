"""The INVITE dialogs the click-to-dial user agent opens, as a UAC (RFC 3261 §12-§15, §22).

:class:`Leg` is one dialog this server starts with an INVITE: to the caller's phone (sent to
its registered contact) or, in the 3PCC fallback, to the callee (sent through the server's own
proxy, so the call is authenticated, routed and billed like any call of the caller). Requests
are written and sent by :class:`sipcore.uac.UserAgentClient`; this module adds what a dialog
needs on top.

Theory of operation
-------------------
A leg goes ``idle -> confirmed -> terminated`` (no early dialogs are kept: nothing is sent to
a dialog before its 2xx).

* **INVITE** (:meth:`Leg.invite`): the first one goes to the Request-URI and Route set the
  leg was made with; a 2xx fixes the dialog (§12.1.2): remote tag from To, remote target from
  Contact, route set from Record-Route in reverse. Re-INVITEs (§14.1) and every other
  in-dialog request (§12.2.1.1) go to the remote target along the route set, with a CSeq one
  above the last (§12.2.1.1), to the transport address the first INVITE went to (the phone's
  registered source address, NAT-safe as the proxy's own relaying is).
* **ACK** for a 2xx is ours (§13.2.2.4): same CSeq number as the INVITE, same credentials, an
  answer in its body when the 2xx carried an offer. It is kept and sent again for every
  retransmitted 2xx (the transaction layer hands those to us, RFC 6026 §8.4). A 2xx from a
  second dialog of the same INVITE (a fork further on) is ACKed and BYEd at once (§13.2.2.4).
* **401/407** (§22.2, §22.3): the request is sent again with a new CSeq and credentials built
  from the subscriber's stored HA1 (:class:`DigestAnswerer`; the server knows no passwords),
  at most twice, and only for a realm equal to the subscriber's domain.
* **CANCEL** (§9.1) through :meth:`Leg.abandon`: a pending INVITE is cancelled; should its 2xx
  arrive anyway (the race §9.1 warns about) the dialog is ACKed and BYEd; a leg abandoned
  after its 2xx is BYEd.
* **Incoming in-dialog requests** reach the leg through :class:`DialogRouter`, the IN_DIALOG
  stage handler registered first, so the proxy core does not answer 481 for dialogs it did
  not set up. A request matches when its Call-ID and To tag name one of our legs and its From
  tag is that leg's remote tag. A leg sent through the server's own proxy (``proxied``: the
  3PCC callee) has the proxy's Record-Route in its route set, so the other side's requests
  reach the proxy first with a Route header and come back to us without it (§16.4); only
  the second arrival is ours, so the proxy's dialog table (and billing) see every one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from sipcore import transaction as txn
from sipcore.digest import build_authorization, select_challenge
from sipcore.errors import SipParseError
from sipcore.message import Response
from sipcore.pipeline import RequestContext
from sipcore.stack import SipStack
from sipcore.transport_types import Peer
from sipcore.uac import Destination, UacError, UserAgentClient, new_call_id, new_tag

log = logging.getLogger("clicktodial.dialog")

__all__ = ["DialogRouter", "DigestAnswerer", "Final", "Leg", "RequestHandler", "Spawner"]

#: Methods whose requests carry our Contact (§8.1.1.8, RFC 3515 §2.4.1, RFC 6665 §4.1.2.1).
_WITH_CONTACT = frozenset({"INVITE", "REFER", "SUBSCRIBE", "NOTIFY", "UPDATE"})
_AUTH_ROUNDS = 2

RequestHandler = Callable[["Leg", RequestContext], None]
#: Runs a coroutine in the background (the service keeps the task until it ends).
Spawner = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


@dataclass(frozen=True, slots=True)
class Final:
    """The outcome of one request: the final response, or a local failure as a status
    (§8.1.3.1: a transport error counts as 503, a timeout as 408) with no response."""

    status: int
    response: Response | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class DigestAnswerer:
    """Credentials for one subscriber from its stored HA1s (RFC 7616 §3.4, §22.2/§22.3).

    ``ha1_of(algorithm)`` gives the stored HA1 for an algorithm (the subscriber store keeps
    MD5 and SHA-256 ones with realm = the subscriber's domain), so only a challenge whose realm
    is that domain can be answered.
    """

    def __init__(self, username: str, domain: str, ha1_of: Callable[[str], str]) -> None:
        self.username = username
        self.domain = domain.lower()
        self.ha1_of = ha1_of
        self._nc: dict[str, int] = {}

    def answer(self, response: Response, method: str, uri: str,
               body: bytes) -> tuple[str, str] | None:
        """(header name, value) answering the 401/407 ``response``, or None if we can't."""
        proxy = response.status == 407
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        challenge = select_challenge(response.header_values(name, split=False))
        if challenge is None or challenge.realm.lower() != self.domain:
            return None
        nc = self._nc.get(challenge.nonce, 0) + 1
        self._nc[challenge.nonce] = nc
        try:
            value = build_authorization(challenge, method=method, uri=uri,
                                        username=self.username,
                                        ha1_hex=self.ha1_of(challenge.algorithm), nc=nc,
                                        body=body)
        except ValueError:
            return None
        return ("Proxy-Authorization" if proxy else "Authorization", value)


class DialogRouter:
    """In-dialog requests for our legs (the IN_DIALOG stage handler, see the module doc)."""

    def __init__(self) -> None:
        self._legs: dict[tuple[str, str], Leg] = {}

    def __len__(self) -> int:
        return len(self._legs)

    def add(self, leg: Leg) -> None:
        self._legs[(leg.call_id, leg.local_tag)] = leg

    def remove(self, leg: Leg) -> None:
        if self._legs.get((leg.call_id, leg.local_tag)) is leg:
            del self._legs[(leg.call_id, leg.local_tag)]

    def __call__(self, ctx: RequestContext) -> bool:
        if not self._legs:
            return False
        req = ctx.request
        to_tag = req.to_addr.tag
        if not to_tag:
            return False
        leg = self._legs.get((req.call_id, to_tag))
        if leg is None or req.from_addr.tag != leg.remote_tag:
            return False
        if leg.proxied and req.has_header("Route"):
            # First arrival of a request in a dialog routed through our own proxy: the
            # proxy relays it (its dialog table and billing see it) and it comes back to
            # us without the Route entry.
            return False
        leg.on_request(leg, ctx)
        return True


class Leg:
    """One dialog opened by our INVITE; see the module docstring."""

    def __init__(self, uac: UserAgentClient, router: DialogRouter, spawn: Spawner, *,
                 uri: str, peer: Peer, local: str, remote: str, route: Sequence[str] = (),
                 credentials: DigestAnswerer | None = None, label: str = "",
                 proxied: bool = False) -> None:
        self.uac = uac
        self.stack: SipStack = uac.stack
        self.router = router
        self._spawn = spawn
        self.peer = peer                  # every request of the dialog goes here
        self.first = Destination(uri, peer, tuple(route))
        self.local = local                # From name-addr without tag
        self.remote = remote              # To name-addr without tag
        self.credentials = credentials
        self.label = label
        self.proxied = proxied
        host, _port = uac.identity.sent_by(peer.transport)
        self.call_id = new_call_id(host)
        self.local_tag = new_tag()
        self.remote_tag: str | None = None
        self.target = uri
        self.route_set: tuple[str, ...] = ()
        self.contact = uac.contact(peer.transport, "click2dial")
        self.cseq = 0
        self.state = "idle"
        self.abandoned = False
        self.on_request: RequestHandler = _refuse
        self._invite_key: txn.ClientTxKey | None = None
        self._invite_future: asyncio.Future[Response] | None = None
        self._invite_cseq = 0
        self._invite_auth: list[tuple[str, str]] = []
        self._ack: tuple[int, bytes] | None = None  # (CSeq, bytes) of the last ACK sent

    # ------------------------------------------------------------------ state
    @property
    def confirmed(self) -> bool:
        return self.state == "confirmed"

    def remote_ended(self) -> None:
        """The other side sent BYE (§15.1.2): the dialog's INVITE usage is over."""
        if self.state == "confirmed":
            self.state = "terminated"

    def close(self) -> None:
        """Forget the dialog: later requests for it get the core's 481."""
        self.router.remove(self)

    # ------------------------------------------------------------------ requests
    def _destination(self) -> Destination:
        if self.remote_tag is None:
            return self.first
        return Destination(self.target, self.peer, self.route_set)

    def _to(self) -> str:
        return self.remote if self.remote_tag is None else f"{self.remote};tag={self.remote_tag}"

    async def _send(self, method: str, headers: Sequence[tuple[str, str]], body: bytes,
                    content_type: str | None,
                    on_response: Callable[[Response], None] | None = None) -> Final:
        auth: list[tuple[str, str]] = []
        for round_ in range(_AUTH_ROUNDS + 1):
            dest = self._destination()
            self.cseq += 1
            try:
                out = self.uac.build(
                    method, dest, from_addr=self.local, to_addr=self._to(),
                    call_id=self.call_id, cseq=self.cseq, from_tag=self.local_tag,
                    contact=self.contact if method in _WITH_CONTACT else None,
                    headers=[*headers, *auth], body=body, content_type=content_type)
            except (SipParseError, ValueError) as exc:
                log.warning("event=c2d_build_failed leg=%s method=%s error=%r", self.label,
                            method, exc)
                return Final(500)
            future = self.uac.send(out, on_response)
            if method == "INVITE":
                self._invite_key = txn.ClientTxKey(out.request.top_via.branch or "", "INVITE")
                self._invite_future = future
                self._invite_cseq = self.cseq
                self._invite_auth = auth
            try:
                response = await asyncio.shield(future)
            except UacError as exc:
                return Final(408 if exc.reason == "timeout" else 503)
            if (response.status in (401, 407) and self.credentials is not None
                    and round_ < _AUTH_ROUNDS and not self.abandoned):
                answer = self.credentials.answer(response, method, dest.uri, body)
                if answer is not None:
                    auth = [answer]
                    continue
            return Final(response.status, response)
        raise AssertionError("unreachable")  # the loop returns on its last round

    async def invite(self, body: bytes = b"", content_type: str | None = "application/sdp", *,
                     auto_ack: bool = True,
                     on_provisional: Callable[[Response], None] | None = None) -> Final:
        """Send an INVITE (the first, or a re-INVITE) and wait for its final response.

        A 2xx is ACKed at once unless ``auto_ack`` is False (the caller then calls
        :meth:`ack` with the answer, RFC 3725 §4.4); a 2xx of an abandoned leg is ACKed and
        BYEd, whatever the caller does with the result.
        """
        initial = self.state == "idle"

        def on_response(response: Response) -> None:
            if response.status < 200:
                if on_provisional is not None:
                    on_provisional(response)
            elif response.status < 300:
                self._late_2xx(response)

        final = await self._send("INVITE", [], body, content_type if body else None,
                                 on_response)
        if not final.ok or final.response is None or self.abandoned:
            return final
        if initial:
            self._establish(final.response)
        if auto_ack:
            self.ack()
        return final

    def _establish(self, response: Response) -> None:
        """§12.1.2: the dialog as the 2xx defines it."""
        self.remote_tag = response.to_addr.tag or ""
        contacts = response.contacts
        if contacts and not contacts[0].is_star:
            self.target = contacts[0].uri
        self.route_set = tuple(reversed(response.header_values("Record-Route")))
        self.state = "confirmed"
        self.router.add(self)

    def ack(self, body: bytes = b"", content_type: str = "application/sdp") -> None:
        """The ACK for the 2xx of the last INVITE (§13.2.2.4), with ``body`` as the answer."""
        dest = self._destination()
        out = self.uac.build(
            "ACK", dest, from_addr=self.local, to_addr=self._to(), call_id=self.call_id,
            cseq=self._invite_cseq, from_tag=self.local_tag, headers=self._invite_auth,
            body=body, content_type=content_type if body else None)
        self._ack = (self._invite_cseq, out.data)
        self.stack.send_raw(out.data, self.peer)

    def _late_2xx(self, response: Response) -> None:
        """A 2xx after the first final: a retransmission (our ACK was lost) or a fork."""
        tag = response.to_addr.tag
        if self.remote_tag is not None and tag == self.remote_tag:
            if self._ack is not None and self._ack[0] == response.cseq.number:
                self.stack.send_raw(self._ack[1], self.peer)
            return
        if self.remote_tag is None and self.abandoned:
            # The first 2xx to an abandoned INVITE: the dialog exists now; end it.
            self._establish(response)
            self.ack()
            self._spawn(self.bye())
            return
        # Another fork answered too (§13.2.2.4): acknowledge and end that dialog at once.
        self._end_stray(response)

    def _end_stray(self, response: Response) -> None:
        contacts = response.contacts
        uri = contacts[0].uri if contacts else self.first.uri
        dest = Destination(uri, self.peer, tuple(reversed(response.header_values("Record-Route"))))
        to = response.header("To") or self._to()
        for method, cseq in (("ACK", response.cseq.number), ("BYE", response.cseq.number + 1)):
            out = self.uac.build(method, dest, from_addr=self.local, to_addr=to,
                                 call_id=self.call_id, cseq=cseq, from_tag=self.local_tag)
            if method == "ACK":
                self.stack.send_raw(out.data, self.peer)
            else:
                self.uac.send(out)

    async def request(self, method: str, headers: Sequence[tuple[str, str]] = (),
                      body: bytes = b"", content_type: str | None = None) -> Final:
        """An in-dialog non-INVITE request (§12.2.1.1), with authentication if challenged."""
        return await self._send(method, headers, body, content_type if body else None)

    async def bye(self) -> int:
        """End the dialog (§15.1.1); returns the BYE's final status (0: nothing to end)."""
        if self.state != "confirmed":
            return 0
        self.state = "terminated"
        try:
            final = await self._send("BYE", [], b"", None)
        finally:
            self.close()
        return final.status

    def abandon(self) -> None:
        """Give the leg up: CANCEL a pending INVITE (§9.1), BYE a dialog."""
        if self.abandoned:
            return
        self.abandoned = True
        future = self._invite_future
        if self.state == "idle" and future is not None:
            if not future.done() and self._invite_key is not None:
                self.stack.cancel(self._invite_key)
            # Should a 2xx come anyway (or have come before anyone looked), it is ACKed and
            # BYEd; invite() returns it without acting once the leg is abandoned.
            future.add_done_callback(self._abandoned_final)
        elif self.state == "confirmed":
            self._spawn(self.bye())

    def _abandoned_final(self, future: asyncio.Future[Response]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        response = future.result()
        if 200 <= response.status < 300 and self.remote_tag is None:
            self._late_2xx(response)

    def __repr__(self) -> str:
        return f"Leg({self.label} {self.call_id} {self.state})"


def _refuse(leg: Leg, ctx: RequestContext) -> None:
    ctx.reply(481, "Call/Transaction Does Not Exist")

