"""CDRs of the free calls between local subscribers, written in groups.

A call to one of our subscribers costs nothing, but it gets a CDR like a billed call: its
first half when the INVITE is relayed (``in_progress``), its answer, and its outcome when it
ends (answered with its duration, cancelled, or a failure status: the callee's missed calls,
:meth:`billing.credit.CreditControl.missed_calls`). Writing these with a statement each --
open, answer, close, every one a pool round trip and for the close a task -- was most of what
billing cost a call between subscribers, though no money and no decision on the call path
depends on them.

Theory of operation
-------------------
:class:`FreeCallRecorder` keeps each call's record (:class:`FreeCall`) in memory while the call
lasts; :meth:`~FreeCallRecorder.open`, :meth:`~FreeCallRecorder.answered` and
:meth:`~FreeCallRecorder.close` change it and mark it for writing, without waiting for
anything. The writer task writes every record marked in a quiet moment of
``delay`` seconds (0.1 s, as the answers of billed calls) in one statement: an upsert of each
record's *whole current state*, so

* a call that starts and ends within one moment is one row written once;
* writing a state twice, or after a write whose commit was not confirmed (a connection lost
  at the wrong time), is harmless: the row ends up as the newest state written;
* the row is only changed while it is this node's free call ``in_progress``, so a Call-ID
  that another node, an earlier incarnation or a billed call already used is left alone (as
  the ``ON CONFLICT DO NOTHING`` of the single-row open did), and a closed CDR never reopens.

While the database is unreachable the marked records stay in memory and the writer tries
again with back-off until they are written; only when ``max_pending`` records wait does a new
call go unrecorded (logged and counted), as every call between subscribers did during an
outage before. A statement refused for another reason (a record PostgreSQL will not take) is
retried record by record so that one bad record cannot hold back the others.

What a crash can lose: records marked in the last ``delay`` seconds (the same window as the
answers of billed calls). A graceful stop writes everything marked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from billing.credit import DATABASE_UNREACHABLE, Settlement

if TYPE_CHECKING:
    from billing.db import Pool

log = logging.getLogger("billing.freecalls")

#: Back-off between attempts while the database is unreachable (the last one repeats).
_RETRY_DELAYS: Final = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

_UPSERT: Final = """
    INSERT INTO cdrs AS c (call_id, caller_username, caller_domain, callee, start_at,
                           answer_at, end_at, status, disconnect_reason, billed_duration,
                           charged_duration, cost, node)
    SELECT f.call_id, f.caller_username, f.caller_domain, f.callee, f.start_at, f.answer_at,
           f.end_at, f.status, f.reason, f.billed,
           CASE WHEN f.status = 'in_progress' THEN NULL ELSE 0 END,
           CASE WHEN f.status = 'in_progress' THEN NULL ELSE 0 END, $11
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                $6::timestamptz[], $7::timestamptz[], $8::text[], $9::text[], $10::int[])
         AS f(call_id, caller_username, caller_domain, callee, start_at, answer_at, end_at,
              status, reason, billed)
    ON CONFLICT (call_id) DO UPDATE SET
        answer_at = COALESCE(c.answer_at, EXCLUDED.answer_at),
        end_at = EXCLUDED.end_at, status = EXCLUDED.status,
        disconnect_reason = EXCLUDED.disconnect_reason,
        billed_duration = EXCLUDED.billed_duration,
        charged_duration = EXCLUDED.charged_duration, cost = EXCLUDED.cost
    WHERE c.status = 'in_progress' AND c.account_id IS NULL AND c.node = EXCLUDED.node
