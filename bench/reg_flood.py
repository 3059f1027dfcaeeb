"""Register many users fast over UDP with digest auth (a helper of sip_load.py).

SIPp could do this too, but it needs a CSV line per user with the password in it and one
scenario run per batch; this asyncio client keeps a window of registrations in flight and
does the whole RFC 3261 §22 exchange itself: REGISTER, 401 with ``WWW-Authenticate`` (RFC
7616: of several challenges it answers the MD5 one, qop=auth, so any registrar that offers MD5
works, Kamailio included), REGISTER with ``Authorization``, 200.  Requests are retransmitted
on Timer E's schedule (RFC 3261 §17.1.2.2: 500 ms doubling) and a registration that sees no
final response after ``timeout`` seconds, or a final response other than 401-then-200,
counts as failed.

Every user gets its own Contact ``sip:USER@HOST:PORT`` on one local socket, so N users make N
bindings.  Stand-alone use (users ``PREFIX1..PREFIXN`` with password ``PASSWORD_PREFIX + user``)::

    python bench/reg_flood.py 127.0.0.1:5060 --users 10000 --domain localhost
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

_PARAM = re.compile(r'([A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]+)')
_COMPACT = {"i": "call-id", "v": "via"}


@dataclass(frozen=True, slots=True)
class User:
    name: str
    domain: str
    password: str


@dataclass
class FloodResult:
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    retransmissions: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _parse_response(data: bytes) -> tuple[int, dict[str, list[str]]] | None:
    """Status code and header values (lower-case names, compact forms expanded)."""
    head, _, _ = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    if not lines[0].startswith("SIP/2.0 "):
        return None
    try:
        status = int(lines[0][8:11])
    except ValueError:
        return None
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip().lower()
        headers.setdefault(_COMPACT.get(key, key), []).append(value.strip())
    return status, headers


def _md5_challenge(values: list[str]) -> dict[str, str] | None:
    """Parameters of the first Digest challenge whose algorithm is MD5 (or unspecified)."""
    for value in values:
        scheme, _, rest = value.partition(" ")
        if scheme.lower() != "digest":
            continue
        params = {k.lower(): v.strip('"') for k, v in _PARAM.findall(rest)}
        if params.get("algorithm", "MD5").upper() == "MD5" and "nonce" in params:
            return params
    return None


@dataclass
class _Pending:
    user: User
    call_id: str
    done: asyncio.Future[str]
    cseq: int = 1
    data: bytes = b""
    interval: float = 0.5
    timer: asyncio.TimerHandle | None = None


class _Client(asyncio.DatagramProtocol):
    def __init__(self, server: tuple[str, int], expires: int) -> None:
        self.server = server
        self.expires = expires
        self.transport: asyncio.DatagramTransport | None = None
        self.local = ("127.0.0.1", 0)
        self.pending: dict[str, _Pending] = {}
        self.retransmissions = 0
        self.tag = os.urandom(4).hex()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)
        host, port = transport.get_extra_info("sockname")[:2]
        self.local = (host, port)

    def _request(self, p: _Pending, authorization: str | None) -> bytes:
        u = p.user
        host, port = self.local
        lines = [
            f"REGISTER sip:{u.domain} SIP/2.0",
            f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{os.urandom(8).hex()};rport",
            "Max-Forwards: 70",
            f"From: <sip:{u.name}@{u.domain}>;tag={self.tag}",
            f"To: <sip:{u.name}@{u.domain}>",
            f"Call-ID: {p.call_id}",
            f"CSeq: {p.cseq} REGISTER",
            f"Contact: <sip:{u.name}@{host}:{port}>",
            f"Expires: {self.expires}",
        ]
        if authorization:
            lines.append(f"Authorization: {authorization}")
        lines += ["User-Agent: sipbill-reg-flood", "Content-Length: 0", "", ""]
        return "\r\n".join(lines).encode()

    def start(self, p: _Pending) -> None:
        self.pending[p.call_id] = p
        self._send(p, self._request(p, None))

    def _send(self, p: _Pending, data: bytes) -> None:
        assert self.transport is not None
        p.data = data
        p.interval = 0.5
        if p.timer is not None:
            p.timer.cancel()
        self.transport.sendto(data, self.server)
        p.timer = asyncio.get_running_loop().call_later(p.interval, self._retransmit, p)

    def _retransmit(self, p: _Pending) -> None:
        if p.done.done() or self.transport is None:
            return
        self.retransmissions += 1
        self.transport.sendto(p.data, self.server)
        p.interval = min(p.interval * 2, 4.0)
        p.timer = asyncio.get_running_loop().call_later(p.interval, self._retransmit, p)

    def finish(self, p: _Pending, outcome: str) -> None:
        if p.timer is not None:
            p.timer.cancel()
        self.pending.pop(p.call_id, None)
        if not p.done.done():
            p.done.set_result(outcome)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        parsed = _parse_response(data)
        if parsed is None:
            return
        status, headers = parsed
        call_id = (headers.get("call-id") or [""])[0]
        p = self.pending.get(call_id)
        cseq = (headers.get("cseq") or ["0"])[0].split()[0]
        if p is None or cseq != str(p.cseq) or status < 200:
            return
        if status == 200 and p.cseq > 1:
            self.finish(p, "ok")
        elif status == 401 and p.cseq == 1:
            challenge = _md5_challenge(headers.get("www-authenticate", []))
            if challenge is None:
                self.finish(p, "no MD5 challenge")
                return
            p.cseq += 1
            self._send(p, self._request(p, self._authorization(p.user, challenge)))
        else:
            self.finish(p, f"{status} to CSeq {p.cseq}")

    @staticmethod
    def _authorization(u: User, ch: dict[str, str]) -> str:
        realm, nonce = ch.get("realm", u.domain), ch["nonce"]
        uri = f"sip:{u.domain}"
        ha1 = _md5(f"{u.name}:{realm}:{u.password}")
        ha2 = _md5(f"REGISTER:{uri}")
        parts = [f'username="{u.name}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"',
                 "algorithm=MD5"]
        qops = [q.strip() for q in ch.get("qop", "").split(",") if q.strip()]
        if "auth" in qops:
            cnonce, nc = os.urandom(6).hex(), "00000001"
            response = _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
            parts += [f'cnonce="{cnonce}"', f"nc={nc}", "qop=auth"]
        else:
            response = _md5(f"{ha1}:{nonce}:{ha2}")
        parts.append(f'response="{response}"')
        if "opaque" in ch:
            parts.append(f'opaque="{ch["opaque"]}"')
        return "Digest " + ", ".join(parts)


async def register_users(server: tuple[str, int], users: Sequence[User], *, window: int = 200,
                         expires: int = 3600, timeout: float = 16.0,
                         local_host: str = "127.0.0.1") -> FloodResult:
    """Register every user once; at most ``window`` registrations are in flight."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # A deep receive queue: a burst of 200 OKs must not be dropped while we are busy sending.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((local_host, 0))
    transport, client = await loop.create_datagram_endpoint(
        lambda: _Client(server, expires), sock=sock)
    result = FloodResult()
    gate = asyncio.Semaphore(window)
    prefix = os.urandom(6).hex()

    async def one(i: int, user: User) -> None:
        async with gate:
            p = _Pending(user, f"{prefix}-{i}@reg-flood", loop.create_future())
            client.start(p)
            try:
                outcome = await asyncio.wait_for(asyncio.shield(p.done), timeout)
            except TimeoutError:
                outcome = "timeout"
                client.finish(p, outcome)
        if outcome == "ok":
            result.ok += 1
        else:
            result.failed += 1
            result.failures[outcome] = result.failures.get(outcome, 0) + 1

    start = time.monotonic()
    try:
        # Tasks are created in slices so 100,000 users do not sit as 100,000 coroutines at once.
        step = window * 20
        for first in range(0, len(users), step):
            await asyncio.gather(*(one(first + i, u)
                                   for i, u in enumerate(users[first:first + step])))
    finally:
        result.seconds = time.monotonic() - start
        result.retransmissions = client.retransmissions
        transport.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target", help="HOST:PORT of the registrar")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--prefix", default="u")
    ap.add_argument("--password-prefix", default="bench-")
    ap.add_argument("--domain", default="localhost")
    ap.add_argument("--window", type=int, default=200)
    args = ap.parse_args()
    host, _, port = args.target.rpartition(":")
    users = [User(f"{args.prefix}{i}", args.domain, f"{args.password_prefix}{args.prefix}{i}")
             for i in range(args.first, args.first + args.users)]
    res = asyncio.run(register_users((host, int(port)), users, window=args.window))
    print(f"registered {res.ok}, failed {res.failed} {res.failures or ''} in {res.seconds:.1f} s "
          f"({res.rate:.0f}/s, {res.retransmissions} retransmissions)")


if __name__ == "__main__":
    main()
