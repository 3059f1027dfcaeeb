"""Real SIP phones for end-to-end tests: PJSIP 2.14 user agents (pjsua2) driven from pytest.

The phones are the ``pjsua2`` module of the ``pjsua2-pybind11`` package: a real, widely deployed
SIP stack that registers with digest authentication (RFC 3261 §22.4; MD5 only in 2.14), answers
INVITEs (§13.3) and hangs up with BYE (§15), so the server is judged by a client it was not
written alongside.

Theory of operation
-------------------
* pjsua2 allows one ``Endpoint`` per process, so :class:`UserAgents` is a process singleton:
  created once per test session (``libCreate``/``libInit``/``libStart``), destroyed once at its
  end (``libDestroy``).  A pool of UDP and TCP transports on 127.0.0.1 (random ports) is made up
  front; every :class:`Phone` borrows one, so each phone has its own address, like a real
  handset, and returns it when closed.
* PJSIP runs one worker thread of its own (``threadCnt=1``, ``mainThreadOnly=False``); nothing
  here polls events.  The pjsua2 callbacks (``onRegState``, ``onIncomingCall``,
  ``onCallState``, ``onCallTsxState``) run on that thread and only *record* what happened into
  plain Python lists (appends are atomic under the GIL); tests poll those lists with
  :func:`wait_for` and a deadline.
* Only the thread that created the endpoint (which ``libCreate`` registers with PJSIP) may
  call into it: the binding has no ``libRegisterThread``, and PJSIP aborts on a thread it does
  not know, so every entry point checks (:meth:`UserAgents.check_thread`).
* The binding does not release the GIL around its C++ calls.  A call from the test thread
  into PJSIP that needs a lock the worker holds while it waits for the GIL inside a callback
  would deadlock, so: callbacks never block and never raise (an exception escaping into C++
  aborts the process; it is recorded in :attr:`UserAgents.errors` instead), the test thread
  calls into PJSIP only at quiet moments (after the state it waited for), and call operations
  that PJSIP refuses with a lock timeout (``acquire_call`` gives up after 2 s and raises) are
  retried.
* Teardown order matters, or the process crashes at exit: calls are hung up and their Python
  objects dropped, then accounts are unregistered and deleted (``Account.shutdown``), then the
  library is destroyed, and only then does the ``Endpoint`` object go.
* PJSIP writes its log, with every SIP message it sends and receives (``msgLogging``), to a
  file rather than through a Python ``LogWriter`` (which would take the GIL on PJSIP's threads
  for every line); :meth:`UserAgents.messages` parses that file so tests can inspect the wire,
  e.g. which digest algorithm the phone answered with.
* The binding exposes no ``AccountNatConfig``, so PJSIP's defaults stay: Via/Contact rewriting
  on ``received``/``rport`` and RFC 5626 outbound (``reg-id``/``+sip.instance`` in the
  Contact).  On loopback the Via already equals the source address for UDP, so nothing is
  rewritten there.
"""

from __future__ import annotations

import ctypes
import gc
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pjsua2 as pj

__all__ = [
    "CallHandle",
    "LoggedMessage",
    "Phone",
    "RegEvent",
    "UserAgents",
    "wait_for",
]