"""


def _refused(exc: BaseException) -> bool:
    """PostgreSQL (or asyncpg's encoding) refused the statement for what it holds, rather
    than the database being out of reach: trying the same again would fail again."""
    if isinstance(exc, asyncpg.DataError):  # an InterfaceError, but about the data
        return True
    return (isinstance(exc, asyncpg.PostgresError | ValueError | TypeError)
            and not isinstance(exc, DATABASE_UNREACHABLE))


@dataclass(eq=False, slots=True)
class FreeCall:
    """The CDR of one free call as this node knows it (the row's newest state)."""

    call_id: str
    caller_username: str
    caller_domain: str
    callee: str
    start_at: datetime
    answer_at: datetime | None = None
    end_at: datetime | None = None
    status: str = "in_progress"
    reason: str | None = None
    #: Resolved with the call's :class:`Settlement` once its closed record is committed.
    done: asyncio.Future[Settlement | None] | None = None

    @property
    def closed(self) -> bool:
        return self.status != "in_progress"

    @property
    def billed_duration(self) -> int | None:
        """Seconds from answer to end (started seconds count), as for a billed call."""
        if not self.closed:
            return None
        if self.answer_at is None or self.end_at is None:
            return 0
        return max(0, math.ceil((self.end_at - self.answer_at).total_seconds()))

    def settlement(self) -> Settlement:
        return Settlement(self.call_id, None, self.status, self.billed_duration or 0, 0,
                          Decimal(0), None, None, False)


class FreeCallRecorder:
    """Group commit of free-call CDRs (see the module docstring). Run :meth:`run` as a task;
    :meth:`flush` at shutdown."""

    def __init__(
        self,
        pool: Pool,
        node_id: str,
        *,
        delay: float = 0.1,
        timeout: float = 5.0,
        max_pending: int = 100_000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._pool = pool
        self.node_id = node_id
        self.delay = delay
        self.timeout = timeout
        self.max_pending = max_pending
        self.clock = clock
        self._pending: dict[FreeCall, None] = {}  # marked for writing, in order
        self._wake = asyncio.Event()
        self._writing = asyncio.Lock()
        self.stats: dict[str, int] = {"written": 0, "statements": 0, "unrecorded": 0,
                                      "write_errors": 0}

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the call's life (no awaits: the call path never waits for its record) ------------

    def open(self, call_id: str, caller: tuple[str, str], callee: str,
             at: datetime) -> FreeCall | None:
        """A new free call's record, marked for writing; None (the call goes unrecorded)
        while ``max_pending`` records wait for an unreachable database."""
        if len(self._pending) >= self.max_pending:
            self.stats["unrecorded"] += 1
            log.warning("event=free_call_unrecorded call_id=%s pending=%d", call_id,
                        len(self._pending))
            return None
        record = FreeCall(call_id, caller[0], caller[1], callee, at)
        self._mark(record)
        return record

    def answered(self, record: FreeCall, at: datetime) -> None:
        if record.closed or record.answer_at is not None:
            return
        record.answer_at = at
        self._mark(record)

    def close(self, record: FreeCall, status: str, at: datetime, reason: str,
              done: asyncio.Future[Settlement | None] | None = None) -> None:
        """The call ended: ``status`` answered, cancelled (never answered) or a failure
        status. ``done`` gets the outcome once it is committed."""
        if record.closed:
            return
        record.status = status
        record.end_at = at
        record.reason = reason
        record.done = done
        self._mark(record)

    def _mark(self, record: FreeCall) -> None:
        self._pending[record] = None
        self._wake.set()

    # -- the writer -----------------------------------------------------------------------

    async def run(self) -> None:
        """Write marked records until cancelled: the first of a quiet moment after ``delay``
        seconds, with everything marked meanwhile."""
        failures = 0
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.delay)
            self._wake.clear()
            try:
                await self.flush()
                failures = 0
            except Exception as exc:  # unreachable, or a bug: the records stay marked
                delay = _RETRY_DELAYS[min(failures, len(_RETRY_DELAYS) - 1)]
                failures += 1
                level = logging.WARNING if isinstance(exc, DATABASE_UNREACHABLE) else logging.ERROR
                log.log(level, "event=free_calls_write_failed pending=%d retry_in=%s error=%r",
                        len(self._pending), delay, exc)
                self._wake.set()
                await asyncio.sleep(delay)

    async def flush(self) -> int:
        """Write every marked record now; returns how many. Raises what makes the database
        unreachable, keeping the records marked."""
        async with self._writing:
            written = 0
            while self._pending:
                batch = self._take()
                try:
                    await self._write(batch)
                except BaseException as exc:  # cancelled too: the records stay marked
                    if not _refused(exc):
                        self._restore(batch)
                        raise
                    await self._write_singly(batch)
                else:
                    self._committed(batch)
                written += len(batch)
            return written

    def _take(self) -> list[tuple[FreeCall, tuple[Any, ...]]]:
        """The marked records with their state now (a record may change while its write is
        in flight: that marks it again for the next statement). One row per Call-ID per
        statement: PostgreSQL refuses to upsert a row twice in one."""
        batch: list[tuple[FreeCall, tuple[Any, ...]]] = []
        later: dict[FreeCall, None] = {}
        seen: set[str] = set()
        for record in self._pending:
            if record.call_id in seen:
                later[record] = None
                continue
            seen.add(record.call_id)
            batch.append((record, (record.call_id, record.caller_username,
                                   record.caller_domain, record.callee, record.start_at,
                                   record.answer_at, record.end_at, record.status,
                                   record.reason, record.billed_duration, record.closed)))
        self._pending = later
        return batch

    def _restore(self, batch: list[tuple[FreeCall, tuple[Any, ...]]]) -> None:
        """Mark a batch that was not written again (records marked meanwhile stay marked:
        their state is newer and includes what the batch had)."""
        restored: dict[FreeCall, None] = {record: None for record, _ in batch}
        restored.update(self._pending)
        self._pending = restored

    async def _write(self, batch: list[tuple[FreeCall, tuple[Any, ...]]]) -> None:
        columns: list[list[Any]] = [[] for _ in range(10)]
        for _record, state in batch:
            for column, value in zip(columns, state, strict=False):
                column.append(value)
        async with asyncio.timeout(self.timeout), self._pool.acquire() as conn:
            await conn.execute(_UPSERT, *columns, self.node_id)
        self.stats["statements"] += 1

    async def _write_singly(self, batch: list[tuple[FreeCall, tuple[Any, ...]]]) -> None:
        for i, item in enumerate(batch):
            try:
                await self._write([item])
            except BaseException as exc:
                if not _refused(exc):
                    self._restore(batch[i:])
                    raise
                record = item[0]
                self.stats["write_errors"] += 1
                log.error("event=free_call_record_refused call_id=%r error=%r",
                          record.call_id, exc)
                if item[1][-1] and record.done is not None and not record.done.done():
                    record.done.set_result(None)
            else:
                self._committed([item])

    def _committed(self, batch: list[tuple[FreeCall, tuple[Any, ...]]]) -> None:
        self.stats["written"] += len(batch)
        for record, state in batch:
            # The outcome is known once the closed state itself is committed.
            if state[-1] and record.done is not None and not record.done.done():
                record.done.set_result(record.settlement())

    async def close_writer(self, task: asyncio.Task[None] | None) -> None:
        """Stop the writer ``task`` and write what is left (once: a database still away
        loses those records, logged)."""
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.flush()
        except DATABASE_UNREACHABLE as exc:
            log.error("event=free_calls_unwritten count=%d error=%r", len(self._pending), exc)
