"""Click-to-dial with SIPp playing the caller's phone: what pjsua2 phones cannot show.

* **3PCC fallback** (``c2d_refer_405.xml``, ``c2d_refer_603.xml``): registered as 1001, SIPp
  answers the server's INVITE, refuses the REFER with 405 or 603 and then takes part in
  third-party call control: the re-INVITE it gets carries the callee's offer. The callee is a
  pjsua2 phone (1002), called by the server through its own proxy as 1001 with an INVITE
  without SDP (RFC 3725 flow IV); its 2xx offer goes to SIPp, SIPp's answer comes back to it
  in the ACK. The two are then in a call with the server in the middle; when the callee hangs
  up, SIPp gets the BYE and its scenario ends successfully. With the fallback switched off the
  job fails ``refer_refused``.
* **A phone that challenges** the INVITE with 401 and checks the credentials against the
  subscriber's password (``c2d_auth_refer.xml``), then plays the transferee: 202 to the REFER
  and NOTIFYs with the new call's status (200: connected; 486: failed ``callee_busy``).
* **A phone that never NOTIFYs** after accepting the REFER (``c2d_refer_silent.xml``):
  ``refer_timeout``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipbill.ctlclient import ControlClient
from tests.pjsua import DOMAIN, Phone, UserAgents
from tests.support import SCENARIOS, ServerProcess, free_port, run_sipp

pytestmark = pytest.mark.timeout(90, method="thread")

#: SIPp answers only MD5 challenges, and its register scenario's digest uri is not checked.
SIPP_AUTH = {"algorithms": ["MD5"], "check_uri": False}


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    extra = {"auth": SIPP_AUTH,
             "clicktodial": {"ring_timeout": 5.0, "callee_timeout": 10.0,
                             "notify_timeout": 2.0}}
    srv = ServerProcess(db_dsn, extra=extra).start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(scope="module")
def ctl(server: ServerProcess) -> Iterator[ControlClient]:
    with ControlClient(str(server.control_socket)) as client:
        yield client


@pytest.fixture
def callee(agents: UserAgents, server: ServerProcess) -> Iterator[Phone]:
    errors_before = len(agents.errors)
    phone = agents.register("1002", "demo1002", server.port, "udp")
    assert phone.registered, phone.reg_events
    try:
        yield phone
    finally:
        phone.close()
    assert not agents.errors[errors_before:], "\n".join(agents.errors[errors_before:])


class SippPhone:
    """SIPp registered as a subscriber, then running a UAS scenario in the background."""

    def __init__(self, server: ServerProcess, user: str, scenario: str, *args: str) -> None:
        self.port = free_port()
        self.media_port = free_port()
        csv = Path(tempfile.mkdtemp(prefix="c2d-sipp-")) / "user.csv"
        csv.write_text(f"SEQUENTIAL\n{user};{DOMAIN};[authentication username={user} "
                       f"password=demo{user}]\n")
        reg = run_sipp("register_auth.xml", server.port, "-inf", str(csv),
                       local_port=self.port, timeout=10)
        assert reg.returncode == 0, reg.output
        self.workdir = csv.parent
        sipp = shutil.which("sipp")
        assert sipp is not None
        cmd = [sipp, f"127.0.0.1:{server.port}", "-sf", str(SCENARIOS / scenario),
               "-i", "127.0.0.1", "-p", str(self.port), "-mp", str(self.media_port),
               "-m", "1", "-timeout", "40s", "-timeout_error", "-nostdin",
               "-trace_err", "-error_file", str(self.workdir / "errors.log"), *args]
        self.out = open(self.workdir / "sipp.out", "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir,
                                     env={**os.environ})

    def wait(self, timeout: float = 20.0) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.out.close()
        text = (self.workdir / "sipp.out").read_text(errors="replace")
        errors = self.workdir / "errors.log"
        if errors.exists():
            text += errors.read_text(errors="replace")
        return rc, text

    def close_output(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self.out.closed:
            self.out.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self.out.closed:
            self.out.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def explain(server: ServerProcess, ctl: ControlClient, job_id: str, caller: SippPhone) -> str:
    """The job, the server's log and SIPp's screen, for assertion messages."""
    job = ctl.call("click2dial.status", job_id)
    caller.close_output()
    sipp_out = (caller.workdir / "sipp.out").read_text(errors="replace")[-3000:]
    return (f"job: {job}\n--- server log ---\n{server.logs()[-4000:]}"
            f"\n--- sipp ---\n{sipp_out}")


def wait_job(ctl: ControlClient, job_id: str, done: Any, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = ctl.call("click2dial.status", job_id)
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


@pytest.mark.parametrize("status", [405, 603])
def test_phone_refusing_refer_is_bridged_to_the_callee(
    server: ServerProcess, agents: UserAgents, callee: Phone, ctl: ControlClient, status: int
) -> None:
    since = agents.log_offset()
    caller = SippPhone(server, "1001", f"c2d_refer_{status}.xml")
    try:
        job_id = ctl.call("click2dial.call", "1001", "1002")
        try:
            incoming = callee.wait_incoming(1, timeout=10)
            incoming.wait_state("CONFIRMED", timeout=10)
        except TimeoutError as exc:
            raise AssertionError(explain(server, ctl, job_id, caller)) from exc
        job = wait_job(ctl, job_id, lambda s: s["bridged"] or s["finished_at"])
        assert job["state"] == "connected", (job, server.logs()[-3000:])
        assert (job["mode"], job["refer_status"], job["bridged"]) == ("3pcc", status, True)

        # The callee's INVITE came through the proxy as a call of 1001, without an offer;
        # the ACK brought it the SIPp caller's answer (flow IV step 8).
        msgs = agents.messages(since)
        invite = next(m for m in msgs if m.direction == "RX"
                      and m.first_line.startswith("INVITE sip:1002"))
        assert f"sip:1001@{DOMAIN}" in invite.header("From")[0]
        assert "\nv=0" not in invite.text, invite.text
        ack = next(m for m in msgs if m.direction == "RX" and m.first_line.startswith("ACK ")
                   and m.header("Call-ID") == invite.header("Call-ID"))
        assert f"m=audio {caller.media_port} " in ack.text, ack.text
        assert "o=sipbill " in ack.text, ack.text
        # The proxy knows the callee's call like any other (billing sees it).
        assert ctl.call("stats")["dialogs"] == 1

        # The callee hangs up: the server answers it and ends the caller's side with BYE.
        time.sleep(0.3)
        incoming.hangup()
        assert incoming.wait_disconnected(timeout=5) == 200
        rc, output = caller.wait(timeout=10)
        assert rc == 0, output
        job = wait_job(ctl, job_id, lambda s: s["finished_at"] is not None)
        assert (job["state"], job["end_reason"], job["bridged"]) == (
            "connected", "callee_hangup", False), job
        assert ctl.call("stats")["dialogs"] == 0
    finally:
        caller.close()


def test_refused_refer_without_fallback_fails(db_dsn: str, agents: UserAgents) -> None:
    srv = ServerProcess(db_dsn, extra={"auth": SIPP_AUTH,
                                             "clicktodial": {"fallback_3pcc": False}}).start()
    caller: SippPhone | None = None
    try:
        caller = SippPhone(srv, "1003", "c2d_refer_405.xml")
        with ControlClient(str(srv.control_socket)) as ctl:
            job_id = ctl.call("click2dial.call", "1003", "1002")
            job = wait_job(ctl, job_id, lambda s: s["finished_at"] is not None)
            assert (job["state"], job["reason"], job["status"]) == (
                "failed", "refer_refused", 405), job
    finally:
        if caller is not None:
            caller.close()
        srv.cleanup()


@pytest.mark.parametrize(("sipfrag", "state", "reason"), [
    ("200 OK", "connected", ""),
    ("486 Busy Here", "failed", "callee_busy"),
])
def test_challenging_phone_gets_credentials_and_reports_the_transfer(
    server: ServerProcess, ctl: ControlClient, sipfrag: str, state: str, reason: str
) -> None:
    caller = SippPhone(server, "1001", "c2d_auth_refer.xml", "-key", "c2duser", "1001",
                       "-key", "c2dpass", "demo1001", "-key", "sipfrag", sipfrag)
    try:
        job_id = ctl.call("click2dial.call", "1001", "1002")
        job = wait_job(ctl, job_id, lambda s: s["finished_at"] is not None)
        rc, output = caller.wait(timeout=10)
        assert rc == 0, output
        assert (job["state"], job["reason"]) == (state, reason), (job, server.logs()[-3000:])
        assert (job["mode"], job["refer_status"]) == ("refer", 202)
        assert job["transfer_status"] == int(sipfrag.split()[0])
        # Connected or not, the dialog with the phone ended with a BYE it answered.
        assert job["bye_status"] == 200, job
    finally:
        caller.close()


def test_phone_that_never_notifies_times_out(server: ServerProcess, ctl: ControlClient) -> None:
    caller = SippPhone(server, "1001", "c2d_refer_silent.xml")
    try:
        start = time.monotonic()
        job_id = ctl.call("click2dial.call", "1001", "1002")
        job = wait_job(ctl, job_id, lambda s: s["finished_at"] is not None)
        assert (job["state"], job["reason"], job["refer_status"]) == (
            "failed", "refer_timeout", 202), job
        assert 2.0 <= time.monotonic() - start < 5.0  # notify_timeout is 2 s here
        assert job["bye_status"] == 200, job
        rc, output = caller.wait(timeout=10)
        assert rc == 0, output
    finally:
        caller.close()


def test_ringing_second_phone_is_cancelled_when_the_first_answers(
    server: ServerProcess, agents: UserAgents, callee: Phone, ctl: ControlClient
) -> None:
    desk = SippPhone(server, "1003", "c2d_ring_only.xml")  # 1003's desk phone: rings only
    mobile = agents.register("1003", "demo1003", server.port, "udp")  # ... and its softphone
    try:
        assert mobile.registered, mobile.reg_events
        job_id = ctl.call("click2dial.call", "1003", "1002")
        job = wait_job(ctl, job_id, lambda s: s["finished_at"] is not None)
        assert (job["state"], job["bye_status"]) == ("connected", 200), (
            job, server.logs()[-3000:])
        rc, output = desk.wait(timeout=10)
        assert rc == 0, output
        call = callee.wait_incoming(1, timeout=5)
        call.wait_state("CONFIRMED", timeout=5)
    finally:
        desk.close()
        # The transferred call must end before the transferee's phone goes: PJSIP keeps a
        # pointer to the original call's (deleted) object as that call's user data.
        for leg in callee.incoming:
            leg.hangup()
            leg.wait_disconnected(timeout=5)
        mobile.close()