DOMAIN = "localhost"
#: Transports made per kind when the endpoint starts (one per phone alive at the same time).
POOL_SIZE = 4
#: Tries of a call operation PJSIP refused because the call's lock stayed busy (2 s each).
_CALL_OP_ATTEMPTS = 3


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, *, what: str = "",
             interval: float = 0.01) -> None:
    """Poll ``predicate`` until it is true; ``TimeoutError`` naming ``what`` after ``timeout``.

    Sleeping releases the GIL, which PJSIP's worker thread needs to deliver callbacks.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass(frozen=True, slots=True)
class RegEvent:
    """One ``onRegState``: the final response to a REGISTER (or a local failure)."""

    code: int  # SIP status, or a PJSIP pseudo-status (408/503) for timeouts and errors
    reason: str
    expiration: int  # seconds granted by the registrar; 0 after unregistering or on failure
    response: str  # the whole response as received ("" when there was none)


@dataclass(frozen=True, slots=True)
class LoggedMessage:
    """A SIP message PJSIP sent (TX) or received (RX), from its log file."""

    direction: str  # "TX" or "RX"
    transport: str  # "UDP" / "TCP"
    peer: str  # "host:port"
    text: str

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    def header(self, name: str) -> list[str]:
        """Values of every ``name`` header line (case-insensitive, long form only)."""
        prefix = name.lower() + ":"
        head = self.text.split("\n\n", 1)[0]
        return [line.split(":", 1)[1].strip() for line in head.splitlines()
                if line.lower().startswith(prefix)]


#: The C library, for ``fflush(NULL)``: PJSIP writes its log file through stdio without
#: flushing (pjsua's log writer skips ``pj_file_flush`` for speed), so the tail of the log sits
#: in a stdio buffer until something flushes every open stream.
_LIBC = ctypes.CDLL(None)

_MSG_RE = re.compile(
    r"(TX|RX) \d+ bytes \S+ msg \S+ \(\w+\) (?:to|from) (\w+) ([^\s]+):\n(.*?)\n--end msg--",
    re.S,
)
_RURI_USER_RE = re.compile(r"^\w+ sips?:([^@;>\s]+)@")


class _Call(pj.Call):
    """pjsua2 call whose callbacks only forward to its :class:`CallHandle`."""

    def __init__(self, account: _Account, handle: CallHandle, call_id: int = -1) -> None:
        super().__init__(account, call_id)
        self.handle = handle

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        self.handle._guard(self.handle._on_state, self)

    def onCallTsxState(self, prm: pj.OnCallTsxStateParam) -> None:
        self.handle._guard(self.handle._on_tsx, prm)


class _Account(pj.Account):
    """pjsua2 account whose callbacks only forward to its :class:`Phone`."""

    def __init__(self, phone: Phone) -> None:
        super().__init__()
        self.phone = phone

    def onRegState(self, prm: pj.OnRegStateParam) -> None:
        self.phone.agents._guard(self.phone._on_reg_state, prm)

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        self.phone.agents._guard(self.phone._on_incoming_call, prm)


@dataclass(eq=False)
class CallHandle:
    """One call leg of a :class:`Phone`, outgoing or incoming, as its callbacks saw it."""

    phone: Phone
    direction: str  # "out" or "in"
    remote: str = ""  # the dialled URI, or the incoming INVITE's request line
    #: (state name, last status code, reason) per ``onCallState``, in order.
    states: list[tuple[str, int, str]] = field(default_factory=list)
    #: (role "UAC"/"UAS", method, final status) per transaction that ended within the call.
    transactions: list[tuple[str, str, int]] = field(default_factory=list)
    #: The dialog's Call-ID, to find its messages in :meth:`UserAgents.messages`.
    sip_call_id: str = ""
    call: _Call | None = field(default=None, repr=False)

    # -------------------------------------------------------------- state, from the callbacks
    @property
    def state(self) -> str:
        return self.states[-1][0] if self.states else "NULL"

    @property
    def last_code(self) -> int:
        return self.states[-1][1] if self.states else 0

    @property
    def state_names(self) -> list[str]:
        return [s for s, _, _ in self.states]

    @property
    def confirmed(self) -> bool:
        return "CONFIRMED" in self.state_names

    @property
    def disconnected(self) -> bool:
        return self.state == "DISCONNECTED"

    def wait_state(self, name: str, timeout: float = 5.0) -> None:
        """Wait until the call has been in state ``name`` (CONFIRMED, EARLY, DISCONNECTED...)."""
        try:
            wait_for(lambda: name in self.state_names, timeout,
                     what=f"{self.phone.user} call {self.direction} {self.remote!r} -> {name}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; states so far: {self.states}") from None

    def wait_disconnected(self, timeout: float = 5.0) -> int:
        """Wait for DISCONNECTED and return the call's last status code."""
        self.wait_state("DISCONNECTED", timeout)
        return self.last_code

    # -------------------------------------------------------------- actions (test thread)
    def hangup(self, code: int = 0) -> None:
        """Hang up (BYE when confirmed, CANCEL or a final response before); idempotent."""
        self.phone.agents.check_thread()
        if self.call is None or self.disconnected:
            return
        call = self.call
        prm = pj.CallOpParam()
        if code:
            prm.statusCode = pj.StatusCode(code)
        self.phone.agents._call_op(lambda: call.hangup(prm))

    # -------------------------------------------------------------- callbacks (PJSIP thread)
    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        self.phone.agents._guard(fn, *args)

    def _on_state(self, call: _Call) -> None:
        info = call.info
        if not self.sip_call_id:
            self.sip_call_id = info.callIdString
        self.states.append((info.state.name, int(info.lastStatusCode), info.lastReason))

    def _on_tsx(self, prm: pj.OnCallTsxStateParam) -> None:
        event = prm.e
        if event.type != pj.EventId.TSX_STATE:
            return
        tsx = event.body.tsxState.tsx
        if tsx.state in (pj.TsxState.COMPLETED, pj.TsxState.TERMINATED) and tsx.statusCode >= 200:
            entry = (tsx.role.name, tsx.method, int(tsx.statusCode))
            # A transaction passes COMPLETED and TERMINATED; record it once.
            if not self.transactions or self.transactions[-1] != entry:
                self.transactions.append(entry)


