"""Calls per server CPU-second with real-time credit control on and off (issue 4's figure).

Not a test: it prints what credit control costs a call on this machine. The same SIPp call
scenario runs twice against a fresh ``sipbill serve`` -- once with ``[billing] enabled =
false``, once with billing on -- and the server's own CPU time (user + system from
``/proc/PID/stat``, :mod:`procstats`) is divided into the calls completed:

* scenario: ``uac_call_auth.xml`` (INVITE, 407, ACK, INVITE with MD5 credentials, 100/180/200,
  ACK, BYE, 200) from ``--callers`` subscribers, each with its own 10.00 EUR account, to
  ``+4989123456``, routed to a gateway answered by a SIPp ``uas.xml``. With billing on each
  call is rated (49: 0.10/min 1/1 + 0.05 connect fee, config/rates.example.csv), reserved,
  answered, settled with a journal row and its CDR completed; the 200 OK carries
  ``Balance-amount``.
* figure: completed calls per CPU-second of the server process (PostgreSQL's CPU is shown
  next to it, not counted: it runs in other processes and on a production machine elsewhere),
  and the overhead ``1 - on/off`` of credit control on that throughput (target: < 30 %).

The rate is kept well below saturation so no call fails (a run with failed calls is
reported and counts as invalid); CPU per call hardly depends on the rate. Off and on alternate
(``--rounds`` of each) so other load on a shared machine weighs on both. The whole run takes
about two minutes (``--calls``/``--rate``/``--rounds`` change that); it needs ``sipp`` (Debian
sip-tester).
Run: ``.venv/bin/python bench/billing_calls.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402
import procstats  # noqa: E402

from sipbill.db import EmbeddedPostgres  # noqa: E402
from tests.support import SCENARIOS, ServerProcess, free_port, run_sipp  # noqa: E402

NUMBER = "+4989123456"


@dataclass(frozen=True, slots=True)
class RunResult:
    mode: str
    calls: int
    failed: int
    server_cpu: float
    db_cpu: float
    wall: float
    cdrs: int

    @property
    def per_cpu_second(self) -> float:
        return self.calls / self.server_cpu if self.server_cpu else 0.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _create_db(server_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, query = server_dsn.partition("?")
    root = base.rsplit("/", 1)[0]
    return f"{root}/{name}" + (f"?{query}" if query else "")


async def _drop_db(server_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _answered_cdrs(dsn: str, timeout: float = 10.0) -> int:
    """Calls settled with a charge, once every reservation is gone (or ``timeout``)."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM reservations)"):
            await asyncio.sleep(0.2)
        return int(await conn.fetchval("SELECT count(*) FROM cdrs WHERE status = 'answered' "
                                       "AND cost > 0"))
    finally:
        await conn.close()


def _db_cpu(postmaster: int | None) -> float:
    if postmaster is None:
        return 0.0
    return sum(procstats.tree_cpu(procstats.tree([postmaster])).values())


