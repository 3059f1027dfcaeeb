"""Test helpers for the caches kept current by NOTIFY (billing.balances, billing.diversions)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

import asyncpg

from billing.accountcache import CHANNEL
from sipcore.pglisten import NotifyHub
from tests.support import eventually


class NotifiedCache(Protocol):
    stats: Any

    async def attach(self, hub: NotifyHub) -> None: ...

    async def detach(self) -> None: ...

    def connection_lost(self) -> None: ...



async def quiet(cache: NotifiedCache, db_pool: asyncpg.Pool) -> None:
    """Wait until every notification committed so far has reached the listening ``cache``.

    A test's set-up (an account, a subscriber) notifies too, and a notification that arrives
    after the test's first read invalidates what that read stored. PostgreSQL delivers
    notifications in commit order, so once a sentinel sent now has arrived, so have those.
    The sentinel names account 0, which does not exist: it changes nothing cached."""
    seen = cache.stats["invalidations"]
    await db_pool.execute("SELECT pg_notify($1, '0' || chr(9) || 'routing')", CHANNEL)
    await eventually(lambda: cache.stats["invalidations"] > seen, "the sentinel notification")


@contextlib.asynccontextmanager
async def listening(cache: NotifiedCache, db_pool: asyncpg.Pool) -> AsyncIterator[NotifyHub]:
    """What the billing service does: the cache LISTENs on the process's notification hub,
    which tells it when the connection is lost and when a new one listens."""
    hub = NotifyHub(db_pool, "test")
    await cache.attach(hub)
    try:
        yield hub
    finally:
        await cache.detach()
        await hub.close()