class Phone:
    """A SIP account (``user@localhost``) on its own transport, pointed at one server port.

    Requests go through the server as outbound proxy (``sip:127.0.0.1:PORT;lr``); REGISTER
    goes to ``sip:127.0.0.1:PORT``.  Incoming calls are answered automatically: 180 then 200
    when :attr:`answer_code` is 200, 180 alone (ringing until the caller gives up) when it is
    180, otherwise straight with that final status (486, 603...).
    An INVITE for another user (a stale binding pointing at a reused transport) is refused
    with 404 and recorded in :attr:`misrouted`.
    """

    def __init__(self, agents: UserAgents, user: str, password: str, server_port: int,
                 transport: str, *, register: bool, answer_code: int) -> None:
        self.agents = agents
        self.user = user
        self.password = password
        self.server_port = server_port
        self.transport = transport
        self.answer_code = answer_code
        self.reg_events: list[RegEvent] = []
        self.incoming: list[CallHandle] = []
        self.outgoing: list[CallHandle] = []
        self.misrouted: list[str] = []
        self.misrouted_calls: list[CallHandle] = []
        self.closed = False
        self.transport_id, self.port = agents._take_transport(transport)
        self.account: _Account | None = _Account(self)
        try:
            self.account.create(self._config(register))
        except BaseException:
            self.account = None
            agents._return_transport(transport, self.transport_id, self.port)
            raise

    @property
    def uri(self) -> str:
        return f"sip:{self.user}@{DOMAIN}"

    @property
    def contact_host_port(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def _config(self, register: bool) -> pj.AccountConfig:
        tparam = ";transport=tcp" if self.transport == "tcp" else ""
        server = f"sip:127.0.0.1:{self.server_port}{tparam}"
        cfg = pj.AccountConfig()
        cfg.idUri = self.uri
        if register:
            cfg.regConfig.registrarUri = server
        cfg.regConfig.retryIntervalSec = 0  # a failed registration stays failed: tests decide
        cfg.regConfig.timeoutSec = 300
        cfg.sipConfig.proxies.append(f"{server};lr")
        cfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", self.user, 0,
                                                       self.password))
        cfg.sipConfig.transportId = self.transport_id
        return cfg

    # -------------------------------------------------------------- registration
    @property
    def reg_code(self) -> int:
        return self.reg_events[-1].code if self.reg_events else 0

    @property
    def registered(self) -> bool:
        last = self.reg_events[-1] if self.reg_events else None
        return last is not None and 200 <= last.code < 300 and last.expiration > 0

    def wait_reg_event(self, after: int = 0, timeout: float = 5.0) -> RegEvent:
        """Wait for registration event number ``after + 1`` (count from :attr:`reg_events`)."""
        wait_for(lambda: len(self.reg_events) > after, timeout,
                 what=f"registration result for {self.user} ({self.transport})")
        return self.reg_events[after]

    def unregister(self, timeout: float = 3.0) -> RegEvent | None:
        """REGISTER with Expires 0 and wait for the answer (None when none came in time)."""
        self.agents.check_thread()
        if self.account is None or not self.registered:
            return None
        seen = len(self.reg_events)
        self.account.setRegistration(False)
        try:
            return self.wait_reg_event(seen, timeout)
        except TimeoutError:
            return None

    # -------------------------------------------------------------- calls
    def call(self, uri: str) -> CallHandle:
        """INVITE ``uri`` (through the server) and return the call handle at once."""
        self.agents.check_thread()
        if self.account is None:
            raise RuntimeError(f"phone {self.user} is closed")
        handle = CallHandle(self, "out", uri)
        handle.call = _Call(self.account, handle)
        self.outgoing.append(handle)
        handle.call.makeCall(uri, pj.CallOpParam(True))
        return handle

    def wait_incoming(self, count: int = 1, timeout: float = 5.0) -> CallHandle:
        """Wait until ``count`` calls have come in and return the latest."""
        wait_for(lambda: len(self.incoming) >= count, timeout,
                 what=f"incoming call #{count} at {self.user}")
        return self.incoming[count - 1]

    # -------------------------------------------------------------- callbacks (PJSIP thread)
    def _on_reg_state(self, prm: pj.OnRegStateParam) -> None:
        # rdata is empty when no response came (timeout, transport error).
        self.reg_events.append(RegEvent(int(prm.code), prm.reason, int(prm.expiration),
                                        prm.rdata.wholeMsg))

    def _on_incoming_call(self, prm: pj.OnIncomingCallParam) -> None:
        assert self.account is not None
        request = prm.rdata.wholeMsg
        first_line = request.split("\n", 1)[0].strip()
        handle = CallHandle(self, "in", first_line)
        handle.call = _Call(self.account, handle, prm.callId)
        match = _RURI_USER_RE.match(first_line)
        if match is None or match.group(1) != self.user:
            self.misrouted.append(first_line)
            self._answer(handle.call, 404)
            self.misrouted_calls.append(handle)
            return
        self.incoming.append(handle)
        if self.answer_code == 200:
            self._answer(handle.call, 180)
        self._answer(handle.call, self.answer_code)

    @staticmethod
    def _answer(call: _Call, code: int) -> None:
        prm = pj.CallOpParam()
        prm.statusCode = pj.StatusCode(code)
        call.answer(prm)

    # -------------------------------------------------------------- teardown (test thread)
    def close(self, timeout: float = 3.0) -> None:
        """Hang up, unregister, delete the account and give the transport back.

        Each step is bounded; the server may already be gone (restart tests), so failures to
        hear back are tolerated, but the local objects are always released.
        """
        if self.closed:
            return
        self.agents.check_thread()
        self.closed = True
        legs = [*self.outgoing, *self.incoming, *self.misrouted_calls]
        for leg in legs:
            if leg.call is not None and not leg.disconnected:
                try:
                    leg.hangup()
                    leg.wait_disconnected(timeout)
                except (TimeoutError, RuntimeError):
                    pass
        try:
            self.unregister(timeout)
        finally:
            account = self.account
            if account is not None:
                account.shutdown()
            self.account = None
            for leg in legs:
                leg.call = None
            del account
            gc.collect()
            self.agents._return_transport(self.transport, self.transport_id, self.port)
            self.agents._forget(self)

    def __repr__(self) -> str:
        return (f"Phone({self.user}@{DOMAIN} {self.transport}:127.0.0.1:{self.port} "
                f"-> {self.server_port}, reg={self.reg_code})")


