"""CDRs of free calls written in groups (billing.freecalls) against a real PostgreSQL: both
halves of the CDR, one statement for many calls, idempotent upserts that leave other nodes'
and billed calls' rows alone, records kept through a database outage and written once it is
back, a record PostgreSQL refuses not holding back the others, and the cap on what waits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from billing.credit import CreditControl, Settlement
from billing.freecalls import FreeCallRecorder
from billing.ledger import Ledger
from billing.rating import Rating
from billing.settings import BillingSettings

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
CALLER = ("4001", "free.example")


async def _cdr(pool: asyncpg.Pool, call_id: str) -> asyncpg.Record | None:
    async with pool.acquire() as conn:
        return await conn.fetchrow("SELECT * FROM cdrs WHERE call_id = $1", call_id)


class FlakyPool:
    """A pool whose connections cannot be had while ``down`` (the database unreachable)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.down = False
        self.attempts = 0

    def acquire(self) -> Any:
        self.attempts += 1
        if self.down:
            raise ConnectionRefusedError("database down")
        return self.pool.acquire()


@pytest.fixture
async def running(db_pool: asyncpg.Pool) -> AsyncIterator[FreeCallRecorder]:
    recorder = FreeCallRecorder(db_pool, "node-a", delay=0.01)
    task = asyncio.get_running_loop().create_task(recorder.run())
    try:
        yield recorder
    finally:
        await recorder.close_writer(task)


async def test_both_halves_and_the_outcome(db_pool: asyncpg.Pool,
                                           running: FreeCallRecorder) -> None:
    call = running.open("fc-1", CALLER, "4002@free.example", T0)
    assert call is not None
    await running.flush()
    first = await _cdr(db_pool, "fc-1")
    assert first is not None and first["status"] == "in_progress"
    assert (first["caller_username"], first["callee"], first["node"]) == (
        "4001", "4002@free.example", "node-a")
    assert first["cost"] is None and first["account_id"] is None

    running.answered(call, T0 + timedelta(seconds=2))
    await running.flush()
    answered = await _cdr(db_pool, "fc-1")
    assert answered is not None and answered["answer_at"] == T0 + timedelta(seconds=2)
    assert answered["status"] == "in_progress"

    done: asyncio.Future[Settlement | None] = asyncio.get_running_loop().create_future()
    running.close(call, "answered", T0 + timedelta(seconds=62.5), "caller_bye", done)
    assert not done.done()  # resolved by the commit, not by the close
    settled = await asyncio.wait_for(done, 5)
    assert settled is not None
    assert (settled.status, settled.duration, settled.cost) == ("answered", 61, 0)
    row = await _cdr(db_pool, "fc-1")
    assert row is not None
    assert (row["status"], row["billed_duration"], row["charged_duration"], row["cost"],
            row["disconnect_reason"]) == ("answered", 61, 0, 0, "caller_bye")
    # Closed is final: a later state (a bug, a late event) does not change it.
    running.close(call, "busy", T0 + timedelta(seconds=99), "late")
    assert call.status == "answered"


async def test_many_calls_in_one_statement_and_a_short_call_written_once(
    db_pool: asyncpg.Pool,
) -> None:
    recorder = FreeCallRecorder(db_pool, "node-a")
    calls = [recorder.open(f"fc-many-{i}", CALLER, "4002@free.example", T0) for i in range(50)]
    for i, call in enumerate(calls):
        assert call is not None
        if i % 2:
            recorder.close(call, "busy", T0 + timedelta(seconds=1), "486 busy")
    assert await recorder.flush() == 50
    assert recorder.stats["statements"] == 1 and recorder.pending == 0
    async with db_pool.acquire() as conn:
        rows = await conn.fetch("SELECT status, count(*) FROM cdrs WHERE call_id LIKE "
                                "'fc-many-%' GROUP BY status ORDER BY status")
    assert [tuple(r) for r in rows] == [("busy", 25), ("in_progress", 25)]
    ledger_missed = await CreditControl(db_pool, Rating([]), BillingSettings(),
                                        ledger=Ledger(db_pool)).missed_calls("4002@free.example")
    assert len([m for m in ledger_missed if m["call_id"].startswith("fc-many-")]) == 25


async def test_upserts_are_idempotent_and_leave_foreign_rows_alone(
    db_pool: asyncpg.Pool,
) -> None:
    recorder = FreeCallRecorder(db_pool, "node-a")
    call = recorder.open("fc-twice", CALLER, "4002@free.example", T0)
    assert call is not None
    await recorder.flush()
    recorder.close(call, "offline", T0 + timedelta(seconds=1), "480 offline")
    await recorder.flush()
    # The same state again (a write whose commit was not confirmed, retried): no change.
    recorder._mark(call)
    await recorder.flush()
    row = await _cdr(db_pool, "fc-twice")
    assert row is not None and (row["status"], row["end_at"]) == (
        "offline", T0 + timedelta(seconds=1))

    # A Call-ID another node is recording, and one a billed call used: left as they are.
    other = FreeCallRecorder(db_pool, "node-b")
    theirs = other.open("fc-theirs", CALLER, "4002@free.example", T0)
    assert theirs is not None
    await other.flush()
    mine = recorder.open("fc-theirs", ("9", "x"), "9@x", T0 + timedelta(seconds=5))
    assert mine is not None
    recorder.close(mine, "busy", T0 + timedelta(seconds=6), "486")
    await recorder.flush()
    row = await _cdr(db_pool, "fc-theirs")
    assert row is not None and (row["status"], row["node"], row["caller_username"]) == (
        "in_progress", "node-b", "4001")

    ledger = Ledger(db_pool)
    account = await ledger.create_account("fc-billed", "EUR")
    async with db_pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO cdrs (call_id, account_id, caller_username, caller_domain, callee, "
            "start_at, status, node) VALUES ('fc-billed', $1, 'a', 'b', 'c', $2, "
            "'in_progress', 'node-a')", account.id, T0)
    free = recorder.open("fc-billed", CALLER, "4002@free.example", T0)
    assert free is not None
    recorder.close(free, "cancelled", T0, "cancelled")
    await recorder.flush()
    row = await _cdr(db_pool, "fc-billed")
    assert row is not None and (row["status"], row["account_id"]) == ("in_progress", account.id)


