"""Test helpers for the caches kept current by NOTIFY (billing.balances, billing.diversions)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import asyncpg


class NotifiedCache(Protocol):
    async def attach(self, conn: Any) -> None: ...

    async def detach(self, conn: Any) -> None: ...

    def connection_lost(self) -> None: ...


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def listening(cache: NotifiedCache, db_pool: asyncpg.Pool) -> AsyncIterator[None]:
    """What the billing service does: one connection LISTENs; when it dies, the cache is told."""
    async with db_pool.acquire() as conn:
        conn.add_termination_listener(lambda _conn: cache.connection_lost())
        await cache.attach(conn)
        try:
            yield
        finally:
            with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
                await cache.detach(conn)
