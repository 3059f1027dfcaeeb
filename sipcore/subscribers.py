"""Subscribers: the users allowed to register and call, with derived secrets only.

A subscriber is ``username@domain``. Its password is never stored: only the digest HA1 for MD5
and for SHA-256 (RFC 3261 §22.4, RFC 7616 §3.4.2: ``H(username:realm:password)``, with the realm
equal to the subscriber's domain) and an MD5 of the password for the legacy ``balance.php``
lookup of the softphone in seed 000. Changing the password recomputes all three.

The registrar reads HA1s on every authentication, so :class:`SubscriberStore` keeps an
in-memory cache that is filled on first use and updated by the store's own writes; other nodes
learn of changes by ``NOTIFY subscribers_changed`` (see :meth:`SubscriberStore.listen`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from asyncpg import Record
from asyncpg.pool import PoolConnectionProxy

__all__ = ["Subscriber", "SubscriberError", "SubscriberExists", "SubscriberStore", "derive_secrets"]

_USERNAME = re.compile(r"^[A-Za-z0-9_.!~*'()&=+$,;?/-]{1,64}$")  # RFC 3261 user, unescaped
_DOMAIN = re.compile(r"^[A-Za-z0-9.-]{1,253}$|^\[[0-9A-Fa-f:.]+\]$")


class SubscriberError(Exception):
    """A refused subscriber operation (bad name, duplicate, unknown user)."""


class SubscriberExists(SubscriberError):
    """``add`` of a username@domain that is already a subscriber."""


@dataclass(frozen=True, slots=True)
class Subscriber:
    username: str
    domain: str
    ha1_md5: str
    ha1_sha256: str
    password_md5: str
    created_at: datetime | None = None

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
    return Subscriber(
        r["username"], r["domain"], r["ha1_md5"], r["ha1_sha256"], r["password_md5"],
        r["created_at"],
    )


class SubscriberStore:
    """PostgreSQL-backed subscribers with a read cache for the authentication hot path."""

    CHANNEL = "subscribers_changed"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._cache: dict[tuple[str, str], Subscriber | None] = {}
        self._listen_conn: PoolConnectionProxy[Record] | None = None

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        user, _, dom = str(payload).partition("@")
        self._cache.pop((user, dom.lower()), None)

    async def add(self, username: str, domain: str, password: str) -> Subscriber:
        _check_names(username, domain)
        if not password:
            raise SubscriberError("password must not be empty")
        md5, sha, pmd5 = derive_secrets(username, domain, password)
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
        self._cache[(username, sub.domain)] = sub
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
        self._cache.pop((username, domain.lower()), None)

    async def delete(self, username: str, domain: str) -> None:
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                "DELETE FROM subscribers WHERE username = $1 AND domain = $2",
                username, domain.lower(),
            )
            if status.endswith(" 0"):
                raise SubscriberError(f"no subscriber {username}@{domain}")
            await conn.execute("SELECT pg_notify($1, $2)", self.CHANNEL, f"{username}@{domain}")
        self._cache.pop((username, domain.lower()), None)

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
        """The subscriber, from the cache when possible (negative answers are cached too)."""
        key = (username, domain.lower())
        if key in self._cache:
            return self._cache[key]
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM subscribers WHERE username = $1 AND domain = $2", *key
            )
        sub = _row(row) if row is not None else None
        if len(self._cache) > 200_000:
            self._cache.clear()  # bound memory against a dictionary attack on usernames
        self._cache[key] = sub
        return sub

    def exists_cached(self, username: str, domain: str) -> bool | None:
        hit = self._cache.get((username, domain.lower()), False)
        if hit is False:
            return None
        return hit is not None

    async def listen(self) -> None:
        """Drop cache entries when another node changes a subscriber (LISTEN/NOTIFY)."""
        conn = await self.pool.acquire()
        self._listen_conn = conn
        await conn.add_listener(self.CHANNEL, self._on_notify)

    async def close(self) -> None:
        if self._listen_conn is not None:
            conn, self._listen_conn = self._listen_conn, None
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
                await conn.remove_listener(self.CHANNEL, self._on_notify)
            await self.pool.release(conn)
