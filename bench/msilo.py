"""msilo throughput: stored messages per second, and delivery rate when recipients register.

Not a test.  Runs the real pieces in one process: an embedded PostgreSQL (pgserver) in a
temporary directory, :class:`msilo.service.Msilo` with its :class:`MessageStore`, a
:class:`SipStack` with UDP on 127.0.0.1 and the user agent client, and one UDP socket playing
every recipient's phone (answering each MESSAGE 200 OK at once).

1. *Store*: MESSAGEs for offline users go through ``Msilo.on_message`` (what the LOCATION
   stage calls), ``--concurrency`` at a time: each is one INSERT round trip with the quota
   and duplicate checks.  Reported: messages stored per second and the 202 latency.
2. *Deliver*: every recipient gets a binding and a ``ContactRegistered`` event at once;
   reported: messages delivered (2xx seen and marked) per second until the store is empty.
   Each message costs a claim (UPDATE ... RETURNING), a MESSAGE/200 exchange and a mark.

Run: ``.venv/bin/python bench/msilo.py`` (defaults: 5000 messages for 500 users; under a
minute on a 2-core machine; ``--messages``/``--users`` to change, everything is bounded by
``--time-limit``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg

from msilo.service import Msilo
from msilo.settings import MsiloSettings
from msilo.store import MessageStore
from sipbill.db import EmbeddedPostgres, migrate
from sipcore.location import Binding, BindingChange, ContactRegistered, LocationService
from sipcore.message import Request, build_request, build_response, parse_message
from sipcore.pipeline import EventBus, RequestContext
from sipcore.stack import SipStack
from sipcore.transaction import ServerTxKey, TransactionLayer
from sipcore.transport import Transports
from sipcore.transport_types import Peer
from sipcore.uac import UserAgentClient

DOMAIN = "bench.example"


class Phones(asyncio.DatagramProtocol):
    """Every recipient's phone: 200 OK to each new MESSAGE, counted."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        req = parse_message(data)
        if isinstance(req, Request) and self.transport is not None:
            self.received += 1
            self.transport.sendto(build_response(req, 200, to_tag="b"), addr)


class Identity:
    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr

    def sent_by(self, transport: str) -> tuple[str, int]:
        return self.addr


def _context(n: int, user: str) -> tuple[RequestContext, list[int]]:
    statuses: list[int] = []
    raw = build_request("MESSAGE", f"sip:{user}@{DOMAIN}", [
        ("Via", f"SIP/2.0/UDP 10.1.0.1:5060;branch=z9hG4bKbench{n}"),
        ("From", f'"Sender {n}" <sip:sender{n % 50}@{DOMAIN}>;tag=s{n}'),
        ("To", f"<sip:{user}@{DOMAIN}>"), ("Call-ID", f"bench-{n}@10.1.0.1"),
        ("CSeq", "1 MESSAGE"), ("Content-Type", "text/plain;charset=utf-8"),
    ], f"bench message {n}: ".encode() + b"x" * 100)
    req = parse_message(raw)
    assert isinstance(req, Request)

    def replier(ctx: RequestContext, status: int, *_: object) -> None:
        statuses.append(status)

    ctx = RequestContext(req, Peer("UDP", "10.1.0.1", 5060),
                         ServerTxKey(f"z9hG4bKbench{n}", "10.1.0.1", 5060, "MESSAGE"), replier)
    ctx.attrs.update(location="offline", aor=f"sip:{user}@{DOMAIN}")
    return ctx, statuses


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="msilo-bench-"))
    pg = EmbeddedPostgres(root / "pg")
    dsn = await asyncio.to_thread(pg.start)
    loop = asyncio.get_running_loop()
    try:
        pool = await asyncpg.create_pool(dsn, min_size=4, max_size=args.pool)
        assert pool is not None
        async with pool.acquire() as conn:
            await migrate(conn)
        stack = SipStack(lambda st: Transports(st), TransactionLayer())
        addr = await stack.transports.listen_udp("127.0.0.1", 0)
        transport, phones = await loop.create_datagram_endpoint(
            Phones, local_addr=("127.0.0.1", 0))
        phone_host, phone_port = transport.get_extra_info("sockname")[:2]
        location = LocationService(pool, EventBus())
        settings = MsiloSettings(quota=args.messages, delivery_concurrency=args.concurrency)
        msilo = Msilo(settings, MessageStore(pool, expiry=settings.expiry, quota=args.messages),
                      UserAgentClient(stack, Identity(addr)), location, domain=DOMAIN,
                      aliases={}, lease_seconds=42.0)
        users = [f"u{i:05d}" for i in range(args.users)]

        # 1. store
        contexts = [_context(n, users[n % len(users)]) for n in range(args.messages)]
        latencies: list[float] = []
        sem = asyncio.Semaphore(args.concurrency)

        async def store_one(ctx: RequestContext) -> None:
            async with sem:
                t0 = time.perf_counter()
                await msilo.on_message(ctx)
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        async with asyncio.timeout(args.time_limit):
            await asyncio.gather(*(store_one(c) for c, _ in contexts))
        store_s = time.perf_counter() - t0
        accepted = sum(1 for _, st in contexts if st == [202])
        lat = sorted(latencies)
        print(f"store:   {accepted}/{args.messages} messages answered 202 in {store_s:.2f} s "
              f"= {accepted / store_s:,.0f} msg/s  (concurrency {args.concurrency}; latency "
              f"median {statistics.median(lat) * 1e3:.2f} ms, "
              f"p99 {lat[int(len(lat) * 0.99) - 1] * 1e3:.2f} ms)")

        # 2. deliver on register
        bindings: list[Binding] = []
        for user in users:
            aor = f"sip:{user}@{DOMAIN}"
            b = Binding(aor, f"sip:{user}@{phone_host}:{phone_port}",
                        Peer("UDP", phone_host, phone_port), time.time() + 3600,
                        received_at=time.time())
            await location.update(aor, lambda cur, b=b: BindingChange((b,), added=(b,)))
            bindings.append(b)
        t0 = time.perf_counter()
        for b in bindings:
            msilo.on_registered(ContactRegistered(b.aor, b))
        async with asyncio.timeout(args.time_limit):
            await msilo.idle()
        deliver_s = time.perf_counter() - t0
        left = await msilo.store.count()
        delivered = msilo.stats["delivered"]
        print(f"deliver: {delivered} messages to {len(users)} users registering at once in "
              f"{deliver_s:.2f} s = {delivered / deliver_s:,.0f} msg/s  (phone got "
              f"{phones.received}, left in store {left}, concurrency {args.concurrency})")
        await msilo.close()
        await location.close()
        transport.close()
        await stack.close()
        await pool.close()
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--pool", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=90.0)
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))


if __name__ == "__main__":
    main()
