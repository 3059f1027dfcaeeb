"""Registrar (RFC 3261 §10.3) and LocationLookup, sans-IO over a real PostgreSQL.

Each REGISTER is parsed by the real parser and handed to the handler in a RequestContext whose
replier builds and re-parses the response; ``ctx.user`` is set as the AUTH stage would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from email.utils import parsedate_to_datetime

import asyncpg
import pytest

from sipcore.location import (
    BindingChange,
    ContactExpired,
    ContactRefreshed,
    ContactRegistered,
    ContactRemoved,
    LocationService,
)
from sipcore.message import Request, Response
from sipcore.pipeline import EventBus, Later, Target
from sipcore.registrar import LocationLookup, Registrar, RegistrarSettings
from sipcore.subscribers import SubscriberStore
from sipcore.transport_types import Peer
from tests.sipcore.regkit import DOMAIN, PHONE, context, recorder_of, register, request

SETTINGS = RegistrarSettings(default_expires=600, min_expires=60, max_expires=1200, max_contacts=3)


class Events:
    def __init__(self, bus: EventBus) -> None:
        self.seen: list[object] = []
        for kind in (ContactRegistered, ContactRefreshed, ContactRemoved, ContactExpired):
            bus.subscribe(kind, self.seen.append)

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.seen]


@pytest.fixture
async def bus() -> EventBus:
    return EventBus()


@pytest.fixture
async def location(db_pool: asyncpg.Pool, bus: EventBus) -> AsyncIterator[LocationService]:
    await db_pool.execute("DELETE FROM location")
    service = LocationService(db_pool, bus)
    await service.load()
    yield service
    await service.close()


@pytest.fixture
def registrar(location: LocationService) -> Registrar:
    return Registrar(location, [DOMAIN], SETTINGS)


async def send(
    registrar: Registrar,
    req: Request,
    *,
    user: str | None = "alice",
    source: Peer = PHONE,
    extra: list[tuple[str, str]] | None = None,
) -> Response:
    ctx = context(req, source, user=user, user_domain=DOMAIN if user else None)
    if extra:
        ctx.response_headers.extend(extra)
    assert await answered(registrar(ctx)) is True
    return recorder_of(ctx).last


async def answered(verdict: bool | Awaitable[bool]) -> bool:
    """A pipeline handler's verdict, once it is in (the registrar's: a Later for a REGISTER,
    False for anything else)."""
    return verdict if isinstance(verdict, bool) else await verdict


def contacts_of(resp: Response) -> dict[str, dict[str, str | None]]:
    """Contact URI -> its parameters, from a 200 OK."""
    return {c.uri: c.params for c in resp.contacts}


AOR = f"sip:alice@{DOMAIN}"


# ------------------------------------------------------------------------------ add/refresh


async def test_register_adds_binding_and_lists_it(
    registrar: Registrar, location: LocationService
) -> None:
    before = time.time()
    resp = await send(registrar, register("alice", ["<sip:alice@10.0.0.7:5060>"], expires=300))
    assert resp.status == 200
    assert contacts_of(resp) == {"sip:alice@10.0.0.7:5060": {"expires": "300"}}
    date = resp.header("Date")
    assert date is not None and abs(parsedate_to_datetime(date).timestamp() - before) < 2
    (b,) = location.lookup(AOR)
    # RFC 3581: the binding remembers where the REGISTER came from, not the Contact host.
    assert b.source == PHONE and b.contact == "sip:alice@10.0.0.7:5060"
    assert (b.call_id, b.cseq) == ("reg-1@phone", 1)
    assert 299 <= b.expires_at - before <= 301


async def test_default_and_capped_expires(registrar: Registrar) -> None:
    resp = await send(registrar, register("alice", ["<sip:a@1>", "<sip:a@2>;expires=99999"]))
    assert contacts_of(resp) == {"sip:a@1": {"expires": "600"}, "sip:a@2": {"expires": "1200"}}


async def test_contact_param_wins_over_expires_header(registrar: Registrar) -> None:
    resp = await send(
        registrar, register("alice", ["<sip:a@1>;expires=120", "<sip:a@2>"], expires=900)
    )
    assert contacts_of(resp) == {"sip:a@1": {"expires": "120"}, "sip:a@2": {"expires": "900"}}


async def test_refresh_keeps_one_binding_and_emits_refreshed(
    registrar: Registrar, location: LocationService, bus: EventBus
) -> None:
    events = Events(bus)
    await send(registrar, register("alice", ["<sip:a@1>"], cseq=1, expires=300))
    resp = await send(registrar, register("alice", ["<sip:a@1>"], cseq=2, expires=900))
    assert contacts_of(resp) == {"sip:a@1": {"expires": "900"}}
    (b,) = location.lookup(AOR)
    assert b.cseq == 2
    assert events.kinds() == ["ContactRegistered", "ContactRefreshed"]


async def test_only_events_someone_listens_to_are_built(
    registrar: Registrar, location: LocationService, bus: EventBus
) -> None:
    registered: list[ContactRegistered] = []
    bus.subscribe(ContactRegistered, registered.append)
    assert bus.listens(ContactRegistered) and not bus.listens(ContactRefreshed)
    await send(registrar, register("alice", ["<sip:a@1>"], cseq=1, expires=300))
    await send(registrar, register("alice", ["<sip:a@1>", "<sip:a@2>"], cseq=2))
    assert [e.binding.contact for e in registered] == ["sip:a@1", "sip:a@2"]
    # The second REGISTER refreshed sip:a@1 too: that event is only built when asked for.
    change = BindingChange(location.lookup(AOR), added=location.lookup(AOR)[1:],
                           refreshed=location.lookup(AOR)[:1])
    assert [type(e) for e in change.events(AOR, bus.listens)] == [ContactRegistered]
    assert [type(e) for e in change.events(AOR)] == [ContactRegistered, ContactRefreshed]


async def test_several_contacts_with_q_values_all_listed(
    registrar: Registrar, location: LocationService
) -> None:
    await send(registrar, register("alice", ["<sip:desk@10.0.0.1>;q=0.7"], call_id="desk@x"))
    resp = await send(
        registrar, register("alice", ["<sip:soft@10.0.0.2>;q=1.0"], call_id="soft@x", expires=300)
    )
    # The 200 lists ALL current bindings, not just the ones in this request.
    assert contacts_of(resp) == {
        "sip:desk@10.0.0.1": {"expires": "600", "q": "0.7"},
        "sip:soft@10.0.0.2": {"expires": "300"},
    }
    assert [b.q for b in location.lookup(AOR)] == [0.7, 1.0]


async def test_query_without_contact_lists_bindings_and_changes_nothing(
    registrar: Registrar, location: LocationService
) -> None:
    await send(registrar, register("alice", ["<sip:a@1>"], expires=300))
    flushes = location.stats["flushes"]
    resp = await send(registrar, register("alice", [], cseq=2))
    assert resp.status == 200 and list(contacts_of(resp)) == ["sip:a@1"]
    assert location.stats["flushes"] == flushes


async def test_bad_q_value_is_400(registrar: Registrar) -> None:
    for q in ("1.5", "0.1234", "x", "1.01"):
        resp = await send(registrar, register("alice", [f"<sip:a@1>;q={q}"]))
        assert resp.status == 400, q


async def test_same_instance_replaces_its_old_binding(
    registrar: Registrar, location: LocationService, bus: EventBus, db_pool: asyncpg.Pool
) -> None:
    """RFC 5626 §6: a rebooted phone (same +sip.instance, new port and Call-ID) replaces its
    binding instead of leaving a dead one that every call would fork to."""
    inst = '"<urn:uuid:00000000-0000-1000-8000-000a95a0e128>"'
    other = '"<urn:uuid:11111111-0000-1000-8000-000a95a0e128>"'
    await send(registrar, register("alice", [f"<sip:a@10.0.0.1:5060>;+sip.instance={inst}",
                                             f"<sip:b@10.0.0.9>;+sip.instance={other}",
                                             "<sip:plain@10.0.0.5>"], call_id="boot1"))
    events = Events(bus)
    resp = await send(registrar, register(
        "alice", [f"<sip:a@10.0.0.1:5072>;+sip.instance={inst}"], call_id="boot2"))
    assert resp.status == 200
    assert set(contacts_of(resp)) == {"sip:a@10.0.0.1:5072", "sip:b@10.0.0.9",
                                      "sip:plain@10.0.0.5"}
    assert {b.contact for b in location.lookup(AOR)} == set(contacts_of(resp))
    rows = await db_pool.fetch("SELECT contact FROM location WHERE aor = $1", AOR)
    assert {r["contact"] for r in rows} == set(contacts_of(resp))
    assert sorted(events.kinds()) == ["ContactRegistered", "ContactRemoved"]

    # reg-id tells two flows of one instance apart (RFC 5626): both stay.
    await send(registrar, register("alice", ["<sip:plain@10.0.0.5>;expires=0"], call_id="boot1",
                                   cseq=2))
    resp = await send(registrar, register(
        "alice", [f"<sip:a@10.0.0.1:6000>;+sip.instance={inst};reg-id=2"], call_id="flow2"))
    assert resp.status == 200
    assert {"sip:a@10.0.0.1:5072", "sip:a@10.0.0.1:6000"} <= {
        b.contact for b in location.lookup(AOR)}

    # Two contacts of one instance in one REGISTER: the last counts.
    resp = await send(registrar, register(
        "alice", [f"<sip:a@10.0.0.1:7000>;+sip.instance={inst}",
                  f"<sip:a@10.0.0.1:7001>;+sip.instance={inst}"], call_id="boot3"))
    contacts = {b.contact for b in location.lookup(AOR)}
    assert "sip:a@10.0.0.1:7001" in contacts
    assert not {"sip:a@10.0.0.1:7000", "sip:a@10.0.0.1:5072"} & contacts


# ------------------------------------------------------------------------------ removal


async def test_expires_zero_removes_one_contact(
    registrar: Registrar, location: LocationService, bus: EventBus, db_pool: asyncpg.Pool
) -> None:
    await send(registrar, register("alice", ["<sip:a@1>", "<sip:a@2>"]))
    events = Events(bus)
    resp = await send(registrar, register("alice", ["<sip:a@1>;expires=0"], cseq=2))
    assert resp.status == 200 and list(contacts_of(resp)) == ["sip:a@2"]
    assert [b.contact for b in location.lookup(AOR)] == ["sip:a@2"]
    assert await db_pool.fetchval("SELECT count(*) FROM location WHERE aor = $1", AOR) == 1
    assert events.kinds() == ["ContactRemoved"]


async def test_star_removes_everything(
    registrar: Registrar, location: LocationService, bus: EventBus, db_pool: asyncpg.Pool
) -> None:
    await send(registrar, register("alice", ["<sip:a@1>"], call_id="one@x"))
    await send(registrar, register("alice", ["<sip:a@2>"], call_id="two@x"))
    events = Events(bus)
    resp = await send(registrar, register("alice", ["*"], call_id="one@x", cseq=2, expires=0))
    assert resp.status == 200 and resp.contacts == []
    assert location.lookup(AOR) == ()
    assert await db_pool.fetchval("SELECT count(*) FROM location WHERE aor = $1", AOR) == 0
    assert events.kinds() == ["ContactRemoved", "ContactRemoved"]


async def test_star_needs_expires_zero(registrar: Registrar) -> None:
    assert (await send(registrar, register("alice", ["*"]))).status == 400
    assert (await send(registrar, register("alice", ["*"], expires=60))).status == 400


# ------------------------------------------------------------------------------ ordering


async def test_same_call_id_not_higher_cseq_fails_and_changes_nothing(
    registrar: Registrar, location: LocationService
) -> None:
    await send(registrar, register("alice", ["<sip:a@1>"], cseq=5, expires=300))
    # An old REGISTER overtaken by a newer one: §10.3 step 7 aborts the whole update.
    resp = await send(registrar, register("alice", ["<sip:a@1>;expires=0", "<sip:a@9>"], cseq=5))
    assert resp.status == 500
    assert [(b.contact, b.cseq) for b in location.lookup(AOR)] == [("sip:a@1", 5)]
    resp = await send(registrar, register("alice", ["*"], cseq=4, expires=0))
    assert resp.status == 500 and len(location.lookup(AOR)) == 1
    # Another Call-ID (the phone restarted) may update whatever its CSeq.
    resp = await send(
        registrar, register("alice", ["<sip:a@1>"], call_id="new@x", cseq=1, expires=300)
    )
    assert resp.status == 200
    assert location.lookup(AOR)[0].call_id == "new@x"


# ------------------------------------------------------------------------------ limits


async def test_interval_too_brief_is_423_with_min_expires(
    registrar: Registrar, location: LocationService
) -> None:
    resp = await send(registrar, register("alice", ["<sip:a@1>", "<sip:a@2>;expires=30"]))
    assert resp.status == 423
    assert resp.header("Min-Expires") == "60"
    assert location.lookup(AOR) == ()  # all or nothing


async def test_max_contacts_is_403(registrar: Registrar, location: LocationService) -> None:
    await send(registrar, register("alice", ["<sip:a@1>", "<sip:a@2>", "<sip:a@3>"]))
    resp = await send(registrar, register("alice", ["<sip:a@4>"], call_id="other@x"))
    assert (resp.status, resp.reason) == (403, "Too Many Registered Contacts")
    assert len(location.lookup(AOR)) == 3
    # Refreshing and replacing within the limit still works.
    resp = await send(registrar, register("alice", ["<sip:a@3>;expires=0", "<sip:a@4>"], cseq=2))
    assert resp.status == 200 and len(contacts_of(resp)) == 3


# ------------------------------------------------------------------------------ policy


async def test_foreign_domain_is_403(registrar: Registrar) -> None:
    resp = await send(registrar, register("alice", ["<sip:a@1>"], domain="elsewhere.org"))
    assert resp.status == 403


async def test_user_must_own_the_aor(registrar: Registrar, location: LocationService) -> None:
    resp = await send(registrar, register("alice", ["<sip:a@1>"]), user="bob")
    assert resp.status == 403
    resp = await send(registrar, register("alice", ["<sip:a@1>"]), user=None)
    assert resp.status == 403
    assert location.lookup(AOR) == ()


async def test_unsupported_require_is_420(registrar: Registrar) -> None:
    resp = await send(
        registrar, register("alice", ["<sip:a@1>"], headers=[("Require", "path, foo")])
    )
    assert resp.status == 420 and resp.header("Unsupported") == "foo"


async def test_non_sip_contact_is_400(registrar: Registrar) -> None:
    for contact in ("<mailto:alice@example.com>", "<tel:+4930123>", "<sip:bad host@x>"):
        resp = await send(registrar, register("alice", [contact]))
        assert resp.status == 400, contact


# ------------------------------------------------------------------------------ Path, extras


async def test_path_stored_and_echoed_when_supported(
    registrar: Registrar, location: LocationService
) -> None:
    path = [("Path", "<sip:edge1.example.net;lr>"), ("Path", "<sip:edge2.example.net;lr>")]
    resp = await send(
        registrar, register("alice", ["<sip:a@1>"], headers=[*path, ("Supported", "path")])
    )
    assert resp.header_values("Path") == [
        "<sip:edge1.example.net;lr>",
        "<sip:edge2.example.net;lr>",
    ]
    assert location.lookup(AOR)[0].path == (
        "<sip:edge1.example.net;lr>",
        "<sip:edge2.example.net;lr>",
    )
    resp = await send(registrar, register("alice", ["<sip:a@1>"], cseq=2, headers=path))
    assert resp.status == 200 and resp.header_values("Path") == []  # stored, not echoed
    assert len(location.lookup(AOR)[0].path) == 2


async def test_response_headers_from_other_modules_are_included(registrar: Registrar) -> None:
    resp = await send(
        registrar, register("alice", ["<sip:a@1>"]), extra=[("Balance-amount", "12.50")]
    )
    assert resp.status == 200 and resp.header("Balance-amount") == "12.50"


async def test_events_are_emitted_after_the_answer(registrar: Registrar, bus: EventBus) -> None:
    answered_first: list[bool] = []
    req = register("alice", ["<sip:a@1>"])
    ctx = context(req, user="alice", user_domain=DOMAIN)
    bus.subscribe(ContactRegistered, lambda e: answered_first.append(ctx.replied))
    await answered(registrar(ctx))
    assert answered_first == [True]


async def test_database_failure_is_500_and_claims_nothing(db_dsn: str) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
    assert pool is not None
    service = LocationService(pool, EventBus())
    registrar = Registrar(service, [DOMAIN], SETTINGS)
    await pool.execute("ALTER TABLE location RENAME TO location_revoked")
    try:
        resp = await send(registrar, register("zoe", ["<sip:z@1>"]), user="zoe")
        assert resp.status == 500
        assert service.lookup(f"sip:zoe@{DOMAIN}") == ()
    finally:
        await pool.execute("ALTER TABLE location_revoked RENAME TO location")
    # The database is back: the next REGISTER works.
    resp = await send(registrar, register("zoe", ["<sip:z@1>"], cseq=2), user="zoe")
    assert resp.status == 200
    await service.close()
    await pool.close()


async def test_concurrent_registers_are_group_committed(db_pool: asyncpg.Pool) -> None:
    await db_pool.execute("DELETE FROM location")
    service = LocationService(db_pool, EventBus(), flush_delay=0.005)
    registrar = Registrar(service, [DOMAIN], SETTINGS)
    try:
        users = [f"u{i}" for i in range(10)]
        responses = await asyncio.gather(
            *(send(registrar, register(u, [f"<sip:{u}@10.0.0.1>"]), user=u) for u in users)
        )
        assert [r.status for r in responses] == [200] * 10
        assert service.stats["flushes"] == 1  # one round trip for all ten
    finally:
        await service.close()


async def test_bindings_survive_a_restart(db_pool: asyncpg.Pool, registrar: Registrar) -> None:
    await send(registrar, register("alice", ["<sip:a@1>;q=0.5"], expires=300))
    fresh = LocationService(db_pool, EventBus())
    try:
        assert await fresh.load() == 1
        (b,) = fresh.lookup(AOR)
        assert (b.contact, b.q, b.source, b.cseq) == ("sip:a@1", 0.5, PHONE, 1)
        # ... and a registrar on the new service applies the §10.3 rules to them.
        resp = await send(
            Registrar(fresh, [DOMAIN], SETTINGS), register("alice", ["<sip:a@1>"], cseq=1)
        )
        assert resp.status == 500
    finally:
        await fresh.close()


async def test_expired_binding_is_gone_and_announced(db_pool: asyncpg.Pool) -> None:
    await db_pool.execute("DELETE FROM location")
    bus = EventBus()
    events = Events(bus)
    service = LocationService(db_pool, bus)
    registrar = Registrar(
        service, [DOMAIN], RegistrarSettings(default_expires=60, min_expires=1, max_expires=60)
    )
    try:
        await send(registrar, register("alice", ["<sip:a@1>"], expires=1))
        await asyncio.sleep(1.4)
        assert service.lookup(AOR) == ()
        for _ in range(50):
            if await db_pool.fetchval("SELECT count(*) FROM location") == 0:
                break
            await asyncio.sleep(0.02)
        assert await db_pool.fetchval("SELECT count(*) FROM location") == 0
        assert events.kinds() == ["ContactRegistered", "ContactExpired"]
    finally:
        await service.close()


# ------------------------------------------------------------------------------ lookup


@pytest.fixture
async def lookup(location: LocationService, db_pool: asyncpg.Pool) -> LocationLookup:
    subscribers = SubscriberStore(db_pool)
    await subscribers.ensure("alice", DOMAIN, "secret")
    await subscribers.ensure("bob", DOMAIN, "secret")
    return LocationLookup(location, subscribers, [DOMAIN])


async def run_lookup(lookup: LocationLookup, uri: str) -> tuple[dict[str, object], list[Target]]:
    req = request("INVITE", uri, from_uri="sip:carol@elsewhere.org", to_uri=uri)
    ctx = context(req)
    result = lookup(ctx)
    if not isinstance(result, bool):
        result = await result
    assert result is False and not ctx.replied
    return ctx.attrs, ctx.targets


async def test_lookup_targets_every_binding_best_q_first(
    lookup: LocationLookup, registrar: Registrar
) -> None:
    nat = Peer("UDP", "203.0.113.9", 6000)
    await send(registrar, register("alice", ["<sip:desk@10.0.0.1>;q=0.5"], call_id="d@x"))
    await send(
        registrar,
        register(
            "alice",
            ["<sip:cell@10.0.0.2>;q=0.9"],
            call_id="c@x",
            headers=[("Path", "<sip:edge;lr>")],
        ),
        source=nat,
    )
    attrs, targets = await run_lookup(lookup, "sip:alice@EXAMPLE.com;user=phone")
    assert attrs["location"] == "found" and attrs["aor"] == AOR
    assert [(t.uri, t.dest, t.q, t.path) for t in targets] == [
        ("sip:cell@10.0.0.2", nat, 0.9, ("<sip:edge;lr>",)),
        ("sip:desk@10.0.0.1", PHONE, 0.5, ()),
    ]


async def test_lookup_offline_unknown_and_foreign(lookup: LocationLookup) -> None:
    attrs, targets = await run_lookup(lookup, f"sip:bob@{DOMAIN}")
    assert attrs["location"] == "offline" and targets == []
    attrs, targets = await run_lookup(lookup, f"sip:4930123456@{DOMAIN}")
    assert attrs["location"] == "unknown" and targets == []  # maybe a number for a gateway
    attrs, targets = await run_lookup(lookup, "sip:alice@elsewhere.org")
    assert "location" not in attrs and targets == []
    attrs, _ = await run_lookup(lookup, "tel:+4930123456")
    assert "location" not in attrs


async def test_registers_of_one_aor_in_flight_together_are_answered_in_order(
    registrar: Registrar, location: LocationService
) -> None:
    # Each REGISTER starts in the next event-loop turn. The first is answered from the
    # location commit (no task); the second finds the AoR held by that write and waits
    # behind it in a task, then plans against it.
    first = context(register("alice", ["<sip:a@1>"], cseq=1), user="alice", user_domain=DOMAIN)
    second = context(register("alice", ["<sip:b@2>"], cseq=2), user="alice", user_domain=DOMAIN)
    verdicts = [registrar(first), registrar(second)]
    assert all(isinstance(v, Later) and not v.settled for v in verdicts)
    assert recorder_of(first).responses == []
    assert await answered(verdicts[1]) is True
    assert isinstance(verdicts[0], Later) and verdicts[0].settled
    assert set(contacts_of(recorder_of(first).last)) == {"sip:a@1"}
    assert set(contacts_of(recorder_of(second).last)) == {"sip:a@1", "sip:b@2"}
    assert not registrar._tasks
    # A REGISTER that changes nothing (a query) is answered without a write.
    flushes = location.stats["flushes"]
    query = context(register("alice"), user="alice", user_domain=DOMAIN)
    assert await answered(registrar(query)) is True
    assert len(contacts_of(recorder_of(query).last)) == 2
    assert location.stats["flushes"] == flushes
    # Anything else passes at once.
    options = request("OPTIONS", f"sip:alice@{DOMAIN}", from_uri=AOR, to_uri=AOR)
    assert registrar(context(options)) is False
