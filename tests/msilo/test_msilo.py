"""msilo against a real PostgreSQL and real loopback sockets: the store, then the service.

The service tests run the real pieces -- :class:`MessageStore` on the test database, a
:class:`LocationService` holding bindings, a :class:`SipStack` with UDP on 127.0.0.1 and the
user agent client -- against a plain UDP socket playing the recipient's phone.  Requests come
in as parsed bytes through a real :class:`RequestContext`, like the pipeline hands them over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, cast

import asyncpg
import pytest

from msilo.service import Msilo, dedup_key
from msilo.settings import MsiloSettings
from msilo.store import MessageStore, StoreResult
from sipcore.location import Binding, BindingChange, ContactRegistered, LocationService
from sipcore.message import Request, Response, build_request, build_response, parse_message
from sipcore.pipeline import EventBus
from sipcore.stack import SipStack
from sipcore.transaction import TimerSettings, TransactionLayer
from sipcore.transport import Transports
from sipcore.transport_types import Peer
from sipcore.uac import UserAgentClient
from tests.sipcore.regkit import context, recorder_of

DOMAIN = "example.com"


@pytest.fixture
async def clean(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as conn:
        await conn.execute("DELETE FROM msilo_messages; DELETE FROM location")


def _store(pool: asyncpg.Pool, **kw: Any) -> MessageStore:
    return MessageStore(pool, expiry=kw.pop("expiry", 3600), quota=kw.pop("quota", 100), **kw)


async def _put(store: MessageStore, recipient: str, n: int, body: bytes = b"x") -> StoreResult:
    return await store.store(recipient, "sip:alice@example.com", "Alice", "text/plain", body,
                             dedup_key=f"k{recipient}{n}", delivery_call_id=f"c{n}@x")


# ------------------------------------------------------------------------------ the store


async def test_store_keeps_the_body_byte_exact_and_refuses_duplicates(
        db_pool: asyncpg.Pool, clean: None) -> None:
    store = _store(db_pool)
    at = float(int(time.time()) - 100)
    body = bytes(range(256)) + "\u00e9t\u00e9 \U0001f600".encode()
    r1 = await store.store("sip:bob@example.com", "sip:alice@example.com;user=phone",
                           'Al "the" ice', "application/octet-stream", body,
                           dedup_key="same", delivery_call_id="c1@x", received_at=at)
    r2 = await store.store("sip:bob@example.com", "sip:alice@example.com", None, None, b"",
                           dedup_key="same", delivery_call_id="c2@x")
    assert (r1, r2) == (StoreResult.STORED, StoreResult.DUPLICATE)
    [m] = await store.list("sip:bob@example.com")
    assert m.body == body
    assert m.sender_uri == "sip:alice@example.com;user=phone"
    assert m.sender_display == 'Al "the" ice'
    assert m.content_type == "application/octet-stream"
    assert m.received_at == at
    assert m.expires_at == at + 3600


async def test_quota_counts_pending_messages_only(db_pool: asyncpg.Pool, clean: None) -> None:
    store = _store(db_pool, quota=2)
    assert await _put(store, "sip:bob@example.com", 1) is StoreResult.STORED
    assert await _put(store, "sip:bob@example.com", 2) is StoreResult.STORED
    assert await _put(store, "sip:bob@example.com", 3) is StoreResult.FULL
    assert await _put(store, "sip:carol@example.com", 3) is StoreResult.STORED
    first = await store.claim_next("sip:bob@example.com", 0, 30)
    assert first is not None
    await store.mark_delivered(first.id, 200)
    assert await _put(store, "sip:bob@example.com", 4) is StoreResult.STORED
    assert await store.count("sip:bob@example.com") == 2
    assert await store.count() == 3


async def test_claims_go_in_order_one_at_a_time_and_never_after_a_2xx(
        db_pool: asyncpg.Pool, clean: None) -> None:
    store = _store(db_pool)
    for n in range(3):
        await _put(store, "sip:bob@example.com", n, body=f"m{n}".encode())
    first = await store.claim_next("sip:bob@example.com", 0, 30)
    assert first is not None and first.body == b"m0" and first.attempts == 1
    # Leased: a second claimer (another node) gets nothing, not the next message.
    assert await store.claim_next("sip:bob@example.com", 0, 30) is None
    await store.mark_delivered(first.id, 200)
    second = await store.claim_next("sip:bob@example.com", 0, 30)
    assert second is not None and second.body == b"m1"
    await store.mark_failed(second.id, 480, refused=False, max_refusals=3)
    again = await store.claim_next("sip:bob@example.com", 0, 30)
    assert again is not None and again.id == second.id and again.attempts == 2
    # A lapsed lease (crashed node) makes the message claimable again.
    await store.mark_failed(again.id, 480, refused=False, max_refusals=3)
    short = await store.claim_next("sip:bob@example.com", 0, 0.05)
    assert short is not None and short.id == second.id
    await asyncio.sleep(0.1)
    retried = await store.claim_next("sip:bob@example.com", 0, 30)
    assert retried is not None and retried.id == second.id
    assert [m.body for m in await store.list("sip:bob@example.com")] == [b"m1", b"m2"]
    assert await store.sweep() == (0, 1)


async def test_refusals_drop_a_message_and_expiry_deletes(db_pool: asyncpg.Pool,
                                                          clean: None) -> None:
    store = _store(db_pool)
    await _put(store, "sip:bob@example.com", 1)
    for n in range(1, 3):
        m = await store.claim_next("sip:bob@example.com", 0, 30)
        assert m is not None
        dropped = await store.mark_failed(m.id, 415, refused=True, max_refusals=2)
        assert dropped == (n == 2)
    assert await store.count("sip:bob@example.com") == 0
    await store.store("sip:bob@example.com", "sip:a@example.com", None, None, b"old",
                      dedup_key="old", delivery_call_id="o@x", received_at=time.time() - 7200)
    assert await store.count("sip:bob@example.com") == 0  # expired already: not pending
    assert await store.sweep() == (1, 0)


# ------------------------------------------------------------------------------ the service


@dataclass
class Phone(asyncio.DatagramProtocol):
    """The recipient's phone: records requests, answers with ``statuses`` then 200."""

    statuses: list[int] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None
    got: asyncio.Event = field(default_factory=asyncio.Event)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        req = parse_message(data)
        assert isinstance(req, Request)
        if any(r.top_via.branch == req.top_via.branch for r in self.requests):
            return  # a retransmission of a request already answered or ignored
        self.requests.append(req)
        self.got.set()
        status = self.statuses.pop(0) if self.statuses else 200
        if status and self.transport is not None:
            self.transport.sendto(build_response(req, status, to_tag="ph"), addr)

    @property
    def peer(self) -> Peer:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return Peer("UDP", host, port)

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.requests) < n:
                self.got.clear()
                await self.got.wait()


