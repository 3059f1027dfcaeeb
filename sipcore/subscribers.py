"""Subscribers: the users allowed to register and call, with derived secrets only.

A subscriber is ``username@domain``. Its password is never stored: only the digest HA1 for MD5
and for SHA-256 (RFC 3261 §22.4, RFC 7616 §3.4.2: ``H(username:realm:password)``, with the realm
equal to the subscriber's domain) and an MD5 of the password for the legacy ``balance.php``
lookup of the softphone in seed 000. Changing the password recomputes all three.

The registrar reads HA1s on every authentication, so :class:`SubscriberStore` keeps an
in-memory cache that is filled on first use and updated by the store's own writes; other nodes
learn of changes by ``NOTIFY subscribers_changed`` (see :meth:`SubscriberStore.listen`).  The
cache is only as good as that channel.  When the listening connection is lost, notifications
sent meanwhile are lost with it: the cache goes on answering from what it holds (in a database
outage the phones it knows keep authenticating, and nobody can change a subscriber then
either) but stores nothing new, and every entry is read again from the database as soon as a
new connection listens, so a password changed, or a subscriber removed, while the notifications
were lost does not keep its old secrets for longer than the reconnection takes.  A read that
a notification overtook is not stored either (a generation count), so a change committed while
the read was on its way is not shadowed by the row from before it.

The cache holds an entry per registered phone, and memory per phone is a target of its own
(issue 3): the three secrets are one ``bytes`` of raw digests (64 bytes, 112 with the object,
where three hex strings took 320), the cache is keyed ``domain -> username`` (no key tuple per
subscriber) and a cached subscriber's ``username`` and ``domain`` are the cache's key strings.
"""

from __future__ import annotations

import builtins
import enum
import hashlib
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import asyncpg
from asyncpg import Record

from sipcore.missreads import MissReads
from sipcore.pglisten import NotifyHub, Subscription

__all__ = ["MISS", "Miss", "Subscriber", "SubscriberError", "SubscriberExists", "SubscriberStore",
           "derive_secrets"]

log = logging.getLogger("sipcore.subscribers")


class Miss(enum.Enum):
    MISS = 0


#: A cache's ``peek`` holds nothing for the key: ask the database (:meth:`SubscriberStore.get`,
#: ``billing.balances.BalanceCache``, ``billing.diversions.DiversionCache``).
MISS: Final = Miss.MISS

_USERNAME = re.compile(r"^[A-Za-z0-9_.!~*'()&=+$,;?/-]{1,64}$")  # RFC 3261 user, unescaped
_DOMAIN = re.compile(r"^[A-Za-z0-9.-]{1,253}$|^\[[0-9A-Fa-f:.]+\]$")


class SubscriberError(Exception):
    """A refused subscriber operation (bad name, duplicate, unknown user)."""


class SubscriberExists(SubscriberError):
    """``add`` of a username@domain that is already a subscriber."""


# Raw digest lengths: HA1-MD5, HA1-SHA-256, MD5(password), packed in this order.
_MD5: Final = 16
_SHA256: Final = 32
_PACKED: Final = _MD5 + _SHA256 + _MD5


def pack_secrets(ha1_md5: str, ha1_sha256: str, password_md5: str) -> bytes | tuple[str, ...]:
    """The three hex secrets as one ``bytes`` of raw digests; the strings themselves if one
    is not hex of the right length (a row written by hand), so that it still compares as it
    did (never equal to a real digest)."""
    try:
        packed = bytes.fromhex(ha1_md5) + bytes.fromhex(ha1_sha256) + bytes.fromhex(password_md5)
    except ValueError:
        return (ha1_md5, ha1_sha256, password_md5)
    if (len(ha1_md5), len(ha1_sha256)) != (2 * _MD5, 2 * _SHA256) or len(packed) != _PACKED:
        return (ha1_md5, ha1_sha256, password_md5)
    return packed


