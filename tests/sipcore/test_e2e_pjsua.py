"""Real phones against a real ``sipbill serve``: pjsua2 (PJSIP 2.14) end to end.

Issue 3's "done when", as a phone sees it: a pjsua2 account registers with MD5 digest
(RFC 3261 §22.4) although the server offers SHA-256 and MD5 together (RFC 8760 §2.3), over UDP
and over TCP, and sees its binding in the registrar's 200 OK (§10.3 step 8); a second account
calls it through the proxy (§16) and the call connects and ends cleanly (BYE, §15); a busy,
an offline and an unknown callee give the caller 486, 480 and 404; a caller giving up while
it rings CANCELs the callee's INVITE (487); a wrong password never registers; a registration
survives a server restart.  SHA-256 is proven by the test's own client (:class:`RawSip`),
which computes the digest with :mod:`sipcore.digest` -- PJSIP 2.14 has no SHA-256.

Every test is bounded by a few seconds of waiting; a deadlock inside PJSIP (which would hang
pytest, as a thread stuck in C never sees the timeout signal) is cut by pytest-timeout's
thread method.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipcore.digest import build_authorization, parse_challenge, select_challenge
from sipcore.headers import parse_name_addr
from sipcore.message import Response, parse_message
from sipcore.uri import SipUri, parse_uri
from tests.pjsua import DOMAIN, CallHandle, Phone, UserAgents, wait_for
from tests.support import ServerProcess

pytestmark = pytest.mark.timeout(45, method="thread")

USERS = ("1001", "1002", "1003", "2001", "2002", "2003")


def password(user: str) -> str:
    return f"demo{user}"


# ------------------------------------------------------------------------------ fixtures
# ``agents`` (the process's one pjsua2 endpoint) lives in tests/conftest.py: every test
# module with phones shares it, since pjsua2 allows one Endpoint per process.


def _server(db_dsn: str, *, port: int = 0, http_port: int = 0,
            workdir: Path | None = None) -> ServerProcess:
    """A server seeded with :data:`USERS`; give port/workdir of a stopped one to restart it."""
    extra = {"seed": {"subscribers": [{"username": u, "password": password(u)} for u in USERS]}}
    if workdir is None:
        return ServerProcess(db_dsn, extra=extra, port=port, http_port=http_port)
    return ServerProcess(db_dsn, extra=extra, port=port, http_port=http_port, workdir=workdir)


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    srv = _server(db_dsn).start()
    try:
        yield srv
    finally:
        srv.cleanup()


class Phones:
    """The phones of one test, closed (hung up, unregistered, deleted) when it ends."""

    def __init__(self, agents: UserAgents) -> None:
        self.agents = agents
        self.made: list[Phone] = []

    def register(self, user: str, server: ServerProcess, transport: str = "udp", *,
                 secret: str | None = None, answer_code: int = 200) -> Phone:
        phone = self.agents.register(user, secret if secret is not None else password(user),
                                     server.port, transport, answer_code=answer_code)
        self.made.append(phone)
        return phone

    def unregistered(self, user: str, server: ServerProcess, transport: str = "udp") -> Phone:
        phone = self.agents.phone(user, password(user), server.port, transport)
        self.made.append(phone)
        return phone

    def close(self) -> None:
        for phone in reversed(self.made):
            phone.close()
        self.made.clear()


@pytest.fixture
def phones(agents: UserAgents) -> Iterator[Phones]:
    errors_before = len(agents.errors)
    made = Phones(agents)
    try:
        yield made
    finally:
        all_made = list(made.made)  # close() empties the list
        made.close()
    new_errors = agents.errors[errors_before:]
    assert not new_errors, "exceptions in pjsua2 callbacks:\n" + "\n".join(new_errors)
    misrouted = [m for p in all_made for m in p.misrouted]
    assert not misrouted, f"INVITEs for another user reached a phone: {misrouted}"


def diagnose(server: ServerProcess, agents: UserAgents, lines: int = 60) -> str:
    """Server log and PJSIP log tails, for assertion messages."""
    server_tail = "\n".join(server.logs().splitlines()[-lines:])
    return f"\n--- server log ---\n{server_tail}\n--- pjsua log ---\n{agents.log_tail(lines)}"


# ------------------------------------------------------------------------------ a raw client
def header_lines(raw: bytes, name: str) -> list[str]:
    """Values of every ``name`` header line, unsplit (a digest challenge contains commas)."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    prefix = name.lower() + ":"
    return [line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:]
            if line.lower().startswith(prefix)]


