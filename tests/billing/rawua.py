"""A small blocking SIP user agent over UDP for billing's end-to-end tests.

It does what the tests need to see on the wire and nothing more: REGISTER and INVITE with
digest authentication computed by :mod:`sipcore.digest` (RFC 3261 §22.2/§22.3), the ACK for a
non-2xx (§17.1.1.3, same branch) and for a 2xx (§13.2.2.4, along the route set), CANCEL
(§9.1), BYE in both directions (§15.1), and the raw final responses, so a test can read their
status, reason and headers (``Balance-amount``, ``Reason``). Real phones (pjsua2) and SIPp
cover the interoperability side; this one gives exact, per-message control.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sipcore.digest import build_authorization, select_challenge
from sipcore.message import Request, Response, parse_message

DOMAIN = "localhost"


def _values(msg: Response | Request, name: str) -> list[str]:
    return msg.header_values(name, split=False)


@dataclass
class Call:
    """The caller's side of one INVITE."""

    ua: RawUA
    uri: str
    call_id: str
    from_tag: str
    cseq: int
    branch: str
    final: Response | None = None
    provisional: list[Response] = field(default_factory=list)
    route: list[str] = field(default_factory=list)
    remote_target: str = ""
    to_header: str = ""

    @property
    def status(self) -> int:
        return self.final.status if self.final is not None else 0

    def header(self, name: str) -> str | None:
        return self.final.header(name) if self.final is not None else None

    def wait_final(self, timeout: float = 10.0) -> Response:
        """The final response to the INVITE (ACKed as RFC 3261 says)."""
        if self.final is None:
            msg = self.ua.wait(lambda m: isinstance(m, Response) and m.call_id == self.call_id
                               and m.cseq.method == "INVITE" and m.cseq.number == self.cseq
                               and m.status >= 200, timeout, self.provisional)
            assert isinstance(msg, Response)
            self._final(msg)
        assert self.final is not None
        return self.final

    def _final(self, msg: Response) -> None:
        self.final = msg
        self.to_header = msg.header("To") or ""
        if msg.status >= 300:
            self.ua.send_ack_non2xx(self, msg)
            return
        self.route = list(reversed(_values(msg, "Record-Route")))
        self.remote_target = msg.contacts[0].uri if msg.contacts else self.uri
        self.ua.send_in_dialog(self, "ACK", self.cseq)

    def bye(self, timeout: float = 5.0) -> Response:
        """Hang up: BYE along the route set, and its final response."""
        cseq = self.cseq + 1
        self.ua.send_in_dialog(self, "BYE", cseq)
        msg = self.ua.wait(lambda m: isinstance(m, Response) and m.call_id == self.call_id
                           and m.cseq.method == "BYE" and m.status >= 200, timeout)
        assert isinstance(msg, Response)
        return msg

    def cancel(self, timeout: float = 5.0) -> Response:
        """CANCEL the pending INVITE; returns the INVITE's final response (487 normally)."""
        self.ua.send_cancel(self)
        return self.wait_final(timeout)

    def wait_bye(self, timeout: float = 30.0) -> Request:
        """Wait for a BYE from the server (the credit cut) and answer it 200."""
        msg = self.ua.wait(lambda m: isinstance(m, Request) and m.method == "BYE"
                           and m.call_id == self.call_id, timeout)
        assert isinstance(msg, Request)
        self.ua.answer(msg, 200, "OK")
        return msg


