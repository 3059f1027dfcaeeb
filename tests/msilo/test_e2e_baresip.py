"""msilo with a real phone: baresip registers and receives a MESSAGE stored while it was away.

The sender is SIPp (msilo_uac.xml, 202 Accepted); the server restarts before baresip first
registers, so the message comes out of PostgreSQL.  baresip's SIP trace shows the MESSAGE it
parsed -- original sender, Date, body -- and its 200 OK; it gets it exactly once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipbill.ctlclient import ControlClient
from tests.baresip import BARESIP, Baresip
from tests.support import SCENARIOS, SIPP_AUTH, ServerProcess, run_sipp, running_server


def test_baresip_is_installed() -> None:
    """baresip is a real UA these tests need (.ci/run installs baresip-core): its absence is
    a failure, not a skip."""
    assert BARESIP is not None, "baresip not installed (Debian package baresip-core)"


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    with running_server(db_dsn, SIPP_AUTH) as srv:
        yield srv


def ctl(server: ServerProcess, method: str, **params: object) -> object:
    with ControlClient(str(server.control_socket)) as client:
        return client.call(method, **params)


def test_baresip_receives_a_stored_message_once_after_registering(
        server: ServerProcess, tmp_path: Path) -> None:
    res = run_sipp("msilo_uac.xml", server.port, "-inf", str(SCENARIOS / "users.csv"),
                   "-s", "1002", calls=1, timeout=15)
    assert res.returncode == 0, res.output  # 202
    server.stop()
    server.log_path.rename(server.log_path.with_suffix(".before-restart"))
    server.start()
    assert ctl(server, "msilo.count", user="1002") == 1

    phone = Baresip(tmp_path, "1002", server.port).start()
    try:
        phone.wait_for(r"1002@localhost: .*200 OK.*\[1 binding\]")
        [message] = phone.wait_for(r"^MESSAGE sip:1002\S* SIP/2\.0\n(?:.+\n)+\n.*")
        assert re.search(r'^From: "Sender 1001" <sip:1001@localhost>;tag=', message, re.M)
        assert re.search(r"^To: <sip:1002@localhost>$", message, re.M)
        assert re.search(r"^Date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$", message, re.M)
        assert re.search(r"^Content-Type: text/plain;charset=UTF-8$", message, re.M)
        assert "Stored hello 1 for 1002 from 1001." in message
        phone.wait_for(r"^SIP/2\.0 200 OK\n(?:.+\n)*CSeq: \d+ MESSAGE$")
        assert ctl(server, "msilo.count", user="1002") == 0
        ctl(server, "msilo.check")
        time.sleep(1.5)
        assert len(re.findall(r"^MESSAGE sip:1002", phone.output(), re.M)) == 1
    finally:
        phone.stop()