class RawSip:
    """The test's own UDP client: REGISTERs with a digest it computes itself.

    It exists to prove what PJSIP 2.14 cannot: a SHA-256 answer (RFC 8760) is accepted.  It
    also lets a test query an AoR's bindings (REGISTER without Contact, RFC 3261 §10.2.3).
    """

    def __init__(self, server_port: int, user: str, secret: str, timeout: float = 3.0) -> None:
        self.server = ("127.0.0.1", server_port)
        self.user = user
        self.secret = secret
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(timeout)
        self.port = int(self.sock.getsockname()[1])
        self.call_id = secrets.token_hex(8) + "@raw.test"
        self.tag = secrets.token_hex(4)
        self.cseq = 0
        self.ruri = f"sip:{DOMAIN}"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def contact(self) -> str:
        return f"<sip:{self.user}@127.0.0.1:{self.port}>"

    def register(self, *, contact: str | None = None, expires: int | None = None,
                 authorization: str | None = None) -> Response:
        """Send one REGISTER (a new CSeq, same Call-ID) and return its final response."""
        self.cseq += 1
        branch = "z9hG4bK" + secrets.token_hex(8)
        lines = [
            f"REGISTER {self.ruri} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:{self.user}@{DOMAIN}>;tag={self.tag}",
            f"To: <sip:{self.user}@{DOMAIN}>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} REGISTER",
            "User-Agent: sipbill-e2e-raw",
        ]
        if contact is not None:
            lines.append(f"Contact: {contact}")
        if expires is not None:
            lines.append(f"Expires: {expires}")
        if authorization is not None:
            lines.append(f"Authorization: {authorization}")
        lines.append("Content-Length: 0")
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), self.server)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            data = self.sock.recv(65535)
            msg = parse_message(data)
            assert isinstance(msg, Response), data
            if msg.call_id != self.call_id or msg.cseq.number != self.cseq:
                continue  # a late retransmission's answer
            if msg.status >= 200:
                return msg
        raise TimeoutError(f"no final response to REGISTER CSeq {self.cseq}")

    def register_with_digest(self, algorithm: str, *, contact: str | None = None,
                             expires: int | None = None) -> tuple[Response, Response]:
        """REGISTER, answer the 401's ``algorithm`` challenge: (the 401, the final answer)."""
        challenge_response = self.register(contact=contact, expires=expires)
        assert challenge_response.status == 401, challenge_response.raw
        offered = header_lines(challenge_response.raw, "WWW-Authenticate")
        challenge = select_challenge(offered, algorithms=(algorithm,))
        assert challenge is not None, f"no {algorithm} challenge in {offered}"
        assert challenge.algorithm == algorithm
        auth = build_authorization(challenge, method="REGISTER", uri=self.ruri,
                                   username=self.user, password=self.secret)
        return challenge_response, self.register(contact=contact, expires=expires,
                                                 authorization=auth)


def bindings(response: Response) -> dict[tuple[str | None, str, int | None], int]:
    """The 200 OK's Contacts as (user, host, port) -> expires."""
    out: dict[tuple[str | None, str, int | None], int] = {}
    for contact in response.contacts:
        uri = parse_uri(contact.uri)
        assert isinstance(uri, SipUri), contact
        expires = contact.params.get("expires")
        assert expires is not None and expires.isdigit(), f"no expires on {contact}"
        out[(uri.user, uri.host, uri.port)] = int(expires)
    return out


def query_bindings(server: ServerProcess, user: str) -> dict[tuple[str | None, str, int | None],
                                                              int]:
    """An AoR's bindings as the registrar lists them to an authenticated query."""
    with RawSip(server.port, user, password(user)) as raw:
        _, ok = raw.register_with_digest("SHA-256")
        assert ok.status == 200, ok.raw
        return bindings(ok)


def bye_answered_200(agents: UserAgents, call: CallHandle) -> bool:
    """Whether the caller's PJSIP received a 200 to its BYE (the UAC BYE transaction ends
    after pjsua has already reported the call DISCONNECTED, so only the wire shows it)."""
    return any(
        m.direction == "RX" and m.first_line.startswith("SIP/2.0 200")
        and m.header("Call-ID") == [call.sip_call_id]
        and m.header("CSeq")[:1] != [] and m.header("CSeq")[0].endswith("BYE")
        for m in agents.messages()
    )


def phone_binding(phone: Phone) -> tuple[str, str, int]:
    host, port = phone.contact_host_port
    return (phone.user, host, port)


