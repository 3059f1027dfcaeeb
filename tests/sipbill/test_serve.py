"""``sipbill serve`` end to end: a real process on loopback answering real SIP tools.

Issue 2's "done when": the server answers OPTIONS from sipsak and SIPp over UDP and TCP,
shuts down cleanly on SIGTERM, and refuses a bad config naming the key.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import SIPBILL, ServerProcess, run_sipp


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(db_dsn).start()
    try:
        yield srv
    finally:
        srv.cleanup()


def test_sipsak_options_udp(server: ServerProcess) -> None:
    sipsak = shutil.which("sipsak")
    assert sipsak, "sipsak is installed by .ci/run"
    # sipsak truncates 5-digit ports in the Request-URI it writes, so address the server's
    # domain and send through it as the outbound proxy (-p) instead.
    out = subprocess.run([sipsak, "-s", "sip:127.0.0.1", "-p", f"127.0.0.1:{server.port}", "-vv"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SIP/2.0 200 OK" in out.stdout


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_sipp_options(server: ServerProcess, transport: str) -> None:
    res = run_sipp("options.xml", server.port, calls=5, rate=50, transport=transport,
                   timeout=20)
    assert res.returncode == 0, res.output
    assert (res.successful, res.failed) == (5, 0)


def test_clean_shutdown_on_sigterm(db_dsn: str) -> None:
    srv = ServerProcess(db_dsn).start()
    try:
        rc = srv.stop()
        assert rc == 0, srv.logs()
        logs = srv.logs()
        assert "event=stopping" in logs and "event=stopped" in logs
    finally:
        srv.cleanup()


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[sip.timers]\nt1 = -1\n")
    out = subprocess.run([SIPBILL, "check-config", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "sip.timers.t1" in out.stderr and "positive" in out.stderr
    cfg.write_text("[server]\nlisten_port = 5060\n")
    out = subprocess.run([SIPBILL, "check-config", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "server.listen_port" in out.stderr


def test_demo_config_is_valid() -> None:
    repo = Path(__file__).resolve().parents[2]
    for name in ("demo.toml", "sipbill.example.toml"):
        out = subprocess.run([SIPBILL, "check-config", "--config", str(repo / "config" / name)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    assert sys.executable
