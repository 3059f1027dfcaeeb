"""Missed calls (issue 5), seen with real phones (pjsua2): a call to a local subscriber that
is offline (480), rings until the caller gives up (CANCEL, 487), is busy (486) or declined
(603) is recorded for the callee from the same CDRs billing writes, listed newest first with
paging through the control socket, and marked seen; an answered call is not missed. The
phones also see their balance in the 200 OK to REGISTER and to INVITE (seed 000).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sipbill.ctlclient import ControlClient
from tests.billing.e2e import billing_server, password, wait_until
from tests.pjsua import Phone, UserAgents
from tests.support import ServerProcess, free_port

pytestmark = pytest.mark.timeout(60, method="thread")


@pytest.fixture(scope="module")
def server(db_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = billing_server(db_dsn, tmp_path_factory.mktemp("billing-missed"),
                         gateway_port=free_port(),
                         users=["1001", "1002", "1003", "1004", "1005"]).start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture
def phones(agents: UserAgents) -> Iterator[list[Phone]]:
    made: list[Phone] = []
    try:
        yield made
    finally:
        for phone in reversed(made):
            phone.close()


def register(agents: UserAgents, phones: list[Phone], server: ServerProcess, user: str,
             answer_code: int = 200) -> Phone:
    phone = agents.register(user, password(user), server.port, answer_code=answer_code)
    phones.append(phone)
    assert phone.registered, agents.log_tail()
    return phone


def missed(server: ServerProcess, user: str, **params: Any) -> list[dict[str, Any]]:
    with ControlClient(str(server.control_socket)) as ctl:
        result = ctl.call("missed.list", user=user, **params)
    assert isinstance(result, list)
    return result


def test_offline_unanswered_busy_and_declined_calls_are_missed(
    server: ServerProcess, agents: UserAgents, phones: list[Phone]
) -> None:
    since = agents.log_offset()
    caller = register(agents, phones, server, "1001")
    # The registrar's 200 OK, as the phone received it, carries the balance.
    ok = [m for m in agents.messages(since) if m.direction == "RX"
          and m.first_line.startswith("SIP/2.0 200") and m.header("CSeq")
          and m.header("CSeq")[0].endswith("REGISTER")]
    assert ok and ok[-1].header("Balance-amount") == ["10.00"]

    # 1002 is not registered: offline (480).
    out = caller.call("sip:1002@localhost")
    assert out.wait_disconnected(10) == 480

    # 1003 rings until the caller gives up: CANCEL, 487.
    ringing = register(agents, phones, server, "1003", answer_code=180)
    out = caller.call("sip:1003@localhost")
    out.wait_state("EARLY", 10)
    ringing.wait_incoming()
    out.hangup()
    assert out.wait_disconnected(10) == 487

    # 1004 is busy, then declines; 1005 answers (not a missed call).
    busy = register(agents, phones, server, "1004", answer_code=486)
    out = caller.call("sip:1004@localhost")
    assert out.wait_disconnected(10) == 486
    busy.close()
    phones.remove(busy)
    register(agents, phones, server, "1004", answer_code=603)
    out = caller.call("sip:1004@localhost")
    assert out.wait_disconnected(10) == 603
    since = agents.log_offset()
    register(agents, phones, server, "1005")
    out = caller.call("sip:1005@localhost")
    out.wait_state("CONFIRMED", 10)
    answered = [m for m in agents.messages(since) if m.direction == "RX"
                and m.first_line.startswith("SIP/2.0 200") and m.header("CSeq")
                and m.header("CSeq")[0].endswith("INVITE")]
    # A call between subscribers is free: the balance shown is unchanged.
    assert answered and answered[-1].header("Balance-amount") == ["10.00"]
    out.hangup()
    out.wait_disconnected(10)

    wait_until(lambda: len(missed(server, "1004")) == 2, 10, "1004's missed calls")
    wait_until(lambda: missed(server, "1003") != [], 10, "1003's missed call")
    (offline,) = missed(server, "1002")
    assert (offline["caller"], offline["status"]) == ("1001@localhost", "offline")
    (unanswered,) = missed(server, "1003")
    assert unanswered["status"] == "cancelled"
    newest, oldest = missed(server, "1004@localhost")
    assert (newest["status"], oldest["status"]) == ("rejected", "busy")  # newest first
    assert newest["at"] > oldest["at"] and newest["reason"].startswith("603")
    assert [m["id"] for m in missed(server, "1004", offset=1, limit=1)] == [oldest["id"]]
    assert missed(server, "1005") == []

    with ControlClient(str(server.control_socket)) as ctl:
        assert ctl.call("missed.seen", user="1004", ids=[oldest["id"]]) == 1
        assert ctl.call("missed.seen", user="1004") == 1
    assert missed(server, "1004", unseen_only=True) == []
    assert [m["seen"] for m in missed(server, "1004")] == [True, True]