# ------------------------------------------------------------------------------ registration
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_phone_registers_with_md5_and_sees_its_binding(
    server: ServerProcess, agents: UserAgents, phones: Phones, transport: str
) -> None:
    since = agents.log_offset()
    phone = phones.register("1001", server, transport)
    assert phone.registered, f"{phone.reg_events}{diagnose(server, agents)}"
    first = phone.reg_events[0]
    assert 0 < first.expiration <= 300

    # On the wire: both challenges were offered, PJSIP answered the MD5 one.
    sent = [m for m in agents.messages(since)
            if m.direction == "TX" and m.first_line.startswith("REGISTER ")
            and f"sip:1001@{DOMAIN}" in "".join(m.header("From"))]
    received_401 = [m for m in agents.messages(since)
                    if m.direction == "RX" and m.first_line.startswith("SIP/2.0 401")]
    assert received_401, diagnose(server, agents)
    algorithms = {parse_challenge(v).algorithm for v in received_401[0].header("WWW-Authenticate")}
    assert {"SHA-256", "MD5"} <= algorithms
    answers = [v for m in sent for v in m.header("Authorization")]
    assert answers and all("algorithm=MD5" in a for a in answers), answers

    # The Contact PJSIP registered: its UDP transport's address; over TCP the address of the
    # connection it opened (PJSIP expects the registrar to reuse that connection).
    contact = parse_uri(parse_name_addr(sent[-1].header("Contact")[0]).uri)
    assert isinstance(contact, SipUri)
    mine = (contact.user, contact.host, contact.port)
    if transport == "udp":
        assert mine == phone_binding(phone)

    # The registrar's 200 OK lists the binding, with its expiry.
    ok = parse_message(first.response.encode())
    assert isinstance(ok, Response)
    listed = bindings(ok)
    assert mine in listed, (listed, mine)
    assert 0 < listed[mine] <= 300

    # And anyone authenticated as 1001 sees it too.
    assert mine in query_bindings(server, "1001")
    # The Via the registrar answered with gave PJSIP no reason to rewrite and re-register.
    assert len(phone.reg_events) == 1, phone.reg_events

    # Unregistering removes it.
    event = phone.unregister()
    assert event is not None and event.code == 200, phone.reg_events
    assert mine not in query_bindings(server, "1001")


def test_sha256_digest_by_our_own_client(server: ServerProcess) -> None:
    # 2003, not 1003: a binding left behind by a failure here must not make 1003 reachable.
    with RawSip(server.port, "2003", password("2003")) as raw:
        challenge, ok = raw.register_with_digest("SHA-256", contact=raw.contact, expires=120)
        offered = [parse_challenge(v) for v in header_lines(challenge.raw, "WWW-Authenticate")]
        assert [c.algorithm for c in offered][:2] == ["SHA-256", "MD5"], offered
        assert all("auth" in c.qop for c in offered)
        assert len({c.nonce for c in offered}) == 1, "one nonce shared by both challenges"
        assert ok.status == 200, ok.raw
        listed = bindings(ok)
        assert listed.get(("2003", "127.0.0.1", raw.port), 0) > 0, listed

        _, gone = raw.register_with_digest("SHA-256", contact="*", expires=0)
        assert gone.status == 200, gone.raw
        assert ("2003", "127.0.0.1", raw.port) not in bindings(gone)


def test_wrong_password_never_registers(
    server: ServerProcess, agents: UserAgents, phones: Phones
) -> None:
    phone = phones.register("1002", server, secret="not-the-password")
    # Every 401 carries a fresh nonce, which PJSIP 2.14 treats like a stale one: it answers up
    # to three more times (PJSIP_EAUTHSTALECOUNT), then gives up on the last 401.  No binding.
    assert phone.reg_code == 401, f"{phone.reg_events}{diagnose(server, agents)}"
    time.sleep(0.5)
    assert not any(200 <= e.code < 300 for e in phone.reg_events), phone.reg_events
    assert phone_binding(phone) not in query_bindings(server, "1002")


def test_repeated_failures_lock_the_source_out(
    db_dsn: str, agents: UserAgents, phones: Phones
) -> None:
    # Its own server: the lock-out covers the whole source address, 127.0.0.1, for minutes.
    srv = _server(db_dsn).start()
    try:
        statuses: list[int] = []
        with RawSip(srv.port, "2003", "wrong") as raw:
            for _ in range(60):
                challenge = raw.register(contact=raw.contact, expires=60)
                if challenge.status != 401:  # a blocked source is refused before any challenge
                    statuses.append(challenge.status)
                    break
                offered = header_lines(challenge.raw, "WWW-Authenticate")
                chosen = select_challenge(offered, algorithms=("MD5",))
                assert chosen is not None, offered
                auth = build_authorization(chosen, method="REGISTER", uri=raw.ruri,
                                           username=raw.user, password=raw.secret)
                answer = raw.register(contact=raw.contact, expires=60, authorization=auth)
                statuses.append(answer.status)
                if answer.status != 401:
                    break
        assert statuses[-1] == 403, f"{statuses}{diagnose(srv, agents)}"
        assert set(statuses[:-1]) == {401}, statuses
        assert len(statuses) > 3, f"blocked after too few failures: {statuses}"
        # Now even the right password, from a real phone, is refused from this source.
        phone = phones.register("2001", srv)
        assert phone.reg_code == 403, f"{phone.reg_events}{diagnose(srv, agents)}"
    finally:
        phones.close()
        srv.cleanup()


