"""A server killed in the middle of a call (SIGKILL: no shutdown hook runs) is restarted on
the same address: the call's reservation is found by the recovery sweep of the new
incarnation and billed once, up to the last heartbeat of the dead one; later restarts bill
nothing more. Rate 49: 0.1000/min, 1/1, connect fee 0.0500 (tests/billing/e2e.py).
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

import pytest

from tests.billing.e2e import (
    Uac,
    Uas,
    account,
    answered_reservation,
    billing_server,
    cents_up,
    charges,
    last_cdr,
    settled_cdr,
    users_csv,
    wait_until,
)
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)


def test_call_of_a_killed_server_is_recovered_and_billed_once(
    db_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("billing-recovery")
    gw = free_port()
    # Heartbeats every second, so the last known point of the call is at most 1 s old.
    recovery = {"recovery": {"heartbeat_interval": 1.0, "node_timeout": 3.0, "grace": 5.0}}
    srv = billing_server(db_dsn, workdir, gateway_port=gw, billing=recovery).start()
    caller = "2001"
    try:
        with Uas(gw) as uas, Uac("billing_uac_cut.xml", srv.port,
                                 users_csv(workdir, caller), "+49891234567") as uac:
            wait_until(lambda: answered_reservation(db_dsn, caller), 15, "the call's answer")
            time.sleep(3.5)
            assert srv.proc is not None
            srv.proc.kill()  # SIGKILL: no shutdown hook, no BYE, no settlement
            srv.proc.wait()
            srv.proc = None
            killed_at = datetime.now(UTC)
            uac.stop()
            uas.stop()
        in_progress = last_cdr(db_dsn, caller)
        assert in_progress["status"] == "in_progress"
        # Measured from the answer time the server recorded (same clock: same machine), not
        # from when the poll above saw it, which lags by the answer batching and the poll.
        talked = (killed_at - in_progress["answer_at"]).total_seconds()

        srv.start()  # same port and data directory: the same node, a new incarnation
        cdr = settled_cdr(db_dsn, caller, timeout=15)
        assert cdr["recovered"] and cdr["disconnect_reason"] == "recovered"
        billed = cdr["billed_duration"]
        # Up to the last heartbeat before the kill: at most one interval (plus a little
        # scheduling slack) short of the time actually talked, never more than it (started
        # seconds count, hence the ceiling).
        assert talked - 2.5 <= billed <= math.ceil(talked)
        expected = cents_up(Fraction("0.05") + Fraction("0.10") * billed / 60)
        assert cdr["cost"] == expected
        assert charges(db_dsn, cdr["call_id"]) == [-expected]
        state = account(db_dsn, caller)
        assert state["balance"] == Decimal("10.00") - expected and state["reserved"] == 0

        srv.stop()
        srv.start()  # a clean restart finds nothing left to bill
        time.sleep(1.5)  # a maintenance round
        assert charges(db_dsn, cdr["call_id"]) == [-expected]
        assert account(db_dsn, caller)["balance"] == Decimal("10.00") - expected
        assert account(db_dsn, caller)["journal_ok"]
    finally:
        srv.cleanup()
