"""Every RFC 4475 torture message sent to a running server that cannot reach the outside.

The server runs in its own network namespace with only loopback up (``ip netns``, as root),
so whatever hosts the messages name (192.0.2.x, example.com) it cannot send anything off the
machine. Each message goes to it over UDP from inside the namespace. The server must answer
every valid request with a final response (no hung transaction), turn the invalid ones into
a stateless error or a counted drop, raise no handler exception, and still answer OPTIONS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from sipbill.ctlclient import ControlClient
from sipcore.message import parse_message
from tests.support import ServerProcess

DATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "rfc4475"

SENDER = r"""
import json, socket, sys
port, files = int(sys.argv[1]), sys.argv[2:]
out = {}
for name in files:
    data = open(name, "rb").read()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(1.5)
    s.sendto(data, ("127.0.0.1", port))
    got = []
    try:
        while True:
            reply = s.recvfrom(65536)[0]
            got.append(int(reply.split(b" ", 2)[1]))
            if got[-1] >= 200:
                break
    except (socket.timeout, ValueError, IndexError):
        pass
    out[name.rsplit("/", 1)[-1]] = got
    s.close()
print(json.dumps(out))
"""


def _verdicts() -> dict[str, str]:
    rows = {}
    for line in (DATA / "VERDICTS.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _section, verdict, _what = line.split("\t", 3)
            rows[name] = verdict
    return rows


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    if not DATA.is_dir():
        pytest.skip(f"RFC 4475 test data not found at {DATA}")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("network namespaces need root and iproute2 (.ci/run installs it)")
    name = f"sbt{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def server(db_dsn: str, netns: str) -> Iterator[ServerProcess]:
    host = parse_qs(urlsplit(db_dsn).query).get("host", [urlsplit(db_dsn).hostname or ""])[0]
    if not host.startswith("/"):
        pytest.skip("the database is reached over TCP, which a loopback-only namespace "
                    "cannot do; this test needs the embedded PostgreSQL's Unix socket")
    srv = ServerProcess(db_dsn, command_prefix=["ip", "netns", "exec", netns]).start()
    try:
        yield srv
    finally:
        srv.cleanup()


def test_torture_messages_in_a_sealed_namespace(server: ServerProcess, netns: str) -> None:
    verdicts = _verdicts()
    files = sorted(str(DATA / f) for f in verdicts if (DATA / f).exists())
    probe = server.workdir / "options.dat"
    probe.write_bytes(
        b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKprobe\r\n"
        b"From: <sip:probe@example.org>;tag=1\r\nTo: <sip:127.0.0.1>\r\nCall-ID: probe\r\n"
        b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", SENDER, str(server.port),
         *files, str(probe)],
        capture_output=True, text=True, timeout=300, check=True)
    replies: dict[str, list[int]] = json.loads(out.stdout)

    assert server.proc is not None and server.proc.poll() is None, server.logs()
    assert replies["options.dat"] == [200], "the server stopped answering"
    seen_transactions: set[tuple[str, str, str]] = set()
    for name in sorted(verdicts):
        verdict = verdicts[name]
        data = (DATA / name).read_bytes()
        first = data.split(b"\r\n", 1)[0]
        is_request = not first.startswith(b"SIP/") and not first.startswith(b"ACK ")
        statuses = replies.get(name, [])
        if verdict == "valid" and is_request and name != "test.dat":
            msg = parse_message(data)
            key = (msg.top_via.branch or "", str(msg.top_via.sent_by), msg.cseq.method)
            if key in seen_transactions:
                # Same branch, sent-by and method as an earlier message: by RFC 3261
                # §17.2.3 a retransmission, answered to the first sender, not to us.
                continue
            seen_transactions.add(key)
            assert statuses and statuses[-1] >= 200, f"{name}: no final response ({statuses})"
        if statuses and statuses[-1] >= 200 and verdict == "invalid":
            assert statuses[-1] >= 400, f"{name}: invalid message accepted ({statuses})"
        if not is_request:
            assert statuses == [], f"{name}: a response or ACK was answered ({statuses})"
    with ControlClient(str(server.control_socket)) as client:
        stats = client.call("stats")
    assert stats["stack"]["parse_errors"] > 0
    assert stats["pipeline_errors"] == 0, server.logs()
    assert "Traceback" not in server.logs()
