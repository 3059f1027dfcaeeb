"""One LISTEN connection per process for every cache kept current by ``NOTIFY``.

The location service, the subscriber cache and billing's rates, balances and diversions each
keep a copy of database rows in memory and hear of other nodes' changes by LISTEN/NOTIFY
(ARCHITECTURE.md principle 5).  :class:`NotifyHub` gives them one shared connection, so a
worker holds one listening connection instead of one per cache (PostgreSQL's
``max_connections`` is shared by every worker's pool and listener).

A cache is only as good as its listening connection: when it dies (a database restart, a killed
backend, a network blip) the notifications sent meanwhile are gone.  Each subscription names
what to do then:

- ``lost()`` runs at once, when the connection is seen to die (a cache that must not serve
  what it can no longer keep current forgets it, or stops storing);
- ``restore()`` runs once a new connection LISTENs on every channel again: the owner re-reads
  what it caches, since whatever changed in between is unknown.  It may raise (the database is
  still unreachable); it is then retried, with the others that have not yet succeeded.

:func:`relisten` retries with a growing wait (0.5 s, doubling, up to 30 s) until the hub
listens again and every subscription is restored, or the hub is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg import Record
from asyncpg.pool import PoolConnectionProxy

__all__ = ["NotifyHub", "Subscription", "relisten"]

log = logging.getLogger("sipcore.pglisten")

Notified = Callable[[Any, int, str, Any], None]
"""asyncpg's listener signature: ``(connection, sender pid, channel, payload)``."""