@dataclass(frozen=True, slots=True)
class Subscriber:
    """A subscriber with its derived secrets (see :func:`pack_secrets`); the hex forms the
    digest code hashes with are made on access.  ``created_at`` is only filled by
    :meth:`SubscriberStore.list` and :meth:`SubscriberStore.add` (the cache does not keep it)."""

    username: str
    domain: str
    secrets: bytes | tuple[str, ...] = field(repr=False)  # no secrets in logs
    created_at: datetime | None = None

    @classmethod
    def from_hex(
        cls,
        username: str,
        domain: str,
        ha1_md5: str,
        ha1_sha256: str,
        password_md5: str,
        created_at: datetime | None = None,
    ) -> Subscriber:
        return cls(username, domain, pack_secrets(ha1_md5, ha1_sha256, password_md5), created_at)

    @property
    def ha1_md5(self) -> str:
        s = self.secrets
        return s[:_MD5].hex() if isinstance(s, bytes) else s[0]

    @property
    def ha1_sha256(self) -> str:
        s = self.secrets
        return s[_MD5 : _MD5 + _SHA256].hex() if isinstance(s, bytes) else s[1]

    @property
    def password_md5(self) -> str:
        s = self.secrets
        return s[_MD5 + _SHA256 :].hex() if isinstance(s, bytes) else s[2]

    @property
    def aor(self) -> str:
        return f"sip:{self.username}@{self.domain}"

    def ha1(self, algorithm: str) -> str:
        return self.ha1_sha256 if algorithm.upper().startswith("SHA-256") else self.ha1_md5


def derive_secrets(username: str, domain: str, password: str) -> tuple[str, str, str]:
    """(HA1-MD5, HA1-SHA-256, MD5(password)) for a subscriber whose realm is its domain."""
    a1 = f"{username}:{domain}:{password}".encode()
    return (
        hashlib.md5(a1).hexdigest(),
        hashlib.sha256(a1).hexdigest(),
        hashlib.md5(password.encode()).hexdigest(),
    )


def _check_names(username: str, domain: str) -> None:
    if not _USERNAME.match(username):
        raise SubscriberError(f"invalid username {username!r}")
    if not _DOMAIN.match(domain):
        raise SubscriberError(f"invalid domain {domain!r}")


def _row(r: Any) -> Subscriber:
    return Subscriber.from_hex(
        r["username"], r["domain"], r["ha1_md5"], r["ha1_sha256"], r["password_md5"],
        r["created_at"],
    )


#: Bound of the cache (entries, negative ones included) against a dictionary attack on names.
_CACHE_MAX: Final = 200_000


