"""Prepaid calls through a real server to a real gateway (a SIPp UAS), callers SIPp and the
test's own user agent: reservation, the cut at the credit limit with a BYE to both legs,
exact settlement for 1/1, 30/6 and 60/60 increments with connect fees, concurrent calls on one
account, refusals (403 locked, 402, 404 unbillable), operator kill, and the Balance-amount
header and the HTTP balance page before, during and after a call.

Rates (tests/billing/e2e.py RATES_CSV): 1 -> 0.0200/min 60/60 + 0.0150; 44 -> 0.0500/min
30/6 + 0.0300; 49 -> 0.1000/min 1/1 + 0.0500; costs round up to the cent.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from sipbill.ctlclient import ControlClient
from sipcore.message import Request, build_response, parse_message
from tests.billing.e2e import (
    Uas,
    account,
    billing_server,
    cents_up,
    charges,
    password,
    set_balance,
    settled_cdr,
    users_csv,
    wait_until,
)
from tests.billing.rawua import RawUA
from tests.support import ServerProcess, free_port, run_sipp

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def gw_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def voicemail_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(db_dsn: str, gw_port: int, voicemail_port: int,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("billing-calls")
    srv = billing_server(db_dsn, workdir, gateway_port=gw_port, billing={
        # Few failures allowed and a short window, so the 429 test does not lock out the rest.
        "balance_http": {"max_failures": 3, "failure_window": 3.0},
        "diversion_uri": f"sip:voicemail@127.0.0.1:{voicemail_port}",
    }).start()
    try:
        yield srv
    finally:
        srv.cleanup()


def ctl(server: ServerProcess, method: str, **params: object) -> object:
    with ControlClient(str(server.control_socket)) as client:
        return client.call(method, **params)


def metric_values(server: ServerProcess) -> dict[tuple[str, str], float]:
    """(sample name, currency label) -> value from a real /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(sample.name, sample.labels.get("currency", "")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def http_get(server: ServerProcess, query: str, accept: str = "") -> tuple[int, str]:
    url = f"http://127.0.0.1:{server.http_port}/balance.php?{query}"
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# ------------------------------------------------------------------------------ the cut
def test_call_is_cut_with_bye_to_both_legs_at_the_credit_limit(
    server: ServerProcess, db_dsn: str, gw_port: int, tmp_path: Path
) -> None:
    caller = "2001"
    set_balance(db_dsn, caller, "0.06")
    # Rate 49, 1/1 with a 0.05 connect fee: 0.01 left pays 0.1000/min * 6 s -> 6 s, cost 0.06.
    with Uas(gw_port) as uas:
        started = time.monotonic()
        res = run_sipp("billing_uac_cut.xml", server.port, "-inf",
                       str(users_csv(tmp_path, caller)), "-s", "+49891234567", timeout=30)
        elapsed = time.monotonic() - started
        assert res.returncode == 0, res.output  # the caller got the server's BYE
        assert uas.wait(15) == 0  # ... and so did the gateway leg
    assert 6 <= elapsed < 12
    cdr = settled_cdr(db_dsn, caller)
    assert cdr["status"] == "answered" and cdr["disconnect_reason"] == "credit_exhausted"
    assert (cdr["max_duration"], cdr["reserved_amount"]) == (6, Decimal("0.06"))
    assert (cdr["billed_duration"], cdr["charged_duration"]) == (6, 6)
    assert cdr["destination"] == "49891234567" and cdr["callee"] == "+49891234567"
    expected = cents_up(Fraction("0.05") + Fraction("0.10") * 6 / 60)  # 0.05 + 0.01
    assert cdr["cost"] == expected == Decimal("0.06")
    assert charges(db_dsn, cdr["call_id"]) == [Decimal("-0.06")]
    state = account(db_dsn, caller)
    assert (state["balance"], state["reserved"]) == (Decimal("0.00"), Decimal(0))
    assert state["journal_ok"]


# ------------------------------------------------------------------------------ settlement
@pytest.mark.parametrize(
    ("caller", "dialled", "fee", "per_minute", "first", "step"),
    [
        ("2002", "+49891234567", "0.05", "0.10", 1, 1),  # 1/1
        ("2003", "00442079460000", "0.03", "0.05", 30, 6),  # 30/6, dialled with 00
        ("2004", "+12125550100", "0.015", "0.02", 60, 60),  # 60/60
    ],
)
def test_caller_hangs_up_and_is_charged_the_exact_cost(
    server: ServerProcess, db_dsn: str, gw_port: int, tmp_path: Path, caller: str,
    dialled: str, fee: str, per_minute: str, first: int, step: int,
) -> None:
    before = account(db_dsn, caller)["balance"]
    with Uas(gw_port) as uas:
        res = run_sipp("uac_call_auth.xml", server.port, "-inf",
                       str(users_csv(tmp_path, caller)), "-s", dialled, "-d", "2000",
                       timeout=30)
        assert res.returncode == 0, res.output
        assert uas.wait(15) == 0
    cdr = settled_cdr(db_dsn, caller)
    assert cdr["status"] == "answered" and cdr["disconnect_reason"] == "caller_bye"
    talked = cdr["billed_duration"]  # whole seconds from the 200 OK to the BYE, rounded up
    assert 2 <= talked <= 4
    # First increment, then whole next increments: 2-4 s -> 2-4 s (1/1), 30 s (30/6),
    # 60 s (60/60).
    billed = first if talked <= first else first + -(-(talked - first) // step) * step
    assert cdr["charged_duration"] == billed
    expected = cents_up(Fraction(fee) + Fraction(per_minute) * billed / 60)
    # 1/1: 0.05 + 0.10 * 3/60 = 0.055 -> 0.06; 30/6: 0.03 + 0.05 * 30/60 = 0.055 -> 0.06;
    # 60/60: 0.015 + 0.02 * 60/60 = 0.035 -> 0.04.
    assert cdr["cost"] == expected
    assert charges(db_dsn, cdr["call_id"]) == [-expected]
    after = account(db_dsn, caller)
    assert after["balance"] == before - expected and after["reserved"] == 0
    assert after["journal_ok"]


def test_two_concurrent_calls_on_one_account_never_overspend(
    server: ServerProcess, db_dsn: str, gw_port: int
) -> None:
    caller = "2005"
    set_balance(db_dsn, caller, "0.06")  # pays one 6 s call on rate 49 (see the cut test)
    results: dict[int, int] = {}
    ready = threading.Barrier(2)

    def dial(n: int) -> None:
        with RawUA(server.port, caller, password(caller)) as ua:
            ready.wait()
            call = ua.invite("+4989111222")
            results[n] = call.status
            if call.status == 200:
                call.wait_bye(20)  # cut at the limit by the server

    with Uas(gw_port):
        threads = [threading.Thread(target=dial, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert sorted(results.values()) == [200, 402]
    assert settled_cdr(db_dsn, caller)["cost"] == Decimal("0.06")
    state = account(db_dsn, caller)
    assert state["balance"] == Decimal("0.00") and state["reserved"] == 0
    assert state["journal_ok"]


# ------------------------------------------------------------------------------ refusals
def test_locked_account_is_refused_403(server: ServerProcess, db_dsn: str) -> None:
    caller = "2006"
    locked = ctl(server, "account.lock", account=caller, reason="manual")
    assert isinstance(locked, dict) and locked["status"] == "locked"
    with RawUA(server.port, caller, password(caller)) as ua:
        call = ua.invite("+4989111222")
        assert (call.status, call.final and call.final.reason) == (403, "Account Locked")
    ctl(server, "account.unlock", account=caller)
    assert account(db_dsn, caller)["reserved"] == 0


def test_funds_short_of_the_first_increment_get_402(server: ServerProcess, db_dsn: str) -> None:
    caller = "2007"
    # Rate 49: the first second with the connect fee costs 0.05 + 0.10/60 -> 0.06 > 0.05.
    set_balance(db_dsn, caller, "0.05")
    with RawUA(server.port, caller, password(caller)) as ua:
        call = ua.invite("+4989111222")
        assert (call.status, call.final and call.final.reason) == (402, "Payment Required")
    assert account(db_dsn, caller)["reserved"] == 0


def test_number_without_a_rate_is_refused_with_a_reason(server: ServerProcess) -> None:
    with RawUA(server.port, "2008", password("2008")) as ua:
        call = ua.invite("+999555123")
        assert call.status == 404
        assert call.header("Reason") == 'SIP;cause=404;text="No Rate For Destination"'


# ------------------------------------------------------------------------------ balance shown
def test_balance_header_and_http_page_before_during_and_after_a_call(
    server: ServerProcess, db_dsn: str, gw_port: int
) -> None:
    caller = "2009"
    secret = password(caller)
    md5 = hashlib.md5(secret.encode()).hexdigest()
    with RawUA(server.port, caller, secret) as ua, Uas(gw_port):
        ok = ua.register()
        assert ok.status == 200 and ok.header("Balance-amount") == "10.00"
        assert http_get(server, f"login={caller}&password={secret}") == (
            200, "<HTML>\n<HEAD><TITLE>Balance</TITLE></HEAD>\n<BODY>\nBalance: 10.00\n"
                 "</BODY>\n</HTML>\n")
        assert json.loads(http_get(server, f"login={caller}&password={md5}",
                                   accept="application/json")[1]) == {
            "balance": "10.00", "currency": "EUR"}

        call = ua.invite("+4989111222")
        assert call.status == 200
        # 10.00 pays more than the 3600 s cap on rate 49, so the cap is reserved:
        # 0.05 + 0.10 * 3600/60 = 6.05, and the phone is shown 10.00 - 6.05.
        assert call.header("Balance-amount") == "3.95"
        assert ua.register().header("Balance-amount") == "3.95"
        assert "Balance: 3.95" in http_get(server, f"login={caller}&password={md5}")[1]
        active = ctl(server, "calls.active")
        assert isinstance(active, list)
        mine = [c for c in active if c["call_id"] == call.call_id]
        assert mine and mine[0]["reserved"] == "6.05" and mine[0]["caller"] == (
            f"{caller}@localhost")
        # Prometheus sees the reservation while the call runs.
        during = metric_values(server)
        assert during.get(("sipbill_billing_reserved_amount", "EUR"), 0) >= 6.05
        assert during.get(("sipbill_billing_reservations", "EUR"), 0) >= 1
        revenue_before = during.get(("sipbill_billing_revenue_total", "EUR"), 0.0)

        time.sleep(1.0)
        assert call.bye().status == 200
    cdr = settled_cdr(db_dsn, caller)
    talked = cdr["billed_duration"]
    assert 1 <= talked <= 3
    cost = cents_up(Fraction("0.05") + Fraction("0.10") * talked / 60)  # 1-3 s -> 0.06
    assert cdr["cost"] == cost
    shown = f"{Decimal('10.00') - cost:.2f}"
    after = metric_values(server)
    assert after.get(("sipbill_billing_revenue_total", "EUR"), 0.0) >= revenue_before + float(cost)
    with RawUA(server.port, caller, secret) as ua:
        assert ua.register().header("Balance-amount") == shown
    assert f"Balance: {shown}" in http_get(server, f"login={caller}&password={secret}")[1]


def test_http_balance_refuses_wrong_credentials_and_rate_limits(server: ServerProcess) -> None:
    assert http_get(server, "login=2010&password=wrong") == (403, "Forbidden\n")
    assert http_get(server, "login=nobody&password=demo2010")[0] == 403
    assert http_get(server, "login=2010&password=" + "0" * 32)[0] == 403
    # Three failures within 3 s: the source is blocked, even with the right password.
    assert http_get(server, "login=2010&password=demo2010")[0] == 429
    time.sleep(3.2)
    status, body = http_get(server, "login=2010&password=demo2010")
    assert status == 200 and "Balance: 10.00" in body


# ------------------------------------------------------------------------------ operator kill
def test_operator_kills_a_call_and_it_is_settled(
    server: ServerProcess, db_dsn: str, gw_port: int, tmp_path: Path
) -> None:
    caller = "2011"
    before = account(db_dsn, caller)["balance"]
    result: dict[str, object] = {}
    with Uas(gw_port) as uas:
        sipp = threading.Thread(target=lambda: result.update(res=run_sipp(
            "billing_uac_cut.xml", server.port, "-inf", str(users_csv(tmp_path, caller)),
            "-s", "+12125550100", timeout=30)))
        sipp.start()

        def answered() -> list[dict[str, object]]:
            active = ctl(server, "calls.active")
            assert isinstance(active, list)
            return [c for c in active if c["caller"] == f"{caller}@localhost" and c["answered"]]

        wait_until(answered, 10, "the call to be answered")
        call_id = answered()[0]["call_id"]
        settled = ctl(server, "calls.kill", call_id=call_id)
        sipp.join(20)
        res = result["res"]
        assert getattr(res, "returncode", None) == 0, getattr(res, "output", res)
        assert uas.wait(15) == 0
    # 60/60 with a 0.015 connect fee: 0.015 + 0.02 = 0.035 -> 0.04.
    assert isinstance(settled, dict) and settled["cost"] == "0.04"
    cdr = settled_cdr(db_dsn, caller)
    assert cdr["disconnect_reason"] == "killed" and cdr["cost"] == Decimal("0.04")
    assert account(db_dsn, caller)["balance"] == before - Decimal("0.04")


# ------------------------------------------------------------------------------ voicemail
def test_calls_to_a_locked_account_go_to_voicemail(
    server: ServerProcess, voicemail_port: int
) -> None:
    ctl(server, "account.lock", account="1003", reason="low_balance")
    vm = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    vm.bind(("127.0.0.1", voicemail_port))
    vm.settimeout(5)
    try:
        with RawUA(server.port, "1001", password("1001")) as ua:
            call = ua.invite("1003", wait=False)  # 1003 is not even registered
            try:
                data, hop = vm.recvfrom(65535)
            except TimeoutError:
                raise AssertionError(f"{call.final!r}\n" + server.logs()[-3000:]) from None
            invite = parse_message(data)
            assert isinstance(invite, Request) and invite.method == "INVITE"
            assert invite.uri == f"sip:voicemail@127.0.0.1:{voicemail_port}"
            assert invite.header("Diversion") == "<sip:1003@localhost>;reason=unavailable"
            vm.sendto(build_response(invite, 486, "Mailbox Full", to_tag="vm1"), hop)
            assert call.wait_final().status == 486
    finally:
        vm.close()
        ctl(server, "account.unlock", account="1003")
