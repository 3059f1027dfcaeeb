"""SubscriberStore and Subscriber: derived secrets only, kept compactly in the cache (one
``bytes`` of raw digests per subscriber, key strings shared), against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sipcore.digest import ha1
from sipcore.pglisten import NotifyHub
from sipcore.subscribers import (
    Subscriber,
    SubscriberError,
    SubscriberStore,
    derive_secrets,
    pack_secrets,
)
from tests.support import RefusingPool, eventually


@pytest.fixture
async def store(db_pool: asyncpg.Pool) -> SubscriberStore:
    await db_pool.execute("DELETE FROM subscribers")
    return SubscriberStore(db_pool)


def test_secrets_are_one_bytes_object_of_raw_digests() -> None:
    md5, sha, pmd5 = derive_secrets("alice", "example.com", "pw")
    assert md5 == ha1("alice", "example.com", "pw", "MD5")
    assert sha == ha1("alice", "example.com", "pw", "SHA-256")
    assert pmd5 == hashlib.md5(b"pw").hexdigest()
    sub = Subscriber.from_hex("alice", "example.com", md5, sha, pmd5)
    assert isinstance(sub.secrets, bytes) and len(sub.secrets) == 64
    assert (sub.ha1_md5, sub.ha1_sha256, sub.password_md5) == (md5, sha, pmd5)
    assert sub.ha1("MD5") == sub.ha1("md5-sess") == md5
    assert sub.ha1("SHA-256") == sub.ha1("SHA-256-sess") == sha
    # Three hex strings took 96 + 128 + 96 bytes (pymalloc size classes); this one 112.
    assert sys.getsizeof(sub.secrets) <= 112
    # Upper-case hex from a hand-written row still gives the lower-case HA1 the digest hashes.
    assert Subscriber.from_hex("a", "b", md5.upper(), sha.upper(), pmd5).ha1_md5 == md5


def test_secrets_that_are_not_hex_digests_are_kept_as_written() -> None:
    for values in (("", "", ""), ("zz" * 16, "00" * 32, "00" * 16), ("00" * 17, "00" * 31, "00")):
        assert pack_secrets(*values) == values
        sub = Subscriber("a", "b", pack_secrets(*values))
        assert (sub.ha1_md5, sub.ha1_sha256, sub.password_md5) == values


def test_repr_shows_no_secret() -> None:
    md5, sha, pmd5 = derive_secrets("alice", "example.com", "pw")
    text = repr(Subscriber.from_hex("alice", "example.com", md5, sha, pmd5))
    assert "alice" in text
    for secret in (md5, sha, pmd5, bytes.fromhex(md5).hex()[:8]):
        assert secret not in text


async def test_get_caches_and_shares_key_strings(store: SubscriberStore) -> None:
    await store.add("1001", "example.com", "pw1")
    await store.add("1002", "example.com", "pw2")
    fresh = SubscriberStore(store.pool)
    # Names as a request would carry them: distinct string objects per request.
    user1, user2 = "".join(["10", "01"]), "".join(["10", "02"])
    a = await fresh.get(user1, "EXAMPLE.com")
    b = await fresh.get(user2, "example.COM")
    assert a is not None and b is not None
    assert a.ha1_md5 == derive_secrets("1001", "example.com", "pw1")[0]
    assert a.domain == "example.com" and a.domain is b.domain  # one domain string
    assert a.username is user1  # the cache key is the subscriber's own string
    assert a.created_at is None  # the cache does not keep it
    assert await fresh.get("1001", "example.com") is a  # from the cache
    assert list(fresh._cache) == ["example.com"]
    assert fresh.exists_cached("1001", "EXAMPLE.COM") is True
    assert fresh.exists_cached("1003", "example.com") is None
    assert await fresh.get("1003", "example.com") is None  # negative answers are cached
    assert fresh.exists_cached("1003", "example.com") is False


async def test_writes_update_the_cache(store: SubscriberStore) -> None:
    added = await store.add("1001", "example.com", "pw1")
    assert added.created_at is not None
    assert await store.get("1001", "example.com") == Subscriber(
        "1001", "example.com", added.secrets, added.created_at)
    await store.set_password("1001", "example.com", "pw2")
    changed = await store.get("1001", "example.com")
    assert changed is not None
    assert changed.ha1_sha256 == derive_secrets("1001", "example.com", "pw2")[1]
    await store.delete("1001", "example.com")
    assert await store.get("1001", "example.com") is None
    with pytest.raises(SubscriberError):
        await store.delete("1001", "example.com")
    listed = await store.list()
    assert listed == []


async def test_other_node_changes_drop_the_entry(db_pool: asyncpg.Pool,
                                                 store: SubscriberStore) -> None:
    await store.add("1001", "example.com", "pw1")
    other = SubscriberStore(db_pool)
    await other.listen()
    try:
        assert await other.get("1001", "example.com") is not None
        await store.set_password("1001", "example.com", "pw2")
        for _ in range(100):
            if other.exists_cached("1001", "example.com") is None:
                break
            await asyncio.sleep(0.01)
        sub = await other.get("1001", "example.com")
        assert sub is not None
        assert sub.ha1_md5 == derive_secrets("1001", "example.com", "pw2")[0]
    finally:
        await other.close()


async def test_cache_is_bounded(store: SubscriberStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sipcore.subscribers._CACHE_MAX", 3)
    for i in range(7):
        await store.get(f"u{i}", "example.com")
        assert store._cached == sum(len(users) for users in store._cache.values()) <= 3


async def test_a_domain_in_capitals_gets_the_secrets_of_its_stored_form(
    store: SubscriberStore,
) -> None:
    added = await store.add("7001", "Example.COM", "pw7001")
    assert added.domain == "example.com"
    # The realm challenged for the domain is its stored, lower-case form.
    assert added.ha1_md5 == ha1("7001", "example.com", "pw7001", "MD5")
    assert added.ha1_sha256 == ha1("7001", "example.com", "pw7001", "SHA-256")
    await store.set_password("7001", "EXAMPLE.com", "pw7001")
    fetched = await store.get("7001", "example.com")
    assert fetched is not None and fetched.ha1_md5 == added.ha1_md5



async def test_a_lost_listen_connection_re_reads_the_cache_once_it_listens_again(
        db_pool: asyncpg.Pool, store: SubscriberStore) -> None:
    await store.add("1002", "example.com", "pw1")
    other = SubscriberStore(db_pool)
    gate = RefusingPool(db_pool, refuse=False)
    hub = NotifyHub(gate)  # type: ignore[arg-type]
    await other.listen(hub)
    try:
        assert other.listening
        assert await other.get("1002", "example.com") is not None
        assert other.exists_cached("1002", "example.com")
        # A change whose notification never arrives (as when it is sent while the connection
        # is down): the cache still has the old secrets ...
        new = derive_secrets("1002", "example.com", "pw2")
        await db_pool.execute("UPDATE subscribers SET ha1_md5 = $1, ha1_sha256 = $2, "
                              "password_md5 = $3 WHERE username = '1002'", *new)
        cached = await other.get("1002", "example.com")
        assert cached is not None and cached.ha1_md5 != new[0]
        # ... until the listening connection is lost and a new one listens: then every entry
        # is read again.  (Until then, LISTEN is refused, so the gap lasts.)
        gate.refuse = True
        async with db_pool.acquire() as conn:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()")
        await eventually(lambda: other.stats["listen_lost"] == 1, "the lost connection")
        await eventually(lambda: gate.refused > 0, "a refused LISTEN")
        assert not other.listening
        # Meanwhile (in a database outage, say) what is cached still answers; nothing new is
        # stored.
        assert await other.get("1002", "example.com") == cached
        assert await other.get("1003", "example.com") is None
        assert other.exists_cached("1003", "example.com") is None
        gate.refuse = False  # it retries by itself
        await eventually(lambda: other.listening, "listening again")
        sub = await other.get("1002", "example.com")
        assert sub is not None and sub.ha1_md5 == new[0]
        assert other.exists_cached("1002", "example.com")
        await store.set_password("1002", "example.com", "pw3")
        await eventually(lambda: other.exists_cached("1002", "example.com") is None,
                          "the notification on the new connection")
    finally:
        await other.close()
        await hub.close()
    assert not other.listening


async def test_a_read_overtaken_by_a_change_is_not_stored(db_pool: asyncpg.Pool,
                                                          store: SubscriberStore) -> None:
    await store.add("1003", "example.com", "pw1")
    fresh = SubscriberStore(db_pool)

    class RacingPool:
        """Hands out real connections; a change notification arrives while the row is read."""

        @contextlib.asynccontextmanager
        async def acquire(self) -> AsyncIterator[object]:
            async with db_pool.acquire() as conn:
                yield Racing(conn)

    class Racing:
        def __init__(self, conn: object) -> None:
            self.conn = conn

        async def fetch(self, *args: object) -> object:
            rows = await self.conn.fetch(*args)  # type: ignore[attr-defined]
            fresh._on_notify(None, 0, SubscriberStore.CHANNEL, "1003@example.com")
            return rows

    fresh.pool = RacingPool()  # type: ignore[assignment]
    assert await fresh.get("1003", "example.com") is not None
    assert fresh.exists_cached("1003", "example.com") is None  # read, returned, not stored
    fresh.pool = db_pool
    assert await fresh.get("1003", "example.com") is not None
    assert fresh.exists_cached("1003", "example.com")


async def test_misses_arriving_together_share_one_query(db_pool: asyncpg.Pool,
                                                       store: SubscriberStore) -> None:
    # A registration storm: many phones not cached answer their challenges at once.
    for i in range(30):
        await store.add(f"storm{i}", "example.com", f"pw{i}")
    fresh = SubscriberStore(db_pool)
    names = [f"storm{i}" for i in range(30)] + ["nobody", "storm3"]  # an unknown, a repeat
    found = await asyncio.gather(*(fresh.get(n, "Example.COM") for n in names))
    assert fresh.stats["reads"] == 1 and fresh.stats["read_keys"] == 31
    for name, sub in zip(names, found, strict=True):
        if name == "nobody":
            assert sub is None
        else:
            assert sub is not None and sub.username == name and sub.domain == "example.com"
            assert sub.ha1_md5 == derive_secrets(name, "example.com", f"pw{name[5:]}")[0]
    # All of them are cached now, the unknown one as unknown.
    assert fresh.exists_cached("storm7", "example.com") is True
    assert fresh.exists_cached("nobody", "example.com") is False
    assert await fresh.get("storm7", "example.com") == found[7]
    assert fresh.stats["reads"] == 1
    # A failed query fails every lookup that was waiting for it, and caches nothing.
    fresh.pool = RefusingPool(db_pool, refuse=False, refuse_queries=True)  # type: ignore[assignment]
    results = await asyncio.gather(fresh.get("x1", "example.com"), fresh.get("x2", "example.com"),
                                   return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results), results
    assert fresh.exists_cached("x1", "example.com") is None
    await fresh.close()


async def test_the_cache_keeps_answering_until_the_database_can_re_read_it(
        db_pool: asyncpg.Pool, store: SubscriberStore) -> None:
    # A database outage: the LISTEN connection dies, a new one seems to work (a pooled
    # connection not yet known to be dead) but nothing can be read.  Known phones must go on
    # authenticating from the cache meanwhile.
    await store.add("1004", "example.com", "pw1")
    other = SubscriberStore(db_pool)
    await other.listen()
    try:
        cached = await other.get("1004", "example.com")
        assert cached is not None
        flaky = RefusingPool(db_pool, refuse=False, refuse_queries=True)
        other.pool = flaky  # type: ignore[assignment]
        async with db_pool.acquire() as conn:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()")
        await eventually(lambda: flaky.refused_queries > 0, "a failed re-read")
        assert not other.listening
        assert other.peek("1004", "example.com") == cached
        flaky.refuse_queries = False  # the database is back
        await eventually(lambda: other.listening, "listening again")
        assert other.peek("1004", "example.com") == cached
    finally:
        await other.close()