class SubscriberStore:
    """PostgreSQL-backed subscribers with a read cache for the authentication hot path."""

    CHANNEL = "subscribers_changed"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # domain (lower case) -> username -> subscriber, None for "no such subscriber".
        self._cache: dict[str, dict[str, Subscriber | None]] = {}
        self._cached = 0
        self._domains: dict[str, str] = {}  # one string per domain
        self._subscription: Subscription | None = None  # listening for other nodes' changes
        # Bumped by every change seen (notification, own write, lost channel): a read that
        # started under an older generation is not stored.
        self._generation = 0
        self._lost = False  # the listening connection is gone: store nothing new
        self._closed = False
        self._misses: MissReads[tuple[str, str], Subscriber] = MissReads(self._read)
        self._listen_lost = 0

    def _cache_put(self, username: str, domain: str, sub: Subscriber | None) -> None:
        """Cache ``sub`` under the key strings, which it then shares (``domain`` lower case)."""
        if self._cached >= _CACHE_MAX:
            self._cache_clear()  # bound memory against a dictionary attack on usernames
        domain = self._domains.setdefault(domain, domain)
        users = self._cache.get(domain)
        if users is None:
            users = self._cache[domain] = {}
        if username not in users:
            self._cached += 1
        if sub is not None and (sub.username is not username or sub.domain is not domain):
            sub = Subscriber(username, domain, sub.secrets, sub.created_at)
        users[username] = sub

    def _cache_drop(self, username: str, domain: str) -> None:
        users = self._cache.get(domain)
        if users is not None and username in users:
            del users[username]
            self._cached -= 1
            if not users:
                del self._cache[domain]

    def _cache_clear(self) -> None:
        self._cache.clear()
        self._domains.clear()
        self._cached = 0

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._generation += 1
        user, _, dom = str(payload).partition("@")
        self._cache_drop(user, dom.lower())

    async def add(self, username: str, domain: str, password: str) -> Subscriber:
        _check_names(username, domain)
        if not password:
            raise SubscriberError("password must not be empty")
        # Stored and challenged lower-case (the realm is the canonical domain), so derived
        # lower-case too, as set_password does: "Example.COM" must not get unusable HA1s.
        md5, sha, pmd5 = derive_secrets(username, domain.lower(), password)
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                """
                INSERT INTO subscribers (username, domain, ha1_md5, ha1_sha256, password_md5)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (username, domain) DO NOTHING
                RETURNING *
                """,
                username, domain.lower(), md5, sha, pmd5,
            )
            if row is None:
                raise SubscriberExists(f"subscriber {username}@{domain} already exists")
            await conn.execute("SELECT pg_notify($1, $2)", self.CHANNEL, f"{username}@{domain}")
        sub = _row(row)
        if not self._lost:
            self._cache_put(username, sub.domain, sub)
        return sub

    async def ensure(self, username: str, domain: str, password: str) -> bool:
        """Create the subscriber unless it exists (demo seeding). True if it was created."""
        try:
            await self.add(username, domain, password)
        except SubscriberExists:
            return False
        return True

    async def set_password(self, username: str, domain: str, password: str) -> None:
        _check_names(username, domain)
        if not password:
            raise SubscriberError("password must not be empty")
        md5, sha, pmd5 = derive_secrets(username, domain.lower(), password)
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                """
                UPDATE subscribers SET ha1_md5 = $3, ha1_sha256 = $4, password_md5 = $5,
                       updated_at = now()
                WHERE username = $1 AND domain = $2
                """,
                username, domain.lower(), md5, sha, pmd5,
            )
            if status.endswith(" 0"):
                raise SubscriberError(f"no subscriber {username}@{domain}")
            await conn.execute("SELECT pg_notify($1, $2)", self.CHANNEL, f"{username}@{domain}")
        self._generation += 1
        self._cache_drop(username, domain.lower())

    async def delete(self, username: str, domain: str) -> None:
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                "DELETE FROM subscribers WHERE username = $1 AND domain = $2",
                username, domain.lower(),
            )
            if status.endswith(" 0"):
                raise SubscriberError(f"no subscriber {username}@{domain}")
            await conn.execute("SELECT pg_notify($1, $2)", self.CHANNEL, f"{username}@{domain}")
        self._generation += 1
        self._cache_drop(username, domain.lower())

    async def list(self, domain: str | None = None) -> list[Subscriber]:
        async with self.pool.acquire() as conn:
            if domain is None:
                rows = await conn.fetch("SELECT * FROM subscribers ORDER BY domain, username")
            else:
                rows = await conn.fetch(
                    "SELECT * FROM subscribers WHERE domain = $1 ORDER BY username", domain.lower()
                )
        return [_row(r) for r in rows]

    async def get(self, username: str, domain: str) -> Subscriber | None:
        """The subscriber, from the cache when possible (negative answers are cached too).
        Misses of one turn of the event loop (a registration storm) share one query
        (:class:`sipcore.missreads.MissReads`)."""
        domain = domain.lower()
        users = self._cache.get(domain)
        if users is not None and username in users:
            return users[username]
        return await self._misses.get((username, domain))

    async def _read(
        self, keys: builtins.list[tuple[str, str]]
    ) -> dict[tuple[str, str], Subscriber | None]:
        generation = self._generation
        found = await self._select(keys)
        store = generation == self._generation and not self._lost
        out: dict[tuple[str, str], Subscriber | None] = {}
        for username, domain in keys:
            row = found.get((username, domain))
            sub = None if row is None else Subscriber.from_hex(
                username, self._domains.get(domain, domain), row[2], row[3], row[4])
            if store:
                self._cache_put(username, domain, sub)
            out[(username, domain)] = sub
        return out

    def peek(self, username: str, domain: str) -> Subscriber | Literal[Miss.MISS] | None:
        """The cached subscriber (None: cached as unknown), else :data:`MISS`; no await, so
        the authentication of a phone whose entry is cached needs no task."""
        users = self._cache.get(domain.lower())
        if users is None:
            return MISS
        return users.get(username, MISS)

    def exists_cached(self, username: str, domain: str) -> bool | None:
        users = self._cache.get(domain.lower())
        if users is None or username not in users:
            return None
        return users[username] is not None

    @property
    def stats(self) -> dict[str, int]:
        """listen_lost: lost LISTEN connections; reads: queries for cache misses; read_keys:
        the subscribers they asked for (the misses of one event-loop turn share a query)."""
        return {"listen_lost": self._listen_lost, "reads": self._misses.reads,
                "read_keys": self._misses.keys_read}

    @property
    def listening(self) -> bool:
        """A connection listens for other nodes' changes and the cache is current (False
        before :meth:`listen`, and after a lost connection until a new one listens and the
        cache has been read again)."""
        sub = self._subscription
        return sub is not None and sub.hub.connected and not self._lost

    async def listen(self, hub: NotifyHub | None = None) -> None:
        """Drop cache entries when another node changes a subscriber (LISTEN/NOTIFY on
        ``hub``, the process's shared listening connection, or one of the store's own); if
        the connection is lost, listen again and then re-read the cache (see the module
        docstring)."""
        if hub is None:
            hub = NotifyHub(self.pool, "subscribers", private=True)
        self._subscription = await hub.subscribe(self.CHANNEL, self._on_notify,
                                                 lost=self._on_listen_lost,
                                                 restore=self._restore)

    async def _select(
        self, keys: builtins.list[tuple[str, str]]
    ) -> dict[tuple[str, str], Record]:
        """The rows of those of ``keys`` that exist, by key."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT username, domain, ha1_md5, ha1_sha256, password_md5 FROM subscribers"
                " WHERE (username, domain) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                [k[0] for k in keys], [k[1] for k in keys])
        return {(r[0], r[1]): r for r in rows}

    async def _restore(self) -> None:
        """After a lost connection, once a new one listens: re-read every cached entry, since
        whatever changed while nobody listened is unknown.  Raises (and changes nothing)
        while the database cannot be reached, so a cache emptied by a connection that only
        seemed to work does not leave known phones unable to authenticate."""
        generation = self._generation
        keys = [(username, domain) for domain, users in self._cache.items() for username in users]
        rows = await self._select(keys) if keys else {}
        if self._subscription is None or not self._subscription.hub.connected:
            raise ConnectionError("the listening connection was lost again")
        if generation != self._generation:
            self._cache_clear()  # a change arrived meanwhile: the rows may predate it
        else:
            for username, domain in keys:
                row = rows.get((username, domain))
                self._cache[domain][username] = None if row is None else Subscriber.from_hex(
                    username, domain, row[2], row[3], row[4])
        self._lost = False

    def _on_listen_lost(self) -> None:
        if self._closed:
            return
        self._listen_lost += 1
        self._lost = True
        self._generation += 1

    async def close(self) -> None:
        self._closed = True
        await self._misses.drain()
        sub, self._subscription = self._subscription, None
        if sub is not None:
            await sub.cancel()
