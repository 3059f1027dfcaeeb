"""Presence against a real PostgreSQL and real loopback sockets.

The notifier runs with the real location service, subscriber store, SIP stack and user agent
client; a plain UDP socket plays the watcher's phone and records the NOTIFYs.  SUBSCRIBEs come
in as parsed bytes through a real :class:`RequestContext` as the pipeline would hand them over
(after AUTH: ``ctx.user`` is the authenticated watcher, None for another domain).
"""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
import pytest

from presence.pidf import pidf_document, tuple_id
from presence.service import Presence
from presence.settings import PresenceSettings
from sipcore.location import (
    Binding,
    BindingChange,
    ContactExpired,
    ContactRegistered,
    LocationService,
)
from sipcore.message import Request, build_request, build_response, parse_message
from sipcore.pipeline import EventBus, RequestContext
from sipcore.stack import SipStack
from sipcore.subscribers import SubscriberStore
from sipcore.transaction import TimerSettings, TransactionLayer
from sipcore.transport import Transports
from sipcore.transport_types import Peer
from sipcore.uac import UserAgentClient
from tests.sipcore.regkit import context, recorder_of

DOMAIN = "example.com"
NS = "{urn:ietf:params:xml:ns:pidf}"


def test_pidf_document_is_rfc_3863() -> None:
    doc = pidf_document('sip:bob@example.com', "open", now=0.0, note='<away> & "back"')
    root = ET.fromstring(doc)
    assert root.tag == f"{NS}presence"
    assert root.get("entity") == "sip:bob@example.com"
    [tup] = root.findall(f"{NS}tuple")
    assert tup.get("id") == tuple_id("sip:bob@example.com")
    assert tup.findtext(f"{NS}status/{NS}basic") == "open"
    assert tup.findtext(f"{NS}timestamp") == "1970-01-01T00:00:00Z"
    assert root.findtext(f"{NS}note") == '<away> & "back"'
    assert tuple_id("sip:bob@example.com")[0].isalpha()
    closed = ET.fromstring(pidf_document("sip:bob@example.com", "closed"))
    assert closed.findtext(f"{NS}tuple/{NS}status/{NS}basic") == "closed"


@dataclass
class Watcher(asyncio.DatagramProtocol):
    """The watcher's phone: records NOTIFYs and answers ``statuses`` (then 200)."""

    statuses: list[int] = field(default_factory=list)
    notifies: list[tuple[float, Request]] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None
    got: asyncio.Event = field(default_factory=asyncio.Event)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        req = parse_message(data)
        assert isinstance(req, Request)
        if any(r.top_via.branch == req.top_via.branch for _, r in self.notifies):
            return
        self.notifies.append((time.monotonic(), req))
        self.got.set()
        status = self.statuses.pop(0) if self.statuses else 200
        assert self.transport is not None
        self.transport.sendto(build_response(req, status), addr)

    @property
    def peer(self) -> Peer:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return Peer("UDP", host, port)

    async def wait_for(self, n: int, timeout: float = 5.0) -> Request:
        async with asyncio.timeout(timeout):
            while len(self.notifies) < n:
                self.got.clear()
                await self.got.wait()
        return self.notifies[n - 1][1]

    def basic(self, n: int) -> str | None:
        return ET.fromstring(self.notifies[n - 1][1].body).findtext(
            f"{NS}tuple/{NS}status/{NS}basic")


class Identity:
    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr

    def sent_by(self, transport: str) -> tuple[str, int]:
        return self.addr