def run_mode(mode: str, server_dsn: str, postmaster: int | None, workdir: Path,
             callers: list[str], calls: int, rate: float, warmup: int) -> RunResult:
    name = f"bench_billing_{mode}_{int(time.time())}"
    dsn = asyncio.run(_create_db(server_dsn, name))
    # Both ports chosen before anything binds either: two free_port() calls may otherwise
    # name the same port, and the server and the gateway would share it.
    gw = free_port()
    port = free_port()
    while port == gw:
        port = free_port()
    billing: dict[str, object] = (
        {"enabled": False} if mode == "off"
        else {"rates_csv": str(REPO / "config" / "rates.example.csv")}
    )
    srv = ServerProcess(dsn, port=port, workdir=workdir / mode, extra={
        "server": {"log_level": "warning"},
        "database": {"url": dsn, "pool_min": 2, "pool_max": 10},
        "auth": {"algorithms": ["MD5"], "check_uri": False},
        "seed": {"subscribers": [{"username": u, "password": f"bench-{u}"} for u in callers]},
        "proxy": {"gateways": [{"name": "gw", "host": "127.0.0.1", "port": gw,
                                "prefixes": [""]}]},
        "billing": billing,
    })
    (workdir / mode).mkdir(parents=True, exist_ok=True)
    users = workdir / mode / "callers.csv"
    users.write_text("SEQUENTIAL\n" + "".join(
        f"{u};localhost;[authentication username={u} password=bench-{u}]\n" for u in callers))
    uas = subprocess.Popen(
        ["sipp", "-sf", str(SCENARIOS / "uas.xml"), "-i", "127.0.0.1", "-p", str(gw),
         "-nostdin"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        srv.start(timeout=120)
        assert srv.proc is not None
        time.sleep(0.5)
        warm = run_sipp("uac_call_auth.xml", srv.port, "-inf", str(users), "-s", NUMBER,
                        "-d", "0", calls=warmup, rate=rate, timeout=60)
        if warm.failed:
            log(f"{mode}: warm-up had {warm.failed} failed calls:\n{warm.output[-2000:]}")
        time.sleep(1.0)  # settlements of the warm-up done
        cpu0, db0, t0 = procstats.cpu_seconds(srv.proc.pid), _db_cpu(postmaster), time.monotonic()
        res = run_sipp("uac_call_auth.xml", srv.port, "-inf", str(users), "-s", NUMBER,
                       "-d", "0", calls=calls, rate=rate, timeout=calls / rate + 60)
        cdrs = asyncio.run(_answered_cdrs(dsn))  # the last settlements are part of the cost
        cpu1, db1, t1 = procstats.cpu_seconds(srv.proc.pid), _db_cpu(postmaster), time.monotonic()
        if res.failed:
            log(f"{mode}: {res.failed} failed calls:\n{res.output[-2000:]}")
        return RunResult(mode, res.successful, res.failed, cpu1 - cpu0, db1 - db0, t1 - t0,
                         cdrs)
    finally:
        srv.stop()
        uas.kill()
        uas.wait()
        asyncio.run(_drop_db(server_dsn, name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=1000, help="measured calls per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternating")
    parser.add_argument("--rate", type=float, default=60.0, help="calls per second")
    parser.add_argument("--callers", type=int, default=100, help="distinct paying callers")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured calls first")
    parser.add_argument("--dsn", default="", help="a PostgreSQL server to create the bench "
                        "databases in (default: an embedded one in a temporary directory)")
    args = parser.parse_args()
    if shutil.which("sipp") is None:
        log("sipp is not installed (Debian package sip-tester)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-billing-"))
    embedded: EmbeddedPostgres | None = None
    try:
        server_dsn = args.dsn
        postmaster = None
        if not server_dsn:
            embedded = EmbeddedPostgres(workdir / "pg")
            server_dsn = embedded.start()
            postmaster = procstats.postmaster_of_datadir(workdir / "pg")
        callers = [f"b{n:04d}" for n in range(1, args.callers + 1)]
        results: list[RunResult] = []
        # Off and on alternate, so a change in the machine's other load during the run
        # (it is shared) weighs on both alike.
        for n in range(args.rounds):
            for mode in ("off", "on"):
                log(f"round {n + 1}, credit control {mode}: {args.warmup} + {args.calls} "
                    f"calls at {args.rate}/s")
                results.append(run_mode(mode, server_dsn, postmaster, workdir / f"round{n}",
                                        callers, args.calls, args.rate, args.warmup))
    finally:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print("| credit control | calls | failed | server CPU-s | calls / server CPU-s "
          "| PostgreSQL CPU-s | answered CDRs |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.mode} | {r.calls} | {r.failed} | {r.server_cpu:.2f} "
              f"| {r.per_cpu_second:.0f} | {r.db_cpu:.2f} | {r.cdrs} |")
    rate: dict[str, float] = {}
    for mode in ("off", "on"):
        runs = [r for r in results if r.mode == mode]
        rate[mode] = sum(r.calls for r in runs) / sum(r.server_cpu for r in runs)
        print(f"\ncredit control {mode}: {rate[mode]:.0f} calls per server CPU-second "
              f"({1000 / rate[mode]:.2f} ms of server CPU per call)", end="")
    overhead = (1 - rate["on"] / rate["off"]) * 100
    print(f"\ncredit control overhead on calls per server CPU-second: {overhead:.1f} % "
          f"(target < 30 %)")
    ok = all(not r.failed for r in results) and all(
        r.cdrs >= r.calls for r in results if r.mode == "on")
    if not ok:
        print("invalid run: failed calls or calls without a settled CDR")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