class Identity:
    def __init__(self, host: str, port: int) -> None:
        self.addr = (host, port)

    def sent_by(self, transport: str) -> tuple[str, int]:
        return self.addr


@dataclass
class Rig:
    msilo: Msilo
    location: LocationService
    phone: Phone
    stack: SipStack

    async def bind(self, user: str) -> Binding:
        aor = f"sip:{user}@{DOMAIN}"
        peer = self.phone.peer
        b = Binding(aor, f"sip:{user}@{peer.host}:{peer.port}", peer, time.time() + 600,
                    received_at=time.time())

        def plan(current: tuple[Binding, ...]) -> BindingChange:
            return BindingChange((b,), added=(b,))

        await self.location.update(aor, plan)
        return b

    async def unbind(self, user: str) -> None:
        await self.location.remove(f"sip:{user}@{DOMAIN}")


@pytest.fixture
async def rig(db_pool: asyncpg.Pool, clean: None) -> AsyncIterator[Rig]:
    rigs = _rigs(db_pool)
    rig = await rigs.__anext__()
    try:
        yield rig
    finally:
        await rigs.aclose()


async def _rigs(db_pool: asyncpg.Pool, **settings: Any) -> AsyncGenerator[Rig, None]:
    loop = asyncio.get_running_loop()
    layer = TransactionLayer(TimerSettings(T1=0.02, T2=0.08, T4=0.1))
    stack = SipStack(lambda st: Transports(st), layer)
    host, port = await stack.transports.listen_udp("127.0.0.1", 0)
    transport, phone = await loop.create_datagram_endpoint(Phone, local_addr=("127.0.0.1", 0))
    location = LocationService(db_pool, EventBus())
    s = MsiloSettings(**{"max_refusals": 2, **settings})
    msilo = Msilo(s, _store(db_pool, expiry=s.expiry, quota=s.quota),
                  UserAgentClient(stack, Identity(host, port)), location, domain=DOMAIN,
                  aliases={}, lease_seconds=5.0)
    try:
        yield Rig(msilo, location, phone, stack)
    finally:
        await msilo.close()
        await location.close()
        transport.close()
        await stack.close()


