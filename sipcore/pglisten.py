"""LISTEN connections that notice when they are lost, and the loop that replaces them.

A cache kept current by ``NOTIFY`` (location, subscribers, billing's rates and balances) is
only as good as its listening connection: when that connection dies (a database restart, a
killed backend, a network blip) the notifications sent meanwhile are gone.  Each owner takes
its connection with :func:`listen_on` (which also registers ``on_lost``), and when it is lost
runs :func:`relisten` with its own attempt: listen again, then re-read what it caches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from asyncpg import Record
from asyncpg.pool import PoolConnectionProxy

__all__ = ["listen_on", "relisten"]

log = logging.getLogger("sipcore.pglisten")

Notified = Callable[[Any, int, str, Any], None]


async def listen_on(pool: asyncpg.Pool, channel: str, on_notify: Notified,
                    on_lost: Callable[[Any], None]) -> PoolConnectionProxy[Record]:
    """A connection from ``pool`` that LISTENs on ``channel`` and calls ``on_lost`` if it
    dies; the caller keeps it (and releases it to the pool when done)."""
    conn: PoolConnectionProxy[Record] = await pool.acquire()
    try:
        await conn.add_listener(channel, on_notify)
        conn.add_termination_listener(on_lost)
    except BaseException:
        await pool.release(conn)
        raise
    return conn


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
