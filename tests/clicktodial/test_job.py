"""The click-to-dial user agent in process, against scripted phones on loopback UDP.

The server side is the real thing minus the database: a :class:`~sipcore.stack.SipStack` with
short timers, the proxy core running the pipeline (so requests to our dialogs go through the
IN_DIALOG stage as in ``sipbill serve``), the :class:`~sipcore.uac.UserAgentClient` and the
:class:`~clicktodial.dialog.DialogRouter`. The phones are UDP sockets the test drives message
by message, which lets it do what real phones do only sometimes: NOTIFY before the 202
(RFC 3515 §2.4.4 allows it), hang up in the middle of a transfer (RFC 5057: the subscription
outlives the INVITE usage), challenge with another realm, re-send a 2xx whose ACK got lost,
re-INVITE while held, and, in the 3PCC bridge, re-INVITE and hang up through the server.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, cast

import pytest

from clicktodial.dialog import DialogRouter, DigestAnswerer
from clicktodial.job import Job, JobEnv, JobRunner
from clicktodial.settings import ClickToDialSettings
from sipcore.digest import digest_response, ha1, parse_credentials
from sipcore.location import Binding
from sipcore.message import Request, Response, build_request, build_response, parse_message
from sipcore.pipeline import EventBus, Pipeline, Stage
from sipcore.proxy import LocalIdentity, ProxyCore
from sipcore.stack import SipStack
from sipcore.transaction import TimerSettings, TransactionLayer
from sipcore.transport import Transports
from sipcore.transport_types import Peer
from sipcore.uac import UserAgentClient

pytestmark = pytest.mark.timeout(30)

CALLER = "sip:1001@localhost"
CALLEE = "sip:1002@localhost"
SDP_A = (b"v=0\r\no=phone 7 7 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
         b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
SDP_B = (b"v=0\r\no=callee 9 9 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
         b"m=audio 50000 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n")


# ------------------------------------------------------------------------------ phones
class Phone(asyncio.DatagramProtocol):
    """A UDP endpoint the test scripts: every message it gets lands in :attr:`inbox`."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.inbox: asyncio.Queue[Request | Response] = asyncio.Queue()
        self.seen: set[tuple[str, str]] = set()
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.tag = secrets.token_hex(4)
        self.cseq = 100
        self.server: Peer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = int(self.transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str | Any, ...]) -> None:
        self.inbox.put_nowait(parse_message(data))

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@127.0.0.1:{self.port}"

    def binding(self) -> Binding:
        return Binding(f"sip:{self.user}@localhost", self.contact,
                       Peer("UDP", "127.0.0.1", self.port), time.time() + 3600)

    def send(self, data: bytes) -> None:
        assert self.transport is not None and self.server is not None
        self.transport.sendto(data, (self.server.host, self.server.port))

    async def next(self, timeout: float = 3.0) -> Request | Response:
        """The next message that is not a retransmission of one already taken."""
        while True:
            msg = await asyncio.wait_for(self.inbox.get(), timeout)
            if isinstance(msg, Request):
                key = (msg.top_via.branch or "", msg.method)
                if key in self.seen and msg.method != "ACK":
                    continue
                self.seen.add(key)
            return msg

    async def request(self, method: str, timeout: float = 3.0) -> Request:
        msg = await self.next(timeout)
        while isinstance(msg, Response) or msg.method != method:
            if isinstance(msg, Request) and msg.method == "ACK" and method != "ACK":
                msg = await self.next(timeout)  # ACKs of non-2xx finals are absorbed here
                continue
            raise AssertionError(f"expected {method}, got {msg!r}")
        return msg

    async def response(self, timeout: float = 3.0) -> Response:
        """The next response other than 100 Trying."""
        while True:
            msg = await self.next(timeout)
            assert isinstance(msg, Response), msg
            if msg.status != 100:
                return msg

    async def nothing(self, seconds: float) -> None:
        try:
            msg = await asyncio.wait_for(self.inbox.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected nothing, got {msg!r}")

    def answer(self, req: Request, status: int, body: bytes = b"",
               headers: list[tuple[str, str]] | None = None) -> None:
        hdrs = [("Contact", f"<{self.contact}>"), *(headers or [])]
        if body:
            hdrs.append(("Content-Type", "application/sdp"))
        self.send(build_response(req, status, to_tag=self.tag, headers=hdrs, body=body))

    def in_dialog(self, invite: Request, method: str, *, body: bytes = b"",
                  content_type: str = "application/sdp",
                  headers: list[tuple[str, str]] | None = None) -> Request:
        """A request from this phone in the dialog the server's ``invite`` created."""
        self.cseq += 1
        hdrs = [
            ("Via", f"SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK{secrets.token_hex(6)}"
                    ";rport"),
            ("From", f"<sip:{self.user}@localhost>;tag={self.tag}"),
            ("To", invite.header("From") or ""),
            ("Call-ID", invite.call_id),
            ("CSeq", f"{self.cseq} {method}"),
            ("Contact", f"<{self.contact}>"),
            *(headers or []),
        ]
        if body:
            hdrs.append(("Content-Type", content_type))
        data = build_request(method, invite.contacts[0].uri, hdrs, body)
        self.send(data)
        req = parse_message(data)
        assert isinstance(req, Request)
        return req

    def notify(self, invite: Request, sipfrag: str, state: str = "active") -> Request:
        return self.in_dialog(invite, "NOTIFY", body=f"SIP/2.0 {sipfrag}\r\n".encode(),
                              content_type="message/sipfrag;version=2.0",
                              headers=[("Event", "refer"), ("Subscription-State", state)])


# ------------------------------------------------------------------------------ the server
@dataclass
class Server:
    env: JobEnv
    stack: SipStack
    tasks: set[asyncio.Task[Any]]
    done: list[Job]

    def start(self, phones: list[Phone], *, settings: ClickToDialSettings | None = None,
              password: str = "demo1001", callee: Phone | None = None) -> Job:
        env = self.env
        if settings is not None:
            env = replace(env, settings=settings)
        if callee is not None:
            # In this harness the "proxy" the 3PCC callee leg goes through is the callee.
            env = replace(env, proxy_peer=Peer("UDP", "127.0.0.1", callee.port))
            callee.server = self.env.proxy_peer
        for phone in phones:
            phone.server = self.env.proxy_peer
        job = Job(id=secrets.token_hex(4), caller=CALLER, callee=CALLEE)
        job.set_state("calling_caller")
        creds = DigestAnswerer("1001", "localhost",
                               lambda alg: ha1("1001", "localhost", password, alg))
        runner = JobRunner(job, env, [p.binding() for p in phones], creds, self.done.append)
        env.spawn(runner.run())
        return job

    async def finished(self, job: Job, timeout: float = 5.0) -> Job:
        deadline = time.monotonic() + timeout
        while job not in self.done:
            if time.monotonic() > deadline:
                raise AssertionError(f"job not finished: {job.as_dict()}")
            await asyncio.sleep(0.01)
        return job


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    layer = TransactionLayer(TimerSettings(T1=0.1, T2=0.4, T4=0.5))
    stack = SipStack(lambda st: Transports(st), layer)
    host, port = await stack.transports.listen_udp("127.0.0.1", 0)
    identity = LocalIdentity(["localhost"], [("UDP", host, port)])
    pipeline = Pipeline()
    proxy = ProxyCore(stack, pipeline, EventBus(), identity)
    router = DialogRouter()
    pipeline.add(Stage.IN_DIALOG, router, name="clicktodial.in_dialog", first=True)
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    settings = ClickToDialSettings(ring_timeout=2.0, notify_timeout=1.0, transfer_timeout=2.0,
                                   callee_timeout=2.0)
    env = JobEnv(settings=settings, uac=UserAgentClient(stack, identity), router=router,
                 spawn=spawn, proxy_peer=Peer("UDP", host, port),
                 from_server="sip:click2dial@localhost")
    srv = Server(env, stack, tasks, [])
    try:
        yield srv
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.close()
        await stack.close()


@pytest.fixture
async def phone_factory() -> AsyncIterator[Callable[[str], Coroutine[Any, Any, Phone]]]:
    made: list[Phone] = []

    async def make(user: str) -> Phone:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(lambda: Phone(user),
                                                       local_addr=("127.0.0.1", 0))
        made.append(proto)
        return proto

    yield make
    for phone in made:
        if phone.transport is not None:
            phone.transport.close()


async def answered_call(phone: Phone) -> Request:
    """Take the server's INVITE, answer it, take the ACK; returns the INVITE."""
    invite = await phone.request("INVITE")
    phone.answer(invite, 200, SDP_A)
    await phone.request("ACK")
    return invite


# ------------------------------------------------------------------------------ REFER path
async def test_notify_before_202_and_a_caller_hangup_mid_transfer(
    server: Server, phone_factory: Callable[[str], Coroutine[Any, Any, Phone]]
) -> None:
    phone = await phone_factory("1001")
    job = server.start([phone])
    invite = await answered_call(phone)
    assert b"c=IN IP4 0.0.0.0" in invite.body and b"a=sendonly" in invite.body
    assert invite.from_addr.display == "Click-to-dial" and invite.from_addr.uri == CALLEE
    refer = await phone.request("REFER")
    assert refer.header("Refer-To") == f"<{CALLEE}>"
    assert refer.header("Referred-By") == f"<{CALLER}>"
    # RFC 3515 §2.4.4: the first NOTIFY may overtake the 202.
    phone.notify(invite, "100 Trying")
    ok = await phone.response()
    assert ok.status == 200 and ok.cseq.method == "NOTIFY" and ok.contacts
    phone.answer(refer, 202)
    # The user hangs up the server's call while the new one rings: the INVITE usage ends,
    # the subscription does not (RFC 5057 §3.1, §4.1), so the final NOTIFY still counts.
    phone.in_dialog(invite, "BYE")
    assert (await phone.response()).status == 200
    phone.notify(invite, "200 OK", "terminated;reason=noresource")
    assert (await phone.response()).status == 200
    await server.finished(job)
    assert (job.state, job.transfer_status, job.bye_status) == ("connected", 200, 0)
    await phone.nothing(0.3)  # no BYE for a dialog the phone already ended


async def test_lost_ack_is_sent_again_for_the_2xx_retransmission(
    server: Server, phone_factory: Callable[[str], Coroutine[Any, Any, Phone]]
) -> None:
    phone = await phone_factory("1001")
    server.start([phone])
    invite = await phone.request("INVITE")
    phone.answer(invite, 200, SDP_A)
    first = await phone.request("ACK")
    phone.answer(invite, 200, SDP_A)  # as if the ACK had been lost (RFC 3261 §13.3.1.4)
    # The REFER that follows the first ACK may come first.
    got = [await phone.next(), await phone.next()]
    acks = [m for m in got if isinstance(m, Request) and m.method == "ACK"]
    assert [a.raw for a in acks] == [first.raw], got


async def test_phone_challenge_is_answered_from_the_ha1(
    server: Server, phone_factory: Callable[[str], Coroutine[Any, Any, Phone]]
) -> None:
    phone = await phone_factory("1001")
    job = server.start([phone], settings=replace(server.env.settings, fallback_3pcc=False))
    invite = await phone.request("INVITE")
    phone.answer(invite, 407, headers=[("Proxy-Authenticate",
                                        'Digest realm="localhost", nonce="n1", qop="auth", '
                                        "algorithm=MD5")])
    retry = await phone.request("INVITE")
    assert retry.call_id == invite.call_id and retry.cseq.number == invite.cseq.number + 1
    creds = parse_credentials(retry.header("Proxy-Authorization") or "")
    expected = digest_response(algorithm="MD5", ha1_hex=ha1("1001", "localhost", "demo1001"),
                               nonce="n1", method="INVITE", uri=retry.uri, qop="auth",
                               nc=creds.params["nc"], cnonce=creds.cnonce)
    assert (creds.username, creds.response) == ("1001", expected)
    phone.answer(retry, 200, SDP_A)
    ack = await phone.request("ACK")
    assert ack.header("Proxy-Authorization") == retry.header("Proxy-Authorization")
    refer = await phone.request("REFER")
    phone.answer(refer, 603)
    bye = await phone.request("BYE")
    phone.answer(bye, 200)
    await server.finished(job)
    assert (job.state, job.reason, job.status, job.bye_status) == (
        "failed", "refer_refused", 603, 200)


async def test_challenge_for_another_realm_fails_with_auth(
    server: Server, phone_factory: Callable[[str], Coroutine[Any, Any, Phone]]
) -> None:
    phone = await phone_factory("1001")
    job = server.start([phone])
    invite = await phone.request("INVITE")
    phone.answer(invite, 401, headers=[("WWW-Authenticate",
                                        'Digest realm="phone.example", nonce="n", qop="auth"')])
    await server.finished(job)
    assert (job.state, job.reason, job.status) == ("failed", "auth", 401)


async def test_reinvite_while_held_gets_an_inactive_answer_and_transfer_times_out(
    server: Server, phone_factory: Callable[[str], Coroutine[Any, Any, Phone]]
) -> None:
    phone = await phone_factory("1001")
    job = server.start([phone])
    invite = await answered_call(phone)
    refer = await phone.request("REFER")
    phone.answer(refer, 202)
    phone.notify(invite, "180 Ringing")
    assert (await phone.response()).status == 200
    phone.in_dialog(invite, "INVITE", body=SDP_A)
    ok = await phone.response()
    assert ok.status == 200 and ok.cseq.method == "INVITE"
    assert b"a=inactive" in ok.body and b"c=IN IP4 0.0.0.0" in ok.body
    assert b"m=audio 9 RTP/AVP 0" in ok.body
    # No final NOTIFY within transfer_timeout (2 s here): the job gives up and hangs up.
    bye = await phone.request("BYE", timeout=4)
    phone.answer(bye, 200)
    await server.finished(job)
    assert (job.state, job.reason, job.transfer_status, job.bye_status) == (
        "failed", "transfer_timeout", 180, 200)


# ------------------------------------------------------------------------------ 3PCC bridge
async def test_bridge_relays_reinvite_and_hangup(
    server: Server, phone_factory: Callable[[str], Coroutine[Any, Any, Phone]]
) -> None:
    phone = await phone_factory("1001")
    callee = await phone_factory("1002")
    job = server.start([phone], callee=callee)
    invite_a = await answered_call(phone)
    refer = await phone.request("REFER")
    phone.answer(refer, 405, headers=[("Allow", "INVITE, ACK, BYE")])
    # Flow IV: the callee gets an INVITE without an offer, as the caller.
    invite_b = await callee.request("INVITE")
    assert not invite_b.body and invite_b.from_addr.uri == CALLER and invite_b.uri == CALLEE
    callee.answer(invite_b, 200, SDP_B)
    reinvite = await phone.request("INVITE")
    assert reinvite.call_id == invite_a.call_id and b"m=audio 50000 RTP/AVP 8" in reinvite.body
    origin = next(line for line in reinvite.body.split(b"\r\n") if line.startswith(b"o="))
    first_origin = next(line for line in invite_a.body.split(b"\r\n") if line.startswith(b"o="))
    # Same origin as our first offer to this phone, version one higher (RFC 3264 §8).
    assert origin.split()[1] == first_origin.split()[1]
    assert int(origin.split()[2]) == int(first_origin.split()[2]) + 1
    phone.answer(reinvite, 200, SDP_A)
    await phone.request("ACK")
    ack_b = await callee.request("ACK")
    assert b"m=audio 40000 RTP/AVP 0" in ack_b.body  # the caller's answer, in the ACK
    await asyncio.sleep(0.05)
    assert (job.state, job.mode, job.bridged) == ("connected", "3pcc", True)

    # The caller puts the call on hold: the re-INVITE is relayed to the callee and back.
    held = SDP_A.replace(b"a=rtpmap:0 PCMU/8000\r\n", b"a=rtpmap:0 PCMU/8000\r\na=sendonly\r\n")
    phone.in_dialog(invite_a, "INVITE", body=held)
    relayed = await callee.request("INVITE")
    assert b"a=sendonly" in relayed.body and relayed.call_id == invite_b.call_id
    callee.answer(relayed, 200, SDP_B.replace(b"PCMA/8000\r\n", b"PCMA/8000\r\na=recvonly\r\n"))
    await callee.request("ACK")
    ok = await phone.response()
    assert ok.status == 200 and b"a=recvonly" in ok.body and b"o=sipbill " in ok.body

    # The caller hangs up: answered, and the callee gets the BYE.
    phone.in_dialog(invite_a, "BYE")
    assert (await phone.response()).status == 200
    bye = await callee.request("BYE")
    callee.answer(bye, 200)
    await server.finished(job)
    assert (job.state, job.end_reason, job.bridged) == ("connected", "caller_hangup", False)


async def test_callee_not_answering_in_3pcc_is_cancelled(
    server: Server, phone_factory: Callable[[str], Coroutine[Any, Any, Phone]]
) -> None:
    phone = await phone_factory("1001")
    callee = await phone_factory("1002")
    job = server.start([phone], callee=callee)
    await answered_call(phone)
    refer = await phone.request("REFER")
    phone.answer(refer, 501)
    invite_b = await callee.request("INVITE")
    callee.answer(invite_b, 180)
    cancel = await callee.request("CANCEL", timeout=4)  # callee_timeout is 2 s here
    callee.send(build_response(cancel, 200, to_tag=callee.tag))
    callee.answer(invite_b, 487)
    bye = await phone.request("BYE", timeout=4)
    phone.answer(bye, 200)
    await server.finished(job)
    assert (job.state, job.reason, job.mode) == ("failed", "callee_no_answer", "3pcc")
