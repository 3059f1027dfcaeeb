"""SIP load benchmark: rate ladders of SIPp scenarios against sipbill, Kamailio or any server.

Not a test: it prints Markdown tables (and ``--json``) of what a SIP server does on this
machine, per scenario:

* **max rate** -- the highest rate (SIPp calls, i.e. scenario runs, per second) that SIPp
  completed with zero failed calls, on time, and with retransmissions (a response later than
  500 ms) for at most 1% of the calls (``--max-retrans``).  Rates double from
  ``--start-rate`` (200/s) for ``--step-seconds`` (8 s) each until a step falls short of
  that, SIPp falls more than 10% behind the rate, or one server process uses
  ``--saturation`` of its core; then the gap between the last good and the first bad rate
  is halved twice.  Before each step the benchmark waits for the server to finish the
  previous step's backlog; the "stopped by" column names the first rate that fell short.
* **server CPU per 1,000** -- CPU-seconds (user + system, /proc/PID/stat) the server's own
  processes spent per 1,000 successful runs at the max rate, and the same for the server plus
  its PostgreSQL.  This does not depend on how much of the two cores SIPp takes; its inverse,
  runs per server CPU-second, is what issue 3's targets are stated in.  It is read in the
  **steady state**: after the ladder, ``--steady-share`` (75 %) of the max rate (or a fixed
  ``--steady-rate``, e.g. ``register=4800``) runs for ``--steady-seconds`` (50 s; a max rate
  found with the server at saturation does not hold that long) and the CPU is read only from
  ``--steady-from`` (34 s: past Timer J's 32 s, so as many answered transactions end as begin,
  each paying for its own end) to 2 s before the end; the runs in that window are the rate
  times its length (the step must pass, so SIPp kept the rate).  A ladder step alone is 8 s:
  it pays for none of its own transactions' ends but for the ends of the steps before it, so
  its figure (also printed, "ladder step") moves with the rates that came before it.  A busier
  server spends less per run (more datagrams per wake-up and per system call, more bindings
  per database commit), so the steady figure is the more cautious one when the ladder step was
  not disturbed. Should the steady step not pass, the ladder step's figure is printed instead,
  marked so.
* **median / p99** -- response time at half the max rate over ``--latency-seconds`` (45 s:
  long enough for the answered transactions lingering for Timer J, 32 s, and the garbage
  collector's work on them to reach their steady state; run after a ``--cooldown`` of 34 s
  when the step before it was overloaded or ran a server process at ``--saturation``), per
  SIP transaction, from kernel timestamps of the server's packets on loopback
  (sipcapture.py; SIPp's own clock moves in 4 ms steps here).  A second table lists each
  transaction kind (``REGISTER 401``, ``REGISTER 200``, ``INVITE 200`` ...).  Without the
  privilege to capture, or for a server on another host, SIPp's ``-trace_rtt`` is used
  instead.
* **memory** -- RSS and PSS of the server at start-up, then with 10,000 and 100,000
  registered contacts (``--contacts``, registered by reg_flood.py) read ``--settle`` seconds
  after the last REGISTER, and for sipbill once more after a restart that loads the same
  bindings from the database; bytes per contact beyond the baseline.  The reading right after
  registering includes what the registration traffic left behind (completed transactions live
  for Timer J, 32 s, and freed memory is not returned to the OS); the one after the restart
  is the cost of the bindings themselves.

Scenarios (``sipp-scenarios/``); each scenario's SIPp keeps one port for all its steps:

=========  ===============================================================================
register   register_auth.xml over 1,000 users (``--users``): REGISTER, 401, REGISTER, 200
           (2 transactions; each step refreshes the same 1,000 bindings).
call       bench_uac_call.xml -> uas.xml: INVITE/100/180/200/ACK/BYE/200 through the
           record-routing proxy to a registered SIPp UAS (2 server transactions and 2
           client transactions in the proxy); the caller is of a foreign domain, so it is
           not challenged, as a call arriving from a peer would not be.
message    message_uac.xml -> message_uas.xml: MESSAGE, 407, MESSAGE with credentials, 200
           (2 server transactions, 1 client transaction).
options    options.xml: OPTIONS to the server itself, 200 (1 transaction).
=========  ===============================================================================

Servers:

* default: ``sipbill serve`` started here with UDP on a free loopback port, its database
  either an embedded PostgreSQL in a temporary directory or a fresh database created in the
  server ``--dsn`` names (dropped afterwards).  Subscribers ``u1..uN``, ``callee`` and
  ``msgsink`` (password ``bench-`` + name, domain ``localhost``) are written by SQL with the
  derived secrets of sipcore.subscribers.derive_secrets.  Auth is MD5-only and does not
  check the digest uri, because SIPp 3.6 answers only the first challenge and puts the server
  address into that uri (as in tests/sipcore/test_e2e_sipp.py).  ``--core-only`` turns the
  modules off (billing, msilo, presence, clicktodial): the same job as the Kamailio config.
* ``--kamailio``: Kamailio (bench/kamailio.cfg: HA1s in an htable, usrloc in memory,
  record-routing proxy, 2 UDP workers) with the same subscribers.
* ``--target HOST:PORT --pids PID,...``: any running server that has those subscribers;
  CPU and memory are read for the given processes and their descendants (``--db-pids`` for a
  database's).

Run: ``.venv/bin/python bench/sip_load.py`` (about 18 minutes; ``--quick``, 3-second steps
and 10,000 contacts, about 2).  It
needs ``sipp`` (Debian sip-tester) and, for ``--kamailio``, ``kamailio``; the wire capture
needs root or CAP_NET_RAW.  On a shared machine look at ``uptime`` first: other load on the
two cores shows up as lower max rates and longer tails (the CPU-per-1,000 figures are much
less affected); every step logs the machine's busy share and load average to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SCENARIOS = REPO / "sipp-scenarios"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import procstats  # noqa: E402
from reg_flood import User, register_users  # noqa: E402
from sipcapture import Capture  # noqa: E402

DOMAIN = "localhost"
PASSWORD_PREFIX = "bench-"
CALLEE = "callee"
MSG_SINK = "msgsink"
ALL_SCENARIOS = ("register", "call", "message", "options")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A UDP port free on 127.0.0.1 (SIPp would otherwise grab 5060 when it is free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user(name: str) -> User:
    return User(name, DOMAIN, PASSWORD_PREFIX + name)


def load_users(n: int) -> list[User]:
    return [user(f"u{i}") for i in range(1, n + 1)]


def all_subscribers(n: int) -> list[User]:
    return [*load_users(n), user(CALLEE), user(MSG_SINK)]


def write_csv(path: Path, users: Sequence[User]) -> Path:
    """SIPp injection file in the format of sipp-scenarios/users.csv."""
    lines = ["SEQUENTIAL"] + [
        f"{u.name};{u.domain};[authentication username={u.name} password={u.password}]"
        for u in users
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Servers under test


class Server:
    """Where the load goes and which processes are charged for it."""

    name = "server"
    host = "127.0.0.1"
    port = 0

    def server_roots(self) -> list[int]:
        raise NotImplementedError

    def db_roots(self) -> list[int]:
        return []

    def server_pids(self) -> list[int]:
        return procstats.tree(self.server_roots(), exclude=self.db_roots())

    def db_pids(self) -> list[int]:
        return procstats.tree(self.db_roots())

    def stop(self) -> None:
        return None

    #: Whether :meth:`restart` brings the server back with the same bindings.
    restartable = False

    def restart(self) -> None:
        """Restart with the same state (only if :attr:`restartable`)."""
        raise NotImplementedError


class TargetServer(Server):
    def __init__(self, target: str, pids: list[int], db_pids: list[int]) -> None:
        host, _, port = target.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self._pids, self._db = pids, db_pids
        self.name = f"target {target}"

    def server_roots(self) -> list[int]:
        return self._pids

    def db_roots(self) -> list[int]:
        return self._db


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_udp(host: str, port: int, proc: subprocess.Popen[bytes], log_path: Path,
                  timeout: float = 60.0) -> None:
    """Until the server answers an OPTIONS (any response will do)."""
    probe = (
        f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{{p}};branch=z9hG4bKprobe{uuid.uuid4().hex[:12]};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:probe@bench.invalid>;tag=probe\r\n"
        f"To: <sip:{host}:{port}>\r\nCall-ID: {uuid.uuid4().hex}@probe\r\nCSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.3)
        data = probe.replace("{p}", str(s.getsockname()[1])).encode()
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            s.sendto(data, (host, port))
            with contextlib.suppress(TimeoutError):
                if s.recv(65535).startswith(b"SIP/2.0"):
                    return
    raise RuntimeError(f"server did not come up; log {log_path}:\n"
                       + log_path.read_text(errors="replace")[-3000:])


class SipbillServer(Server):
    """``sipbill serve`` on a fresh database, with the bench subscribers."""

    MODULES = ("billing", "msilo", "presence", "clicktodial")

    def __init__(self, workdir: Path, n_users: int, dsn: str | None, workers: int,
                 core_only: bool = False, launch: bool = True) -> None:
        """``launch=False``: provision the database and write nothing else; the caller runs
        the server from :meth:`config` itself (bench/register_cpu.py runs it in-process)."""
        self.name = ("sipbill" + (" core only" if core_only else "")
                     + (f" ({workers} workers)" if workers > 1 else ""))
        self.workdir = workdir
        self.workers = workers
        self.core_only = core_only
        self.port = free_port()
        self.embedded: Any = None
        self.pgdata = workdir / "pgdata"
        self.admin_dsn = dsn
        self._db_roots: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.dbname = "sipbill_bench_" + uuid.uuid4().hex[:8]
        try:
            if dsn is None:
                from sipbill.db import EmbeddedPostgres

                self.embedded = EmbeddedPostgres(self.pgdata)
                self.admin_dsn = self.embedded.start()
            assert self.admin_dsn is not None
            parts = urlsplit(self.admin_dsn)
            self.dsn = urlunsplit(parts._replace(path="/" + self.dbname))
            asyncio.run(self._provision(all_subscribers(n_users)))
            if launch:
                self._start()
        except BaseException:
            self.stop()  # no PostgreSQL or database left behind
            raise

    async def _provision(self, users: list[User]) -> None:
        import asyncpg

        from sipbill.db import migrate
        from sipcore.subscribers import derive_secrets

        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{self.dbname}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(self.dsn)
        try:
            await migrate(conn)
            rows = [(u.name, u.domain, *derive_secrets(u.name, u.domain, u.password))
                    for u in users]
            await conn.copy_records_to_table(
                "subscribers", records=rows,
                columns=["username", "domain", "ha1_md5", "ha1_sha256", "password_md5"])
            # The postmaster and its children, found from one of our own backends: works for
            # the embedded server and for a --dsn server on this machine alike.
            backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
            postmaster = procstats.parent_of(backend)
            if postmaster and procstats.is_postgres(postmaster):
                self._db_roots = [postmaster]
            else:
                log("the database runs elsewhere: its CPU is not measured")
        finally:
            await conn.close()
        log(f"provisioned {len(users)} subscribers in {self.dbname}")

    def config(self) -> str:
        # Written by hand rather than with tests.support.to_toml: the bench must not import
        # the test package.  Comments say why each non-default is there.
        return f"""
