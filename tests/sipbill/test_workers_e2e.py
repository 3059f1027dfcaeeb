"""``server.workers = 2`` end to end: a real ``sipbill serve`` supervisor with two worker
processes sharing the SIP port, driven by SIPp.

SIPp's ``-t un`` gives every call its own UDP socket, so the kernel spreads the calls over both
workers (SO_REUSEPORT hashes the source port); the callee or gateway answers from one fixed
address, so for the calls that landed on the other worker its responses, and its in-dialog
requests, must be handed across (sipcore.workers). The gateway on TCP exercises the other
direction: worker 1 sends through worker 0, which holds the TCP connections.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipbill.ctlclient import ControlClient
from tests.billing.e2e import Uas, account, billing_server, charges, run_db, users_csv
from tests.support import SCENARIOS, ServerProcess, free_port, run_sipp

pytestmark = pytest.mark.timeout(120)

#: SIPp's ``-t un`` (a socket per call) wants its socket cap below the open-file limit.
UN = ("-max_socket", "1000")


@pytest.fixture(scope="module")
def gw_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def tcp_gw_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(db_dsn: str, gw_port: int, tcp_gw_port: int,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Each call reserves up to max_call_duration (AstBill): 10 minutes at the Berlin rate is
    # 0.40 EUR, so the calls running at once (up to 10) never exhaust a 10 EUR account; an
    # hour's reservation (2.40) refused the fifth concurrent call with 402.
    srv = billing_server(db_dsn, tmp_path_factory.mktemp("workers"), gateway_port=gw_port,
                         billing={"max_call_duration": 600})
    srv.extra["server"] = {"workers": 2}
    srv.extra["registrar"] = {"max_contacts": 200}
    # Numbers starting 49 go to a UDP gateway, 1 to a TCP one.
    srv.extra["proxy"] = {"gateways": [
        {"name": "udp-gw", "host": "127.0.0.1", "port": gw_port, "prefixes": ["49"]},
        {"name": "tcp-gw", "host": "127.0.0.1", "port": tcp_gw_port, "transport": "tcp",
         "prefixes": ["1"]},
    ]}
    srv.start(timeout=60)
    try:
        yield srv
    finally:
        srv.cleanup()


def stats(server: ServerProcess) -> dict[str, Any]:
    with ControlClient(str(server.control_socket)) as client:
        result = client.call("stats")
    assert isinstance(result, dict)
    return result


def per_worker(server: ServerProcess, method: str) -> list[int]:
    return [w["requests_in"].get(method, 0) for w in stats(server)["workers"]]


def worker_pids(server: ServerProcess) -> dict[int, int]:
    return {w["index"]: w["pid"] for w in stats(server)["workers"]}


def _wait(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, KeyError):
            pass  # the control socket is briefly away while worker 0 restarts
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def test_both_workers_run_and_report_node_totals(server: ServerProcess) -> None:
    s = stats(server)
    assert s["workers_configured"] == 2 and s["workers_answering"] == 2
    pids = worker_pids(server)
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
    assert server.proc is not None and server.proc.pid not in pids.values()
    assert "(2 workers" in server.logs()


def test_registrations_spread_over_both_workers_and_all_succeed(server: ServerProcess) -> None:
    before = per_worker(server, "REGISTER")
    res = run_sipp("register_auth.xml", server.port, "-inf", str(SCENARIOS / "users.csv"), *UN,
                   calls=40, rate=40, timeout=30, transport="un")
    assert res.returncode == 0, res.output
    assert (res.successful, res.failed) == (40, 0)
    after = per_worker(server, "REGISTER")
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert all(n > 0 for n in served), f"REGISTERs per worker: {served}"
    # 401 + 200 for each; the counters also count a retransmission SIPp sent on a slow
    # moment (absorbed by its transaction), so at least 80.
    assert sum(served) >= 80
    # Each worker's location cache learns the other's bindings (LISTEN/NOTIFY): worker 0
    # (the control socket's) lists all of them.
    def listed() -> int:
        with ControlClient(str(server.control_socket)) as client:
            dump = client.call("ul.dump")
        assert isinstance(dump, dict)
        return int(dump["bindings"])

    _wait(lambda: listed() >= 40, 5, "worker 0 to see every binding")
    # /metrics says the node's totals: the sum over the workers.
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics",
                                timeout=5) as resp:
        text = resp.read().decode()
    line = next(ln for ln in text.splitlines()
                if ln.startswith('sipbill_sip_requests_received_total{method="REGISTER"}'))
    assert float(line.split()[-1]) == sum(per_worker(server, "REGISTER"))
    # The next tests call these users: no forking to the SIPp sockets that are gone.
    with ControlClient(str(server.control_socket)) as client:
        for user in ("1001", "1002", "1003"):
            client.call("ul.rm", user)


def test_calls_between_workers_succeed_end_to_end(server: ServerProcess) -> None:
    callee_port = free_port()
    res = run_sipp("register_auth.xml", server.port, "-inf", str(SCENARIOS / "users.csv"),
                   local_port=callee_port, calls=1, timeout=15)  # 1001 answers here
    assert res.returncode == 0, res.output
    before = stats(server)
    with Uas(callee_port, calls=30) as uas:
        # Rounds of 10 calls until both workers took some (the kernel's hash is random:
        # one round leaves a worker out with probability 2**-9).
        for _ in range(3):
            res = run_sipp("uac_call_auth.xml", server.port, "-inf",
                           str(SCENARIOS / "users.csv"), "-s", "1001", "-d", "200", *UN,
                           calls=10, rate=10, timeout=30, transport="un")
            assert res.returncode == 0, res.output
            assert (res.successful, res.failed) == (10, 0)
            after = stats(server)
            invites = [a["requests_in"].get("INVITE", 0) - b["requests_in"].get("INVITE", 0)
                       for a, b in zip(after["workers"], before["workers"], strict=True)]
            if all(n > 0 for n in invites):
                break
        assert all(n > 0 for n in invites), f"INVITEs per worker: {invites}"
        uas.stop()
    # The callee's answers for the calls of the worker it does not hash to went across.
    handed = sum(w["channel"]["diverted"] for w in after["workers"]) - sum(
        w["channel"]["diverted"] for w in before["workers"])
    assert handed > 0
    assert after["dialogs"] == 0  # every BYE reached the worker that held its dialog


def _billed_calls(server: ServerProcess, db_dsn: str, tmp_path: Path, caller: str,
                  number: str, done: Any) -> list[dict[str, Any]]:
    """Rounds of 10 calls from ``caller`` (each from its own port) until ``done(rows)``;
    each call settled exactly once, the account charged their sum."""
    before = account(db_dsn, caller)["balance"]

    async def cdrs(pool: Any) -> list[dict[str, Any]]:
        rows = await pool.fetch("SELECT * FROM cdrs WHERE caller_username = $1", caller)
        return [dict(r.items()) for r in rows]

    for _ in range(3):
        res = run_sipp("uac_call_auth.xml", server.port, "-inf",
                       str(users_csv(tmp_path, caller)), "-s", number, "-d", "300", *UN,
                       calls=10,
                       rate=10, timeout=30, transport="un")
        assert res.returncode == 0, res.output
        assert (res.successful, res.failed) == (10, 0)
        _wait(lambda: all(c["status"] != "in_progress"
                          for c in run_db(db_dsn, cdrs)), 10, "every call to be settled")
        rows = run_db(db_dsn, cdrs)
        if done(rows):
            break
    assert done(rows)
    total = 0
    for cdr in rows:
        assert cdr["status"] == "answered" and cdr["disconnect_reason"] == "caller_bye"
        assert not cdr["recovered"] and cdr["cost"] > 0
        assert charges(db_dsn, cdr["call_id"]) == [-cdr["cost"]]  # settled exactly once
        total += cdr["cost"]
    after = account(db_dsn, caller)
    assert after["balance"] == before - total and after["reserved"] == 0
    assert after["journal_ok"]
    return rows


def _billed_by(rows: list[dict[str, Any]]) -> set[str]:
    """The workers that billed these calls (node ids are ``host/address[/wN]:pid:uuid``)."""
    return {"w1" if "/w1:" in str(r["node"]) else "w0" for r in rows}


def test_billed_calls_through_a_udp_gateway_settle_once(
        server: ServerProcess, db_dsn: str, gw_port: int, tmp_path: Path) -> None:
    with Uas(gw_port, calls=30) as uas:
        # Both workers billed calls, each under its own node identity.
        _billed_calls(server, db_dsn, tmp_path, "2001", "4930123456",
                      lambda rows: _billed_by(rows) == {"w0", "w1"})
        uas.stop()


def test_billed_calls_through_a_tcp_gateway_go_through_worker_0(
        server: ServerProcess, db_dsn: str, tcp_gw_port: int, tmp_path: Path) -> None:
    uas = subprocess.Popen(
        ["sipp", "-sf", str(SCENARIOS / "uas.xml"), "-i", "127.0.0.1", "-p", str(tcp_gw_port),
         "-t", "t1", "-m", "30", "-nostdin", "-timeout", "60s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        # Worker 1's INVITEs, ACKs and BYEs go out through worker 0, the gateway's answers
        # come back to worker 0 and are handed to worker 1.
        _billed_calls(server, db_dsn, tmp_path, "2002", "12125551234",
                      lambda rows: "w1" in _billed_by(rows))
    finally:
        uas.kill()
        uas.wait()
    channel = stats(server)["workers"][1]["channel"]
    assert channel["tcp_relayed"] > 0 and channel["received"] > 0


def test_a_killed_worker_is_restarted_and_the_server_keeps_answering(
        server: ServerProcess) -> None:
    pids = worker_pids(server)
    os.kill(pids[1], signal.SIGKILL)
    _wait(lambda: worker_pids(server).get(1) not in (None, pids[1]), 30,
          "worker 1 to be restarted")
    res = run_sipp("register_auth.xml", server.port, "-inf", str(SCENARIOS / "users.csv"), *UN,
                   calls=20, rate=40, timeout=20, transport="un")
    assert (res.successful, res.failed) == (20, 0), res.output
    assert "event=worker_exited worker=1" in server.logs()
    # Worker 0 too: it holds TCP, HTTP and the control socket.
    os.kill(pids[0], signal.SIGKILL)
    _wait(lambda: worker_pids(server).get(0) not in (None, pids[0]), 30,
          "worker 0 to be restarted")
    res = run_sipp("options.xml", server.port, calls=5, rate=20, transport="t1", timeout=15)
    assert (res.successful, res.failed) == (5, 0), res.output


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_sigterm_stops_every_process_with_exit_code_0(server: ServerProcess) -> None:
    pids = list(worker_pids(server).values())
    assert server.proc is not None
    assert server.stop() == 0
    _wait(lambda: not any(_alive(p) for p in pids), 5, "the workers to be gone")
    # The port is free again: nothing kept a socket.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", server.port))
    logs = server.logs()
    assert "event=supervisor_stopped" in logs
    # Nothing went wrong on the way, apart from the workers this module killed on purpose.
    bad = [ln for ln in logs.splitlines() if ("level=error" in ln or "Traceback" in ln)]
    assert bad == [], "\n".join(bad[:20])
