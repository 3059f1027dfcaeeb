"""Click-to-dial end to end with real phones: pjsua2 (PJSIP 2.14) against ``sipbill serve``.

Issue 7's "done when", as the phones see it: ``click2dial.call`` on the control socket makes
the server call the caller's registered phone (INVITE on hold, RFC 3264 §8.4), REFER it to the
callee (RFC 3515), follow the NOTIFYs (message/sipfrag) and BYE its helper dialog; the caller's
phone then talks to the callee in a call it placed itself through the proxy. A caller who is
busy or does not answer gives a failed job with its reason, and so does one not registered.

pjsua2 accepts REFER by default and calls the Refer-To target itself; the binding has no
Python object for that new call (the helper does not create one in onCallTransferRequest), so
the caller's side of it is checked on the wire (PJSIP's message log) and the callee's side by
its call handle.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sipbill.ctlclient import ControlClient
from tests.pjsua import DOMAIN, Phone, UserAgents
from tests.support import SIPBILL, ServerProcess

pytestmark = pytest.mark.timeout(60, method="thread")

USERS = ("1001", "1002", "1003")


def password(user: str) -> str:
    return f"demo{user}"


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    extra = {"clicktodial": {"ring_timeout": 3.0, "notify_timeout": 5.0,
                             "transfer_timeout": 15.0}}
    srv = ServerProcess(db_dsn, extra=extra).start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(scope="module")
def ctl(server: ServerProcess) -> Iterator[ControlClient]:
    with ControlClient(str(server.control_socket)) as client:
        yield client


class Phones:
    """The phones of one test, closed (hung up, unregistered, deleted) when it ends."""

    def __init__(self, agents: UserAgents, server: ServerProcess) -> None:
        self.agents = agents
        self.server = server
        self.made: list[Phone] = []

    def register(self, user: str, *, answer_code: int = 200, transport: str = "udp") -> Phone:
        phone = self.agents.register(user, password(user), self.server.port, transport,
                                     answer_code=answer_code)
        self.made.append(phone)
        assert phone.registered, phone.reg_events
        return phone

    def close(self) -> None:
        # Newest first: callees (registered after their callers) hang up the transferred calls
        # before the transferee's phone goes; PJSIP keeps a pointer to the original call's
        # object as the transferred call's user data, and would call into a deleted object.
        for phone in reversed(self.made):
            phone.close()
        self.made.clear()


@pytest.fixture
def phones(agents: UserAgents, server: ServerProcess) -> Iterator[Phones]:
    errors_before = len(agents.errors)
    made = Phones(agents, server)
    try:
        yield made
    finally:
        made.close()
    new_errors = agents.errors[errors_before:]
    assert not new_errors, "exceptions in pjsua2 callbacks:\n" + "\n".join(new_errors)


def wait_job(ctl: ControlClient, job_id: str, done: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Poll click2dial.status until ``done(status)``; the last status either way."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = ctl.call("click2dial.status", job_id)
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def finished(status: dict[str, Any]) -> bool:
    return status["finished_at"] is not None


def diagnose(server: ServerProcess, agents: UserAgents, lines: int = 60) -> str:
    server_tail = "\n".join(server.logs().splitlines()[-lines:])
    return f"\n--- server log ---\n{server_tail}\n--- pjsua log ---\n{agents.log_tail(lines)}"


# ------------------------------------------------------------------------------ REFER path
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_job_connects_caller_and_callee_and_ends_its_own_dialog(
    server: ServerProcess, agents: UserAgents, phones: Phones, ctl: ControlClient,
    transport: str,
) -> None:
    since = agents.log_offset()
    caller = phones.register("1001", transport=transport)
    callee = phones.register("1002")

    job_id = ctl.call("click2dial.call", **{"from": "1001", "to": "1002"})
    assert isinstance(job_id, str) and job_id

    # The server's INVITE reaches the caller's phone, which answers it.
    helper = caller.wait_incoming(1, timeout=5)
    helper.wait_state("CONFIRMED", timeout=5)
    # The phone follows the REFER: the callee rings and answers a call from the caller.
    incoming = callee.wait_incoming(1, timeout=10)
    incoming.wait_state("CONFIRMED", timeout=10)

    status = wait_job(ctl, job_id, finished)
    assert status["state"] == "connected", f"{status}{diagnose(server, agents)}"
    assert status["mode"] == "refer"
    assert status["refer_status"] == 202
    assert status["transfer_status"] == 200
    # Our helper dialog is gone: BYE sent, 200 received, the phone's leg disconnected.
    assert status["bye_status"] == 200, status
    helper.wait_disconnected(timeout=5)
    states = [h["state"] for h in status["history"]]
    assert states == ["calling_caller", "caller_answered", "transferring", "connected"], states

    # The wire, as the caller's phone saw it.
    msgs = agents.messages(since)
    invite = next(m for m in msgs if m.direction == "RX" and m.first_line.startswith("INVITE ")
                  and m.peer.endswith(f":{server.port}") and "click2dial" in
                  "".join(m.header("Contact")))
    assert "c=IN IP4 0.0.0.0" in invite.text and "a=sendonly" in invite.text, invite.text
    assert "Click-to-dial" in invite.header("From")[0]
    assert f"sip:1002@{DOMAIN}" in invite.header("From")[0]
    refer = next(m for m in msgs if m.direction == "RX" and m.first_line.startswith("REFER "))
    assert refer.header("Refer-To") == [f"<sip:1002@{DOMAIN}>"], refer.text
    assert refer.header("Referred-By") == [f"<sip:1001@{DOMAIN}>"], refer.text
    notifies = [m for m in msgs if m.direction == "TX" and m.first_line.startswith("NOTIFY ")]
    assert any("SIP/2.0 200" in m.text for m in notifies), [m.text for m in notifies]
    # The caller's phone placed the new call itself, to the callee, and it was answered.
    placed = [m for m in msgs if m.direction == "TX" and m.first_line.startswith("INVITE sip:1002")]
    assert placed, diagnose(server, agents)
    assert placed[-1].header("Referred-By"), placed[-1].text
    assert incoming.sip_call_id in {m.header("Call-ID")[0] for m in placed}

    # Caller and callee stay in their call after our dialog is gone.
    time.sleep(0.5)
    assert not incoming.disconnected, incoming.states
    stats = ctl.call("stats")
    assert stats["dialogs"] == 1, stats

    # The job shows up in the list, and its outcome in the counters.
    listed = ctl.call("click2dial.list")
    assert listed[0]["id"] == job_id
    counters = ctl.call("click2dial.stats")
    assert counters["outcomes"]["connected"] >= 1 and counters["connected"] >= 1, counters
    assert counters["active"] == 0


def test_busy_caller_fails_the_job(
    server: ServerProcess, agents: UserAgents, phones: Phones, ctl: ControlClient
) -> None:
    phones.register("1001", answer_code=486)
    phones.register("1002")
    job_id = ctl.call("click2dial.call", "1001", "1002")
    status = wait_job(ctl, job_id, finished)
    assert status["state"] == "failed", f"{status}{diagnose(server, agents)}"
    assert (status["reason"], status["status"]) == ("caller_busy", 486)
    assert status["bye_status"] == 0  # no dialog was ever set up
    assert ctl.call("click2dial.stats")["failed:caller_busy"] >= 1


def test_declining_caller_fails_the_job(
    server: ServerProcess, agents: UserAgents, phones: Phones, ctl: ControlClient
) -> None:
    phones.register("1001", answer_code=603)
    job_id = ctl.call("click2dial.call", "1001", "1003")
    status = wait_job(ctl, job_id, finished)
    assert (status["state"], status["reason"], status["status"]) == (
        "failed", "caller_declined", 603), status


def test_caller_not_answering_is_cancelled(
    server: ServerProcess, agents: UserAgents, phones: Phones, ctl: ControlClient
) -> None:
    caller = phones.register("1001", answer_code=180)
    job_id = ctl.call("click2dial.call", "1001", "1002")
    ringing = caller.wait_incoming(1, timeout=5)
    ringing.wait_state("EARLY", timeout=5)
    start = time.monotonic()
    status = wait_job(ctl, job_id, finished, timeout=10)
    assert (status["state"], status["reason"]) == ("failed", "no_answer"), status
    # ring_timeout is 3 s in this module's server; then the INVITE is CANCELled (487).
    assert ringing.wait_disconnected(timeout=5) == 487, ringing.states
    assert time.monotonic() - start < 6


def test_unregistered_caller_fails_at_once(server: ServerProcess, ctl: ControlClient) -> None:
    # Started the way an operator would: `sipbill ctl click2dial.call FROM TO`.
    out = subprocess.run([SIPBILL, "ctl", "--socket", str(server.control_socket), "--json",
                          "click2dial.call", "1003", "1002"], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)
    status = ctl.call("click2dial.status", job_id)
    assert (status["state"], status["reason"]) == ("failed", "caller_offline"), status


def test_control_refuses_what_cannot_be_a_job(ctl: ControlClient) -> None:
    from sipbill.control import ControlError

    with pytest.raises(ControlError) as info:
        ctl.call("click2dial.call", "9999", "1002")  # no such subscriber
    assert info.value.code == 404
    with pytest.raises(ControlError) as info:
        ctl.call("click2dial.call", "1001@elsewhere.example", "1002")
    assert info.value.code == 400
    with pytest.raises(ControlError) as info:
        ctl.call("click2dial.status", "nope")
    assert info.value.code == 404


def test_second_phone_answering_too_is_hung_up(
    server: ServerProcess, agents: UserAgents, phones: Phones, ctl: ControlClient
) -> None:
    # Two registrations of 1001 that both answer. (PJSIP hands an incoming INVITE to the
    # first account whose user matches, so both calls land on the first phone object.)
    first = phones.register("1001")
    phones.register("1001")
    callee = phones.register("1002")
    job_id = ctl.call("click2dial.call", "1001", "1002")
    status = wait_job(ctl, job_id, finished)
    assert (status["state"], status["bye_status"]) == ("connected", 200), (
        f"{status}{diagnose(server, agents)}")
    # Both forks were answered; the one that lost was ACKed and BYEd at once (§13.2.2.4),
    # the winner after the transfer.
    legs = [first.wait_incoming(1), first.wait_incoming(2)]
    for leg in legs:
        leg.wait_state("CONFIRMED", timeout=5)
        assert leg.wait_disconnected(timeout=5) == 200, leg.states
    callee.wait_incoming(1, timeout=5).wait_state("CONFIRMED", timeout=5)
