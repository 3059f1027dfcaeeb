"""The click-to-dial module: jobs driven from the control socket (seed 002 §click-to-dial).

``click2dial.call CALLER CALLEE`` starts a job that connects a registered local subscriber's
phone to a callee (a local user or a number) with INVITE + REFER (RFC 3515), or with
third-party call control where the phone refuses REFER (RFC 3725); see :mod:`clicktodial.job`
for the call flow and :mod:`clicktodial.dialog` for the user agent underneath.

Control methods (``sipbill ctl click2dial.call 1001 1002``):

``click2dial.call(caller, callee) -> str``
    Starts a job and returns its id. ``caller`` must be a subscriber of one of our domains
    (``1001``, ``1001@domain`` or ``sip:1001@domain``); a caller without a live registration
    still gets a job, failed at once with reason ``caller_offline``. ``callee`` is a user
    (``1002``, ``1002@domain``), a number or a ``sip:``/``tel:`` URI. The wire names are
    ``caller``/``callee`` because a Python handler cannot have a parameter named ``from``;
    positional ``[from, to]`` works as well.
``click2dial.status(id) -> dict``
    The job: ``state`` (calling_caller, caller_answered, transferring, connected, failed),
    ``reason`` when failed, ``mode`` (refer or 3pcc) and the SIP statuses seen.
``click2dial.list(active=False) -> list``
    Recent jobs, newest first (only unfinished ones with ``active``).
``click2dial.stats() -> dict``
    The counters below, for operators.

Why jobs are not stored in the database: a job is a set of live SIP dialogs owned by this
process; after a restart they are gone, so a stored "calling" job would only be a stale claim.
Finished jobs stay in memory (``keep_finished``) for status queries.

Metrics (``ctx.services["clicktodial"]``, exported by :mod:`sipbill.metrics` as
``sipbill_clicktodial_events_total{event=...}``): :attr:`ClickToDial.stats` counts
``started``, ``connected``, ``failed`` and ``failed:<reason>`` (``failed:no_answer``,
``failed:caller_busy``...), ``fallback_3pcc`` and ``refused`` (calls refused at the control
socket); :attr:`ClickToDial.outcomes` counts finished jobs by outcome label alone (``connected``
or the reason); :attr:`ClickToDial.running` holds the jobs in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from clicktodial.dialog import DialogRouter, DigestAnswerer
from clicktodial.job import Job, JobEnv, JobRunner
from clicktodial.settings import SECTION, ClickToDialSettings
from sipbill.control import NOT_FOUND, ControlError, MethodRegistry
from sipcore.errors import SipParseError
from sipcore.location import LocationService
from sipcore.pipeline import Stage
from sipcore.registrar import canonical_aor
from sipcore.subscribers import SubscriberStore
from sipcore.transport_types import Peer
from sipcore.uac import UserAgentClient
from sipcore.uri import SipUri, TelUri, parse_uri

if TYPE_CHECKING:
    from sipbill.app import AppContext

log = logging.getLogger("clicktodial.service")

__all__ = ["ClickToDial", "parse_callee", "parse_caller", "setup"]

#: control error code for "too many jobs" / "this caller already has a job" (HTTP-like).
BUSY = 429
CONFLICT = 409
BAD_REQUEST = 400


class ClickToDial:
    """The jobs of this server and the control methods that start and show them."""

    def __init__(self, settings: ClickToDialSettings, *, uac: UserAgentClient,
                 location: LocationService, subscribers: SubscriberStore,
                 domains: Sequence[str], aliases: Mapping[str, str], proxy_peer: Peer) -> None:
        self.settings = settings
        self.uac = uac
        self.location = location
        self.subscribers = subscribers
        self.domains = [d.lower() for d in domains]
        self.aliases = dict(aliases)
        self.router = DialogRouter()
        self.env = JobEnv(settings=settings, uac=uac, router=self.router, spawn=self.spawn,
                          proxy_peer=proxy_peer,
                          from_server=f"sip:click2dial@{self.domains[0]}")
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.running: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats: Counter[str] = Counter(
            {"started": 0, "connected": 0, "failed": 0, "fallback_3pcc": 0, "refused": 0})
        self.outcomes: Counter[str] = Counter()

    @property
    def active(self) -> int:
        return len(self.running)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, keeping the task referenced until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=c2d_task_error exc=%r", task.exception())

    # ------------------------------------------------------------------ control methods
    async def call(self, caller: str, callee: str) -> str:
        """Start a job; see the module docstring."""
        aor, user, domain = parse_caller(caller, self.domains, self.aliases)
        target = parse_callee(callee, self.domains[0])
        subscriber = await self.subscribers.get(user, domain)
        if subscriber is None:
            self.stats["refused"] += 1
            raise ControlError(NOT_FOUND, f"caller {aor} is not a subscriber")
        if len(self.running) >= self.settings.max_jobs:
            self.stats["refused"] += 1
            raise ControlError(BUSY, "too many click-to-dial jobs running; try again later")
        for job_id in self.running:
            other = self.jobs.get(job_id)
            if other is not None and other.caller == aor and other.state != "connected":
                self.stats["refused"] += 1
                raise ControlError(CONFLICT, f"{aor} already has a click-to-dial job: {job_id}")
        job = Job(id=secrets.token_hex(8), caller=aor, callee=target)
        job.set_state("calling_caller")
        self.jobs[job.id] = job
        self.stats["started"] += 1
        now = self.location.clock()
        bindings = [b for b in self.location.lookup(aor) if b.expires_at > now]
        log.info("event=c2d_job_started job=%s caller=%s callee=%s bindings=%d", job.id, aor,
                 target, len(bindings))
        if not bindings:
            job.reason = "caller_offline"
            job.set_state("failed")
            job.finished_at = time.time()
            log.info("event=c2d_job_done job=%s state=failed reason=caller_offline", job.id)
            self._finished(job)
            return job.id
        credentials = DigestAnswerer(user, domain, subscriber.ha1)
        runner = JobRunner(job, self.env, bindings, credentials, self._finished)
        self.running[job.id] = self.spawn(runner.run())
        return job.id

    def _finished(self, job: Job) -> None:
        self.running.pop(job.id, None)
        self.outcomes[job.outcome] += 1
        if job.state == "connected":
            self.stats["connected"] += 1
        else:
            self.stats["failed"] += 1
            # billing's "refused:<reason>" style: the exporter turns every key into a label
            # value, and reasons are a fixed set written in job.py, so the set stays bounded.
            self.stats[f"failed:{job.reason}"] += 1
        if job.mode == "3pcc":
            self.stats["fallback_3pcc"] += 1
        # Forget the oldest finished jobs beyond keep_finished.
        finished = [j for j in self.jobs.values() if j.done]
        for old in finished[: max(0, len(finished) - self.settings.keep_finished)]:
            del self.jobs[old.id]

    async def status(self, id: str) -> dict[str, Any]:
        job = self.jobs.get(id)
        if job is None:
            raise ControlError(NOT_FOUND, f"no click-to-dial job {id!r}")
        return job.as_dict()

    async def list_jobs(self, active: bool = False) -> list[dict[str, Any]]:
        jobs = reversed(self.jobs.values())
        return [j.as_dict() for j in jobs if not active or not j.done]

    async def stats_snapshot(self) -> dict[str, Any]:
        return {"active": self.active, **self.stats, "outcomes": dict(self.outcomes)}

    def register_methods(self, methods: MethodRegistry) -> None:
        async def call(from_: str, to: str) -> str:
            return await self.call(from_, to)

        methods.register("click2dial.call", call,
                         help="Connect a registered local subscriber's phone to a callee: the "
                              "phone is called, then REFERred (or bridged with 3PCC). Returns "
                              "the job id.",
                         params_doc={"from": "the subscriber to call first: 1001, "
                                             "1001@domain or sip:1001@domain",
                                     "to": "whom the caller gets connected to: a user, "
                                           "a number or a sip:/tel: URI"})
        methods.register("click2dial.status", self.status,
                         help="A click-to-dial job: state, failure reason, SIP statuses.",
                         params_doc={"id": "the job id click2dial.call returned"})
        methods.register("click2dial.list", self.list_jobs,
                         help="Recent click-to-dial jobs, newest first.",
                         params_doc={"active": "only jobs still running"})
        methods.register("click2dial.stats", self.stats_snapshot,
                         help="Click-to-dial counters: jobs started, connected, failed, "
                              "3PCC fallbacks, refused; finished jobs by outcome.")

    async def close(self) -> None:
        """Shutdown: every running job CANCELs or BYEs its dialogs, briefly waited for."""
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5.0)


def parse_caller(text: str, domains: Sequence[str],
                 aliases: Mapping[str, str]) -> tuple[str, str, str]:
    """(AoR, user, domain) of a local caller given as ``1001``, ``1001@domain`` or a SIP URI;
    :class:`ControlError` 400 for anything else or a domain that is not ours."""
    t = text.strip()
    if not t.lower().startswith(("sip:", "sips:")):
        if ":" in t.partition("@")[0]:
            raise ControlError(BAD_REQUEST, f"caller is not a SIP user: {text!r}")
        t = "sip:" + (t if "@" in t else f"{t}@{domains[0]}")
    try:
        uri = parse_uri(t)
    except SipParseError as exc:
        raise ControlError(BAD_REQUEST, f"caller is not a SIP address: {text!r}") from exc
    if not isinstance(uri, SipUri) or not uri.user:
        raise ControlError(BAD_REQUEST, f"caller is not a SIP user: {text!r}")
    aor = canonical_aor(uri, aliases)
    domain = aor.rpartition("@")[2]
    if domain not in domains:
        raise ControlError(BAD_REQUEST, f"caller {aor} is not in one of our domains")
    return aor, uri.user, domain


def parse_callee(text: str, domain: str) -> str:
    """The Refer-To URI: a SIP URI as given; a ``tel:`` URI, a number or a user at ``domain``
    (a number then goes through the proxy's gateways like any dialled number)."""
    t = text.strip()
    low = t.lower()
    try:
        if low.startswith(("sip:", "sips:")):
            uri = parse_uri(t)
        elif low.startswith("tel:"):
            tel = parse_uri(t)
            if not isinstance(tel, TelUri):
                raise ControlError(BAD_REQUEST, f"callee is not a tel: URI: {text!r}")
            uri = parse_uri(f"sip:{tel.number}@{domain};user=phone")
        elif ":" in t.partition("@")[0]:
            raise ControlError(BAD_REQUEST, f"callee is not a SIP or tel: address: {text!r}")
        else:
            uri = parse_uri(f"sip:{t}" if "@" in t else f"sip:{t}@{domain}")
    except SipParseError as exc:
        raise ControlError(BAD_REQUEST, f"callee is not a SIP address: {text!r}") from exc
    if not isinstance(uri, SipUri) or not uri.user:
        raise ControlError(BAD_REQUEST, f"callee names no user or number: {text!r}")
    return str(uri)


def _own_listener(listen: Sequence[tuple[str, str, int]]) -> Peer:
    """Where this server's proxy listens, as a destination for our own requests."""
    chosen = next((x for x in listen if x[0] == "UDP"), None) or listen[0]
    transport, host, port = chosen
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return Peer(transport, host, port)


async def setup(ctx: AppContext) -> None:
    """The module hook: the IN_DIALOG handler for our dialogs and the control methods."""
    settings = ctx.settings.modules.get(SECTION)
    if not isinstance(settings, ClickToDialSettings):
        settings = ClickToDialSettings()
    uac = UserAgentClient(ctx.stack, ctx.identity, user_agent=ctx.settings.server.user_agent)
    service = ClickToDial(settings, uac=uac, location=ctx.location,
                          subscribers=ctx.subscribers, domains=ctx.settings.server.domains,
                          aliases=ctx.settings.server.domain_aliases,
                          proxy_peer=_own_listener(ctx.identity.listen))
    # First in IN_DIALOG: the core answers 481 to in-dialog requests of dialogs it did not
    # set up, and the NOTIFYs and BYEs of our dialogs are such requests.
    ctx.pipeline.add(Stage.IN_DIALOG, service.router, name="clicktodial.in_dialog", first=True)
    service.register_methods(ctx.methods)
    ctx.shutdown_hooks.append(service.close)
    ctx.services["clicktodial"] = service
