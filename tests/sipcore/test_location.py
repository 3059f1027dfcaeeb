"""LocationService against a real PostgreSQL: write-through, group commit, expiry, restart,
LISTEN/NOTIFY between two instances ("nodes"), and failure handling."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sipcore
from sipcore.errors import SipParseError
from sipcore.location import (
    Binding,
    BindingChange,
    ContactExpired,
    ContactRemoved,
    ContactsReloaded,
    LocationService,
    LocationWriteError,
    _Op,
    _row_json,
    aor_of,
)
from sipcore.pglisten import NotifyHub
from sipcore.pipeline import EventBus
from sipcore.transport_types import Peer
from sipcore.uri import parse_uri
from tests.support import RefusingPool, eventually

SOURCE = Peer("UDP", "198.51.100.7", 40123)


class Events:
    def __init__(self, bus: EventBus) -> None:
        self.seen: list[object] = []
        for kind in (ContactExpired, ContactRemoved):
            bus.subscribe(kind, self.seen.append)


@pytest.fixture
async def clean(db_pool: asyncpg.Pool) -> None:
    await db_pool.execute("DELETE FROM location")


@pytest.fixture
async def bus() -> EventBus:
    return EventBus()


@pytest.fixture
async def location(
    db_pool: asyncpg.Pool, bus: EventBus, clean: None
) -> AsyncIterator[LocationService]:
    service = LocationService(db_pool, bus)
    await service.load()
    yield service
    await service.close()


def binding(
    aor: str,
    contact: str,
    expires_in: float = 3600,
    *,
    q: float = 1.0,
    path: tuple[str, ...] = (),
    instance: str | None = None,
    reg_id: int | None = None,
    user_agent: str = "",
) -> Binding:
    now = time.time()
    return Binding(
        aor,
        contact,
        SOURCE,
        now + expires_in,
        received_at=now,
        call_id="c@x",
        cseq=1,
        q=q,
        path=path,
        instance=instance,
        reg_id=reg_id,
        user_agent=user_agent,
    )


Plan = Callable[[tuple[Binding, ...]], BindingChange | None]


def add(*bindings: Binding) -> Plan:
    def plan(current: tuple[Binding, ...]) -> BindingChange:
        return BindingChange((*current, *bindings), added=bindings)

    return plan


async def db_rows(pool: asyncpg.Pool, aor: str) -> list[str]:
    rows = await pool.fetch("SELECT contact FROM location WHERE aor = $1 ORDER BY contact", aor)
    return [r["contact"] for r in rows]


# ------------------------------------------------------------------------------------ aor_of


def test_aor_of_canonicalises() -> None:
    assert aor_of("sip:alice@Example.COM:5070;transport=tcp?subject=x") == "sip:alice@example.com"
    assert aor_of("sips:alice@example.com") == "sip:alice@example.com"
    assert aor_of("sip:%61lice@example.com") == "sip:alice@example.com"  # unescaped
    assert aor_of("sip:Alice@example.com") == "sip:Alice@example.com"  # user keeps its case
    assert aor_of(parse_uri("sip:1001@example.com;user=phone")) == "sip:1001@example.com"
    assert aor_of("sip:example.com") == "sip:example.com"
    with pytest.raises(ValueError):
        aor_of("tel:+15551234")
    with pytest.raises(SipParseError):
        aor_of("mailto:alice@example.com")


# ------------------------------------------------------------------------------------ writes


async def test_update_writes_through_and_indexes(
    location: LocationService, db_pool: asyncpg.Pool
) -> None:
    aor = "sip:alice@example.com"
    b1 = binding(aor, "sip:alice@10.0.0.7:5060", q=0.5, path=("<sip:edge.example.net;lr>",))
    change = await location.update(aor, add(b1))
    assert change.bindings == (b1,)
    assert location.lookup(aor) == (b1,)
    assert location.lookup_contact("sip:alice@10.0.0.7:5060") is b1
    assert (location.aor_count, location.binding_count) == (1, 1)
    row = await db_pool.fetchrow(
        "SELECT *, extract(epoch FROM expires_at)::float8 AS e FROM location WHERE aor = $1", aor
    )
    assert row is not None
    assert (row["transport"], row["source_host"], row["source_port"]) == (
        "UDP",
        "198.51.100.7",
        40123,
    )
    assert row["q"] == 0.5 and row["path"] == "<sip:edge.example.net;lr>"
    assert abs(row["e"] - b1.expires_at) < 1e-3
    dumped = location.dump()
    assert dumped[aor][0]["contact"] == "sip:alice@10.0.0.7:5060"
    assert 3590 <= dumped[aor][0]["expires"] <= 3600


async def test_plan_returning_none_writes_nothing(location: LocationService) -> None:
    change = await location.update("sip:nobody@example.com", lambda current: None)
    assert change.bindings == () and not change.changed
    assert location.stats["flushes"] == 0


async def test_concurrent_updates_share_one_flush(
    db_pool: asyncpg.Pool, bus: EventBus, clean: None
) -> None:
    service = LocationService(db_pool, bus, flush_delay=0.005)
    try:
        aors = [f"sip:user{i}@example.com" for i in range(20)]
        await asyncio.gather(
            *(service.update(a, add(binding(a, f"sip:{i}@10.0.0.1"))) for i, a in enumerate(aors))
        )
        assert service.stats["flushes"] == 1
        assert service.stats["flushed_ops"] == 20
        assert await db_pool.fetchval("SELECT count(*) FROM location") == 20
    finally:
        await service.close()


async def test_updates_of_one_aor_are_serialised(location: LocationService) -> None:
    aor = "sip:bob@example.com"
    planned: list[tuple[str, int]] = []

    def adder(contact: str) -> Plan:
        def plan(current: tuple[Binding, ...]) -> BindingChange:
            planned.append((contact, len(current)))
            b = binding(aor, contact)
            return BindingChange((*current, b), added=(b,))

        return plan

    for _ in range(2):  # the second round starts with the AoR's lock gone again
        start = len(location.lookup(aor))
        contacts = [f"sip:bob@10.0.{start}.{i}" for i in range(5)]
        await asyncio.gather(*(location.update(aor, adder(c)) for c in contacts))
        # In arrival order, each plan seeing the committed result of the one before (the
        # first runs at once, the others queue behind its write): nothing was lost.
        assert planned[-5:] == [(c, start + i) for i, c in enumerate(contacts)]
        assert not location._aor_locks
    assert len(location.lookup(aor)) == 10


async def test_a_cancelled_update_still_holds_back_the_next_one_until_it_is_written(
    db_pool: asyncpg.Pool, bus: EventBus, clean: None
) -> None:
    # A REGISTER whose task is cancelled while its change waits for the flush (a server
    # shutting down, a caller's timeout) does not take the change back: it is queued and
    # will be written.  The next update of the AoR must plan against it, so it waits for
    # that write as it would for one whose caller is still waiting.
    service = LocationService(db_pool, bus, flush_delay=0.2)
    try:
        aor = "sip:erin@example.com"
        first = asyncio.create_task(service.update(aor, add(binding(aor, "sip:e@1"))))
        await eventually(lambda: service.busy(aor), "the first change to be queued")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        seen: list[tuple[str, ...]] = []

        def second(current: tuple[Binding, ...]) -> BindingChange:
            seen.append(tuple(b.contact for b in current))
            b = binding(aor, "sip:e@2")
            return BindingChange((*current, b), added=(b,))

        await service.update(aor, second)
        assert seen == [("sip:e@1",)]
        assert sorted(b.contact for b in service.lookup(aor)) == ["sip:e@1", "sip:e@2"]
        assert await db_rows(db_pool, aor) == ["sip:e@1", "sip:e@2"]
    finally:
        await service.close()


async def test_remove_emits_and_deletes_every_row(
    location: LocationService, db_pool: asyncpg.Pool, bus: EventBus
) -> None:
    events = Events(bus)
    aor = "sip:carol@example.com"
    await location.update(aor, add(binding(aor, "sip:c@1"), binding(aor, "sip:c@2")))
    # A row another node wrote that this one never loaded goes too.
    await db_pool.execute(
        "INSERT INTO location (aor, contact, transport, source_host, source_port, expires_at,"
        " call_id, cseq, received_at) VALUES ($1, 'sip:c@3', 'UDP', '1.2.3.4', 5060,"
        " now() + interval '1 hour', 'x', 1, now())",
        aor,
    )
    assert await location.remove(aor) == 2
    assert location.lookup(aor) == () and location.lookup_contact("sip:c@1") is None
    assert await db_rows(db_pool, aor) == []
    assert [type(e) for e in events.seen] == [ContactRemoved, ContactRemoved]


async def test_write_failure_changes_nothing(db_dsn: str, bus: EventBus, clean: None) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
    assert pool is not None
    service = LocationService(pool, bus)
    aor = "sip:dave@example.com"
    await service.update(aor, add(binding(aor, "sip:d@1")))
    await pool.close()
    with pytest.raises(LocationWriteError):
        await service.update(aor, add(binding(aor, "sip:d@2")))
    assert [b.contact for b in service.lookup(aor)] == ["sip:d@1"]
    assert service.stats["flush_errors"] == 1
    assert not service.busy(aor)
    await service.close()


# ------------------------------------------------------------------------------------ restart


async def test_restart_loads_unexpired_bindings(
    db_pool: asyncpg.Pool, bus: EventBus, clean: None
) -> None:
    first = LocationService(db_pool, bus)
    aor = "sip:erin@example.com"
    kept = binding(
        aor,
        "sip:e@1",
        q=0.25,
        path=("<sip:a;lr>", "<sip:b;lr>"),
        instance='"<urn:x>"',
        reg_id=1,
        user_agent="Téléphone\t☎ \"1.0\" \\ x",
    )
    await first.update(aor, add(kept))
    await first.close()
    # A row that expired while the server was down is dropped at start-up.
    await db_pool.execute(
        "INSERT INTO location (aor, contact, transport, source_host, source_port, expires_at,"
        " call_id, cseq, received_at) VALUES ($1, 'sip:e@old', 'UDP', '1.2.3.4', 5060,"
        " now() - interval '1 second', 'x', 1, now())",
        aor,
    )
    second = LocationService(db_pool, bus)
    try:
        assert await second.load() == 1
        (loaded,) = second.lookup(aor)
        assert loaded.contact == "sip:e@1" and loaded.source == SOURCE
        assert loaded.q == 0.25 and loaded.path == ("<sip:a;lr>", "<sip:b;lr>")
        assert (loaded.instance, loaded.reg_id, loaded.user_agent) == (
            '"<urn:x>"', 1, "Téléphone\t☎ \"1.0\" \\ x")
        assert (loaded.cseq, loaded.call_id) == (kept.cseq, kept.call_id)
        assert abs(loaded.expires_at - kept.expires_at) < 1e-3
        assert second.lookup_contact("sip:e@1") is loaded
        assert await db_rows(db_pool, aor) == ["sip:e@1"]
    finally:
        await second.close()


async def test_restart_shares_repeated_strings_and_sources(
    db_pool: asyncpg.Pool, bus: EventBus, clean: None
) -> None:
    """What a binding costs is a target (< 1 KB per phone): what repeats is one object."""
    first = LocationService(db_pool, bus)
    natted = Peer("UDP", "203.0.113.9", 40000)
    for i in range(4):
        aor = f"sip:{2000 + i}@example.com"
        await first.update(aor, add(binding(aor, f"sip:{2000 + i}@10.0.0.{i}:5060",
                                            user_agent="Phone/2.0"),
                                    binding(aor, f"sip:{2000 + i}@10.1.0.{i}:5060",
                                            user_agent="Phone/2.0")))
    await first.update("sip:2010@example.com", add(Binding(
        "sip:2010@example.com", "sip:2010@192.0.2.1", natted, time.time() + 3600, q=0.5)))
    await first.close()
    second = LocationService(db_pool, bus)
    try:
        assert await second.load() == 9
        loaded = [b for aor in second.aors() for b in second.lookup(aor)]
        assert len(loaded) == 9
        for aor, bindings in second._by_aor.items():
            assert all(b.aor is aor for b in bindings)  # the key is every binding's AoR
        for contact, b in second._by_contact.items():
            assert contact is b.contact
        plain = [b for b in loaded if b.q == 1.0]
        assert len(plain) == 8
        assert all(b.source is plain[0].source for b in plain)  # one Peer per source
        assert all(b.user_agent is plain[0].user_agent for b in plain)
        if not sipcore.NATIVE:  # compiled, a float attribute is a C double in the object
            assert all(b.q is plain[0].q for b in plain)  # one float
        (other,) = second.lookup("sip:2010@example.com")
        assert other.source == natted and other.q == 0.5
        assert other.source.transport is plain[0].source.transport
        # A REGISTER's binding shares them too (the registrar makes a Peer per request).
        aor = "sip:2000@example.com"
        fresh = binding(aor, "sip:2000@10.9.9.9:5060")
        fresh.source = Peer("".join(["U", "DP"]), "".join(["198.51.", "100.7"]), 40123)
        await second.update(aor, add(fresh))
        assert fresh.source is plain[0].source and fresh.aor is loaded[0].aor
        # Far expiries wait for a scan: nothing of an hour's registrations is in the heap.
        assert second._heap == []
    finally:
        await second.close()


# ------------------------------------------------------------------------------------ expiry


async def test_expiry_removes_from_memory_and_db_and_emits(
    location: LocationService, db_pool: asyncpg.Pool, bus: EventBus
) -> None:
    events = Events(bus)
    aor = "sip:frank@example.com"
    short = binding(aor, "sip:f@short", expires_in=0.3)
    long = binding(aor, "sip:f@long", expires_in=3600)
    await location.update(aor, add(short, long))
    await asyncio.sleep(0.6)
    await _settle(location)
    assert location.lookup(aor) == (long,)
    assert location.lookup_contact("sip:f@short") is None
    assert await db_rows(db_pool, aor) == ["sip:f@long"]
    assert len(events.seen) == 1
    expired = events.seen[0]
    assert isinstance(expired, ContactExpired) and expired.binding is short
    assert location.stats["expired"] == 1


async def test_refresh_postpones_expiry_without_growing_the_heap(
    location: LocationService, bus: EventBus
) -> None:
    events = Events(bus)
    aor = "sip:gina@example.com"
    await location.update(aor, add(binding(aor, "sip:g@1", expires_in=0.4)))
    for _ in range(5):

        def refresh(current: tuple[Binding, ...]) -> BindingChange:
            new = binding(aor, "sip:g@1", expires_in=0.8)
            return BindingChange((new,), refreshed=(new,))

        await location.update(aor, refresh)
        assert len(location._heap) == 1  # the refresh inherited the pending entry
    await asyncio.sleep(0.5)  # past the first expiry, not the refreshed one
    assert len(location.lookup(aor)) == 1 and events.seen == []
    await asyncio.sleep(0.6)
    await _settle(location)
    assert location.lookup(aor) == ()
    assert [type(e) for e in events.seen] == [ContactExpired]


async def test_shortened_expiry_is_honoured(location: LocationService, bus: EventBus) -> None:
    events = Events(bus)
    aor = "sip:hank@example.com"
    await location.update(aor, add(binding(aor, "sip:h@1", expires_in=3600)))

    def shorten(current: tuple[Binding, ...]) -> BindingChange:
        new = binding(aor, "sip:h@1", expires_in=0.2)
        return BindingChange((new,), refreshed=(new,))

    await location.update(aor, shorten)
    await asyncio.sleep(0.4)
    await _settle(location)
    assert location.lookup(aor) == ()
    assert [type(e) for e in events.seen] == [ContactExpired]


async def test_far_expiries_enter_the_heap_when_a_scan_brings_them_within_the_horizon(
    db_pool: asyncpg.Pool, bus: EventBus, clean: None
) -> None:
    skew = [0.0]
    service = LocationService(db_pool, bus, clock=lambda: time.time() + skew[0])
    await service.load()
    try:
        events = Events(bus)
        aor = "sip:ivy@example.com"
        far = binding(aor, "sip:v@far", expires_in=3600)
        near = binding(aor, "sip:v@near", expires_in=30)
        await service.update(aor, add(far, near))
        assert [entry[2] for entry in service._heap] == ["sip:v@near"]

        def refresh(current: tuple[Binding, ...]) -> BindingChange:
            new = binding(aor, "sip:v@far", expires_in=3700)
            return BindingChange((new, near), refreshed=(new,))

        await service.update(aor, refresh)  # outside the horizon: still no entry
        assert [entry[2] for entry in service._heap] == ["sip:v@near"]
        refreshed = service.lookup_contact("sip:v@far")
        skew[0] = 3700 - 100.0  # an hour on: near is long gone, far comes within the horizon
        service._expire_due()
        await _settle(service)
        assert [entry[2] for entry in service._heap] == ["sip:v@far"]
        assert service.lookup(aor) == (refreshed,)
        skew[0] = 3701.0
        service._expire_due()
        await _settle(service)
        assert service.lookup(aor) == () and service._heap == []
        assert [e.binding for e in events.seen] == [near, refreshed]  # type: ignore[attr-defined]
    finally:
        await service.close()


async def _settle(location: LocationService) -> None:
    """Wait for queued writes (the expiry deletes) to be flushed."""
    for _ in range(100):
        if not location._queue and location._flush_task is None:
            return
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------ nodes


async def test_other_node_learns_changes_by_notify(db_dsn: str, clean: None) -> None:
    # Two nodes are two processes with their own pools. (Sharing one pool would make a node
    # take the other's NOTIFY for its own: it recognises its own writes by the server PID of
    # the connection it wrote with.)
    pool_a = await asyncpg.create_pool(db_dsn, min_size=1, max_size=3)
    pool_b = await asyncpg.create_pool(db_dsn, min_size=1, max_size=3)
    assert pool_a is not None and pool_b is not None
    bus_a, bus_b = EventBus(), EventBus()
    reloaded_a: list[ContactsReloaded] = []
    reloaded_b: list[ContactsReloaded] = []
    bus_a.subscribe(ContactsReloaded, reloaded_a.append)
    bus_b.subscribe(ContactsReloaded, reloaded_b.append)
    node_a = LocationService(pool_a, bus_a)
    node_b = LocationService(pool_b, bus_b)
    await node_a.load()
    await node_b.load()
    await node_a.listen()
    await node_b.listen()
    try:
        aor = "sip:ivan@example.com"
        b = binding(aor, "sip:i@1", q=0.5, path=("<sip:edge.example.com;lr>",),
                    instance='"<urn:uuid:00000000-0000-0000-0000-000000000001>"', reg_id=1,
                    user_agent="Phone\t1")
        await node_a.update(aor, add(b))
        await eventually(lambda: len(node_b.lookup(aor)) == 1)
        # A new contact comes with the notification itself (no query), every field intact.
        assert node_b.stats["remote_changes"] == 1 and node_b.stats["reloads"] == 0
        assert node_b.lookup(aor)[0].as_dict(0) == b.as_dict(0)
        assert node_a.stats["reloads"] == 0  # its own notification was recognised
        # Node b's watchers (presence) hear of the new contact; node a raised its own events.
        assert [(e.aor, [x.contact for x in e.bindings]) for e in reloaded_b] == [
            (aor, ["sip:i@1"])]
        # A second contact joins the first; then it is removed on its own (Expires: 0).
        second = binding(aor, "sip:i@2")
        await node_a.update(aor, add(second))
        await eventually(lambda: len(node_b.lookup(aor)) == 2)
        assert [x.contact for x in reloaded_b[-1].bindings] == ["sip:i@1", "sip:i@2"]
        await node_a.update(aor, lambda cur: BindingChange(cur[:1], removed=cur[1:]))
        await eventually(lambda: len(node_b.lookup(aor)) == 1)
        assert node_b.stats["remote_changes"] == 3 and node_b.stats["reloads"] == 0
        assert len(reloaded_b) == 3
        # A plain refresh changes no contact: applied from the notification itself (no
        # query), nothing announced.
        reloads = node_b.stats["reloads"]
        first = node_a.lookup(aor)[0]
        fresh = Binding(aor, "sip:i@1", first.source, first.expires_at + 600,
                        call_id=first.call_id, cseq=first.cseq + 1, q=first.q,
                        path=first.path, user_agent=first.user_agent, instance=first.instance,
                        reg_id=first.reg_id, received_at=first.received_at + 1.5)
        await node_a.update(aor, lambda cur: BindingChange((fresh,), refreshed=(fresh,)))
        await eventually(lambda: node_b.stats["remote_refreshes"] == 1)
        (seen,) = node_b.lookup(aor)
        assert (seen.expires_at, seen.cseq, seen.received_at, seen.call_id, seen.source) == (
            fresh.expires_at, fresh.cseq, fresh.received_at, fresh.call_id, fresh.source)
        assert node_b.stats["reloads"] == reloads and len(reloaded_b) == 3
        # A refresh from a new source (a NAT rebinding) carries the whole binding.
        moved = Binding(aor, "sip:i@1", Peer("UDP", "192.0.2.77", 4000), fresh.expires_at,
                        call_id=fresh.call_id, cseq=fresh.cseq + 1)
        await node_a.update(aor, lambda cur: BindingChange((moved,), refreshed=(moved,)))
        await eventually(lambda: node_b.stats["remote_changes"] == 4)
        assert node_b.lookup(aor)[0].as_dict(0) == moved.as_dict(0)
        assert node_b.stats["reloads"] == reloads and len(reloaded_b) == 3
        # A notification that cannot be read is not guessed at: the AoR is re-read.
        node_b._on_notify(None, 0, LocationService.CHANNEL, f"{aor}\tD\t[not json")
        await eventually(lambda: node_b.stats["reloads"] == reloads + 1)
        (reread,) = node_b.lookup(aor)
        assert (reread.contact, reread.source, reread.cseq) == (
            moved.contact, moved.source, moved.cseq)
        # Nor is one whose JSON is fine but whose Path is not a header list.
        bad_path = json.dumps([[], [[aor, "sip:i@9", "UDP", "192.0.2.9", 5060, 9e9, 1.0,
                                     "c", 1, "<sip:a;lr>,<sip:b;lr", "", None, None, 0]]])
        node_b._on_notify(None, 0, LocationService.CHANNEL, f"{aor}\tD\t{bad_path}")
        await eventually(lambda: node_b.stats["reloads"] == reloads + 2)
        assert [x.contact for x in node_b.lookup(aor)] == [moved.contact]
        await node_b.remove(aor)
        await eventually(lambda: node_a.lookup(aor) == ())
        assert [(e.aor, e.bindings) for e in reloaded_a] == [(aor, ())]
    finally:
        await node_a.close()
        await node_b.close()
        await pool_a.close()
        await pool_b.close()


async def test_changes_missed_while_not_listening_are_reloaded(db_dsn: str, clean: None) -> None:
    # Node b's listening connection dies and cannot be replaced for a while (the database
    # refuses it); node a registers and removes contacts meanwhile, whose notifications b
    # never gets.  Once b listens again it reloads everything and agrees with a.
    pool_a = await asyncpg.create_pool(db_dsn, min_size=1, max_size=3)
    pool_b = await asyncpg.create_pool(db_dsn, min_size=1, max_size=3)
    assert pool_a is not None and pool_b is not None

    gate = RefusingPool(pool_b, refuse=False)
    hub_b = NotifyHub(gate, "node_b")  # type: ignore[arg-type]
    node_a, node_b = LocationService(pool_a, EventBus()), LocationService(pool_b, EventBus())
    try:
        stays, goes, comes = ("sip:stay@example.com", "sip:go@example.com",
                              "sip:come@example.com")
        await node_a.update(stays, add(binding(stays, "sip:s@1")))
        await node_a.update(goes, add(binding(goes, "sip:g@1")))
        await node_b.load()
        await node_a.listen()
        await node_b.listen(hub_b)
        assert node_b.listening and len(node_b.lookup(goes)) == 1
        gate.refuse = True
        async with pool_a.acquire() as conn:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()")
        await eventually(lambda: gate.refused > 0)
        assert not node_b.listening
        await node_a.update(goes, lambda cur: BindingChange((), removed=cur, remove_all=True))
        await node_a.update(comes, add(binding(comes, "sip:c@1")))
        await asyncio.sleep(0.1)
        assert len(node_b.lookup(goes)) == 1 and not node_b.lookup(comes)  # not heard
        gate.refuse = False  # it retries by itself
        await eventually(lambda: node_b.listening, timeout=10.0)
        assert node_b.stats["resyncs"] == 1
        assert not node_b.lookup(goes)
        assert [b.contact for b in node_b.lookup(comes)] == ["sip:c@1"]
        assert [b.contact for b in node_b.lookup(stays)] == ["sip:s@1"]
        # And the new connection hears what happens next.
        await node_a.update(stays, lambda cur: BindingChange((), removed=cur, remove_all=True))
        await eventually(lambda: not node_b.lookup(stays))
    finally:
        await node_a.close()
        await node_b.close()
        await hub_b.close()
        await pool_a.close()
        await pool_b.close()



async def test_a_refresh_changes_no_indexed_column(db_pool: asyncpg.Pool) -> None:
    # A registration refresh (the most frequent write) rewrites expires_at, cseq, received_at
    # and the source: as long as no index covers those, PostgreSQL updates the row in place
    # (HOT), with no new index entries and no dead tuple left for autovacuum.
    indexed = await db_pool.fetch(
        "SELECT i.indexrelid::regclass::text AS name, a.attname FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = 'location'::regclass")
    assert {r["attname"] for r in indexed} == {"aor", "contact"}, indexed
    options = await db_pool.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = 'location'::regclass")
    assert "fillfactor=75" in options  # room on each page for the row's next version


async def test_a_change_too_big_for_a_notification_names_only_the_aor(
        location: LocationService) -> None:
    # PostgreSQL refuses NOTIFY payloads of 8,000 bytes or more: a change that big is sent
    # as the bare AoR, and the other nodes re-read it.
    aor = "sip:zoe@example.com"
    loop = asyncio.get_running_loop()
    small = BindingChange((binding(aor, "sip:z@1"),), added=(binding(aor, "sip:z@1"),))
    many = tuple(binding(aor, f"sip:z{n}@{'h' * 200}.example.com") for n in range(40))
    big = BindingChange(many, added=many)

    def notice(change: BindingChange) -> str:
        document = json.loads(location._flush_json([_Op(aor, change, (), loop.create_future())]))
        assert [row[1] for row in document[0]] == [b.contact for b in change.added]
        (text,) = document[4]
        assert isinstance(text, str)
        return text

    assert notice(small).startswith(f"{aor}\tD\t[[],[[")
    assert notice(big) == aor


async def test_the_flush_document_is_the_json_of_its_parts(location: LocationService) -> None:
    # [upserts, deletes, AoRs to clear, expiry deletes, notifications], written by hand: it
    # must read back as the same values json.dumps would write, whatever the text holds.
    loop = asyncio.get_running_loop()
    aor, other, third = 'sip:"q"@example.com', "sip:\u00e9t\u00e9@example.com", "sip:t@x"
    added = binding(aor, 'sip:a@1;x="\\"')
    gone = binding(aor, "sip:b\t@1")
    old = binding(third, "sip:c@1")
    ops = [_Op(aor, BindingChange((added,), added=(added,), removed=(gone,)), (),
               loop.create_future()),
           _Op(other, BindingChange((), removed=(old,), remove_all=True), (),
               loop.create_future()),
           _Op(third, None, (old,), loop.create_future())]
    text = location._flush_json(ops)
    assert text.isascii()
    upserts, deletes, cleared, expired, notices = json.loads(text)
    assert [row[:2] for row in upserts] == [[aor, added.contact]]
    assert deletes == [[aor, gone.contact]]
    assert cleared == [other]
    assert expired == [[third, old.contact, old.expires_at]]
    assert notices[1:] == [other, third] and notices[0].startswith(f"{aor}\tD\t")


async def test_update_soon_calls_back_from_the_flush_with_the_batch_installed(
    location: LocationService, db_pool: asyncpg.Pool
) -> None:
    # The registrar's path for most REGISTERs: no coroutine; the callback answers from the
    # flush, and by then the whole batch is committed and in memory.
    heard: list[tuple[str, BindingChange, BaseException | None, int]] = []
    aors = ["sip:ann@example.com", "sip:ben@example.com"]

    def committed(aor: str) -> Callable[[BindingChange, BaseException | None], None]:
        def callback(change: BindingChange, error: BaseException | None) -> None:
            heard.append((aor, change, error, sum(len(location.lookup(a)) for a in aors)))
        return callback

    started = [location.update_soon(a, add(binding(a, f"sip:{i}@10.0.0.2")), committed(a))
               for i, a in enumerate(aors)]
    assert [s is not None and s[1] for s in started] == [True, True]
    assert location.lookup(aors[0]) == () and heard == []  # nothing before the commit
    # While its write is in flight the AoR is held: update_soon declines and plans nothing.
    assert location.update_soon(aors[0], lambda current: pytest.fail("planned"),
                                committed(aors[0])) is None
    await eventually(lambda: len(heard) == 2, "both callbacks")
    assert [(aor, error, seen) for aor, _, error, seen in heard] == [
        (aors[0], None, 2), (aors[1], None, 2)]
    assert heard[0][1] is started[0][0]  # type: ignore[index]
    assert await db_pool.fetchval("SELECT count(*) FROM location") == 2
    # No change to write: the change at once, and no callback.
    unchanged = location.update_soon(aors[0], lambda current: None, committed(aors[0]))
    assert unchanged is not None and unchanged[1] is False
    assert unchanged[0].bindings == location.lookup(aors[0])
    await asyncio.sleep(0.05)
    assert len(heard) == 2


async def test_update_soon_reports_a_failed_write_and_survives_a_failing_callback(
    db_pool: asyncpg.Pool, bus: EventBus, clean: None
) -> None:
    gate = RefusingPool(db_pool, refuse=False, refuse_queries=True)
    service = LocationService(gate, bus)  # type: ignore[arg-type]
    heard: list[BaseException | None] = []

    def broken(change: BindingChange, error: BaseException | None) -> None:
        heard.append(error)
        raise RuntimeError("the caller's bug")

    try:
        aor = "sip:cy@example.com"
        assert service.update_soon(aor, add(binding(aor, "sip:c@10.0.0.3")), broken)
        await eventually(lambda: heard, "the callback")
        assert isinstance(heard[0], LocationWriteError) and service.lookup(aor) == ()
        # The flush that called the failing callback went on: the next write works.
        gate.refuse_queries = False
        assert service.update_soon(aor, add(binding(aor, "sip:c@10.0.0.3")), broken)
        await eventually(lambda: len(heard) == 2, "the second callback")
        assert heard[1] is None and len(service.lookup(aor)) == 1
    finally:
        await service.close()


_floats = st.floats(allow_nan=True, allow_infinity=True)
_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(aor=st.text(), contact=st.text(), transport=st.text(), host=st.text(), port=_ints,
       expires_at=_floats, q=_floats, call_id=st.text(), cseq=_ints,
       path=st.lists(st.text(), max_size=3), user_agent=st.text(),
       instance=st.none() | st.text(), reg_id=st.none() | _ints, received_at=_floats)
def test_a_row_is_the_json_the_encoder_writes(
    aor: str, contact: str, transport: str, host: str, port: int, expires_at: float, q: float,
    call_id: str, cseq: int, path: list[str], user_agent: str, instance: str | None,
    reg_id: int | None, received_at: float,
) -> None:
    """The flush writes each row by hand; it must be what json.dumps writes (ASCII only, so a
    row fits a notification and quotes, controls and non-ASCII text are escaped)."""
    b = Binding(aor, contact, Peer(transport, host, port), expires_at, q=q, call_id=call_id,
                cseq=cseq, path=tuple(path), user_agent=user_agent, instance=instance,
                reg_id=reg_id, received_at=received_at)
    expected = json.dumps([aor, contact, transport, host, port, expires_at, q, call_id, cseq,
                           ", ".join(path), user_agent, instance, reg_id, received_at],
                          separators=(",", ":"))
    assert _row_json(b) == expected
