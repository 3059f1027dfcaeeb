"""Transport bridging through the proxy, checked on the wire with raw sockets.

A TCP caller calls a UDP callee: the proxy must double-record-route (RFC 5658) with the
callee-facing (UDP) entry on top, and a BYE from the callee that follows that route set must
reach the caller over TCP with both of our Route entries removed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from sipcore.digest import build_authorization, parse_challenge
from sipcore.message import Request, Response, build_request, build_response, parse_message
from tests.support import ServerProcess


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(db_dsn).start()
    try:
        yield srv
    finally:
        srv.cleanup()


class TcpReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def next(self) -> Request | Response:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = self.buf[:end].decode()
                length = 0
                for line in head.split("\r\n"):
                    if line.lower().startswith(("content-length:", "l:")):
                        length = int(line.split(":", 1)[1])
                total = end + 4 + length
                if len(self.buf) >= total:
                    data, self.buf = self.buf[:total], self.buf[total:]
                    return parse_message(data, stream=True)
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed"
            self.buf += chunk


def _udp_next(sock: socket.socket) -> Request | Response:
    data, _ = sock.recvfrom(65536)
    return parse_message(data)


def _with_auth(resp: Response, method: str, uri: str, user: str, header: str) -> str:
    challenges = resp.header_values(
        "Proxy-Authenticate" if resp.status == 407 else "WWW-Authenticate", split=False)
    md5 = next(c for c in challenges if "MD5" in c)
    return f"{header}: " + build_authorization(
        parse_challenge(md5), method=method, uri=uri, username=user, password=f"demo{user}")


def test_tcp_caller_udp_callee_double_record_route(server: ServerProcess) -> None:
    port = server.port
    callee = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    callee.bind(("127.0.0.1", 0))
    callee.settimeout(5)
    cport = callee.getsockname()[1]
    srv_udp = ("127.0.0.1", port)

    def register(cseq: int, extra: list[tuple[str, str]]) -> Response:
        req = build_request("REGISTER", "sip:localhost", [
            ("Via", f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bKreg{cseq};rport"),
            ("From", "<sip:1002@localhost>;tag=r1"), ("To", "<sip:1002@localhost>"),
            ("Call-ID", "reg-bridge"), ("CSeq", f"{cseq} REGISTER"),
            ("Contact", f"<sip:1002@127.0.0.1:{cport}>"), ("Expires", "300"), *extra])
        callee.sendto(req, srv_udp)
        resp = _udp_next(callee)
        assert isinstance(resp, Response)
        return resp

    first = register(1, [])
    assert first.status == 401
    auth = _with_auth(first, "REGISTER", "sip:localhost", "1002", "Authorization")
    name, _, value = auth.partition(": ")
    assert register(2, [(name, value)]).status == 200

    caller = socket.create_connection(("127.0.0.1", port), timeout=5)
    reader = TcpReader(caller)
    lport = caller.getsockname()[1]
    sdp = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"

    def invite(cseq: int, extra: list[tuple[str, str]]) -> bytes:
        return build_request("INVITE", "sip:1002@localhost", [
            ("Via", f"SIP/2.0/TCP 127.0.0.1:{lport};branch=z9hG4bKinv{cseq}"),
            ("From", "<sip:1001@localhost>;tag=caller1"), ("To", "<sip:1002@localhost>"),
            ("Call-ID", "bridge-call"), ("CSeq", f"{cseq} INVITE"),
            ("Contact", f"<sip:1001@127.0.0.1:{lport};transport=tcp>"),
            ("Content-Type", "application/sdp"), *extra], sdp)

    caller.sendall(invite(1, []))
    resp = reader.next()
    while isinstance(resp, Response) and resp.status == 100:
        resp = reader.next()
    assert isinstance(resp, Response) and resp.status == 407
    caller.sendall(build_request("ACK", "sip:1002@localhost", [
        ("Via", f"SIP/2.0/TCP 127.0.0.1:{lport};branch=z9hG4bKinv1"),
        ("From", "<sip:1001@localhost>;tag=caller1"), ("To", resp.header("To") or ""),
        ("Call-ID", "bridge-call"), ("CSeq", "1 ACK")]))
    auth = _with_auth(resp, "INVITE", "sip:1002@localhost", "1001", "Proxy-Authorization")
    name, _, value = auth.partition(": ")
    caller.sendall(invite(2, [(name, value)]))

    inv = _udp_next(callee)
    assert isinstance(inv, Request) and inv.method == "INVITE"
    rr = inv.header_values("Record-Route")
    assert len(rr) == 2
    assert "transport=tcp" not in rr[0] and "transport=tcp" in rr[1]  # callee-facing on top

    ok = build_response(inv, 200, to_tag="callee1", headers=[
        ("Record-Route", ", ".join(rr)), ("Contact", f"<sip:1002@127.0.0.1:{cport}>")])
    callee.sendto(ok, srv_udp)
    resp = reader.next()
    while isinstance(resp, Response) and resp.status < 200:
        resp = reader.next()
    assert isinstance(resp, Response) and resp.status == 200

    # The callee hangs up along its route set (Record-Route in order, RFC 3261 §12.1.1).
    bye = build_request("BYE", f"sip:1001@127.0.0.1:{lport};transport=tcp", [
        ("Via", f"SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bKbye1;rport"),
        ("Route", ", ".join(rr)),
        ("From", (inv.header("To") or "") + ";tag=callee1"), ("To", inv.header("From") or ""),
        ("Call-ID", "bridge-call"), ("CSeq", "1 BYE")])
    callee.sendto(bye, srv_udp)
    got = reader.next()
    while isinstance(got, Response):
        got = reader.next()
    assert got.method == "BYE"
    assert not got.has_header("Route")  # both of our entries consumed
    caller.sendall(build_response(got, 200))
    final = _udp_next(callee)
    assert isinstance(final, Response) and final.status == 200 and final.cseq.method == "BYE"
    caller.close()
    callee.close()