# ------------------------------------------------------------------------------ calls
@pytest.mark.parametrize(("caller_transport", "callee_transport"),
                         [("udp", "udp"), ("tcp", "udp"), ("udp", "tcp")])
def test_call_connects_and_ends_cleanly(
    server: ServerProcess, agents: UserAgents, phones: Phones,
    caller_transport: str, callee_transport: str,
) -> None:
    callee = phones.register("1001", server, callee_transport)
    caller = phones.register("1002", server, caller_transport)
    assert callee.registered and caller.registered, diagnose(server, agents)

    out = caller.call(f"sip:1001@{DOMAIN}")
    try:
        incoming = callee.wait_incoming()
        out.wait_state("CONFIRMED")
        incoming.wait_state("CONFIRMED")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}{diagnose(server, agents)}") from None
    assert "EARLY" in out.state_names, out.states  # the 180 came through the proxy

    out.hangup()
    out.wait_disconnected()
    incoming.wait_disconnected()
    assert ("UAS", "BYE", 200) in incoming.transactions, incoming.transactions
    wait_for(lambda: bye_answered_200(agents, out), 3.0, what="the 200 to the caller's BYE")
    assert len(callee.reg_events) == 1, f"re-registered during the call: {callee.reg_events}"


def test_busy_callee_gives_486(server: ServerProcess, agents: UserAgents,
                               phones: Phones) -> None:
    callee = phones.register("1001", server, answer_code=486)
    caller = phones.register("1002", server)
    out = caller.call(f"sip:1001@{DOMAIN}")
    assert out.wait_disconnected() == 486, f"{out.states}{diagnose(server, agents)}"
    assert not out.confirmed
    # The 486 is the phone's own answer, relayed: the INVITE did reach it.
    assert callee.wait_incoming().wait_disconnected() == 486


def test_caller_gives_up_while_it_rings(server: ServerProcess, agents: UserAgents,
                                        phones: Phones) -> None:
    callee = phones.register("1001", server, answer_code=180)
    caller = phones.register("1002", server)
    out = caller.call(f"sip:1001@{DOMAIN}")
    try:
        incoming = callee.wait_incoming()
        out.wait_state("EARLY")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}{diagnose(server, agents)}") from None
    out.hangup()  # CANCEL (RFC 3261 §9), relayed by the proxy to the ringing phone (§16.10)
    assert out.wait_disconnected() == 487, f"{out.states}{diagnose(server, agents)}"
    assert incoming.wait_disconnected() == 487, incoming.states
    assert ("UAS", "CANCEL", 200) in incoming.transactions, incoming.transactions
    assert not out.confirmed and not incoming.confirmed


def test_offline_subscriber_gives_480(server: ServerProcess, agents: UserAgents,
                                      phones: Phones) -> None:
    caller = phones.register("1002", server)
    out = caller.call(f"sip:1003@{DOMAIN}")
    assert out.wait_disconnected() == 480, f"{out.states}{diagnose(server, agents)}"


def test_unknown_user_gives_404(server: ServerProcess, agents: UserAgents,
                                phones: Phones) -> None:
    caller = phones.register("1002", server)
    out = caller.call(f"sip:nosuchuser@{DOMAIN}")
    assert out.wait_disconnected() == 404, f"{out.states}{diagnose(server, agents)}"


# ------------------------------------------------------------------------------ restart
def test_registration_survives_a_server_restart(
    db_dsn: str, agents: UserAgents, phones: Phones
) -> None:
    first = _server(db_dsn).start()
    second: ServerProcess | None = None
    try:
        callee = phones.register("2001", first)
        assert callee.registered, diagnose(first, agents)
        assert first.stop() == 0, first.logs()

        # Same port, same data directory, same database: a restarted server.
        second = _server(db_dsn, port=first.port, http_port=first.http_port,
                         workdir=first.workdir).start()
        caller = phones.unregistered("2002", second)
        out = caller.call(f"sip:2001@{DOMAIN}")
        try:
            incoming = callee.wait_incoming()
            out.wait_state("CONFIRMED")
            incoming.wait_state("CONFIRMED")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}{diagnose(second, agents)}") from None
        assert len(callee.reg_events) == 1, f"the phone re-registered: {callee.reg_events}"
        out.hangup()
        out.wait_disconnected()
        incoming.wait_disconnected()
        wait_for(lambda: ("UAS", "BYE", 200) in incoming.transactions, 2.0, what="BYE 200")
    finally:
        phones.close()  # unregister through the live server, so no binding outlives the test
        if second is not None:
            second.cleanup()
        first.cleanup()
