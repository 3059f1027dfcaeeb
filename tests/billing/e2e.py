"""Shared pieces of billing's end-to-end tests: a server with billing and a gateway, SIPp
UASes on the gateway port, and direct reads of the ledger the server writes.

Every expected amount in the tests is worked out from :data:`RATES_CSV` next to its assertion.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from decimal import ROUND_CEILING, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, Self, TypeVar

import asyncpg

from billing.ledger import Ledger
from tests.support import SCENARIOS, ServerProcess, free_port

T = TypeVar("T")

#: The test rate table: the demo's prefixes, with connect fees on every increment scheme.
RATES_CSV = """\
prefix,description,price_per_minute,first_increment,next_increment,connect_fee
1,USA/Canada,0.0200,60,60,0.0150
44,United Kingdom,0.0500,30,6,0.0300
49,Germany,0.1000,1,1,0.0500
4930,Germany Berlin,0.0400,60,1,0
"""
CALLERS = [f"20{n:02d}" for n in range(1, 21)]
SIPP_AUTH = {"algorithms": ["MD5"], "check_uri": False}


def password(user: str) -> str:
    return f"demo{user}"


def cents_up(value: Fraction) -> Decimal:
    """Round up to the cent, as the rates do."""
    return (Decimal(value.numerator) / Decimal(value.denominator)).quantize(
        Decimal("0.01"), rounding=ROUND_CEILING)


def billing_server(dsn: str, workdir: Path, *, gateway_port: int, port: int = 0,
                   http_port: int = 0, billing: dict[str, Any] | None = None,
                   users: list[str] | None = None) -> ServerProcess:
    """A server seeded with 1001-1003 and :data:`CALLERS` (10.00 EUR each), the rates of
    :data:`RATES_CSV` and one gateway for every number at ``gateway_port``."""
    workdir.mkdir(parents=True, exist_ok=True)
    rates = workdir / "rates.csv"
    rates.write_text(RATES_CSV)
    seeded = users if users is not None else ["1001", "1002", "1003", *CALLERS]
    while not port or port == gateway_port:  # never the gateway's: it binds only later
        port = free_port()
    extra: dict[str, Any] = {
        "auth": SIPP_AUTH,
        "seed": {"subscribers": [{"username": u, "password": password(u)} for u in seeded]},
        "proxy": {"gateways": [{"name": "gw", "host": "127.0.0.1", "port": gateway_port,
                                "prefixes": [""]}]},
        "billing": {"rates_csv": str(rates), **(billing or {})},
    }
    return ServerProcess(dsn, extra=extra, port=port, http_port=http_port, workdir=workdir)


def users_csv(directory: Path, user: str) -> Path:
    """A SIPp injection file with one caller (field0 user, field1 domain, field2 auth)."""
    path = directory / f"user-{user}.csv"
    path.write_text(f"SEQUENTIAL\n{user};localhost;[authentication username={user} "
                    f"password={password(user)}]\n")
    return path


class _SippProcess:
    """A SIPp process in the background, killed when the ``with`` block ends."""

    proc: subprocess.Popen[str]

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Uas(_SippProcess):
    """A SIPp UAS (sipp-scenarios/uas.xml by default) answering on ``port``."""

    def __init__(self, port: int, calls: int = 1, scenario: str = "uas.xml",
                 timeout: int = 60) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            ["sipp", "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port),
             "-m", str(calls), "-nostdin", "-timeout", f"{timeout}s", "-timeout_error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(0.3)  # bound before the first INVITE arrives


def run_db(dsn: str, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run ``work(pool)`` against the server's database from a synchronous test."""

    async def main() -> T:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        assert pool is not None
        try:
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


def set_balance(dsn: str, user: str, amount: str) -> None:
    """Bring ``user``'s account to exactly ``amount`` with a journalled adjustment."""

    async def work(pool: asyncpg.Pool) -> None:
        ledger = Ledger(pool)
        account = await ledger.account_for_subscriber(user, "localhost")
        assert account is not None, user
        delta = Decimal(amount) - account.balance
        if delta:
            await ledger.adjust(account.id, delta, reason="test setup")

    run_db(dsn, work)


def account(dsn: str, user: str) -> dict[str, Any]:
    """Balance, reservations and status of ``user``'s account."""

    async def work(pool: asyncpg.Pool) -> dict[str, Any]:
        ledger = Ledger(pool)
        acct = await ledger.account_for_subscriber(user, "localhost")
        assert acct is not None, user
        return {"id": acct.id, "balance": acct.balance, "status": acct.status,
                "reserved": await ledger.reserved(acct.id),
                "journal_ok": await ledger.verify() == []}

    return run_db(dsn, work)


def last_cdr(dsn: str, caller: str) -> dict[str, Any]:
    async def work(pool: asyncpg.Pool) -> dict[str, Any]:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM cdrs WHERE caller_username = $1 ORDER BY id DESC LIMIT 1", caller)
        assert row is not None, f"no CDR for {caller}"
        return dict(row.items())

    return run_db(dsn, work)


def charges(dsn: str, call_id: str) -> list[Decimal]:
    async def work(pool: asyncpg.Pool) -> list[Decimal]:
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT amount FROM journal WHERE kind = 'charge' AND reference = $1", call_id)
        return [r["amount"] for r in rows]

    return run_db(dsn, work)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def settled_cdr(dsn: str, caller: str, timeout: float = 10.0) -> dict[str, Any]:
    """The caller's last CDR once it is complete (the server settles right after the BYE)."""
    wait_until(lambda: last_cdr(dsn, caller)["status"] != "in_progress", timeout,
               f"the last call of {caller} to be settled")
    return last_cdr(dsn, caller)


class Uac(_SippProcess):
    """A SIPp caller running in the background (e.g. billing_uac_cut.xml, waiting for BYE)."""

    def __init__(self, scenario: str, server_port: int, inf: Path, service: str,
                 *extra: str, timeout: int = 60) -> None:
        self.proc = subprocess.Popen(
            ["sipp", f"127.0.0.1:{server_port}", "-sf", str(SCENARIOS / scenario),
             "-i", "127.0.0.1", "-p", str(free_port()), "-inf", str(inf), "-s", service,
             "-m", "1", "-nostdin", "-timeout", f"{timeout}s", "-timeout_error", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )


def answered_reservation(dsn: str, caller: str) -> bool:
    """Whether ``caller`` has a call in progress that was answered."""

    async def work(pool: asyncpg.Pool) -> bool:
        async with pool.acquire() as conn:
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM reservations r JOIN cdrs c USING (call_id) "
                "WHERE c.caller_username = $1 AND r.answered_at IS NOT NULL)", caller))

    return run_db(dsn, work)
