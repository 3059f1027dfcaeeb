"""The location service's coroutines: its database round trips and the waits between them.

:class:`sipcore.location.LocationService` is compiled with mypyc, and a compiled module may
define no coroutine (``sipcore/__init__.py`` says why).  So the service's methods that wait --
:meth:`~sipcore.location.LocationService.update`, ``remove``, ``load``, ``listen``,
``resync``, ``close`` and the flush and reload tasks -- are plain methods that return one of
the coroutines below, which CPython runs; each takes the service as its first argument and
calls back into its synchronous (compiled) methods for everything but the waiting.  The
design, and what the fields these functions touch mean, is in ``sipcore/location.py``'s
docstring.  Nothing here runs per REGISTER on the usual path: a REGISTER of an AoR that no
other change holds is planned and queued by ``update_soon`` without a coroutine, and one
flush writes the changes of many.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

from sipcore.pglisten import NotifyHub

if TYPE_CHECKING:
    from sipcore.location import Binding, BindingChange, LocationService, Plan, _Op

__all__ = [
    "FLUSH_SQL",
    "SELECT_COLUMNS",
    "AorLock",
    "close",
    "flush_loop",
    "listen",
    "load",
    "reload",
    "remove",
    "resync",
    "update",
]

log = logging.getLogger("sipcore.location")

# All writes of one flush in one statement: one round trip, one implicit transaction.  The
# pg_notify CTE is only evaluated because the final SELECT reads it.  The batch travels as one
# JSON document (``LocationService._flush_json``): as 21 arrays, asyncpg's encoder spent
# about two isinstance() checks against collections.abc per value, more than the rest of the
# flush's client side.
FLUSH_SQL: Final = """
WITH ins AS (
    INSERT INTO location (aor, contact, transport, source_host, source_port, expires_at, q,
                          call_id, cseq, path, user_agent, instance, reg_id, received_at)
    SELECT u->>0, u->>1, u->>2, u->>3, (u->>4)::int4, to_timestamp((u->>5)::float8),
           (u->>6)::float8, u->>7, (u->>8)::int8, u->>9, u->>10, u->>11, (u->>12)::int4,
           to_timestamp((u->>13)::float8)
    FROM jsonb_array_elements($1::jsonb->0) AS u
    ON CONFLICT (aor, contact) DO UPDATE SET
        transport = EXCLUDED.transport, source_host = EXCLUDED.source_host,
        source_port = EXCLUDED.source_port, expires_at = EXCLUDED.expires_at, q = EXCLUDED.q,
        call_id = EXCLUDED.call_id, cseq = EXCLUDED.cseq, path = EXCLUDED.path,
        user_agent = EXCLUDED.user_agent, instance = EXCLUDED.instance,
        reg_id = EXCLUDED.reg_id, received_at = EXCLUDED.received_at
), del AS (
    DELETE FROM location l USING jsonb_array_elements($1::jsonb->1) AS d
    WHERE l.aor = d->>0 AND l.contact = d->>1
), del_all AS (
    DELETE FROM location WHERE aor IN (SELECT jsonb_array_elements_text($1::jsonb->2))
), expired AS (
    DELETE FROM location l USING jsonb_array_elements($1::jsonb->3) AS e
    WHERE l.aor = e->>0 AND l.contact = e->>1
      AND l.expires_at <= to_timestamp((e->>2)::float8)
    RETURNING l.aor, l.contact
), notified AS (
    SELECT pg_notify('location_changed', n) FROM jsonb_array_elements_text($1::jsonb->4) AS n
)
SELECT aor, contact FROM expired
UNION ALL
SELECT NULL, NULL FROM (SELECT count(*) FROM notified) AS forced
"""

#: The columns ``LocationService.binding_from_row`` reads.
SELECT_COLUMNS: Final = """
    aor, contact, transport, source_host, source_port,
    extract(epoch FROM expires_at)::float8 AS expires_at, q, call_id, cseq, path, user_agent,
    instance, reg_id, extract(epoch FROM received_at)::float8 AS received_at
"""

#: Rows per round trip when loading every binding (start-up, resync).
_LOAD_CHUNK: Final = 2000


class AorLock:
    """Serialises the updates of one AoR; dropped when nobody holds or waits for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


# ----------------------------------------------------------------------------- writing
async def update(svc: LocationService, aor: str, plan: Plan) -> BindingChange:
    """:meth:`LocationService.update`."""
    # One update per AoR at a time, in arrival order: each plan sees the committed result of
    # the previous one. A FIFO lock wakes one waiter per commit; waiting on the shared
    # in-flight marker instead woke every queued REGISTER of the AoR on each commit.
    locks = svc._aor_locks
    entry = locks.get(aor)
    if entry is None:
        if aor not in svc._inflight:
            # Nobody holds, awaits or writes this AoR: plan now. The plan and the queueing of
            # its write run without a pause, and from then on the write's in-flight marker
            # makes the next update take the lock below and wait for it, so the lock need
            # not exist until a second update arrives.
            return await _update_now(svc, aor, plan)
        entry = locks[aor] = AorLock()
    entry.users += 1
    try:
        async with entry.lock:
            pending = svc._inflight.get(aor)
            if pending is not None:  # an expiry write of this AoR is still in flight
                await asyncio.wait((pending,))
            return await _update_now(svc, aor, plan)
    finally:
        entry.users -= 1
        if entry.users == 0:
            del locks[aor]