async def relisten(attempt: Callable[[], Awaitable[None]], stopped: Callable[[], bool],
                   what: str) -> bool:
    """Run ``attempt`` until it succeeds (True) or ``stopped()`` (False), waiting 0.5 s after
    the first failure and twice as long after each next one, up to 30 s."""
    delay = 0.5
    while not stopped():
        try:
            await attempt()
        except Exception as exc:
            log.warning("event=%s_relisten_failed error=%r retry_in=%.1f", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        else:
            log.info("event=%s_listen_restored", what)
            return True
    return False


@dataclass(eq=False, slots=True)
class Subscription:
    """One owner's interest in one channel (see the module docstring)."""

    hub: NotifyHub
    channel: str
    on_notify: Notified
    lost: Callable[[], None] | None
    restore: Callable[[], Awaitable[None]] | None
    #: LISTENing now and, after a lost connection, restored.
    current: bool = False

    async def cancel(self) -> None:
        """Stop listening (:meth:`NotifyHub.unsubscribe`)."""
        await self.hub.unsubscribe(self)


class NotifyHub:
    """The process's listening connection, shared by channel subscriptions."""

    def __init__(self, pool: asyncpg.Pool, name: str = "notify", *,
                 private: bool = False) -> None:
        self.pool = pool
        self.name = name
        #: Made by one owner for itself: closed when its last subscription is cancelled.
        self.private = private
        self.stats = {"lost": 0, "restored": 0}
        self._conn: PoolConnectionProxy[Record] | None = None
        self._subs: list[Subscription] = []
        self._lock = asyncio.Lock()  # one connect (or relisten attempt) at a time
        self._relisten_task: asyncio.Task[bool] | None = None
        self._conn_lost: Callable[[object], None] | None = None  # the current connection's
        self._dead: list[PoolConnectionProxy[Record]] = []  # lost, not yet back in the pool
        self._closed = False

    @property
    def connected(self) -> bool:
        """A connection is up and LISTENs on every subscribed channel."""
        return self._conn is not None

    @property
    def listening(self) -> bool:
        """Connected, and every subscription restored since the last loss."""
        return self._conn is not None and all(s.current for s in self._subs)

    @property
    def channels(self) -> list[str]:
        return sorted({s.channel for s in self._subs})

    async def subscribe(self, channel: str, on_notify: Notified, *,
                        lost: Callable[[], None] | None = None,
                        restore: Callable[[], Awaitable[None]] | None = None) -> Subscription:
        """LISTEN on ``channel`` now, taking the hub's connection first if it has none;
        raises (and subscribes nothing) if that fails.  While a lost connection is being
        replaced the subscription joins the others: it listens, and is restored, with them."""
        if self._closed:
            raise RuntimeError("the notification hub is closed")
        sub = Subscription(self, channel, on_notify, lost, restore)
        async with self._lock:
            conn = self._conn
            if conn is not None:
                try:
                    await conn.add_listener(channel, on_notify)
                except BaseException:
                    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError,
                                             OSError):
                        await conn.remove_listener(channel, on_notify)
                    raise
                sub.current = True  # it has missed nothing: it only starts listening now
            elif self._relisten_task is None or self._relisten_task.done():
                await self._connect([sub])
                sub.current = True
            # else: the re-listen loop will LISTEN on it with the others, then restore it.
            self._subs.append(sub)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        """Stop listening for ``sub`` (the connection stays while others listen; a
        :attr:`private` hub closes with its last subscription)."""
        if sub not in self._subs:
            return
        self._subs.remove(sub)
        sub.current = False
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.remove_listener(sub.channel, sub.on_notify)
        if self.private and not self._subs:
            await self.close()

    async def _connect(self, extra: Sequence[Subscription] = ()) -> None:
        """Take a connection, LISTEN on every channel, watch for its loss (the caller holds
        the lock, so no subscription joins meanwhile)."""
        conn: PoolConnectionProxy[Record] = await self.pool.acquire()
        try:
            for sub in [*self._subs, *extra]:
                await conn.add_listener(sub.channel, sub.on_notify)
            self._conn_lost = functools.partial(self._on_lost, conn)
            conn.add_termination_listener(self._conn_lost)
        except BaseException:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await self.pool.release(conn)
            raise
        self._conn = conn

    def _on_lost(self, conn: PoolConnectionProxy[Record], _closed: object) -> None:
        if self._closed or conn is not self._conn:
            return
        log.warning("event=%s_listen_lost channels=%s", self.name, ",".join(self.channels))
        self.stats["lost"] += 1
        self._conn = None
        self._dead.append(conn)
        for sub in list(self._subs):
            sub.current = False
            if sub.lost is not None:
                try:
                    sub.lost()
                except Exception:
                    log.exception("event=%s_lost_callback_failed channel=%s", self.name,
                                  sub.channel)
        if self._relisten_task is None or self._relisten_task.done():
            self._relisten_task = asyncio.get_running_loop().create_task(
                relisten(self._restore, lambda: self._closed, self.name))

    async def _restore(self) -> None:
        """One relisten attempt: connect if need be, then restore every subscription not yet
        restored; raises while any step fails (or the connection is lost again meanwhile)."""
        await self._release_dead()
        async with self._lock:
            if self._conn is None:
                await self._connect()
        for sub in list(self._subs):
            if sub.current or sub not in self._subs:
                continue
            if sub.restore is not None:
                await sub.restore()
            if self._conn is None:
                raise ConnectionError("the listening connection was lost again")
            sub.current = True
        if self._conn is None or not all(s.current for s in self._subs):
            raise ConnectionError("the listening connection was lost again")
        self.stats["restored"] += 1

    async def _release_dead(self) -> None:
        dead, self._dead = self._dead, []
        for conn in dead:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await self.pool.release(conn)

    async def close(self) -> None:
        """Stop re-listening and give the connection back to the pool."""
        self._closed = True
        task, self._relisten_task = self._relisten_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sub in self._subs:
            sub.current = False
        await self._release_dead()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            if self._conn_lost is not None:
                conn.remove_termination_listener(self._conn_lost)
            for sub in self._subs:
                await conn.remove_listener(sub.channel, sub.on_notify)
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await self.pool.release(conn)