def _message(to_user: str, body: bytes, *, call_id: str = "m1@alice", cseq: int = 1,
             content_type: str = "text/plain;charset=utf-8") -> Request:
    raw = build_request("MESSAGE", f"sip:{to_user}@{DOMAIN}", [
        ("Via", "SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-" + call_id.replace("@", "-")
         + str(cseq)),
        ("From", '"Alice A." <sip:alice@example.com>;tag=at1'),
        ("To", f"<sip:{to_user}@{DOMAIN}>"),
        ("Call-ID", call_id), ("CSeq", f"{cseq} MESSAGE"),
        ("Content-Type", content_type),
    ], body)
    req = parse_message(raw)
    assert isinstance(req, Request)
    return req


def _offline_ctx(req: Request, location: str = "offline") -> Any:
    ctx = context(req, user="alice", user_domain=DOMAIN)
    ctx.attrs.update(location=location, aor=f"sip:{req.to_addr.parsed_uri.user}@{DOMAIN}")  # type: ignore[union-attr]
    return ctx


async def test_offline_message_is_stored_202_and_delivered_once_on_register(rig: Rig) -> None:
    body = "Gr\u00fc\u00dfe, Bob \u2603\r\n\x00end".encode()
    req = _message("bob", body)
    ctx = _offline_ctx(req)
    received = time.time()
    assert await rig.msilo.on_message(ctx) is True
    assert recorder_of(ctx).last.status == 202
    binding = await rig.bind("bob")
    rig.msilo.on_registered(ContactRegistered(binding.aor, binding))
    await rig.phone.wait_for(1)
    await rig.msilo.idle()
    got = rig.phone.requests[0]
    assert got.method == "MESSAGE"
    assert got.uri == binding.contact
    assert got.from_addr.display == "Alice A."
    assert got.from_addr.uri == "sip:alice@example.com"
    assert got.to_addr.uri == "sip:bob@example.com"
    assert got.content_type == "text/plain;charset=utf-8"
    assert got.body == body
    date = parsedate_to_datetime(got.header("Date") or "")
    assert abs(date.timestamp() - received) < 2
    assert (got.header("Date") or "").endswith("GMT")
    # Registered again (a new binding) and a periodic check: nothing goes out twice.
    rig.msilo.on_registered(ContactRegistered(binding.aor, binding))
    await rig.msilo.idle()
    rig.msilo.settings = MsiloSettings(retry_interval=1.0)
    await rig.msilo.check()
    await rig.msilo.idle()
    assert len(rig.phone.requests) == 1
    assert await rig.msilo.store.count() == 0


