"""msilo end to end: a real ``sipbill serve``, SIPp user agents on the wire, a restart between.

The scenarios check the exact wire form (sipp-scenarios/msilo_*.xml): the sender gets 202,
the recipient's phone, once registered, gets the MESSAGE from the original sender with a
Date header, the original Content-Type and body.  "Exactly once" is checked on the wire too: a
later registration of the same user, and a forced periodic check, send nothing more.

SIPp cannot receive a request with a new Call-ID in a client scenario, so the recipient
registers with one SIPp (register_auth.xml) and receives with a second one started on the same
port; the delivery's first copy may hit the port in between, and the UDP retransmission
(Timer E) reaches the receiving SIPp.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from sipbill.ctlclient import ControlClient
from tests.support import SCENARIOS, ServerProcess, free_port, run_sipp

SIPP_AUTH = {"auth": {"algorithms": ["MD5"], "check_uri": False}}
USERS = str(SCENARIOS / "users.csv")


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(db_dsn, extra=SIPP_AUTH).start()
    try:
        yield srv
    finally:
        srv.cleanup()


def ctl(server: ServerProcess, method: str, **params: object) -> object:
    with ControlClient(str(server.control_socket)) as client:
        return client.call(method, **params)


def _uas(scenario: str, port: int, *, timeout: int = 30) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["sipp", "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port),
         "-m", "1", "-nostdin", "-timeout", f"{timeout}s", "-timeout_error",
         "-trace_err", "-error_file", "/dev/stderr"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _register(server: ServerProcess, user_line: int, port: int) -> None:
    """REGISTER CSV user ``user_line`` (0 = 1001) from ``port``."""
    csv = SCENARIOS / "users.csv"
    line = csv.read_text().splitlines()[1 + user_line]
    one = csv.parent / f".msilo_user_{user_line}_{port}.csv"
    one.write_text("SEQUENTIAL\n" + line + "\n")
    try:
        res = run_sipp("register_auth.xml", server.port, "-inf", str(one), local_port=port,
                       calls=1, timeout=15)
    finally:
        one.unlink()
    assert res.returncode == 0, res.output


def _count_after_delivery(server: ServerProcess, user: str, within: float = 5.0) -> object:
    """msilo.count once the delivered message is deleted: the phone's 200 reaches the server
    before SIPp exits, and the deletion's database write may still be in flight then."""
    deadline = time.monotonic() + within
    while True:
        count = ctl(server, "msilo.count", user=user)
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def _finish(uas: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    try:
        _, err = uas.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        uas.kill()
        _, err = uas.communicate()
    return uas.returncode, err


def test_offline_message_is_stored_and_delivered_once_across_a_restart(
        server: ServerProcess) -> None:
    ctl(server, "ul.rm", aor="1002")
    res = run_sipp("msilo_uac.xml", server.port, "-inf", USERS, "-s", "1002", calls=1,
                   timeout=15)
    assert res.returncode == 0, res.output
    assert ctl(server, "msilo.count", user="1002") == 1
    [stored] = ctl(server, "msilo.list", user="1002")  # type: ignore[misc]
    assert stored["sender"] == "sip:1001@localhost"
    assert stored["sender_display"] == "Sender 1001"
    assert stored["body"].startswith("Stored hello 1 for 1002 from 1001.")

    # The server goes down and comes back on the same database: the message is still there.
    server.stop()
    # start() waits for "listening" in the log: begin a fresh one for the second run.
    server.log_path.rename(server.log_path.with_suffix(".before-restart"))
    server.start()
    assert ctl(server, "msilo.count", user="1002") == 1

    port = free_port()
    _register(server, 1, port)
    code, err = _finish(_uas("msilo_uas.xml", port), 40)
    assert code == 0, err
    assert _count_after_delivery(server, "1002") == 0

    # Exactly once: a new registration and a forced check send nothing more.
    ctl(server, "ul.rm", aor="1002")
    port2 = free_port()
    _register(server, 1, port2)
    uas = _uas("msilo_uas.xml", port2, timeout=4)
    ctl(server, "msilo.check")
    code, _ = _finish(uas, 20)
    assert code != 0  # timed out: no MESSAGE came
    assert len(re.findall(r"event=msilo_delivered .*aor=sip:1002@localhost", server.logs())) == 1


def test_message_a_registered_phone_refuses_with_480_is_stored_and_202(
        server: ServerProcess) -> None:
    port = free_port()
    _register(server, 2, port)  # 1003
    uas = _uas("msilo_uas_480.xml", port)
    try:
        res = run_sipp("msilo_uac.xml", server.port, "-inf", USERS, "-s", "1003", calls=1,
                       timeout=15)
        assert res.returncode == 0, res.output  # 202, not the phone's 480
    finally:
        code, err = _finish(uas, 20)
    assert code == 0, err
    assert ctl(server, "msilo.count", user="1003") == 1

    # The phone comes back with a new contact (a new binding): the message is delivered.
    port2 = free_port()
    _register(server, 2, port2)
    code, err = _finish(_uas("msilo_uas.xml", port2), 40)
    assert code == 0, err
    assert _count_after_delivery(server, "1003") == 0
