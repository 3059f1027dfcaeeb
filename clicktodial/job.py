"""One click-to-dial job: call the caller, then REFER it to the callee (RFC 3515), or bridge
the two phones with third-party call control where the caller's phone refuses REFER (RFC 3725).

Theory of operation
-------------------
A job is a small script (:meth:`JobRunner.run`) over the dialogs of :mod:`clicktodial.dialog`.
Its state, as ``click2dial.status`` shows it::

    calling_caller -> caller_answered -> transferring -> connected
          \\                 \\                \\
           `-----------------`----------------`------> failed (+ reason)

1. **calling_caller.** An INVITE goes to every live binding of the caller's address of record
   (the registrar's location service; no binding: failed ``caller_offline``), to the contact
   at the address the REGISTER came from, along its Path. It offers one audio stream on hold
   (seed 002: "0.0.0.0 as IP address in SDP because there is no remote phone"; RFC 3264 §8.4
   ``a=sendonly``). From names the callee (or the server) under a display name such as
   "Click-to-dial", so the phone shows what the call is for. A 401/407 from the phone is
   answered with the caller's own stored HA1 (:class:`~clicktodial.dialog.DigestAnswerer`;
   a realm other than the caller's domain fails ``auth``). The first 2xx wins and is ACKed;
   the other forks are CANCELled (a late 2xx is ACKed and BYEd). No answer within
   ``ring_timeout``: CANCEL, failed ``no_answer``. 486/600: ``caller_busy``; 603:
   ``caller_declined``; no response at all: ``caller_unreachable``.
2. **caller_answered -> transferring.** A REFER (RFC 3515 §2.4.1) in that dialog with
   ``Refer-To: <callee>`` and ``Referred-By: <caller>`` (RFC 3892) asks the phone to call the
   callee itself, through the proxy like any of its calls, so it authenticates and is billed
   as the caller. Its acceptance creates an implicit subscription (RFC 3515 §2.4.4; the
   subscriber's side of it as RFC 6665 §4.1.3 says): every NOTIFY with ``Event: refer`` is
   answered 200 and its ``message/sipfrag`` body read for the new call's status (RFC 3515
   §2.4.5): 1xx progress, 2xx ``connected``, 3xx-6xx failed (``callee_busy``,
   ``callee_declined``, ``callee_unavailable``...). No NOTIFY within ``notify_timeout``:
   ``refer_timeout``; no final status within ``transfer_timeout``: ``transfer_timeout``. A BYE
   from the phone ends the INVITE usage of the dialog only; the subscription usage lives on
   (RFC 5057 §3.1, §4.1), so later NOTIFYs still count.
3. **connected.** Our dialog with the phone has done its job: it ends with a BYE (its final
   status is ``bye_status``) and the job is over. Every failure after the caller answered ends
   the dialog with a BYE as well.

**Fallback** (``fallback_3pcc``): a REFER refused with 403/405/420/489/501/603 switches to
RFC 3725 flow IV, the flow §5 of that RFC recommends when the parties are people: the caller
already holds a dialog with "no media", so the callee gets an INVITE without SDP (through the
server's own proxy, as the caller, authenticated with the caller's HA1: routed, credit-checked
and billed like a call the caller dialled); the callee's 2xx carries offer2, which goes to the
caller in a re-INVITE (offer2', restamped with our origin line for that dialog and padded to as
many m-lines as before, RFC 3264 §8); the caller's answer2' goes back to the callee in the ACK
(answer2). Offering the caller's answer to the hold offer to the callee instead (flow I order)
would reuse an answer to a sendonly offer, and make the caller's phone wait for an ACK while
the callee rings (RFC 3725 §4.1's timeout problem). The job is then ``connected`` with
``mode = "3pcc"`` and the server stays in the path as a B2BUA: BYE from either side is
answered and sent to the other, other requests are relayed to the other dialog with their
answers (SDP restamped per dialog); the job records ``end_reason`` when the call ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clicktodial import sdp
from clicktodial.dialog import DialogRouter, DigestAnswerer, Final, Leg, Spawner
from clicktodial.settings import ClickToDialSettings
from sipcore.location import Binding
from sipcore.pipeline import RequestContext
from sipcore.transport_types import Peer
from sipcore.uac import UserAgentClient

log = logging.getLogger("clicktodial.job")

__all__ = ["STATES", "Job", "JobEnv", "JobFailed", "JobRunner", "sipfrag_status"]

STATES = ("calling_caller", "caller_answered", "transferring", "connected", "failed")

#: REFER answers that mean "this phone will not do REFER" (RFC 3515 §2.4.2, RFC 3261 §21):
#: the only ones worth a 3PCC retry.
REFER_REFUSED = frozenset({403, 405, 420, 489, 501, 603})

#: In-dialog methods a phone may send to our UA outside a bridge.
_ALLOW = "INVITE, ACK, BYE, CANCEL, NOTIFY, OPTIONS, INFO, UPDATE"

#: Header fields relayed with a request between the two dialogs of a 3PCC bridge (beyond
#: Content-Type and the body): what the methods a phone sends in a call need.
_RELAYED = ("Event", "Subscription-State", "Info-Package", "Refer-To", "Referred-By",
            "Accept", "Allow-Events", "Content-Disposition")


class JobFailed(Exception):
    """Ends a job: ``reason`` for people and metrics, ``status`` the SIP status behind it."""

    def __init__(self, reason: str, status: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(eq=False)
class Job:
    """What ``click2dial.status`` shows of one job."""

    id: str
    caller: str                     # the caller's address of record, sip:1001@localhost
    callee: str                     # the URI the caller's phone is asked to call
    state: str = "calling_caller"
    reason: str = ""                # why it failed ("" unless failed)
    status: int = 0                 # SIP status behind the failure, if any
    mode: str = "refer"             # "refer", or "3pcc" after a refused REFER
    refer_status: int = 0           # final status of the REFER
    transfer_status: int = 0        # last status the NOTIFYs reported (message/sipfrag)
    bye_status: int = 0             # final status of the BYE ending our dialog with the caller
    bridged: bool = False           # 3PCC: the server relays between the two phones
    end_reason: str = ""            # 3PCC: caller_hangup | callee_hangup | shutdown
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    history: list[tuple[float, str]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def outcome(self) -> str:
        """The metrics label: ``connected`` or the failure reason."""
        return self.reason if self.state == "failed" else self.state

    def set_state(self, state: str) -> None:
        self.state = state
        self.updated_at = time.time()
        self.history.append((self.updated_at, state))

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "caller": self.caller, "callee": self.callee, "state": self.state,
            "reason": self.reason, "status": self.status, "mode": self.mode,
            "refer_status": self.refer_status, "transfer_status": self.transfer_status,
            "bye_status": self.bye_status, "bridged": self.bridged,
            "end_reason": self.end_reason, "created_at": self.created_at,
            "updated_at": self.updated_at, "finished_at": self.finished_at,
            "history": [{"at": at, "state": state} for at, state in self.history],
        }


@dataclass(frozen=True, slots=True)
class JobEnv:
    """What a job needs of the server, handed in by the service (no globals)."""

    settings: ClickToDialSettings
    uac: UserAgentClient
    router: DialogRouter
    spawn: Spawner
    proxy_peer: Peer           # this server's own listener: 3PCC calls go through the proxy
    from_server: str           # sip:click2dial@domain, for caller_id = "server"


def sipfrag_status(body: bytes) -> int:
    """The status code of a ``message/sipfrag`` status line (RFC 3420), 0 if there is none."""
    first = body.split(b"\n", 1)[0].strip().split()
    if len(first) >= 2 and first[0].upper() == b"SIP/2.0" and first[1].isdigit():
        return int(first[1])
    return 0


def caller_reason(final: Final) -> str:
    status = final.status
    if final.response is None:
        return "caller_unreachable"
    if status in (486, 600):
        return "caller_busy"
    if status == 603:
        return "caller_declined"
    if status in (401, 407):
        return "auth"
    if status in (408, 480, 487):
        return "no_answer"
    return "caller_failed"


def callee_reason(status: int) -> str:
    if status in (486, 600):
        return "callee_busy"
    if status == 603:
        return "callee_declined"
    if status in (404, 604):
        return "callee_unknown"
    if status == 480:
        return "callee_unavailable"
    if status in (408, 487):
        return "callee_no_answer"
    if status in (402, 403):
        return "callee_rejected"
    return "callee_failed"


def _caller_rank(final: Final) -> int:
    """Which fork's answer tells the caller's state best (lowest first)."""
    order = {603: 0, 486: 1, 600: 1, 401: 2, 407: 2}
    return order.get(final.status, 5 if final.response is not None else 9)


class JobRunner:
    """Runs one :class:`Job` (see the module docstring)."""

    def __init__(self, job: Job, env: JobEnv, bindings: Sequence[Binding],
                 credentials: DigestAnswerer, on_done: Callable[[Job], None]) -> None:
        self.job = job
        self.env = env
        self.settings = env.settings
        self.bindings = list(bindings)
        self.credentials = credentials
        self.on_done = on_done
        self.legs: list[Leg] = []
        self.leg_a: Leg | None = None
        self.leg_b: Leg | None = None
        self.origins: dict[Leg, sdp.Origin] = {}
        self.notifies: asyncio.Queue[tuple[int, bool]] = asyncio.Queue()
        self.caller_gone = asyncio.Event()
        self.bridge_done = asyncio.Event()
        self.remote_sdp: dict[Leg, bytes] = {}
        self.reinvite_busy = False

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        job = self.job
        try:
            await self._run()
        except JobFailed as exc:
            self._fail(exc.reason, exc.status)
        except asyncio.CancelledError:
            if not job.done:
                if job.bridged:
                    job.end_reason = job.end_reason or "shutdown"
                else:
                    self._fail("shutdown")
            raise
        except Exception:
            log.exception("event=c2d_job_error job=%s", job.id)
            self._fail("internal_error")
        finally:
            await self._cleanup()
            job.bridged = False
            if job.finished_at is None:
                job.finished_at = time.time()
            log.info("event=c2d_job_done job=%s state=%s reason=%s mode=%s status=%d "
                     "bye_status=%d end_reason=%s", job.id, job.state, job.reason or "-",
                     job.mode, job.status, job.bye_status, job.end_reason or "-")
            self.on_done(job)

    def _fail(self, reason: str, status: int = 0) -> None:
        job = self.job
        job.reason = reason
        job.status = status
        job.set_state("failed")

    async def _cleanup(self) -> None:
        """Whatever happened: CANCEL what rings, BYE what is up, forget our dialogs."""
        byes: dict[Leg, asyncio.Task[int]] = {}
        for leg in self.legs:
            if leg.state == "idle":
                leg.abandon()
            elif leg.confirmed:
                byes[leg] = self.env.spawn(leg.bye())
        if byes:
            await asyncio.wait(byes.values(), timeout=2.0)
            task = byes.get(self.leg_a) if self.leg_a is not None else None
            if (task is not None and task.done() and not task.cancelled()
                    and task.exception() is None and not self.job.bye_status):
                self.job.bye_status = task.result()
        for leg in self.legs:
            if leg.state != "idle":
                leg.close()

    def _new_leg(self, *, uri: str, peer: Peer, local: str, remote: str,
                 route: Sequence[str] = (), label: str, proxied: bool = False) -> Leg:
        leg = Leg(self.env.uac, self.env.router, self.env.spawn, uri=uri, peer=peer,
                  local=local, remote=remote, route=route, credentials=self.credentials,
                  label=f"{self.job.id}/{label}", proxied=proxied)
        leg.on_request = self._on_request
        self.legs.append(leg)
        self.origins[leg] = sdp.Origin(self.env.uac.identity.sent_by(peer.transport)[0])
        return leg

    # ------------------------------------------------------------------ the script
    async def _run(self) -> None:
        self.leg_a = leg_a = await self._ring_caller()
        self.job.set_state("caller_answered")
        await self._transfer(leg_a)

    async def _ring_caller(self) -> Leg:
        job = self.job
        settings = self.settings
        shown = job.callee if settings.caller_id == "callee" else self.env.from_server
        local = f'"{settings.display_name}" <{shown}>' if settings.display_name else f"<{shown}>"
        forks: dict[asyncio.Task[Final], Leg] = {}
        for binding in self.bindings:
            leg = self._new_leg(uri=binding.contact, peer=binding.source, local=local,
                                remote=f"<{job.caller}>", route=binding.path, label="caller")
            offer = sdp.hold_offer(self.origins[leg], settings.hold_direction)
            forks[asyncio.ensure_future(leg.invite(offer))] = leg
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.ring_timeout
        winner: Leg | None = None
        failures: list[Final] = []
        pending: set[asyncio.Task[Final]] = set(forks)
        try:
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline -
                                                                         loop.time()),
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break  # ring timeout
                for task in done:
                    final = task.result()
                    if final.ok and winner is None:
                        winner = forks[task]
                    elif final.ok:
                        forks[task].abandon()  # a second phone answered too: BYE it
                    else:
                        failures.append(final)
        finally:
            for leg in forks.values():
                if leg is not winner:
                    leg.abandon()
            for task in pending:
                task.cancel()
        if winner is not None:
            return winner
        if pending or not failures:
            raise JobFailed("no_answer", 487)
        best = min(failures, key=_caller_rank)
        raise JobFailed(caller_reason(best), best.status)

    async def _transfer(self, leg_a: Leg) -> None:
        job = self.job
        job.set_state("transferring")
        final = await leg_a.request("REFER", [("Refer-To", f"<{job.callee}>"),
                                              ("Referred-By", f"<{job.caller}>")])
        job.refer_status = final.status
        if final.ok:
            await self._follow_notifies(leg_a)
            return
        status = final.status
        if status in REFER_REFUSED:
            if self.settings.fallback_3pcc:
                await self._third_party(leg_a)
                return
            raise JobFailed("refer_refused", status)
        if status == 481 or self.caller_gone.is_set():
            raise JobFailed("caller_hangup", status)
        if final.response is None:
            raise JobFailed("refer_timeout", status)
        if status in (401, 407):
            raise JobFailed("auth", status)
        raise JobFailed("refer_failed", status)

    async def _follow_notifies(self, leg_a: Leg) -> None:
        job = self.job
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.transfer_timeout
        try:
            status, terminated = await asyncio.wait_for(self.notifies.get(),
                                                        self.settings.notify_timeout)
        except TimeoutError:
            raise JobFailed("refer_timeout") from None
        while True:
            if status:
                job.transfer_status = status
                job.updated_at = time.time()
            if 200 <= status < 300:
                break
            if status >= 300:
                raise JobFailed(callee_reason(status), status)
            if terminated:
                raise JobFailed("transfer_failed", job.transfer_status)
            try:
                status, terminated = await asyncio.wait_for(
                    self.notifies.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise JobFailed("transfer_timeout", job.transfer_status) from None
        job.set_state("connected")
        # The new call stands on its own; our helper dialog is done (seed 002; the transferor
        # ends its dialog once the transfer succeeded, as in RFC 5589's basic transfer).
        job.bye_status = await leg_a.bye()
        job.finished_at = time.time()

    # ------------------------------------------------------------------ 3PCC fallback
    async def _third_party(self, leg_a: Leg) -> None:
        job = self.job
        job.mode = "3pcc"
        log.info("event=c2d_fallback_3pcc job=%s refer_status=%d", job.id, job.refer_status)
        self.leg_b = leg_b = self._new_leg(uri=job.callee, peer=self.env.proxy_peer,
                                           local=f"<{job.caller}>", remote=f"<{job.callee}>",
                                           label="callee", proxied=True)
        # Flow IV step 4: INVITE without an offer; the callee rings as long as it likes.
        final = await self._race_caller(leg_b.invite(b"", None, auto_ack=False),
                                        self.settings.callee_timeout, leg_b)
        if not final.ok or final.response is None:
            raise JobFailed(callee_reason(final.status) if final.status not in (401, 407)
                            else "auth", final.status)
        response = final.response
        offer2 = response.body if sdp.is_sdp(response.content_type, response.body) else b""
        if not offer2:
            leg_b.ack()
            raise JobFailed("callee_no_sdp", final.status)
        self.remote_sdp[leg_b] = offer2
        origin_a = self.origins[leg_a]
        # Steps 6-7: offer2' to the caller in a re-INVITE.
        offer2p = origin_a.stamp(sdp.pad_media(offer2, origin_a.media_count))
        final_a = await leg_a.invite(offer2p) if leg_a.confirmed else Final(481)
        answer = final_a.response
        if not final_a.ok or answer is None or not sdp.is_sdp(answer.content_type, answer.body):
            # The callee's offer still needs its answer: a hold answer, then BYE.
            leg_b.ack(sdp.hold_answer(offer2, self.origins[leg_b]))
            if self.caller_gone.is_set():
                raise JobFailed("caller_hangup", final_a.status)
            raise JobFailed("caller_reinvite_failed", final_a.status)
        self.remote_sdp[leg_a] = answer.body
        # Step 8: answer2 to the callee in the ACK.
        leg_b.ack(self.origins[leg_b].stamp(sdp.trim_media(answer.body,
                                                           sdp.media_count(offer2))))
        # Either side may have hung up while the other was being asked (their BYE was
        # answered by _on_request); then there is nothing to bridge.
        if not leg_b.confirmed:
            raise JobFailed("callee_hangup")
        if not leg_a.confirmed:
            raise JobFailed("caller_hangup")
        job.bridged = True
        job.set_state("connected")
        log.info("event=c2d_bridged job=%s", job.id)
        await self.bridge_done.wait()
        job.bridged = False
        job.finished_at = time.time()

    async def _race_caller(self, coro: Any, timeout: float, leg: Leg) -> Final:
        """Await ``coro`` (an INVITE) unless the caller hangs up or ``timeout`` passes."""
        task: asyncio.Task[Final] = asyncio.ensure_future(coro)
        gone = asyncio.ensure_future(self.caller_gone.wait())
        try:
            done, _ = await asyncio.wait({task, gone}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if task in done:
            return task.result()
        leg.abandon()
        task.cancel()
        if gone in done:
            raise JobFailed("caller_hangup")
        raise JobFailed("callee_no_answer", 408)

    # ------------------------------------------------------------------ in-dialog requests
    def _on_request(self, leg: Leg, ctx: RequestContext) -> None:
        if self.job.bridged:
            self._relay(leg, ctx)
            return
        req = ctx.request
        method = req.method
        if method == "NOTIFY":
            self._notify(leg, ctx)
        elif method == "BYE":
            ctx.reply(200)
            leg.remote_ended()
            if leg is self.leg_a:
                self.caller_gone.set()
        elif method in ("INVITE", "UPDATE"):
            self._hold_answer(leg, ctx)
        elif method in ("OPTIONS", "INFO"):
            ctx.reply(200, headers=[("Allow", _ALLOW)])
        else:
            ctx.reply(405, headers=[("Allow", _ALLOW)])

    def _notify(self, leg: Leg, ctx: RequestContext) -> None:
        """RFC 3515 §2.4.4-2.4.5 / RFC 6665 §4.1.3: answer, then read the sipfrag."""
        req = ctx.request
        event = (req.header("Event") or "").split(";", 1)[0].strip().lower()
        if event != "refer":
            ctx.reply(489, "Bad Event", headers=[("Allow-Events", "refer")])
            return
        sub_state = (req.header("Subscription-State") or "").split(";", 1)[0].strip().lower()
        # NOTIFY is a target refresh request (RFC 6665 §4.1.3), so the 2xx carries our Contact.
        ctx.reply(200, headers=[("Contact", leg.contact)])
        self.notifies.put_nowait((sipfrag_status(req.body), sub_state == "terminated"))

    def _hold_answer(self, leg: Leg, ctx: RequestContext) -> None:
        """A phone's offer while we hold it: accept every stream inactive (RFC 3264 §8.4)."""
        req = ctx.request
        origin = self.origins[leg]
        headers = [("Contact", leg.contact)]
        if sdp.is_sdp(req.content_type, req.body):
            body = sdp.hold_answer(req.body, origin)
        elif req.method == "INVITE":
            body = sdp.hold_offer(origin, self.settings.hold_direction)  # offer in the 2xx
        else:
            ctx.reply(200, headers=headers)
            return
        ctx.reply(200, headers=[*headers, ("Content-Type", "application/sdp")], body=body)

    def _relay(self, leg: Leg, ctx: RequestContext) -> None:
        """A request in one dialog of the bridge: answer it with the other dialog's answer."""
        other = self.leg_b if leg is self.leg_a else self.leg_a
        req = ctx.request
        if other is None:
            ctx.reply(481, "Call/Transaction Does Not Exist")
            return
        if req.method == "BYE":
            ctx.reply(200)
            leg.remote_ended()
            self.job.end_reason = "caller_hangup" if leg is self.leg_a else "callee_hangup"
            self.env.spawn(self._end_bridge(other))
            return
        if req.method == "INVITE":
            if self.reinvite_busy:
                ctx.reply(491, "Request Pending")
                return
            if not sdp.is_sdp(req.content_type, req.body):
                # An offer wanted in our 2xx: the other side's current description, which is
                # what the session already is (RFC 3264 §8: unchanged, same version).
                current = self.remote_sdp.get(other, b"")
                if not current:
                    ctx.reply(488, "Not Acceptable Here")
                    return
                ctx.reply(200, headers=[("Contact", leg.contact),
                                        ("Content-Type", "application/sdp")],
                          body=self.origins[leg].stamp(current))
                return
            self.reinvite_busy = True
        self.env.spawn(self._relay_request(leg, other, ctx))

    async def _end_bridge(self, other: Leg) -> None:
        try:
            await other.bye()
        finally:
            self.bridge_done.set()

    async def _relay_request(self, leg: Leg, other: Leg, ctx: RequestContext) -> None:
        req = ctx.request
        method = req.method
        try:
            body = req.body
            content_type = req.content_type
            offer_in = sdp.is_sdp(content_type, body)
            offer_lines = sdp.media_count(body) if offer_in else 0
            if offer_in:
                self.remote_sdp[leg] = body
                origin = self.origins[other]
                body = origin.stamp(sdp.pad_media(body, origin.media_count))
            if method == "INVITE":
                final = await other.invite(body, content_type)
            else:
                headers = [(name, value) for name in _RELAYED
                           for value in req.header_values(name, split=False)]
                final = await other.request(method, headers, body, content_type)
            response = final.response
            if response is None:
                ctx.reply(final.status)
                return
            status = response.status
            if status in (401, 407):
                status = 403  # the other side's challenge is not this phone's to answer
            headers_out: list[tuple[str, str]] = []
            rbody = response.body
            if 200 <= status < 300:
                headers_out.append(("Contact", leg.contact))
            if rbody:
                rtype = response.content_type or "application/octet-stream"
                if sdp.is_sdp(rtype, rbody):
                    self.remote_sdp[other] = rbody
                    if offer_lines:
                        rbody = sdp.trim_media(rbody, offer_lines)
                    rbody = self.origins[leg].stamp(rbody)
                headers_out.append(("Content-Type", rtype))
            ctx.reply(status, response.reason if status == response.status else None,
                      headers=headers_out, body=rbody)
        finally:
            if method == "INVITE":
                self.reinvite_busy = False
