"""Transaction-layer retransmissions on the wire (RFC 3261 §17), through a running server.

A raw UDP "phone" registers and then stays silent when the proxy forwards an INVITE to it:
the server's INVITE client transaction must retransmit on Timer A (T1, 2*T1, 4*T1 ...), all
with the same branch. A retransmitted request from the caller must be absorbed by the server
transaction (answered again, never forwarded a second time).
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator

import pytest

from sipcore.digest import build_authorization, parse_challenge
from sipcore.message import Request, Response, build_request, parse_message
from tests.support import ServerProcess

T1 = 0.25


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(db_dsn, extra={"sip": {"timers": {"t1": T1, "t2": 4.0}}}).start()
    try:
        yield srv
    finally:
        srv.cleanup()


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(3)
    return s


def register(server: ServerProcess, phone: socket.socket, user: str) -> None:
    port = phone.getsockname()[1]

    def send(cseq: int, extra: list[tuple[str, str]]) -> Response:
        phone.sendto(build_request("REGISTER", "sip:localhost", [
            ("Via", f"SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKr{user}{cseq};rport"),
            ("From", f"<sip:{user}@localhost>;tag=r{user}"), ("To", f"<sip:{user}@localhost>"),
            ("Call-ID", f"reg-{user}-{port}"), ("CSeq", f"{cseq} REGISTER"),
            ("Contact", f"<sip:{user}@127.0.0.1:{port}>"), ("Expires", "120"), *extra,
        ]), ("127.0.0.1", server.port))
        resp = parse_message(phone.recvfrom(65536)[0])
        assert isinstance(resp, Response)
        return resp

    challenge = send(1, [])
    assert challenge.status == 401
    md5 = next(c for c in challenge.header_values("WWW-Authenticate") if "MD5" in c)
    auth = build_authorization(parse_challenge(md5), method="REGISTER", uri="sip:localhost",
                               username=user, password=f"demo{user}")
    assert send(2, [("Authorization", auth)]).status == 200


def test_forwarded_invite_is_retransmitted_on_timer_a(server: ServerProcess) -> None:
    callee = udp()
    register(server, callee, "1002")
    caller = udp()
    cport = caller.getsockname()[1]

    def invite(cseq: int, extra: list[tuple[str, str]]) -> bytes:
        return build_request("INVITE", "sip:1002@localhost", [
            ("Via", f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bKcall{cseq};rport"),
            ("From", "<sip:1001@localhost>;tag=c1"), ("To", "<sip:1002@localhost>"),
            ("Call-ID", "retrans-1"), ("CSeq", f"{cseq} INVITE"),
            ("Contact", f"<sip:1001@127.0.0.1:{cport}>"), *extra])

    caller.sendto(invite(1, []), ("127.0.0.1", server.port))
    resp = parse_message(caller.recvfrom(65536)[0])
    while isinstance(resp, Response) and resp.status == 100:
        resp = parse_message(caller.recvfrom(65536)[0])
    assert isinstance(resp, Response) and resp.status == 407
    md5 = next(c for c in resp.header_values("Proxy-Authenticate") if "MD5" in c)
    auth = build_authorization(parse_challenge(md5), method="INVITE",
                               uri="sip:1002@localhost", username="1001", password="demo1001")
    authed = invite(2, [("Proxy-Authorization", auth)])
    caller.sendto(authed, ("127.0.0.1", server.port))

    # The silent callee sees the INVITE at t0, t0+T1, t0+3*T1, t0+7*T1 (Timer A doubling).
    arrivals: list[tuple[float, str]] = []
    deadline = time.monotonic() + 8 * T1
    callee.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            data = callee.recvfrom(65536)[0]
        except TimeoutError:
            continue
        msg = parse_message(data)
        assert isinstance(msg, Request) and msg.method == "INVITE"
        arrivals.append((time.monotonic(), msg.top_via.branch or ""))
    assert len(arrivals) >= 4, arrivals
    assert len({branch for _, branch in arrivals}) == 1  # retransmissions, not new branches
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    for gap, expected in zip(gaps, (T1, 2 * T1, 4 * T1), strict=False):
        assert expected * 0.6 < gap < expected * 1.8, gaps

    # The caller retransmits its INVITE: the server answers from the transaction (100 Trying)
    # and does not forward it again -- no new branch reaches the callee.
    before = {b for _, b in arrivals}
    caller.sendto(authed, ("127.0.0.1", server.port))
    again = parse_message(caller.recvfrom(65536)[0])
    assert isinstance(again, Response) and again.status == 100
    callee.settimeout(0.5)
    seen: set[str] = set()
    try:
        while True:
            msg = parse_message(callee.recvfrom(65536)[0])
            assert isinstance(msg, Request)
            seen.add(msg.top_via.branch or "")
    except TimeoutError:
        pass
    assert seen <= before
    # Hang up: CANCEL the call so the server's transactions end.
    caller.sendto(build_request("CANCEL", "sip:1002@localhost", [
        ("Via", f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bKcall2;rport"),
        ("From", "<sip:1001@localhost>;tag=c1"), ("To", "<sip:1002@localhost>"),
        ("Call-ID", "retrans-1"), ("CSeq", "2 CANCEL")]), ("127.0.0.1", server.port))
    caller.close()
    callee.close()