@dataclass
class Rig:
    presence: Presence
    location: LocationService
    watcher: Watcher

    def subscribe(self, presentity: str = "bob", *, expires: int | None = 600,
                  event: str = "presence", user: str | None = "alice",
                  accept: str | None = None, to_tag: str | None = None, cseq: int = 1,
                  call_id: str = "sub-1@alice") -> RequestContext:
        headers = [("Event", event), ("Contact", f"<sip:alice@{self.watcher.peer.host}:"
                                                  f"{self.watcher.peer.port}>")]
        if expires is not None:
            headers.append(("Expires", str(expires)))
        if accept is not None:
            headers.append(("Accept", accept))
        to = f"<sip:{presentity}@{DOMAIN}>" + (f";tag={to_tag}" if to_tag else "")
        raw = build_request("SUBSCRIBE", f"sip:{presentity}@{DOMAIN}", [
            ("Via", f"SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-{call_id.split('@')[0]}-{cseq}"),
            ("From", f"<sip:alice@{DOMAIN}>;tag=alice-tag"), ("To", to),
            ("Call-ID", call_id), ("CSeq", f"{cseq} SUBSCRIBE"), *headers,
        ])
        req = parse_message(raw)
        assert isinstance(req, Request)
        return context(req, self.watcher.peer, user=user,
                       user_domain=DOMAIN if user else None)

    async def bind(self, user: str) -> Binding:
        aor = f"sip:{user}@{DOMAIN}"
        b = Binding(aor, f"sip:{user}@192.0.2.9", Peer("UDP", "192.0.2.9", 5060),
                    time.time() + 600, received_at=time.time())
        await self.location.update(aor, lambda cur: BindingChange((b,), added=(b,)))
        return b


async def _rigs(pool: asyncpg.Pool, watcher_port: int = 0, node: str = "",
                **settings: Any) -> AsyncGenerator[Rig, None]:
    loop = asyncio.get_running_loop()
    stack = SipStack(lambda st: Transports(st),
                     TransactionLayer(TimerSettings(T1=0.02, T2=0.08, T4=0.1)))
    addr = await stack.transports.listen_udp("127.0.0.1", 0)
    transport, watcher = await loop.create_datagram_endpoint(
        Watcher, local_addr=("127.0.0.1", watcher_port))
    location = LocationService(pool, EventBus())
    subscribers = SubscriberStore(pool)
    for user in ("alice", "bob", "carol"):
        await subscribers.ensure(user, DOMAIN, "pw")
    presence = Presence(PresenceSettings(**settings), pool, location, subscribers,
                        UserAgentClient(stack, Identity(addr)), domains=[DOMAIN], aliases={},
                        node=node, claim_unowned=not node.endswith("/w1"))
    await presence.load()
    try:
        yield Rig(presence, location, watcher)
    finally:
        await presence.close()
        await location.close()
        transport.close()
        await stack.close()