[server]
domains = ["{DOMAIN}"]
data_dir = "{self.workdir}"
# Info logs a line per registration; the comparison is with a Kamailio that logs errors only.
log_level = "warning"
workers = {self.workers}

[[server.listen]]
transport = "udp"
host = "127.0.0.1"
port = {self.port}

[database]
url = "{self.dsn}"

[http]
enabled = false

[control]
enabled = false

[auth]
# SIPp 3.6 answers only the first challenge, only MD5, and puts the server address into the
# digest uri (see tests/sipcore/test_e2e_sipp.py).
algorithms = ["MD5"]
check_uri = false
# All load comes from one source address; a few stale-nonce retries of an overloaded step
# must not lock SIPp out for the steps after it.
source_failure_limit = 1000
user_failure_limit = 0
""" + "".join(
            # --core-only: registrar, location and proxy without the product's modules (the
            # balance lookup on every REGISTER, free-call records, offline messages ...), the
            # same job as the Kamailio configuration does.
            f"\n[{module}]\nenabled = false\n" for module in self.MODULES if self.core_only)

    def _start(self) -> None:
        cfg = self.workdir / "sipbill.toml"
        cfg.write_text(self.config())
        self.log_path = self.workdir / "sipbill.log"
        sipbill = str(Path(sys.executable).parent / "sipbill")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sipbill, "serve", "--config", str(cfg)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # The SIP socket is bound (and may answer) before start-up has finished loading the
        # bindings; the banner comes last (tests/support.py waits for it too).
        deadline = time.monotonic() + 120.0
        while "sipbill listening on" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sipbill did not start; log {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        _wait_for_udp(self.host, self.port, self.proc, self.log_path)
        log(f"sipbill pid {self.proc.pid} on udp:127.0.0.1:{self.port}")

    def server_roots(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def db_roots(self) -> list[int]:
        return self._db_roots

    # Bindings are written through to PostgreSQL and loaded at start-up, so a restarted
    # server holds exactly the registered contacts and none of the registration traffic.
    restartable = True

    def restart(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)
        self._start()

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)
            self.proc = None
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
        elif self.admin_dsn is not None:
            asyncio.run(self._drop())

    async def _drop(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        finally:
            await conn.close()


class KamailioServer(Server):
    """Kamailio with bench/kamailio.cfg and the subscribers' HA1s in a db_text directory."""

    def __init__(self, workdir: Path, n_users: int, workers: int) -> None:
        binary = shutil.which("kamailio") or "/usr/sbin/kamailio"
        if not Path(binary).exists():
            raise RuntimeError("kamailio not installed")
        self.name = f"Kamailio ({workers} workers)"
        self.port = free_port()
        dbdir = workdir / "kamailio-db"
        write_dbtext(dbdir, all_subscribers(n_users))
        self.log_path = workdir / "kamailio.log"
        cmd = [binary, "-f", str(BENCH / "kamailio.cfg"), "-DD", "-E", "-n", str(workers),
               "-m", "512", "-M", "64", "-P", str(workdir / "kamailio.pid"),
               "-A", f"BENCH_LISTEN=udp:127.0.0.1:{self.port}",
               "-A", f'BENCH_DB="text://{dbdir}"']
        with open(self.log_path, "ab") as out:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for_udp(self.host, self.port, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise
        log(f"kamailio pid {self.proc.pid} on udp:127.0.0.1:{self.port}")

    def server_roots(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)
            self.proc = None


def write_dbtext(dbdir: Path, users: Sequence[User]) -> None:
    """A db_text database with the ``htable`` table kamailio.cfg loads its ``ha1`` hash from:
    key ``user@domain``, value the MD5 HA1 (key type 0 = plain key, value type 0 = string)."""
    import hashlib

    dbdir.mkdir(parents=True, exist_ok=True)
    (dbdir / "version").write_text(
        "id(int,auto) table_name(string) table_version(int) \n0:htable:2\n")
    rows = ["id(int,auto) key_name(string) key_type(int) value_type(int) key_value(string) "
            "expires(int) "]
    for i, u in enumerate(users, 1):
        ha1 = hashlib.md5(f"{u.name}:{u.domain}:{u.password}".encode()).hexdigest()
        # db_text would need ':' escaped; no name or domain here has one.
        rows.append(f"{i}:{u.name}@{u.domain}:0:0:{ha1}:0")
    (dbdir / "htable").write_text("\n".join(rows) + "\n")


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class CpuSample:
    at: float
    server: dict[int, float]
    db: dict[int, float]


def sample_cpu(srv: Server) -> CpuSample:
    return CpuSample(time.monotonic(), procstats.tree_cpu(srv.server_pids()),
                     procstats.tree_cpu(srv.db_pids()))


def wait_idle(srv: Server, busy: float = 0.15, longest: float = 30.0) -> float:
    """Wait until the server and its database use less than ``busy`` of a core.

    An overloaded step leaves a backlog (queued datagrams, retransmissions, write-behind to
    the database) that would otherwise be charged to, and slow down, the next step.
    Returns the seconds waited.
    """
    start = time.monotonic()
    prev = sample_cpu(srv)
    while time.monotonic() - start < longest:
        time.sleep(0.5)
        cur = sample_cpu(srv)
        used = (sum(procstats.cpu_delta(prev.server, cur.server).values())
                + sum(procstats.cpu_delta(prev.db, cur.db).values()))
        if used / (cur.at - prev.at) < busy:
            break
        prev = cur
    return time.monotonic() - start


@dataclass
class StepResult:
    scenario: str
    rate: int
    calls: int  # what SIPp was told to run
    created: int
    ok: int
    failed: int  # failed + never finished, on the UAC and (for calls/messages) the UAS
    retransmissions: int
    wall: float
    server_cpu: float
    db_cpu: float
    peak_process_util: float  # busiest server process: CPU-seconds per wall second
    machine_busy: float
    sipp_seconds: float
    load_average: float  # 1-minute load average after the step: others' work shows here
    udp_drops: int  # datagrams the kernel dropped for a full receive buffer, any socket
    # A steady step: the CPU in the window (window_seconds > 0) that cpu_per_1000 reads.
    window_seconds: float = 0.0
    window_server_cpu: float = 0.0
    window_db_cpu: float = 0.0
    # Response times in ms keyed by "METHOD status" (wire capture) or "rtd" (SIPp's clock).
    latency_ms: dict[str, list[float]] = field(default_factory=dict, repr=False)
    latency_source: str = ""

    @property
    def all_latencies(self) -> list[float]:
        return [v for values in self.latency_ms.values() for v in values]

    @property
    def achieved_rate(self) -> float:
        return self.created / self.sipp_seconds if self.sipp_seconds > 0 else 0.0

    @property
    def rate_held(self) -> bool:
        # SIPp paces call creation itself; when the machine (or the server's answers) cannot
        # keep up it falls behind, and the step took longer than calls/rate.  Allow 10% and a
        # second for start-up and the last calls' own duration.
        return self.sipp_seconds <= 1.1 * self.calls / self.rate + 1.0

    max_retrans_share: float = 0.01

    @property
    def passed(self) -> bool:
        return self.verdict == ""

    @property
    def verdict(self) -> str:
        """Why the step does not count as sustained ("" if it does)."""
        if self.failed or self.ok < self.calls:
            return f"{max(self.failed, self.calls - self.ok)} failed"
        # A retransmission means a response took longer than T1 (500 ms): the server was
        # queueing, and SIPp's retransmissions add load of their own.  Beyond a trace of
        # them the rate is not sustainable even if every call still completed.
        if self.retransmissions > self.max_retrans_share * self.calls:
            return f"{self.retransmissions} retransmissions"
        if not self.rate_held:
            return "rate not held"
        return ""

    def cpu_per_1000(self, with_db: bool = False) -> float:
        """CPU-seconds per 1,000 successful runs: over the steady window when this step has
        one (runs in it: the rate times its length), else over the whole step."""
        if self.window_seconds > 0:
            cpu = self.window_server_cpu + (self.window_db_cpu if with_db else 0.0)
            return 1000.0 * cpu / (self.rate * self.window_seconds)
        cpu = self.server_cpu + (self.db_cpu if with_db else 0.0)
        return 1000.0 * cpu / self.ok if self.ok else float("nan")

    def summary(self) -> str:
        return (f"{self.scenario} {self.rate}/s: ok {self.ok}/{self.calls} failed {self.failed} "
                f"retrans {self.retransmissions}, udp drops {self.udp_drops}, "
                f"{self.achieved_rate:.0f}/s created, server "
                f"{self.server_cpu:.2f} cpu-s (peak proc {self.peak_process_util:.0%}), db "
                f"{self.db_cpu:.2f} cpu-s, machine {self.machine_busy:.0%} "
                f"(load {self.load_average:.1f}), "
                f"{self.cpu_per_1000():.3f} cpu-s/1000"
                + (f", p50 {percentile(self.all_latencies, 50):.2f} ms p99 "
                   f"{percentile(self.all_latencies, 99):.2f} ms ({self.latency_source})"
                   if self.latency_ms else ""))


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(pct / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[k]


def read_sipp_stat(path: Path) -> dict[str, str]:
    """The last row of a SIPp -trace_stat CSV as a dict (empty if none was written)."""
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    return dict(zip(lines[0].split(";"), lines[-1].split(";"), strict=False))


def _int(row: dict[str, str], key: str) -> int:
    try:
        return int(row.get(key, "0") or 0)
    except ValueError:
        return 0


def first_error(path: Path, stderr: str) -> str:
    """The first error SIPp logged that is not the scenario's own expected timeout."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    # Each entry starts with a date and tab, not always on a new line; a message quoted in
    # one spans several lines.
    for entry in re.split(r"(?=\d{4}-\d\d-\d\d\t)", text)[1:]:
        if "jumping to label" not in entry:
            return " ".join(entry.split())[:400]
    lines = stderr.strip().splitlines()
    return lines[-1][:300] if lines else "(no error logged)"


def read_rtts(directory: Path) -> list[float]:
    """Response times (ms) from SIPp's ``*_rtt.csv`` (rows ``date_ms;response_time_ms;rtd``)."""
    out: list[float] = []
    for path in directory.glob("*_rtt.csv"):
        for line in path.read_text().splitlines()[1:]:
            cols = line.split(";")
            if len(cols) >= 2:
                with contextlib.suppress(ValueError):
                    out.append(float(cols[1]))
    return out


class Uas:
    """A SIPp UAS (uas.xml or message_uas.xml) registered as a local user from its own port."""

    def __init__(self, srv: Server, workdir: Path, scenario: str, username: str) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"uas-{username}-", dir=workdir))
        csv = write_csv(self.dir / "me.csv", [user(username)])
        # Registered by SIPp from the very port the UAS will answer on, so the binding's source
        # address (RFC 3581) is the UAS, as in tests/sipcore/test_e2e_sipp.py.
        reg = run_sipp(srv, "register_auth.xml", self.dir, ["-inf", str(csv)], rate=1, calls=1,
                       timeout=15, local_port=self.port, spread=False)
        if reg.returncode != 0:
            raise RuntimeError(f"{username} did not register: {reg.stdout[-2000:]}")
        self.stat = self.dir / "uas_stat.csv"
        self.proc = subprocess.Popen(
            ["sipp", "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(self.port),
             "-nostdin", "-trace_stat", "-stf", str(self.stat), "-fd", "1",
             "-buff_size", str(8 << 20), "-max_recv_loops", "10000",
             "-max_sched_loops", "10000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir)
        time.sleep(0.5)

    def failed(self) -> int:
        """Calls the UAS saw fail so far (the stat file is rewritten every second)."""
        row = read_sipp_stat(self.stat)
        return _int(row, "FailedCall(C)")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # SIPp: quit after dumping statistics
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


#: ``--spread``: SIPp transport ``un`` (a UDP socket per call) instead of ``u1`` (one socket),
#: so a server whose workers share the port with SO_REUSEPORT (hashed by source address) gets
#: the calls spread over its workers instead of all on one.
SPREAD = {"on": False}


def run_sipp(srv: Server, scenario: str, workdir: Path, args: Sequence[str], *, rate: float,
             calls: int, timeout: float, local_port: int | None = None,
             rtt: bool = False, spread: bool = True) -> subprocess.CompletedProcess[str]:
    spread = spread and SPREAD["on"]
    transport = ["-t", "un", "-max_socket", "5000"] if spread else ["-t", "u1"]
    cmd = ["sipp", f"{srv.host}:{srv.port}", "-sf", str(SCENARIOS / scenario),
           "-i", "127.0.0.1", "-p", str(local_port or free_port()), *transport,
           "-r", str(rate), "-m", str(calls), "-l", str(max(100, int(rate * 30))),
           "-timeout", f"{int(timeout)}s", "-nostdin",
           "-trace_stat", "-stf", str(workdir / "stat.csv"), "-fd", "1",
           "-buff_size", str(8 << 20), "-max_recv_loops", "10000", "-max_sched_loops", "10000",
           "-recv_timeout", "5000",
           # Errors to a file: on stderr SIPp slows to a crawl when every call reports one
           # (the caller's expected timeout waiting for a late 180 is reported as an error).
           "-trace_err", "-error_file", str(workdir / "errors.log")]
    if rtt:
        cmd += ["-trace_rtt", "-rtt_freq", "1000"]
    cmd += list(args)
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          timeout=timeout + 30, stdin=subprocess.DEVNULL)


@dataclass
class ScenarioSpec:
    name: str
    sipp_file: str
    args: list[str]
    uas: Uas | None = None
    # One SIPp port for all steps of a scenario: REGISTER steps then refresh the same
    # bindings like phones do, instead of adding a contact per step until the AoR is full.
    local_port: int = field(default_factory=free_port)


class Bench:
    def __init__(self, srv: Server, workdir: Path, args: argparse.Namespace) -> None:
        self.srv = srv
        self.workdir = workdir
        self.args = args
        self.machine = procstats.MachineCpu()

    def step(self, spec: ScenarioSpec, rate: int, latency: bool = False,
             steady: bool = False) -> StepResult:
        seconds = (self.args.latency_seconds if latency
                   else self.args.steady_seconds if steady else self.args.step_seconds)
        # Wire timestamps when the server is on this machine's loopback and we may capture;
        # otherwise SIPp's coarse clock (see sipcapture).
        wire = latency and self.srv.host.startswith("127.") and Capture.available()
        calls = max(1, int(rate * seconds))
        stepdir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-{rate}-", dir=self.workdir))
        waited = wait_idle(self.srv)
        if waited > 2.0:
            log(f"waited {waited:.0f} s for the server to finish earlier work")
        uas_failed0 = spec.uas.failed() if spec.uas else 0
        drops0 = procstats.udp_receive_drops()
        self.machine.sample()
        before = sample_cpu(self.srv)
        t0 = time.monotonic()
        window = (WindowSampler(self.srv, t0 + self.args.steady_from, t0 + seconds - 2.0)
                  if steady else None)
        with Capture(self.srv.port) if wire else contextlib.nullcontext() as cap:
            proc = run_sipp(self.srv, spec.sipp_file, stepdir, spec.args, rate=rate,
                            calls=calls, timeout=seconds + 10, local_port=spec.local_port,
                            rtt=latency and not wire)
        sipp_seconds = time.monotonic() - t0
        after = sample_cpu(self.srv)
        busy = self.machine.sample()
        wall = after.at - before.at
        server = procstats.cpu_delta(before.server, after.server)
        db = procstats.cpu_delta(before.db, after.db)
        row = read_sipp_stat(stepdir / "stat.csv")
        created = _int(row, "TotalCallCreated")
        ok = _int(row, "SuccessfulCall(C)")
        failed = _int(row, "FailedCall(C)")
        unfinished = max(0, created - ok - failed) + max(0, calls - created)
        uas_failed = 0
        if spec.uas is not None:
            time.sleep(1.2)  # the UAS rewrites its statistics once a second
            uas_failed = spec.uas.failed() - uas_failed0
        if not row:
            log(f"SIPp wrote no statistics (rc {proc.returncode}): {proc.stderr[-1500:]}")
        res = StepResult(
            scenario=spec.name, rate=rate, calls=calls, created=created, ok=ok,
            failed=failed + unfinished + uas_failed,
            retransmissions=_int(row, "Retransmissions(C)"), wall=wall,
            server_cpu=sum(server.values()), db_cpu=sum(db.values()),
            peak_process_util=max(server.values(), default=0.0) / wall if wall > 0 else 0.0,
            machine_busy=busy, sipp_seconds=sipp_seconds, load_average=os.getloadavg()[0],
            udp_drops=procstats.udp_receive_drops() - drops0,
            max_retrans_share=self.args.max_retrans)
        if window is not None:
            window.join()
            if window.samples is not None and res.passed:
                first, last = window.samples
                res.window_seconds = last.at - first.at
                res.window_server_cpu = sum(procstats.cpu_delta(first.server,
                                                                last.server).values())
                res.window_db_cpu = sum(procstats.cpu_delta(first.db, last.db).values())
        if isinstance(cap, Capture):
            res.latency_source = "wire"
            res.latency_ms = {kind: [1000.0 * t for t in times]
                              for kind, times in sorted(cap.response_times().items())}
        elif latency:
            res.latency_source = "sipp"
            res.latency_ms = {"rtd": read_rtts(stepdir)}
        if res.failed:
            log("SIPp: " + first_error(stepdir / "errors.log", proc.stderr))
        shutil.rmtree(stepdir, ignore_errors=True)
        log(res.summary())
        return res

    def ladder(self, spec: ScenarioSpec) -> ScenarioResult:
        a = self.args
        steps: list[StepResult] = []
        good: StepResult | None = None
        bad: StepResult | None = None
        stop_reason = f"reached --max-rate {a.max_rate}"
        rate = a.start_rate
        res = self.step(spec, rate)
        steps.append(res)
        # A server that cannot take the start rate: halve until a step passes, so that it
        # still gets figures, and refine between that and the lowest rate that failed.
        while not res.passed and rate // 2 >= 25:
            bad, rate = res, rate // 2
            time.sleep(1.0)
            res = self.step(spec, rate)
            steps.append(res)
        if not res.passed:
            return ScenarioResult(spec.name, None, None, steps, f"{res.verdict} at {rate}/s")
        good = res
        while bad is None:
            if good.peak_process_util >= a.saturation:
                stop_reason = (f"a server process at {good.peak_process_util:.0%} of a core "
                               f"at {good.rate}/s")
                break
            rate = int(rate * a.growth)
            if rate > a.max_rate:
                break
            time.sleep(1.0)
            res = self.step(spec, rate)
            steps.append(res)
            if res.passed:
                good = res
            else:
                bad = res
        for _ in range(a.refine if good is not None and bad is not None else 0):
            assert good is not None and bad is not None
            mid = int(round((good.rate + bad.rate) / 2 / 25.0) * 25)
            if mid <= good.rate or mid >= bad.rate:
                break
            time.sleep(1.0)
            res = self.step(spec, mid)
            steps.append(res)
            if res.passed:
                good = res
            else:
                bad = res
        if bad is not None:
            stop_reason = f"{bad.verdict} at {bad.rate}/s"
        latency: StepResult | None = None
        steady: StepResult | None = None
        if good is not None and a.steady_seconds > 0:
            # A share of that rate in its steady state (see the module doc): after a
            # cool-down, so that the ends of the ladder's transactions are not in the window.
            log(f"cooling down {a.cooldown:g} s before the steady step")
            time.sleep(a.cooldown)
            rate = a.steady_rate.get(spec.name, 0)
            if not rate:
                rate = max(1, int(good.rate * a.steady_share))
                if rate >= 200:
                    rate -= rate % 100
            steady = self.step(spec, rate, steady=True)
            steps.append(steady)
            if steady.window_seconds <= 0:
                why = steady.verdict or "no window"
                log(f"the steady step at {rate}/s did not pass ({why}): the ladder step's "
                    "CPU figure stands")
                steady = None
        if good is not None:
            last = steps[-1]
            if (not last.passed or last.peak_process_util >= a.saturation
                    or a.steady_seconds > 0):
                # An overloaded step, one that passed with the server at saturation, or the
                # 50-second steady step leaves completed transactions behind for Timer J
                # (32 s) and a larger heap; the latency step should not measure that
                # aftermath.
                log(f"cooling down {a.cooldown:g} s before the latency step")
                time.sleep(a.cooldown)
            else:
                time.sleep(1.0)
            latency = self.step(spec, max(1, good.rate // 2), latency=True)
            steps.append(latency)
        return ScenarioResult(spec.name, good, latency, steps, stop_reason, steady)


@dataclass
class ScenarioResult:
    name: str
    best: StepResult | None
    latency: StepResult | None
    steps: list[StepResult]
    stop_reason: str
    steady: StepResult | None = None  # a share of the max rate, with a steady window (passed)

    @property
    def cpu_step(self) -> StepResult | None:
        """The step whose CPU figure the table gives: the steady one, else the ladder's."""
        return self.steady if self.steady is not None else self.best


class WindowSampler:
    """Samples the server's CPU at two instants (``time.monotonic()``) from a thread, while
    the calling thread waits for SIPp."""

    def __init__(self, srv: Server, start: float, end: float) -> None:
        self.samples: tuple[CpuSample, CpuSample] | None = None
        self._thread = threading.Thread(target=self._run, args=(srv, start, end), daemon=True)
        self._thread.start()

    def _run(self, srv: Server, start: float, end: float) -> None:
        if end - start < 1.0:
            return
        time.sleep(max(0.0, start - time.monotonic()))
        first = sample_cpu(srv)
        time.sleep(max(0.0, end - time.monotonic()))
        self.samples = (first, sample_cpu(srv))

    def join(self) -> None:
        self._thread.join()


@dataclass
class MemoryPoint:
    contacts: int
    rss: int
    pss: int
    register_seconds: float = 0.0
    register_failed: int = 0
    note: str = ""


def measure_memory(srv: Server, counts: Sequence[int], settle: float) -> list[MemoryPoint]:
    """RSS/PSS of the server at baseline and after registering ``counts`` contacts in total.

    A reading ``settle`` seconds after the last REGISTER shows what the registration traffic
    left behind as well: a stateful server keeps each completed non-INVITE server transaction
    for Timer J (64*T1 = 32 s, RFC 3261 §17.2.2), and memory a process freed is mostly not
    given back to the OS.  A server that can restart with its bindings (sipbill loads them
    from the database) is also read after a restart, which shows the bindings alone; it is
    then restarted after every count (cheaper than waiting out Timer J) and read after the
    settle time only at the last count.
    """
    pids = srv.server_pids()
    warm = procstats.memory(pids)
    points = [MemoryPoint(0, warm.rss, warm.pss)]
    log(f"baseline memory: RSS {warm.rss / 2**20:.1f} MiB, PSS {warm.pss / 2**20:.1f} MiB")
    done = 0
    for target in counts:
        batch = [user(f"u{i}") for i in range(done + 1, target + 1)]
        res = asyncio.run(register_users((srv.host, srv.port), batch, window=256))
        log(f"registered {res.ok} more contacts ({res.failed} failed {res.failures or ''}) in "
            f"{res.seconds:.1f} s = {res.rate:.0f}/s, {res.retransmissions} retransmissions")
        done = target
        if target == counts[-1] or not srv.restartable:
            time.sleep(settle)
            mem = procstats.memory(srv.server_pids())
            points.append(MemoryPoint(target, mem.rss, mem.pss, res.seconds, res.failed,
                                      f"{settle:g} s after registering"))
            log(f"{target} contacts: RSS {mem.rss / 2**20:.1f} MiB, "
                f"PSS {mem.pss / 2**20:.1f} MiB")
        if srv.restartable:
            srv.restart()
            time.sleep(3.0)
            mem = procstats.memory(srv.server_pids())
            points.append(MemoryPoint(target, mem.rss, mem.pss, res.seconds, res.failed,
                                      "restarted, bindings loaded"))
            log(f"after restart with {target} contacts: RSS {mem.rss / 2**20:.1f} MiB, "
                f"PSS {mem.pss / 2**20:.1f} MiB")
    return points


# --------------------------------------------------------------------------------------------
# Report


def _fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v != v else f"{v:.{digits}f}"  # NaN check without math import


def markdown(srv_name: str, results: list[ScenarioResult], memory: list[MemoryPoint],
             args: argparse.Namespace) -> str:
    unit = {"register": "REGISTER (401+200)", "call": "call (INVITE..BYE, RR)",
            "message": "MESSAGE (407+200)", "options": "OPTIONS"}
    has_db = any(s.db_cpu for r in results for s in r.steps)
    loaded = memory[-1].contacts if memory else 0
    out = [f"### {srv_name}: SIPp rate ladders ({args.step_seconds:g} s per step, UDP, "
           f"{os.cpu_count()} cores shared with SIPp, {loaded:,} contacts registered)", ""]
    head = ["scenario", "max rate /s (0 failures)", "CPU read at", "server CPU-s per 1,000",
            "per server CPU-s", "per server CPU-s at the ladder step"]
    if has_db:
        head += ["CPU-s per 1,000 incl. DB", "per CPU-s incl. DB"]
    head += ["median ms @ half", "p99 ms @ half", "stopped by"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for r in results:
        b, lat = r.best, r.latency
        row = [unit.get(r.name, r.name)]
        if b is None:
            row += ["none"] + ["n/a"] * (len(head) - 3)
        else:
            c = r.steady if r.steady is not None else b
            per = c.cpu_per_1000()
            ladder = b.cpu_per_1000()
            read_at = (f"steady {c.rate}/s" if r.steady is not None
                       else "ladder step (steady step failed)" if args.steady_seconds
                       else "ladder step")
            row += [str(b.rate), read_at, _fmt(per, 3),
                    _fmt(1000.0 / per if per else float("nan"), 0),
                    _fmt(1000.0 / ladder if ladder else float("nan"), 0)]
            if has_db:
                per_db = c.cpu_per_1000(with_db=True)
                row += [_fmt(per_db, 3), _fmt(1000.0 / per_db if per_db else float("nan"), 0)]
            rtts = lat.all_latencies if lat is not None else []
            row += [_fmt(percentile(rtts, 50)), _fmt(percentile(rtts, 99))]
        row.append(r.stop_reason)
        out.append("| " + " | ".join(row) + " |")
    out += ["", f"### {srv_name}: response times at half the max rate, per transaction "
            f"({args.latency_seconds:g} s)", "",
            "| scenario | rate /s | transaction | count | median ms | p99 ms | max ms | source |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lat = r.latency
        if lat is None:
            continue
        for kind, values in lat.latency_ms.items():
            out.append(f"| {r.name} | {lat.rate} | {kind} | {len(values)} | "
                       f"{_fmt(percentile(values, 50))} | {_fmt(percentile(values, 99))} | "
                       f"{_fmt(max(values, default=float('nan')))} | {lat.latency_source} |")
    if memory:
        base = memory[0]
        prev = 0
        # PSS splits shared pages among the processes that map them, so the baseline moves
        # by a few MiB with what else runs (a restarted server is a new process); RSS counts
        # them whole in every reading.  At 10,000 contacts 2 MiB is 200 bytes per contact.
        out += ["", f"### {srv_name}: memory with registered contacts", "",
                "| contacts | when | RSS MiB | PSS MiB | bytes/contact beyond baseline (PSS) "
                "| (RSS) | registered at /s |", "|---|---|---|---|---|---|---|"]
        for m in memory:
            per = (m.pss - base.pss) / m.contacts if m.contacts else float("nan")
            per_rss = (m.rss - base.rss) / m.contacts if m.contacts else float("nan")
            rate = (m.contacts - prev) / m.register_seconds if m.register_seconds else 0.0
            prev = m.contacts
            failed = f" ({m.register_failed} failed)" if m.register_failed else ""
            out.append(f"| {m.contacts:,} | {m.note or 'baseline'} | {m.rss / 2**20:.1f} | "
                       f"{m.pss / 2**20:.1f} | {_fmt(per, 0)} | {_fmt(per_rss, 0)} | "
                       f"{_fmt(rate, 0) if rate else '-'}{failed} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------


def fixed_contact_scenario(workdir: Path) -> str:
    """register_auth.xml with a Contact that names the user but not the SIPp socket.

    With ``--spread`` every SIPp call has a socket of its own, and a Contact naming its port
    made every REGISTER add a binding (until the AoR held 100, each listed in every 200 OK)
    instead of refreshing the user's one.  A fixed Contact from a new source port is what a
    phone behind a NAT whose mapping changed sends: the binding is refreshed and moves to the
    new source address."""
    text = (SCENARIOS / "register_auth.xml").read_text()
    socket_contact = "Contact: <sip:[field0]@[local_ip]:[local_port];"
    if text.count(socket_contact) != 2:
        raise RuntimeError("register_auth.xml: expected two Contact lines naming the socket")
    path = workdir / "register_auth_fixed_contact.xml"
    path.write_text(text.replace(socket_contact, "Contact: <sip:[field0]@[local_ip];"))
    return str(path)


def build_specs(srv: Server, workdir: Path, names: Sequence[str], n_users: int,
                uases: list[Uas]) -> Iterator[ScenarioSpec]:
    csv = write_csv(workdir / "bench_users.csv", load_users(n_users))
    for name in names:
        if name == "register":
            scenario = fixed_contact_scenario(workdir) if SPREAD["on"] else "register_auth.xml"
            yield ScenarioSpec(name, scenario, ["-inf", str(csv)])
        elif name == "call":
            uas = Uas(srv, workdir, "uas.xml", CALLEE)
            uases.append(uas)
            yield ScenarioSpec(name, "bench_uac_call.xml",
                               ["-s", CALLEE, "-key", "domain", DOMAIN], uas)
            uas.stop()
        elif name == "message":
            uas = Uas(srv, workdir, "message_uas.xml", MSG_SINK)
            uases.append(uas)
            yield ScenarioSpec(name, "message_uac.xml", ["-inf", str(csv), "-s", MSG_SINK], uas)
            uas.stop()
        elif name == "options":
            yield ScenarioSpec(name, "options.xml", [])
        else:
            raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(ALL_SCENARIOS)}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    who = ap.add_mutually_exclusive_group()
    who.add_argument("--target", help="HOST:PORT of a running SIP server (UDP)")
    who.add_argument("--kamailio", action="store_true", help="start Kamailio (bench/kamailio.cfg)")
    ap.add_argument("--pids", default="", help="with --target: server PIDs (trees) to measure")
    ap.add_argument("--db-pids", default="", help="with --target: database PIDs (trees)")
    ap.add_argument("--dsn", help="PostgreSQL server for sipbill (default: embedded)")
    ap.add_argument("--core-only", action="store_true",
                    help="sipbill without its modules (billing, msilo, presence, clicktodial)")
    ap.add_argument("--workers", type=int, default=0,
                    help="sipbill server.workers / Kamailio children (default 1 / 2)")
    ap.add_argument("--spread", action=argparse.BooleanOptionalAction, default=None,
                    help="a UDP socket per SIPp call (-t un) so SO_REUSEPORT workers share the "
                         "load (default: on with sipbill --workers > 1); REGISTERs then keep "
                         "one Contact per user from changing source ports, like phones "
                         "behind a NAT")
    ap.add_argument("--quick", action="store_true", help="a smoke run of about 2 minutes")
    ap.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                    help="comma-separated (default: all); '' for the memory figures only")
    ap.add_argument("--users", type=int, default=1000, help="users cycled by the load")
    ap.add_argument("--contacts", default=None,
                    help="contact counts for the memory figures (default 10000,100000; "
                         "quick: 10000; 0 to skip)")
    ap.add_argument("--settle", type=float, default=None,
                    help="seconds between registering contacts and reading memory "
                         "(default 34, quick 5)")
    ap.add_argument("--step-seconds", type=float, default=None,
                    help="seconds per step (default 8, quick 3)")
    ap.add_argument("--latency-seconds", type=float, default=None,
                    help="seconds of the latency step at half the max rate (default 45, so "
                         "the transactions lingering for Timer J reach their steady number; "
                         "quick: the step length)")
    ap.add_argument("--steady-seconds", type=float, default=None,
                    help="seconds of the steady step (at --steady-share of the max rate) "
                         "whose CPU the table gives (default 50; quick: 0, none); 0 to skip")
    ap.add_argument("--steady-share", type=float, default=0.75,
                    help="rate of the steady step as a share of the max rate (default 0.75: "
                         "a max rate found at saturation does not hold for long)")
    ap.add_argument("--steady-rate", action="append", default=[], metavar="SCENARIO=RATE",
                    help="run this scenario's steady step at this fixed rate instead of "
                         "--steady-share of its max rate (repeatable; e.g. register=4800: "
                         "the steady figure then does not follow the ladder's noisy max rate, "
                         "and a pass shows the server sustains the rate)")
    ap.add_argument("--steady-from", type=float, default=34.0,
                    help="second of the steady step from which its CPU is read (default 34: "
                         "past Timer J)")
    ap.add_argument("--start-rate", type=int, default=200)
    ap.add_argument("--max-rate", type=int, default=25600)
    ap.add_argument("--growth", type=float, default=None, help="rate factor per step")
    ap.add_argument("--refine", type=int, default=None, help="bisection steps after the ladder")
    ap.add_argument("--max-retrans", type=float, default=0.01,
                    help="share of calls that may see a retransmission in a passing step")
    ap.add_argument("--cooldown", type=float, default=None,
                    help="seconds to wait after an overloaded step before the latency step "
                         "(default 34, quick 5)")
    ap.add_argument("--saturation", type=float, default=0.95,
                    help="stop when a server process uses this share of a core")
    ap.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)
    q = args.quick
    if args.step_seconds is None:
        args.step_seconds = 3.0 if q else 8.0
    if args.latency_seconds is None:
        args.latency_seconds = args.step_seconds if q else 45.0
    if args.steady_seconds is None:
        args.steady_seconds = 0.0 if q else 50.0
    if args.steady_seconds and args.steady_seconds - 2.0 - args.steady_from < 5.0:
        ap.error("--steady-seconds must leave a window of at least 5 s after --steady-from "
                 "and before the last 2 s")
    steady_rate: dict[str, int] = {}
    for item in args.steady_rate:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not value.isdigit() or int(value) < 1:
            ap.error(f"--steady-rate wants SCENARIO=RATE with a positive rate, not {item!r}")
        if name not in ALL_SCENARIOS:
            ap.error(f"--steady-rate: no scenario {name!r} (one of {', '.join(ALL_SCENARIOS)})")
        steady_rate[name] = int(value)
    if steady_rate and not args.steady_seconds:
        ap.error("--steady-rate needs a steady step (--steady-seconds > 0; --quick has none)")
    args.steady_rate = steady_rate
    if args.growth is None:
        args.growth = 4.0 if q else 2.0
    if args.refine is None:
        args.refine = 0 if q else 2
    if args.contacts is None:
        args.contacts = "10000" if q else "10000,100000"
    if args.settle is None:
        # Quick: no waiting for Timer J; the reading after a restart is the one to trust.
        args.settle = 5.0 if q else 34.0
    if args.cooldown is None:
        args.cooldown = 5.0 if q else 34.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("sipp") is None:
        raise SystemExit("sipp not installed (Debian package sip-tester)")
    contacts = sorted({int(c) for c in args.contacts.split(",") if int(c) > 0})
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    n_users = max([args.users, *contacts])
    workdir = Path(tempfile.mkdtemp(prefix="sip-load-"))
    log(f"work directory {workdir}; load average {os.getloadavg()[0]:.2f}")
    started = time.monotonic()
    srv: Server
    if args.target:
        pids = [int(p) for p in args.pids.split(",") if p]
        db_pids = [int(p) for p in args.db_pids.split(",") if p]
        srv = TargetServer(args.target, pids, db_pids)
    elif args.kamailio:
        srv = KamailioServer(workdir, n_users, args.workers or 2)
    else:
        if args.spread is None:
            args.spread = args.workers > 1
        srv = SipbillServer(workdir, n_users, args.dsn, args.workers or 1, args.core_only)
    SPREAD["on"] = bool(args.spread)
    uases: list[Uas] = []
    results: list[ScenarioResult] = []
    memory: list[MemoryPoint] = []
    try:
        if contacts:
            memory = measure_memory(srv, contacts, args.settle)
        bench = Bench(srv, workdir, args)
        for spec in build_specs(srv, workdir, names, args.users, uases):
            log(f"--- {spec.name}")
            results.append(bench.ladder(spec))
    finally:
        for uas in uases:
            uas.stop()
        srv.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    text = markdown(srv.name, results, memory, args)
    print(text)
    log(f"done in {elapsed:.0f} s")
    if args.json_path:
        payload = {
            "server": srv.name, "elapsed_seconds": elapsed, "args": vars(args),
            "scenarios": [
                {"name": r.name, "stop_reason": r.stop_reason,
                 "max_rate": r.best.rate if r.best else None,
                 "cpu_per_1000": r.cpu_step.cpu_per_1000() if r.cpu_step else None,
                 "cpu_per_1000_with_db": (r.cpu_step.cpu_per_1000(with_db=True)
                                          if r.cpu_step else None),
                 "cpu_from": ("steady" if r.steady else "ladder step") if r.best else None,
                 "latency_rate": r.latency.rate if r.latency else None,
                 "median_ms": percentile(r.latency.all_latencies, 50) if r.latency else None,
                 "p99_ms": percentile(r.latency.all_latencies, 99) if r.latency else None,
                 "latency": {kind: {"count": len(v), "median_ms": percentile(v, 50),
                                    "p99_ms": percentile(v, 99)}
                             for kind, v in r.latency.latency_ms.items()} if r.latency else {},
                 "steps": [{**{k: v for k, v in asdict(s).items() if k != "latency_ms"},
                            "cpu_per_1000": s.cpu_per_1000(),
                            "cpu_per_1000_with_db": s.cpu_per_1000(with_db=True)}
                           for s in r.steps]}
                for r in results],
            "memory": [asdict(m) for m in memory],
        }
        Path(args.json_path).write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
