"""Presence end to end: a real ``sipbill serve`` and SIPp watchers and presentities.

sipp-scenarios/presence_watcher.xml checks each NOTIFY on the wire (Event, Subscription-State,
PIDF Content-Type, entity, basic status) while this test moves the presentity: offline at
first, then registered (register_auth.xml), then unregistered (presence_unregister.xml); the
watcher then refreshes and unsubscribes in the dialog.  The control socket shows status and
subscriptions between the steps.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipbill.ctlclient import ControlClient
from tests.support import SCENARIOS, ServerProcess, free_port, run_sipp

SIPP_AUTH = {"auth": {"algorithms": ["MD5"], "check_uri": False}}


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


def _user_csv(tmp: Path, user: str) -> str:
    path = tmp / f"user_{user}.csv"
    path.write_text(f"SEQUENTIAL\n{user};localhost;"
                    f"[authentication username={user} password=demo{user}]\n")
    return str(path)


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_watcher_gets_closed_open_closed_then_refresh_and_unsubscribe(
        server: ServerProcess, tmp_path: Path) -> None:
    ctl(server, "ul.rm", aor="1002")
    assert ctl(server, "presence.status", aor="1002")["status"] == "offline"  # type: ignore[index]
    watcher = subprocess.Popen(
        ["sipp", f"127.0.0.1:{server.port}", "-sf", str(SCENARIOS / "presence_watcher.xml"),
         "-inf", _user_csv(tmp_path, "1001"), "-s", "1002", "-i", "127.0.0.1",
         "-p", str(free_port()), "-m", "1", "-nostdin", "-timeout", "40s", "-timeout_error",
         "-trace_err", "-error_file", str(tmp_path / "watcher_errors.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        _wait(lambda: ctl(server, "presence.subscriptions", aor="1002"))
        time.sleep(0.5)  # the first NOTIFY (closed) is answered
        presentity = _user_csv(tmp_path, "1002")
        res = run_sipp("register_auth.xml", server.port, "-inf", presentity, calls=1,
                       timeout=15)
        assert res.returncode == 0, res.output
        assert ctl(server, "presence.status", aor="1002")["status"] == "online"  # type: ignore[index]
        time.sleep(0.5)  # NOTIFY (open)
        res = run_sipp("presence_unregister.xml", server.port, "-inf", presentity, calls=1,
                       timeout=15)
        assert res.returncode == 0, res.output
        # Refresh, unsubscribe and the terminated NOTIFY follow in the scenario.
        _, err = watcher.communicate(timeout=40)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    errors = (tmp_path / "watcher_errors.log")
    assert watcher.returncode == 0, err + (errors.read_text() if errors.exists() else "")
    assert ctl(server, "presence.subscriptions", aor="1002") == []


def test_bad_event_is_489_and_hidden_users_appear_offline(server: ServerProcess,
                                                          tmp_path: Path) -> None:
    presentity = _user_csv(tmp_path, "1003")
    res = run_sipp("register_auth.xml", server.port, "-inf", presentity, calls=1, timeout=15)
    assert res.returncode == 0, res.output
    assert ctl(server, "presence.status", aor="1003")["status"] == "online"  # type: ignore[index]
    assert ctl(server, "presence.hide", user="1003", state="on")["hidden"] is True  # type: ignore[index]
    shown = ctl(server, "presence.status", aor="sip:1003@localhost")
    assert shown == {"aor": "sip:1003@localhost", "status": "offline", "hidden": True,
                     "watchers": 0}
    ctl(server, "presence.hide", user="1003", state="off")
    assert ctl(server, "presence.status", aor="1003")["status"] == "online"  # type: ignore[index]
    assert ctl(server, "presence.status", aor="bob@example.org")["status"] == "non-local"  # type: ignore[index]
    assert ctl(server, "presence.status", aor="nobody")["status"] == "unknown"  # type: ignore[index]
