"""Presence with a real watcher: baresip subscribes (RFC 3856) to a contact and shows the
status it parses from our PIDF NOTIFYs as SIPp registers and unregisters that contact."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipbill.ctlclient import ControlClient
from tests.baresip import Baresip
from tests.support import SIPP_AUTH, ServerProcess, run_sipp, running_server


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    with running_server(db_dsn, SIPP_AUTH) as srv:
        yield srv


def test_baresip_watcher_sees_online_then_offline(server: ServerProcess,
                                                   tmp_path: Path) -> None:
    csv = tmp_path / "1003.csv"
    csv.write_text("SEQUENTIAL\n1003;localhost;[authentication username=1003 password=demo1003]\n")
    watcher = Baresip(tmp_path, "1001", server.port, watch=("1003",)).start()
    try:
        watcher.wait_for(r"1001@localhost: .*200 OK")
        watcher.wait_for(r"^NOTIFY sip:\S+ SIP/2\.0\n(?:.+\n)*Subscription-State: active")
        with ControlClient(str(server.control_socket)) as client:
            [sub] = client.call("presence.subscriptions", aor="1003")
        assert sub["watcher"] == "sip:1001@localhost"

        res = run_sipp("register_auth.xml", server.port, "-inf", str(csv), calls=1, timeout=15)
        assert res.returncode == 0, res.output
        t0 = time.monotonic()
        watcher.wait_for(r"<sip:1003@localhost> changed status from \w+ to Online")
        assert time.monotonic() - t0 < 2.0  # the NOTIFY follows the REGISTER at once

        res = run_sipp("presence_unregister.xml", server.port, "-inf", str(csv), calls=1,
                       timeout=15)
        assert res.returncode == 0, res.output
        watcher.wait_for(r"<sip:1003@localhost> changed status from Online to Offline")
        assert "application/pidf+xml" in watcher.output()
    finally:
        watcher.stop()