async def test_new_bindings_arriving_together_are_looked_up_with_one_query(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    # A registration storm: 40 phones register at once, one of which has a message waiting.
    await rig.msilo.on_message(_offline_ctx(_message("bob", b"while you were away")))
    claims: list[str] = []
    claim_next = rig.msilo.store.claim_next

    async def counting_claim(recipient: str, *args: Any) -> Any:
        claims.append(recipient)
        return await claim_next(recipient, *args)

    monkeypatch.setattr(rig.msilo.store, "claim_next", counting_claim)
    bindings = [await rig.bind(f"storm{i}") for i in range(39)] + [await rig.bind("bob")]
    for b in bindings:
        rig.msilo.on_registered(ContactRegistered(b.aor, b))
    await rig.phone.wait_for(1)
    await rig.msilo.idle()
    assert rig.msilo.stats["registration_checks"] == 1
    assert set(claims) == {f"sip:bob@{DOMAIN}"}  # no claim (an UPDATE) for the other 39
    assert [r.body for r in rig.phone.requests] == [b"while you were away"]
    assert await rig.msilo.store.count() == 0


async def test_messages_go_in_order_and_a_failure_stops_the_run(rig: Rig) -> None:
    for n in range(3):
        ctx = _offline_ctx(_message("bob", f"m{n}".encode(), call_id=f"m{n}@alice"))
        await rig.msilo.on_message(ctx)
    rig.phone.statuses = [200, 480]
    binding = await rig.bind("bob")
    rig.msilo.on_registered(ContactRegistered(binding.aor, binding))
    await rig.phone.wait_for(2)
    await rig.msilo.idle()
    assert [r.body for r in rig.phone.requests] == [b"m0", b"m1"]
    assert [m.body for m in await rig.msilo.store.list(binding.aor)] == [b"m1", b"m2"]
    # Next registration: the rest, in order, m1 with the same Call-ID as its first attempt.
    rig.msilo.on_registered(ContactRegistered(binding.aor, binding))
    await rig.phone.wait_for(4)
    await rig.msilo.idle()
    assert [r.body for r in rig.phone.requests] == [b"m0", b"m1", b"m1", b"m2"]
    assert rig.phone.requests[1].call_id == rig.phone.requests[2].call_id
    assert rig.phone.requests[2].cseq.number > rig.phone.requests[1].cseq.number
    assert await rig.msilo.store.count() == 0


async def test_a_refused_message_does_not_block_the_others(rig: Rig) -> None:
    for n in range(2):
        await rig.msilo.on_message(_offline_ctx(_message("bob", f"m{n}".encode(),
                                                         call_id=f"r{n}@alice")))
    rig.phone.statuses = [415, 200, 415]
    binding = await rig.bind("bob")
    rig.msilo.on_registered(ContactRegistered(binding.aor, binding))
    await rig.phone.wait_for(2)
    await rig.msilo.idle()
    assert [r.body for r in rig.phone.requests] == [b"m0", b"m1"]
    rig.msilo.on_registered(ContactRegistered(binding.aor, binding))
    await rig.phone.wait_for(3)
    await rig.msilo.idle()
    assert await rig.msilo.store.count() == 0  # refused twice (max_refusals = 2): dropped
    assert rig.msilo.stats["dropped"] == 1


async def test_forwarded_message_that_failed_is_stored_once(rig: Rig) -> None:
    req = _message("bob", b"are you there?", call_id="f1@alice")
    ctx = _offline_ctx(req, location="found")
    assert rig.msilo.on_failure(ctx, 480, None) is True
    assert rig.msilo.on_failure(ctx, 480, None) is False  # the same request: already taken
    await rig.msilo.idle()
    assert recorder_of(ctx).last.status == 202
    # The same MESSAGE offered again (new transaction, same Call-ID/CSeq/tag): one row.
    again = _offline_ctx(_message("bob", b"are you there?", call_id="f1@alice"), "found")
    assert rig.msilo.on_failure(again, 408, None) is True
    await rig.msilo.idle()
    assert recorder_of(again).last.status == 202
    assert await rig.msilo.store.count("sip:bob@example.com") == 1
    # Other failures, other methods and in-dialog requests are not ours.
    other = _offline_ctx(_message("bob", b"x", call_id="f2@alice"), "found")
    busy = parse_message(build_response(other.request, 486, to_tag="ph"))
    assert isinstance(busy, Response)
    assert rig.msilo.on_failure(other, 486, busy) is False
    assert rig.msilo.on_failure(_offline_ctx(_message("bob", b"x"), "offline"), 480,
                                None) is False


async def test_size_and_quota_limits(db_pool: asyncpg.Pool, clean: None) -> None:
    rigs = _rigs(db_pool, quota=1, max_message_size=10, quota_status=503)
    rig = await rigs.__anext__()
    try:
        big = _offline_ctx(_message("bob", b"x" * 11, call_id="big@alice"))
        await rig.msilo.on_message(big)
        assert recorder_of(big).last.status == 413
        ok = _offline_ctx(_message("bob", b"fits", call_id="ok@alice"))
        await rig.msilo.on_message(ok)
        assert recorder_of(ok).last.status == 202
        full = _offline_ctx(_message("bob", b"more", call_id="full@alice"))
        await rig.msilo.on_message(full)
        last = recorder_of(full).last
        assert (last.status, last.reason) == (503, "Message Store Full")
        assert "cause=503" in (last.header("Reason") or "")
    finally:
        await rigs.aclose()


async def test_store_failure_is_503(rig: Rig) -> None:
    rig.msilo.store = MessageStore(_ClosedPool(), expiry=60, quota=1)  # type: ignore[arg-type]
    ctx = _offline_ctx(_message("bob", b"lost?", call_id="db@alice"))
    await rig.msilo.on_message(ctx)
    assert recorder_of(ctx).last.status == 503


class _ClosedPool:
    """A pool whose database is gone: acquiring fails like a dropped connection."""

    def acquire(self) -> Any:
        raise asyncpg.InterfaceError("pool is closed")


async def test_restart_keeps_messages_and_retries_a_crashed_delivery(
        db_pool: asyncpg.Pool, clean: None) -> None:
    rigs = _rigs(db_pool)
    rig = await rigs.__anext__()
    await rig.msilo.on_message(_offline_ctx(_message("bob", b"survives", call_id="s@alice")))
    # A node "crashes" mid-delivery: the message is leased and never marked.
    leased = await rig.msilo.store.claim_next("sip:bob@example.com", 0, 0.2)
    assert leased is not None
    await rigs.aclose()
    await asyncio.sleep(1.1)  # the lease lapsed and the retry interval passed
    rigs = _rigs(db_pool, retry_interval=1.0)
    rig = await rigs.__anext__()
    try:
        await rig.bind("bob")
        assert await rig.msilo.check() == 1
        await rig.phone.wait_for(1)
        await rig.msilo.idle()
        assert rig.phone.requests[0].body == b"survives"
        assert rig.phone.requests[0].cseq.number == 2  # the second attempt
        assert await rig.msilo.store.count() == 0
    finally:
        await rigs.aclose()


def test_dedup_key_depends_on_every_part() -> None:
    base = dedup_key("c", "t", 1, "sip:b@x")
    assert len({base, dedup_key("c2", "t", 1, "sip:b@x"), dedup_key("c", "t2", 1, "sip:b@x"),
                dedup_key("c", "t", 2, "sip:b@x"), dedup_key("c", "t", 1, "sip:c@x")}) == 5


async def test_offline_notice_goes_back_to_the_sender(db_pool: asyncpg.Pool, clean: None) -> None:
    rigs = _rigs(db_pool, offline_notice=True)
    rig = await rigs.__anext__()
    try:
        req = _message("bob", b"hi bob", call_id="n1@alice")
        # The sender (not registered here) sent from the phone's address: the notice goes there.
        ctx = context(req, rig.phone.peer, user="alice", user_domain=DOMAIN)
        ctx.attrs.update(location="offline", aor="sip:bob@example.com")
        await rig.msilo.on_message(ctx)
        assert recorder_of(ctx).last.status == 202
        notice = (await _first(rig.phone))
        assert notice.from_addr.uri == "sip:msilo@example.com"
        assert notice.uri == "sip:alice@example.com"
        assert notice.to_addr.uri == "sip:alice@example.com"
        assert notice.body == b"bob@example.com is offline. Your message will be delivered later."
        assert notice.content_type == "text/plain;charset=utf-8"
    finally:
        await rigs.aclose()


async def _first(phone: Phone) -> Request:
    await phone.wait_for(1)
    return phone.requests[0]