class RawUA:
    """One subscriber's UDP user agent on its own loopback port."""

    def __init__(self, server_port: int, user: str, password: str, *,
                 algorithm: str = "MD5") -> None:
        self.server = ("127.0.0.1", server_port)
        self.user = user
        self.password = password
        self.algorithm = algorithm
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.backlog: list[Request | Response] = []
        self.reg_call_id = secrets.token_hex(8) + "@rawua"
        self.reg_cseq = 0
        self.tag = secrets.token_hex(4)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawUA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@{DOMAIN}"

    @property
    def contact(self) -> str:
        return f"<sip:{self.user}@127.0.0.1:{self.port}>"

    # -- transport
    def send(self, lines: list[str], body: bytes = b"") -> None:
        head = "\r\n".join([*lines, f"Content-Length: {len(body)}"]) + "\r\n\r\n"
        self.sock.sendto(head.encode() + body, self.server)

    def wait(self, match: Callable[[Request | Response], bool], timeout: float = 10.0,
             others: list[Response] | None = None) -> Request | Response:
        """The first message (queued or arriving) that ``match``es; provisional responses of
        the same call go to ``others``; requests nobody waits for are answered 200 (a BYE
        retransmission) or kept."""
        for i, msg in enumerate(self.backlog):
            if match(msg):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching SIP message")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            msg = parse_message(data)
            assert isinstance(msg, Request | Response)
            if match(msg):
                return msg
            if isinstance(msg, Response) and msg.status < 200 and others is not None:
                others.append(msg)
            elif isinstance(msg, Response) and msg.status < 200:
                continue
            else:
                self.backlog.append(msg)

    def answer(self, req: Request, status: int, reason: str) -> None:
        lines = [f"SIP/2.0 {status} {reason}"]
        lines += [f"Via: {v}" for v in _values(req, "Via")]
        lines += [f"From: {req.header('From')}", f"To: {req.header('To')}",
                  f"Call-ID: {req.call_id}", f"CSeq: {req.cseq.number} {req.cseq.method}"]
        self.send(lines)

    def _via(self, branch: str) -> str:
        return f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch};rport"

    # -- REGISTER
    def register(self, expires: int = 300) -> Response:
        """REGISTER (answering the 401 challenge); the final response."""
        authorization: str | None = None
        for _ in range(2):
            self.reg_cseq += 1
            lines = [
                f"REGISTER sip:{DOMAIN} SIP/2.0",
                self._via("z9hG4bK" + secrets.token_hex(8)),
                "Max-Forwards: 70",
                f"From: <{self.aor}>;tag={self.tag}",
                f"To: <{self.aor}>",
                f"Call-ID: {self.reg_call_id}",
                f"CSeq: {self.reg_cseq} REGISTER",
                f"Contact: {self.contact}",
                f"Expires: {expires}",
            ]
            if authorization:
                lines.append(f"Authorization: {authorization}")
            self.send(lines)
            msg = self.wait(self._final_register(self.reg_cseq))
            assert isinstance(msg, Response)
            if msg.status != 401 or authorization:
                return msg
            challenge = select_challenge(_values(msg, "WWW-Authenticate"),
                                         algorithms=(self.algorithm,))
            assert challenge is not None, msg.raw
            authorization = build_authorization(challenge, method="REGISTER",
                                                uri=f"sip:{DOMAIN}", username=self.user,
                                                password=self.password)
        raise AssertionError("unreachable")

    def _final_register(self, cseq: int) -> Callable[[Request | Response], bool]:
        return lambda m: (isinstance(m, Response) and m.call_id == self.reg_call_id
                          and m.cseq.number == cseq and m.status >= 200)

    # -- INVITE
    def invite(self, target: str, *, wait: bool = True, timeout: float = 10.0) -> Call:
        """Call ``target`` (a number or user, or a full URI) through the server; with
        ``wait`` return after the final response, else as soon as the authenticated INVITE
        is sent (see :meth:`Call.wait_final`)."""
        uri = target if target.startswith("sip:") else f"sip:{target}@{DOMAIN}"
        call = Call(self, uri, secrets.token_hex(8) + "@rawua", secrets.token_hex(4), 1,
                    "z9hG4bK" + secrets.token_hex(8))
        self._send_invite(call, None)
        first = self.wait(lambda m: isinstance(m, Response) and m.call_id == call.call_id
                          and m.cseq.number == 1 and m.status >= 200, timeout)
        assert isinstance(first, Response)
        if first.status == 407:
            self.send_ack_non2xx(call, first)
            challenge = select_challenge(_values(first, "Proxy-Authenticate"),
                                         algorithms=(self.algorithm,))
            assert challenge is not None, first.raw
            auth = build_authorization(challenge, method="INVITE", uri=uri,
                                       username=self.user, password=self.password)
            call.cseq, call.branch = 2, "z9hG4bK" + secrets.token_hex(8)
            self._send_invite(call, auth)
        else:
            call._final(first)
            return call
        if wait:
            call.wait_final(timeout)
        return call

    def _send_invite(self, call: Call, auth: str | None) -> None:
        sdp = (f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
               f"m=audio {self.port + 2} RTP/AVP 0\r\n").encode()
        lines = [
            f"INVITE {call.uri} SIP/2.0",
            self._via(call.branch),
            "Max-Forwards: 70",
            f"From: <{self.aor}>;tag={call.from_tag}",
            f"To: <{call.uri}>",
            f"Call-ID: {call.call_id}",
            f"CSeq: {call.cseq} INVITE",
            f"Contact: {self.contact}",
            "Content-Type: application/sdp",
        ]
        if auth:
            lines.append(f"Proxy-Authorization: {auth}")
        self.send(lines, sdp)

    def send_ack_non2xx(self, call: Call, response: Response) -> None:
        self.send([
            f"ACK {call.uri} SIP/2.0",
            self._via(call.branch),
            "Max-Forwards: 70",
            f"From: <{self.aor}>;tag={call.from_tag}",
            f"To: {response.header('To')}",
            f"Call-ID: {call.call_id}",
            f"CSeq: {call.cseq} ACK",
        ])

    def send_cancel(self, call: Call) -> None:
        self.send([
            f"CANCEL {call.uri} SIP/2.0",
            self._via(call.branch),
            "Max-Forwards: 70",
            f"From: <{self.aor}>;tag={call.from_tag}",
            f"To: <{call.uri}>",
            f"Call-ID: {call.call_id}",
            f"CSeq: {call.cseq} CANCEL",
        ])

    def send_in_dialog(self, call: Call, method: str, cseq: int) -> None:
        lines = [
            f"{method} {call.remote_target} SIP/2.0",
            self._via("z9hG4bK" + secrets.token_hex(8)),
            "Max-Forwards: 70",
            f"From: <{self.aor}>;tag={call.from_tag}",
            f"To: {call.to_header}",
            f"Call-ID: {call.call_id}",
            f"CSeq: {cseq} {method}",
        ]
        lines += [f"Route: {r}" for r in call.route]
        self.send(lines)