class UserAgents:
    """The process's pjsua2 endpoint and its transports; makes :class:`Phone` objects.

    Use one per test session (a session fixture): ``UserAgents(log_path)`` starts PJSIP,
    :meth:`close` shuts it down.  A second instance while one is alive is refused, as pjsua2
    refuses a second ``Endpoint``.
    """

    _active: UserAgents | None = None

    def __init__(self, log_path: Path) -> None:
        if UserAgents._active is not None:
            raise RuntimeError("pjsua2 allows one Endpoint per process; close the other first")
        self.log_path = log_path
        #: Tracebacks of exceptions raised inside callbacks (they must never reach PJSIP).
        self.errors: list[str] = []
        self._phones: list[Phone] = []
        self._free: dict[str, list[tuple[int, int]]] = {"udp": [], "tcp": []}
        self._lock = threading.Lock()
        self._thread = threading.get_ident()
        ep = pj.Endpoint()
        ep.libCreate()
        self.ep: pj.Endpoint = ep
        try:
            cfg = pj.EpConfig()
            cfg.uaConfig.threadCnt = 1
            cfg.uaConfig.mainThreadOnly = False
            cfg.uaConfig.maxCalls = 32  # wide call-id rotation: a late Call delete never hits
            cfg.logConfig.consoleLevel = 0  # keep pytest's output clean
            cfg.logConfig.level = 4  # level 4 carries the SIP messages (msgLogging)
            cfg.logConfig.msgLogging = 1
            cfg.logConfig.filename = str(log_path)
            cfg.medConfig.threadCnt = 0  # media is not under test; no extra thread
            ep.libInit(cfg)
            ep.audDevManager.setNullDev()  # no sound card on a test box
            for kind, ttype in (("udp", pj.TransportType.UDP), ("tcp", pj.TransportType.TCP)):
                for _ in range(POOL_SIZE):
                    tcfg = pj.TransportConfig()
                    tcfg.boundAddress = "127.0.0.1"
                    tcfg.port = 0
                    tid = ep.transportCreate(ttype, tcfg)
                    port = int(ep.transportGetInfo(tid).localName.rsplit(":", 1)[1])
                    self._free[kind].append((tid, port))
            ep.libStart()
        except BaseException:
            ep.libDestroy()
            raise
        UserAgents._active = self

    # -------------------------------------------------------------- phones
    def register(self, user: str, password: str, server_port: int, transport: str = "udp",
                 *, answer_code: int = 200, timeout: float = 5.0) -> Phone:
        """A phone that REGISTERs with ``server_port`` and waits for the registrar's verdict.

        Returns once the first registration result is in, successful or not: check
        :attr:`Phone.registered` / :attr:`Phone.reg_code`.
        """
        phone = self.phone(user, password, server_port, transport, register=True,
                           answer_code=answer_code)
        try:
            phone.wait_reg_event(0, timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None
        return phone

    def phone(self, user: str, password: str, server_port: int, transport: str = "udp", *,
              register: bool = False, answer_code: int = 200) -> Phone:
        """A phone for ``user``; with ``register=False`` it only places (and answers) calls."""
        self.check_thread()
        if transport not in self._free:
            raise ValueError(f"transport must be udp or tcp, got {transport!r}")
        phone = Phone(self, user, password, server_port, transport, register=register,
                      answer_code=answer_code)
        with self._lock:
            self._phones.append(phone)
        return phone

    @property
    def phones(self) -> list[Phone]:
        with self._lock:
            return list(self._phones)

    def close_phones(self) -> None:
        """Close every phone still open (test teardown)."""
        for phone in reversed(self.phones):
            phone.close()

    # -------------------------------------------------------------- the wire, from the log
    def log_text(self) -> str:
        _LIBC.fflush(None)
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def messages(self, since: int = 0) -> list[LoggedMessage]:
        """Every SIP message in PJSIP's log from character offset ``since`` on."""
        text = self.log_text()[since:]
        return [LoggedMessage(d, t, peer, body.replace("\r\n", "\n"))
                for d, t, peer, body in _MSG_RE.findall(text)]

    def log_offset(self) -> int:
        """The current end of the log, to pass to :meth:`messages` later."""
        return len(self.log_text())

    # -------------------------------------------------------------- internals
    def check_thread(self) -> None:
        """Refuse PJSIP calls from a thread PJSIP does not know.

        ``libCreate`` registers the creating thread; any other thread would have to call
        ``libRegisterThread``, which this binding does not expose (PJSIP asserts and aborts
        the process on an unregistered thread).
        """
        if threading.get_ident() != self._thread:
            raise RuntimeError("pjsua2 must be driven from the thread that created UserAgents")

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a callback body; an exception is recorded, never propagated into PJSIP."""
        try:
            fn(*args)
        except BaseException:
            self.errors.append(traceback.format_exc())

    def _call_op(self, op: Callable[[], object]) -> None:
        """Run a call operation, retrying when PJSIP timed out waiting for the call's lock."""
        for attempt in range(_CALL_OP_ATTEMPTS):
            try:
                op()
                return
            except RuntimeError:
                if attempt == _CALL_OP_ATTEMPTS - 1:
                    raise
                time.sleep(0.05)

    def _take_transport(self, kind: str) -> tuple[int, int]:
        with self._lock:
            if not self._free[kind]:
                raise RuntimeError(f"all {POOL_SIZE} {kind} transports are in use; close a phone")
            return self._free[kind].pop(0)

    def _return_transport(self, kind: str, tid: int, port: int) -> None:
        with self._lock:
            self._free[kind].append((tid, port))

    def _forget(self, phone: Phone) -> None:
        with self._lock:
            if phone in self._phones:
                self._phones.remove(phone)

    def close(self) -> None:
        """Close all phones, then destroy the library (in this order, or PJSIP crashes)."""
        if UserAgents._active is not self:
            return
        self.check_thread()
        try:
            self.close_phones()
        finally:
            gc.collect()
            self.ep.libDestroy()
            del self.ep
            gc.collect()
            UserAgents._active = None

    @classmethod
    def session(cls, log_path: Path) -> Iterator[UserAgents]:
        """Generator for a session fixture: ``yield from UserAgents.session(path)``."""
        agents = cls(log_path)
        try:
            yield agents
        finally:
            agents.close()