async def test_two_records_of_one_call_id_go_in_separate_statements(
    db_pool: asyncpg.Pool,
) -> None:
    recorder = FreeCallRecorder(db_pool, "node-a")
    first = recorder.open("fc-reused", CALLER, "4002@free.example", T0)
    assert first is not None
    recorder.close(first, "busy", T0, "486")
    second = recorder.open("fc-reused", CALLER, "4002@free.example", T0 + timedelta(seconds=9))
    assert second is not None
    assert await recorder.flush() == 2
    assert recorder.stats["statements"] == 2
    row = await _cdr(db_pool, "fc-reused")
    # The Call-ID's first call keeps its record (as with the single-row open before).
    assert row is not None and (row["status"], row["start_at"]) == ("busy", T0)


async def test_an_outage_keeps_the_records_until_the_database_is_back(
    db_pool: asyncpg.Pool,
) -> None:
    flaky = FlakyPool(db_pool)
    recorder = FreeCallRecorder(flaky, "node-a", delay=0.01)  # type: ignore[arg-type]
    task = asyncio.get_running_loop().create_task(recorder.run())
    try:
        flaky.down = True
        call = recorder.open("fc-outage", CALLER, "4002@free.example", T0)
        assert call is not None
        recorder.answered(call, T0 + timedelta(seconds=1))
        done: asyncio.Future[Settlement | None] = asyncio.get_running_loop().create_future()
        recorder.close(call, "answered", T0 + timedelta(seconds=11), "callee_bye", done)
        await asyncio.sleep(0.5)
        assert flaky.attempts >= 2 and recorder.pending == 1 and not done.done()
        with pytest.raises(ConnectionRefusedError):
            await recorder.flush()
        assert recorder.pending == 1
        flaky.down = False
        settled = await asyncio.wait_for(done, 5)
        assert settled is not None and settled.duration == 10
    finally:
        await recorder.close_writer(task)
    row = await _cdr(db_pool, "fc-outage")
    assert row is not None and (row["status"], row["billed_duration"]) == ("answered", 10)


async def test_cancelled_writer_keeps_the_batch_it_was_writing(db_pool: asyncpg.Pool) -> None:
    gate = asyncio.Event()

    class SlowPool:
        @contextlib.asynccontextmanager
        async def acquire(self) -> AsyncIterator[Any]:
            await gate.wait()
            async with db_pool.acquire() as conn:
                yield conn

    recorder = FreeCallRecorder(SlowPool(), "node-a", delay=0)  # type: ignore[arg-type]
    task = asyncio.get_running_loop().create_task(recorder.run())
    call = recorder.open("fc-stop", CALLER, "4002@free.example", T0)
    assert call is not None
    await asyncio.sleep(0.05)
    assert recorder.pending == 0  # taken by the flush that waits for a connection
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert recorder.pending == 1
    gate.set()
    await recorder.close_writer(None)
    row = await _cdr(db_pool, "fc-stop")
    assert row is not None and row["status"] == "in_progress"


async def test_a_refused_record_does_not_hold_back_the_others(db_pool: asyncpg.Pool) -> None:
    recorder = FreeCallRecorder(db_pool, "node-a")
    bad = recorder.open("fc-bad", CALLER, "nul\x00byte@free.example", T0)
    good = recorder.open("fc-good", CALLER, "4002@free.example", T0)
    assert bad is not None and good is not None
    done: asyncio.Future[Settlement | None] = asyncio.get_running_loop().create_future()
    recorder.close(bad, "busy", T0, "486", done)
    await recorder.flush()
    assert recorder.pending == 0 and recorder.stats["write_errors"] == 1
    assert done.result() is None
    assert await _cdr(db_pool, "fc-good") is not None
    assert await _cdr(db_pool, "fc-bad") is None


async def test_new_calls_go_unrecorded_while_too_many_records_wait(
    db_pool: asyncpg.Pool,
) -> None:
    flaky = FlakyPool(db_pool)
    flaky.down = True
    recorder = FreeCallRecorder(flaky, "node-a", max_pending=2)  # type: ignore[arg-type]
    first = recorder.open("fc-cap-1", CALLER, "4002@free.example", T0)
    second = recorder.open("fc-cap-2", CALLER, "4002@free.example", T0)
    assert first is not None and second is not None
    assert recorder.open("fc-cap-3", CALLER, "4002@free.example", T0) is None
    assert recorder.stats["unrecorded"] == 1
    # Calls already recorded are still closed (their CDRs must not stay in progress).
    recorder.close(first, "busy", T0, "486")
    assert recorder.pending == 2
    flaky.down = False
    assert await recorder.flush() == 2
    row = await _cdr(db_pool, "fc-cap-1")
    assert row is not None and row["status"] == "busy"