@pytest.fixture
async def clean(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as conn:
        await conn.execute("DELETE FROM presence_subscriptions; DELETE FROM presence_hidden; "
                           "DELETE FROM location")


@pytest.fixture
async def rig(db_pool: asyncpg.Pool, clean: None) -> AsyncIterator[Rig]:
    rigs = _rigs(db_pool)
    yield await rigs.__anext__()
    await rigs.aclose()


async def test_subscribe_200_then_immediate_notify_and_one_per_registration_change(
        rig: Rig) -> None:
    ctx = rig.subscribe(expires=100_000)
    assert await rig.presence.on_subscribe(ctx) is True
    ok = recorder_of(ctx).last
    assert ok.status == 200
    assert ok.header("Expires") == "7200"  # clamped to max_expires
    assert ok.to_addr.tag and ok.contacts
    first = await rig.watcher.wait_for(1)
    assert first.method == "NOTIFY"
    assert first.call_id == "sub-1@alice"
    assert first.from_addr.tag == ok.to_addr.tag
    assert first.to_addr.tag == "alice-tag"
    assert first.header("Event") == "presence"
    assert first.header("Subscription-State") in ("active;expires=7200", "active;expires=7199")
    assert first.content_type == "application/pidf+xml"
    assert first.contacts
    assert rig.watcher.basic(1) == "closed"

    b = await rig.bind("bob")
    t0 = time.monotonic()
    rig.presence.on_location(ContactRegistered(b.aor, b))
    await rig.watcher.wait_for(2)
    assert rig.watcher.notifies[1][0] - t0 < 1.0  # watchers see changes within a second
    assert rig.watcher.basic(2) == "open"
    await rig.location.remove(b.aor)
    rig.presence.on_location(ContactExpired(b.aor, b))
    await rig.watcher.wait_for(3)
    assert rig.watcher.basic(3) == "closed"
    cseqs = [r.cseq.number for _, r in rig.watcher.notifies]
    assert cseqs == sorted(cseqs) and len(set(cseqs)) == 3


async def test_refresh_unsubscribe_and_out_of_order(rig: Rig) -> None:
    ctx = rig.subscribe()
    await rig.presence.on_subscribe(ctx)
    tag = recorder_of(ctx).last.to_addr.tag
    await rig.watcher.wait_for(1)
    refresh = rig.subscribe(expires=300, to_tag=tag, cseq=2, user=None)
    assert await rig.presence.on_in_dialog(refresh) is True
    assert recorder_of(refresh).last.header("Expires") == "300"
    second = await rig.watcher.wait_for(2)
    assert second.header("Subscription-State") in ("active;expires=300", "active;expires=299")
    stale = rig.subscribe(expires=300, to_tag=tag, cseq=2, call_id="sub-1@alice", user=None)
    await rig.presence.on_in_dialog(stale)
    assert recorder_of(stale).last.status == 500
    other = rig.subscribe(to_tag="not-ours", cseq=3, user=None)
    assert await rig.presence.on_in_dialog(other) is False  # the core answers 481
    bye = rig.subscribe(expires=0, to_tag=tag, cseq=3, user=None)
    assert await rig.presence.on_in_dialog(bye) is True
    assert recorder_of(bye).last.status == 200
    last = await rig.watcher.wait_for(3)
    assert last.header("Subscription-State") == "terminated;reason=timeout"
    assert not rig.presence.subscriptions
    async with rig.presence.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM presence_subscriptions") == 0


@pytest.mark.parametrize(
    ("kw", "status", "header"),
    [
        ({"event": "dialog"}, 489, ("Allow-Events", "presence")),
        ({"event": "presence.winfo"}, 489, ("Allow-Events", "presence")),
        ({"user": None}, 403, None),
        ({"accept": "application/xpidf+xml"}, 406, ("Accept", "application/pidf+xml")),
        ({"expires": 5}, 423, ("Min-Expires", "60")),
        ({"presentity": "nobody"}, 404, None),
    ],
)
async def test_refusals(rig: Rig, kw: dict[str, Any], status: int,
                        header: tuple[str, str] | None) -> None:
    ctx = rig.subscribe(**kw)
    assert await rig.presence.on_subscribe(ctx) is True
    last = recorder_of(ctx).last
    assert last.status == status
    if header is not None:
        assert last.header(header[0]) == header[1]
    assert not rig.presence.subscriptions


async def test_fetch_gets_one_terminated_notify(rig: Rig) -> None:
    await rig.bind("bob")
    ctx = rig.subscribe(expires=0)
    await rig.presence.on_subscribe(ctx)
    assert recorder_of(ctx).last.status == 200
    notify = await rig.watcher.wait_for(1)
    assert notify.header("Subscription-State") == "terminated;reason=timeout"
    assert rig.watcher.basic(1) == "open"
    assert not rig.presence.subscriptions


async def test_expiry_sends_terminated_and_481_removes(db_pool: asyncpg.Pool,
                                                       clean: None) -> None:
    rigs = _rigs(db_pool, min_expires=1, default_expires=1)
    rig = await rigs.__anext__()
    try:
        await rig.presence.on_subscribe(rig.subscribe(expires=1))
        await rig.watcher.wait_for(1)
        gone = await rig.watcher.wait_for(2, timeout=3)
        assert gone.header("Subscription-State") == "terminated;reason=timeout"
        assert not rig.presence.subscriptions
        # A watcher that forgot its subscription answers 481: the notifier drops it.
        rig.watcher.statuses = [200, 481]
        await rig.presence.on_subscribe(rig.subscribe(expires=600, call_id="s2@alice"))
        await rig.watcher.wait_for(3)
        assert len(rig.presence.subscriptions) == 1
        b = await rig.bind("bob")
        rig.presence.on_location(ContactRegistered(b.aor, b))
        await rig.watcher.wait_for(4)
        await rig.presence.idle()
        assert not rig.presence.subscriptions
    finally:
        await rigs.aclose()


async def test_hidden_presentity_is_closed_and_status_values(rig: Rig) -> None:
    await rig.bind("bob")
    assert await rig.presence.status("sip:bob@example.com") == "online"
    assert await rig.presence.status("sip:carol@example.com") == "offline"
    assert await rig.presence.status("sip:nobody@example.com") == "unknown"
    assert await rig.presence.status("sip:bob@example.org") == "non-local"
    await rig.presence.on_subscribe(rig.subscribe())
    await rig.watcher.wait_for(1)
    assert rig.watcher.basic(1) == "open"
    assert await rig.presence.set_hidden("sip:bob@example.com", True) is True
    await rig.watcher.wait_for(2)
    assert rig.watcher.basic(2) == "closed"
    assert await rig.presence.status("sip:bob@example.com") == "offline"
    assert await rig.presence.status("sip:bob@example.com", reveal=True) == "online"
    assert await rig.presence.set_hidden("sip:bob@example.com", True) is False


async def test_subscriptions_and_hiding_survive_a_restart(db_pool: asyncpg.Pool,
                                                          clean: None) -> None:
    rigs = _rigs(db_pool)
    rig = await rigs.__anext__()
    await rig.presence.on_subscribe(rig.subscribe())
    first = await rig.watcher.wait_for(1)
    await rig.presence.set_hidden("sip:carol@example.com", True)
    port = rig.watcher.peer.port
    await rigs.aclose()

    rigs = _rigs(db_pool, watcher_port=port)  # the watcher is still where it subscribed from
    rig = await rigs.__anext__()
    try:
        assert len(rig.presence.subscriptions) == 1
        assert "sip:carol@example.com" in rig.presence.hidden
        again = await rig.watcher.wait_for(1)  # the current state after the restart
        assert again.call_id == first.call_id
        assert again.from_addr.tag == first.from_addr.tag
        assert again.cseq.number > first.cseq.number
    finally:
        await rigs.aclose()


async def test_a_restart_loads_only_the_subscriptions_of_its_own_node(
        db_pool: asyncpg.Pool, clean: None) -> None:
    """With several worker processes (or nodes) each serves the subscriptions it accepted: a
    restarted worker must not NOTIFY, and later expire, another one's watchers."""
    rigs = _rigs(db_pool, node="host/127.0.0.1:5060/w1")
    rig = await rigs.__anext__()
    await rig.presence.on_subscribe(rig.subscribe())
    await rig.watcher.wait_for(1)
    port = rig.watcher.peer.port
    (ours,) = rig.presence.subscriptions
    await rigs.aclose()
    async with db_pool.acquire() as conn:
        assert await conn.fetchval("SELECT node FROM presence_subscriptions") == (
            "host/127.0.0.1:5060/w1")
        # A row from before subscriptions had an owner: worker 0 claims it.
        await conn.execute(
            "CREATE TEMP TABLE copy AS SELECT * FROM presence_subscriptions; "
            "UPDATE copy SET local_tag = 'old', node = ''; "
            "INSERT INTO presence_subscriptions SELECT * FROM copy; DROP TABLE copy")

    for node, expected in (("host/127.0.0.1:5060", "old"),
                           ("host/127.0.0.1:5060/w1", ours[2])):
        rigs = _rigs(db_pool, watcher_port=port, node=node)
        rig = await rigs.__anext__()
        try:
            assert [key[2] for key in rig.presence.subscriptions] == [expected], node
        finally:
            await rigs.aclose()


async def test_rapid_changes_notify_in_order_and_end_with_the_latest_state(rig: Rig) -> None:
    await rig.presence.on_subscribe(rig.subscribe())
    await rig.watcher.wait_for(1)
    b = await rig.bind("bob")
    for _ in range(3):
        rig.presence.on_location(ContactRegistered(b.aor, b))
    await rig.location.remove(b.aor)
    rig.presence.on_location(ContactExpired(b.aor, b))
    await rig.presence.idle()
    cseqs = [r.cseq.number for _, r in rig.watcher.notifies]
    assert cseqs == sorted(cseqs) and len(set(cseqs)) == len(cseqs)
    assert len(cseqs) <= 5  # changes during a NOTIFY transaction are coalesced
    assert rig.watcher.basic(len(cseqs)) == "closed"