async def _update_now(svc: LocationService, aor: str, plan: Plan) -> BindingChange:
    change, waiter = svc._plan_and_queue(aor, plan)
    if waiter is not None:
        await waiter
    return change


async def remove(svc: LocationService, aor: str) -> int:
    """:meth:`LocationService.remove`."""
    change = await update(svc, aor, svc._remove_all_plan)
    svc._emit_change(aor, change)
    return len(change.removed)


async def flush_loop(svc: LocationService) -> None:
    """The flush task: write what is queued, a batch at a time, until nothing is."""
    try:
        while batch := svc._take_batch():
            await _write(svc, batch)
    finally:
        svc._flush_task = None


async def _write(svc: LocationService, batch: list[_Op]) -> None:
    document = svc._flush_json(batch)
    try:
        async with asyncio.timeout(svc.write_timeout), svc.pool.acquire() as conn:
            svc._own_pids.add(conn.get_server_pid())
            rows = await conn.fetch(FLUSH_SQL, document)
    except BaseException as exc:
        svc._fail(batch, exc)
        if not isinstance(exc, Exception):
            raise  # cancelled: the service is closing
        return
    svc._commit(batch, {(r[0], r[1]) for r in rows if r[0] is not None})


# ----------------------------------------------------------------------------- reading
async def load(svc: LocationService) -> int:
    """:meth:`LocationService.load`."""
    now = svc.clock()
    async with svc.pool.acquire() as conn:
        await conn.execute("DELETE FROM location WHERE expires_at <= to_timestamp($1)", now)
        grouped = await _fetch_all(svc, conn, now)
    svc._replace_all(grouped)
    log.info("event=location_loaded aors=%d bindings=%d", svc.aor_count, svc.binding_count)
    return svc.binding_count


async def _fetch_all(svc: LocationService, conn: Any, now: float) -> dict[str, tuple[Binding, ...]]:
    """Every binding unexpired at ``now``, by AoR, read through a cursor in chunks: a fetch
    of all rows at once left the records' memory as holes between the bindings (freed, but
    not returned to the OS), which cost more than the records themselves."""
    grouped: dict[str, tuple[Binding, ...]] = {}
    group: list[Binding] = []
    async with conn.transaction(readonly=True):
        cursor = conn.cursor(
            f"SELECT {SELECT_COLUMNS} FROM location WHERE expires_at > to_timestamp($1) "
            "ORDER BY aor, received_at",
            now,
            prefetch=_LOAD_CHUNK,
        )
        async for row in cursor:
            b = svc.binding_from_row(row)
            if group and b.aor == group[0].aor:
                b.aor = group[0].aor  # one string per AoR
            else:
                if group:
                    grouped[group[0].aor] = tuple(group)
                    group.clear()
            group.append(b)
    if group:
        grouped[group[0].aor] = tuple(group)
    return grouped


async def resync(svc: LocationService) -> None:
    """:meth:`LocationService.resync`."""
    async with asyncio.timeout(max(svc.write_timeout, 30.0)), svc.pool.acquire() as conn:
        grouped = await _fetch_all(svc, conn, svc.clock())
    svc._replace_all(grouped, announce=True)
    svc.stats["resyncs"] += 1


async def reload(svc: LocationService, aor: str) -> None:
    """Replace ``aor``'s bindings by what the database holds now (no events): the task
    ``LocationService._on_notify`` starts for another node's change it cannot apply."""
    inflight = svc._inflight
    try:
        while True:
            while (pending := inflight.get(aor)) is not None:
                await asyncio.wait((pending,))
            marker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            inflight[aor] = marker
            try:
                async with asyncio.timeout(svc.write_timeout), svc.pool.acquire() as conn:
                    rows = await conn.fetch(
                        f"SELECT {SELECT_COLUMNS} FROM location "
                        "WHERE aor = $1 AND expires_at > to_timestamp($2) "
                        "ORDER BY received_at",
                        aor,
                        svc.clock(),
                    )
                svc._reloaded(aor, rows)
            except Exception as exc:
                log.error("event=location_reload_failed aor=%s error=%r", aor, exc)
            finally:
                if inflight.get(aor) is marker:
                    del inflight[aor]
                marker.set_result(None)
            if not svc._reloads.get(aor):
                break
            svc._reloads[aor] = False
    finally:
        svc._reloads.pop(aor, None)


async def listen(svc: LocationService, hub: NotifyHub | None) -> None:
    """:meth:`LocationService.listen`."""
    if hub is None:
        hub = NotifyHub(svc.pool, "location", private=True)
    svc._subscription = await hub.subscribe(svc.CHANNEL, svc._on_notify, restore=svc.resync)


# ----------------------------------------------------------------------------- shutdown
async def close(svc: LocationService) -> None:
    """:meth:`LocationService.close`."""
    svc._flush_now()
    while (task := svc._flush_task) is not None:
        await asyncio.wait((task,))
    svc._stop()
    tasks = list(svc._tasks)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    sub, svc._subscription = svc._subscription, None
    if sub is not None:
        await sub.cancel()
