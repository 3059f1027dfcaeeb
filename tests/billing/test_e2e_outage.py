"""PostgreSQL becomes unreachable under a running server (its only path to the database, a
TCP relay owned by the test, is cut): a new billable call is refused with 503 -- never let
through unbilled -- while a call already in progress keeps its timer, is cut at its limit and
is billed once the database is back.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import pytest

from sipcore.message import Request
from tests.billing.e2e import (
    Uas,
    account,
    billing_server,
    password,
    run_db,
    set_balance,
    wait_until,
)
from tests.billing.rawua import RawUA
from tests.support import ServerProcess, free_port

pytestmark = pytest.mark.timeout(120)


class DbRelay:
    """A TCP port that relays to the PostgreSQL of ``dsn`` until :meth:`cut`; :meth:`mend`
    listens again on the same port."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        port = parts.port or int(query.get("port", ["5432"])[0])
        self.unix = f"{query['host'][0]}/.s.PGSQL.{port}" if "host" in query else None
        self.tcp = (parts.hostname or "127.0.0.1", port)
        self.port = free_port(socket.SOCK_STREAM)
        self.dsn = urlunsplit(parts._replace(
            netloc=f"{parts.username or 'postgres'}@127.0.0.1:{self.port}", query=""))
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.open = False
        self.mend()

    def mend(self) -> None:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", self.port))
        lsock.listen(16)
        self.listener = lsock
        with self.lock:
            self.open = True
        threading.Thread(target=self._accept, args=(lsock,), daemon=True).start()

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                client, _ = lsock.accept()
            except OSError:
                return
            if self.unix is not None:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self.unix)
            else:
                upstream = socket.create_connection(self.tcp)
            with self.lock:
                if not self.open:  # accepted just as the relay was cut: cut it too
                    client.close()
                    upstream.close()
                    return
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and drop the open ones, as a dead database host would."""
        with self.lock:
            self.open = False
            conns, self.conns = self.conns, []
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def cdr_of(dsn: str, call_id: str) -> dict[str, Any] | None:
    async def work(pool: asyncpg.Pool) -> dict[str, Any] | None:
        row = await pool.fetchrow("SELECT * FROM cdrs WHERE call_id = $1", call_id)
        return None if row is None else dict(row)

    return run_db(dsn, work)


@pytest.fixture(scope="module")
def relay(db_dsn: str) -> Iterator[DbRelay]:
    r = DbRelay(db_dsn)
    try:
        yield r
    finally:
        r.cut()


@pytest.fixture(scope="module")
def gw_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(relay: DbRelay, gw_port: int, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[ServerProcess]:
    srv = billing_server(relay.dsn, tmp_path_factory.mktemp("billing-outage"),
                         gateway_port=gw_port, users=["2001", "2002"])
    srv.extra["database"] = {"url": relay.dsn, "pool_min": 1, "pool_max": 4,
                             "command_timeout": 2.0}
    srv.start()
    try:
        yield srv
    finally:
        srv.cleanup()


def test_database_outage(server: ServerProcess, relay: DbRelay, db_dsn: str,
                         gw_port: int) -> None:
    caller, other = "2001", "2002"
    set_balance(db_dsn, caller, "0.06")  # rate 49: a 6 s call (see test_e2e_calls)
    with RawUA(server.port, caller, password(caller)) as ua, \
            RawUA(server.port, other, password(other)) as ua2, Uas(gw_port):
        assert ua2.register().header("Balance-amount") == "10.00"
        call = ua.invite("+4989111222")
        assert call.status == 200 and call.header("Balance-amount") == "0.00"

        relay.cut()
        try:
            refused = ua2.invite("+4989111222")
        except TimeoutError:
            raise AssertionError("no answer:\n" + server.logs()[-6000:]) from None
        assert (refused.status, refused.final and refused.final.reason) == (
            503, "Billing Unavailable"), server.logs()[-6000:]

        # The call in progress keeps its timer: cut at 6 s with the database still away.
        call.wait_bye(15)

        # A call between subscribers goes through (it costs nothing; the callee's account
        # was never looked up, so it is not diverted); its CDR waits in memory.
        free = ua.invite("2002", wait=False)
        ring = ua2.wait(lambda m: isinstance(m, Request) and m.method == "INVITE"
                        and m.call_id == free.call_id, 15)
        assert isinstance(ring, Request)
        ua2.answer(ring, 486, "Busy Here")
        assert free.wait_final(15).status == 486
        relay.mend()
    # The settlement was retried until the database came back: billed once, in full.
    wait_until(lambda: (cdr_of(db_dsn, call.call_id) or {}).get("status") != "in_progress",
               20, "the call to be settled")
    cdr = cdr_of(db_dsn, call.call_id)
    assert cdr is not None
    assert cdr["disconnect_reason"] == "credit_exhausted" and cdr["cost"] == Decimal("0.06")
    assert not cdr["recovered"]
    wait_until(lambda: account(db_dsn, caller)["reserved"] == 0, 10, "the reservation to go")
    assert account(db_dsn, caller)["balance"] == Decimal("0.00")
    # ... and is written once the database is back: the callee's missed call.
    wait_until(lambda: cdr_of(db_dsn, free.call_id) is not None, 40, "the free call's CDR")
    cdr = cdr_of(db_dsn, free.call_id)
    assert cdr is not None and (cdr["status"], cdr["caller_username"], cdr["callee"]) == (
        "busy", caller, "2002@localhost")

    # The connection listening for account changes (and every other cache's) died with the
    # relay: a new one listens, and the balance a phone is shown follows a change made after
    # the outage.
    wait_until(lambda: "event=notify_listen_restored" in server.logs(), 20,
               "the caches to listen again")
    with RawUA(server.port, other, password(other)) as ua2:
        assert ua2.register().header("Balance-amount") == "10.00"
        set_balance(db_dsn, other, "7.00")
        wait_until(lambda: ua2.register().header("Balance-amount") == "7.00", 5,
                   "the new balance on the REGISTER 200 OK")
