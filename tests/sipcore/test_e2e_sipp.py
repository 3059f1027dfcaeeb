"""The SIPp scenarios of sipp-scenarios/ against a running server, at a small rate.

SIPp 3.6 only answers the first challenge and only with MD5, and it puts the server address
rather than the Request-URI into the digest ``uri``; the server under test is configured for
that (``auth.algorithms = ["MD5"]``, ``auth.check_uri = false``), as one would for such UAs.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.support import SCENARIOS, ServerProcess, free_port, run_sipp

SIPP_AUTH = {"auth": {"algorithms": ["MD5"], "check_uri": False}}


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(db_dsn, extra=SIPP_AUTH).start()
    try:
        yield srv
    finally:
        srv.cleanup()


def test_register_with_digest_auth(server: ServerProcess) -> None:
    res = run_sipp("register_auth.xml", server.port, "-inf", str(SCENARIOS / "users.csv"),
                   calls=30, rate=20, timeout=30)
    assert res.returncode == 0, res.output
    assert (res.successful, res.failed) == (30, 0)


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_options(server: ServerProcess, transport: str) -> None:
    res = run_sipp("options.xml", server.port, calls=10, rate=50, transport=transport,
                   timeout=20)
    assert res.returncode == 0, res.output
    assert (res.successful, res.failed) == (10, 0)


def _uas(scenario: str, port: int, calls: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["sipp", "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port),
         "-m", str(calls), "-nostdin", "-timeout", "40s", "-timeout_error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def test_calls_with_proxy_auth_to_registered_uas(server: ServerProcess) -> None:
    uas_port = free_port()
    # The callee (CSV line 1 = 1001) registers from the port its UAS will answer on.
    res = run_sipp("register_auth.xml", server.port, "-inf", str(SCENARIOS / "users.csv"),
                   local_port=uas_port, calls=1, timeout=15)
    assert res.returncode == 0, res.output
    uas = _uas("uas.xml", uas_port, 5)
    try:
        time.sleep(0.3)
        res = run_sipp("uac_call_auth.xml", server.port, "-inf", str(SCENARIOS / "users.csv"),
                       "-s", "1001", "-d", "200", calls=5, rate=5, timeout=30)
        assert res.returncode == 0, res.output
        assert (res.successful, res.failed) == (5, 0)
        assert uas.wait(30) == 0
    finally:
        if uas.poll() is None:
            uas.kill()
            uas.wait()


def test_message_to_registered_user(server: ServerProcess) -> None:
    uas_port = free_port()
    res = run_sipp("register_auth.xml", server.port, "-inf", str(SCENARIOS / "users.csv"),
                   local_port=uas_port, calls=1, timeout=15)
    assert res.returncode == 0, res.output
    uas = _uas("message_uas.xml", uas_port, 5)
    try:
        time.sleep(0.3)
        res = run_sipp("message_uac.xml", server.port, "-inf", str(SCENARIOS / "users.csv"),
                       "-s", "1001", calls=5, rate=10, timeout=20)
        assert res.returncode == 0, res.output
        assert (res.successful, res.failed) == (5, 0)
        assert uas.wait(20) == 0
    finally:
        if uas.poll() is None:
            uas.kill()
            uas.wait()


def test_listen_address_is_an_alias_of_the_domain(server: ServerProcess, tmp_path: object) -> None:
    """A phone configured with domain 127.0.0.1 is the same subscriber as 1002@localhost."""
    from pathlib import Path

    csv = Path(str(tmp_path)) / "users_ip.csv"
    csv.write_text("SEQUENTIAL\n1002;127.0.0.1;[authentication username=1002 password=demo1002]\n")
    uas_port = free_port()
    res = run_sipp("register_auth.xml", server.port, "-inf", str(csv), local_port=uas_port,
                   calls=1, timeout=15)
    assert res.returncode == 0, res.output
    uas = _uas("message_uas.xml", uas_port, 1)
    try:
        time.sleep(0.3)
        # Sent to 1002@localhost: found under the canonical AoR the alias registered.
        res = run_sipp("message_uac.xml", server.port, "-inf", str(SCENARIOS / "users.csv"),
                       "-s", "1002", calls=1, timeout=15)
        assert res.returncode == 0, res.output
        assert uas.wait(15) == 0
    finally:
        if uas.poll() is None:
            uas.kill()
            uas.wait()
