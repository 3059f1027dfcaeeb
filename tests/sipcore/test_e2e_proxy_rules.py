"""Proxy sanity rules on the wire (RFC 3261 §16.3, §16.4, RFC 5393), with raw UDP requests.

Unauthenticated requests from a foreign domain pass AUTH untouched, so each request below
reaches REQINIT/RELAY exactly as a stranger's would.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator

import pytest

from sipcore.message import Response, build_request, parse_message
from tests.support import ServerProcess

_seq = itertools.count(1)


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(db_dsn).start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture()
def sock() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    yield s
    s.close()


def ask(server: ServerProcess, sock: socket.socket, method: str, uri: str,
        *extra: tuple[str, str], to_tag: str = "", vias: tuple[str, ...] = ()) -> Response:
    n = next(_seq)
    port = sock.getsockname()[1]
    headers = [
        ("Via", f"SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKrules{n};rport"),
        *[("Via", v) for v in vias],
        ("From", f"<sip:stranger@example.org>;tag=f{n}"),
        ("To", f"<{uri}>" + (f";tag={to_tag}" if to_tag else "")),
        ("Call-ID", f"rules-{n}@example.org"), ("CSeq", f"1 {method}"),
        ("Contact", f"<sip:stranger@127.0.0.1:{port}>"), *extra,
    ]
    sock.sendto(build_request(method, uri, headers), ("127.0.0.1", server.port))
    while True:
        resp = parse_message(sock.recvfrom(65536)[0])
        assert isinstance(resp, Response)
        if resp.status >= 200:
            return resp


def test_max_forwards_zero_is_483(server: ServerProcess, sock: socket.socket) -> None:
    resp = ask(server, sock, "MESSAGE", "sip:1001@localhost", ("Max-Forwards", "0"))
    assert resp.status == 483


def test_options_to_the_server_with_max_forwards_zero_is_answered(
        server: ServerProcess, sock: socket.socket) -> None:
    resp = ask(server, sock, "OPTIONS", f"sip:127.0.0.1:{server.port}", ("Max-Forwards", "0"))
    assert resp.status == 200 and "INVITE" in (resp.header("Allow") or "")


def test_unknown_proxy_require_is_420_with_unsupported(
        server: ServerProcess, sock: socket.socket) -> None:
    resp = ask(server, sock, "MESSAGE", "sip:1001@localhost",
               ("Proxy-Require", "path, foo-bar"))
    assert resp.status == 420
    assert resp.header("Unsupported") == "foo-bar"


def test_request_that_comes_back_unchanged_is_a_loop(
        server: ServerProcess, sock: socket.socket) -> None:
    # Our own earlier Via with the loop hash of this very request (RFC 5393 style): the
    # server must recognise the request came round, whatever the branch counter says.
    from sipcore.message import parse_message as pm
    from sipcore.proxy import _loop_hash

    n = next(_seq)
    port = sock.getsockname()[1]
    uri = "sip:1001@localhost"
    base = [
        ("From", f"<sip:stranger@example.org>;tag=f{n}"), ("To", f"<{uri}>"),
        ("Call-ID", f"loop-{n}@example.org"), ("CSeq", "1 MESSAGE"),
    ]
    probe = pm(build_request("MESSAGE", uri, [
        ("Via", f"SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKx"), *base]))
    mine = f"SIP/2.0/UDP 127.0.0.1:{server.port};branch=z9hG4bK{_loop_hash(probe)}.abc1"
    data = build_request("MESSAGE", uri, [
        ("Via", f"SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKloop{n};rport"),
        ("Via", mine), *base])
    sock.sendto(data, ("127.0.0.1", server.port))
    resp = parse_message(sock.recvfrom(65536)[0])
    assert isinstance(resp, Response) and resp.status == 482


def test_foreign_domain_is_not_relayed(server: ServerProcess, sock: socket.socket) -> None:
    resp = ask(server, sock, "MESSAGE", "sip:someone@example.com")
    assert resp.status == 403


def test_number_from_stranger_never_reaches_a_gateway(
        server: ServerProcess, sock: socket.socket) -> None:
    resp = ask(server, sock, "INVITE", "sip:+4930123456@localhost")
    assert resp.status in (403, 404)


def test_unknown_dialog_is_481(server: ServerProcess, sock: socket.socket) -> None:
    resp = ask(server, sock, "BYE", "sip:1001@127.0.0.1:5999", to_tag="nosuchdialog")
    assert resp.status == 481


def test_offline_and_unknown_users(server: ServerProcess, sock: socket.socket) -> None:
    assert ask(server, sock, "INFO", "sip:1003@localhost").status == 480
    assert ask(server, sock, "INFO", "sip:nobody@localhost").status == 404
