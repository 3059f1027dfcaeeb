"""The control socket of a running server: core methods driven by `sipbill ctl`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from sipbill.control import ControlError
from sipbill.ctlclient import ControlClient
from tests.pjsua import UserAgents
from tests.support import (
    SCENARIOS,
    SIPBILL,
    SIPP_AUTH,
    ServerProcess,
    free_port,
    run_sipp,
    running_server,
)


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    with running_server(db_dsn, SIPP_AUTH) as srv:
        yield srv


def ctl(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SIPBILL, "--config", str(server.config_path), "ctl", *args],
                          capture_output=True, text=True, timeout=30)


def test_ul_dump_shows_a_registration_and_ul_rm_removes_it(server: ServerProcess) -> None:
    port = free_port()
    res = run_sipp("register_auth.xml", server.port, "-inf", str(SCENARIOS / "users.csv"),
                   local_port=port, calls=1, timeout=15)
    assert res.returncode == 0, res.output
    out = ctl(server, "--json", "ul.dump")
    assert out.returncode == 0, out.stderr
    dump = json.loads(out.stdout)
    contacts = [b["contact"] for b in dump["records"]["sip:1001@localhost"]]
    assert f"<sip:1001@127.0.0.1:{port};transport=UDP>".strip("<>") in contacts[0]
    looked = ctl(server, "--json", "ul.lookup", "1001")
    assert looked.returncode == 0 and str(port) in looked.stdout
    assert ctl(server, "ul.rm", "1001@localhost").returncode == 0
    gone = ctl(server, "ul.lookup", "1001")
    assert gone.returncode == 1 and "no bindings" in gone.stderr


def test_core_methods_and_errors(server: ServerProcess) -> None:
    with ControlClient(str(server.control_socket)) as client:
        names = client.call("system.list_methods")
        for m in ("stats", "config.show", "ul.dump", "ul.lookup", "ul.rm", "subscriber.add",
                  "subscriber.list", "subscriber.passwd", "subscriber.del"):
            assert m in names
        cfg = client.call("config.show")
        assert cfg["database"]["url"] == "***"  # secrets redacted
        assert client.call("subscriber.add", user="2001", password="pw2001") == "2001@localhost"
        assert any(s["username"] == "2001" for s in client.call("subscriber.list"))
        with pytest.raises(ControlError) as err:
            client.call("subscriber.add", user="2001", password="again")
        assert err.value.code == 409
        client.call("subscriber.del", user="2001")
        with pytest.raises(ControlError) as err:
            client.call("no.such_method")
        assert err.value.code == -32601
        stats = client.call("stats")
        assert stats["transport"]["udp_datagrams_in"] >= 0 and "proxy" in stats
        subscribers = stats["subscribers"]
        assert (subscribers["listening"], subscribers["listen_lost"]) == (1, 0)
        assert {"reads", "read_keys"} <= subscribers.keys()  # misses read together
        assert stats["notify"] == {"listening": 1, "lost": 0, "restored": 0}


def test_ul_dump_shows_a_pjsua2_binding(server: ServerProcess, agents: UserAgents) -> None:
    """Issue 6's check: `sipbill ctl ul.dump` shows a real phone's registration."""
    phone = agents.register("1002", "demo1002", server.port)
    try:
        assert phone.registered, phone.reg_code
        out = ctl(server, "--json", "ul.dump")
        assert out.returncode == 0, out.stderr
        bindings = json.loads(out.stdout)["records"]["sip:1002@localhost"]
        host, port = phone.contact_host_port
        assert any(f"{host}:{port}" in b["contact"] for b in bindings), bindings
        table = ctl(server, "ul.lookup", "1002")  # the human table, too
        assert table.returncode == 0 and f"{host}:{port}" in table.stdout
    finally:
        phone.unregister()
        phone.close()


def test_module_methods_are_registered_and_answer(server: ServerProcess) -> None:
    """Each module registers its own methods on the same socket."""
    with ControlClient(str(server.control_socket)) as client:
        names = set(client.call("system.list_methods"))
        for m in ("account.balance", "account.topup", "account.lock", "account.unlock",
                  "account.statement", "calls.active", "calls.kill", "rates.reload",
                  "rates.unbillable", "rates.rerate", "missed.list", "missed.seen",
                  "presence.status", "presence.hide", "msilo.list", "msilo.count",
                  "click2dial.call", "click2dial.status", "click2dial.list"):
            assert m in names, m
        assert client.call("rates.unbillable") == []
        assert client.call("rates.rerate") == []
        assert client.call("calls.active") == []
        assert client.call("presence.status", "1001")["status"] == "offline"
        assert client.call("msilo.count", "1001") == 0
        with pytest.raises(ControlError) as err:
            client.call("calls.kill", "no-such-call")
        assert err.value.code == 404


def test_bad_frames_get_errors_while_sip_is_served(server: ServerProcess) -> None:
    import socket
    import struct

    import msgpack

    def frame(payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + payload

    def read_frame(sock: socket.socket) -> object:
        head = b""
        while len(head) < 4:
            chunk = sock.recv(4 - len(head))
            assert chunk, "connection closed before a reply"
            head += chunk
        (n,) = struct.unpack(">I", head)
        body = b""
        while len(body) < n:
            body += sock.recv(n - len(body))
        return msgpack.unpackb(body)

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(server.control_socket))
    s.sendall(frame(b"\xc1 not msgpack"))
    reply = read_frame(s)
    assert isinstance(reply, dict) and reply["error"]["code"] == -32700
    s.sendall(frame(msgpack.packb([1, 2, 3])))  # not a map: not a request at all
    reply = read_frame(s)
    assert isinstance(reply, dict) and reply["error"]["code"] == -32700
    s.sendall(frame(msgpack.packb({"id": 6, "params": {}})))  # a map without a method
    reply = read_frame(s)
    assert isinstance(reply, dict) and reply["error"]["code"] == -32600
    s.sendall(frame(msgpack.packb({"id": 7, "method": "no.such", "params": {}})))
    reply = read_frame(s)
    assert isinstance(reply, dict) and reply["id"] == 7 and reply["error"]["code"] == -32601
    s.sendall(struct.pack(">I", 512 * 1024 * 1024))  # an oversize frame: error, then closed
    reply = read_frame(s)
    assert isinstance(reply, dict) and reply["error"]["code"] == -32001
    assert s.recv(1) == b""
    s.close()

    # The SIP side never noticed.
    res = run_sipp("options.xml", server.port, local_port=free_port(), calls=3, timeout=15)
    assert res.returncode == 0, res.output
    with ControlClient(str(server.control_socket)) as client:
        assert client.call("system.ping") == "pong"
