"""What an authenticated REGISTER costs the server's Python, without sockets: a low-noise figure.

Not a test.  ``bench/sip_load.py`` measures the whole server under SIPp, and on this VM its
figures drift by tens of percent between runs minutes apart (the kernel's share: a loopback
``sendto`` that wakes SIPp costs ~10 us of system time).  This benchmark runs the real server
(:class:`sipbill.app.Application`, all modules unless ``--core-only``, the bench's settings,
its own embedded PostgreSQL with the bench's 1,000 subscribers) *in this process*, hands it
REGISTERs as SIPp's ``register_auth.xml`` writes them straight into the stack
(``SipStack.message_received``), and catches what it sends instead of putting it on a socket.
Everything else is real: parsing, transactions, digest authentication, the registrar, the
location service's write-through to PostgreSQL (asyncpg in this process, the database in its
own), the 200 OK with the bindings and the balance.

``--batch`` REGISTER pairs are in flight at once (a busy server's location flushes carry
many bindings each): the first REGISTERs of a batch go in, their 401s come out synchronously,
the answers with credentials go in, and the batch ends when every 200 OK has gone out.  CPU
is this process's (``time.process_time``) less the client's own work (building the requests,
reading the nonces, the digests), measured around it:

* ``401 leg``: the CPU of handing in the first REGISTERs, whose 401s are sent before that
  returns (stateless challenges, no task, no await);
* ``200 leg``: the rest, including the event-loop turns that wait for the location commit.

Each row is the best (lowest) of ``--rounds`` rounds of ``--pairs`` pairs.  Rounds of one run
agree within a few percent; runs minutes apart on this VM still differ by up to ~15 %.

``--instructions`` counts instead of timing, with no noise at all: it runs this benchmark
twice under ``valgrind --tool=callgrind`` (640 and 2,560 pairs after the same warm-up, 64 in
flight) and prints the difference of the two programs' instruction counts per pair: the
instructions one more REGISTER pair costs the server process, start-up excluded (the
client's share, building and answering the requests, is in it too: about 2 %).  Two runs
of the same code agree within 0.1 %, so a change of 1 % shows.  About two minutes.

Run: ``.venv/bin/python bench/register_cpu.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sip_load

from sipbill.app import Application, tune_gc
from sipbill.modules import register_module_settings
from sipbill.settings import load_settings
from sipcore.transport_types import Peer

_NONCE = re.compile(rb'nonce="([^"]+)"')
_SOURCE = Peer("UDP", "127.0.0.1", 5070)  # one source, like SIPp's -t u1


@dataclass
class Round:
    pairs: int
    leg1: float  # CPU seconds of the 401 leg
    total: float  # server CPU seconds in all

    @property
    def pair_ms(self) -> float:
        return 1000.0 * self.total / self.pairs

    @property
    def leg1_ms(self) -> float:
        return 1000.0 * self.leg1 / self.pairs

    @property
    def leg2_ms(self) -> float:
        return self.pair_ms - self.leg1_ms


class Client:
    """The requests register_auth.xml sends, for the bench's users."""

    def __init__(self, users: list[sip_load.User]) -> None:
        self.users = users
        self.ha1 = {u.name: hashlib.md5(f"{u.name}:{u.domain}:{u.password}".encode()).hexdigest()
                    for u in users}
        # SIPp puts the server address into the digest uri (the bench sets check_uri = false).
        self.ha2 = hashlib.md5(b"REGISTER:sip:127.0.0.1:5060").hexdigest()

    def _request(self, user: sip_load.User, n: int, cseq: int, extra: str) -> bytes:
        port = _SOURCE.port
        return (
            f"REGISTER sip:{user.domain} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{n}-{cseq};rport\r\n"
            f"From: <sip:{user.name}@{user.domain}>;tag={n}SIPpTag00{n}\r\n"
            f"To: <sip:{user.name}@{user.domain}>\r\n"
            f"Call-ID: {n}-bench@127.0.0.1\r\n"
            f"CSeq: {cseq} REGISTER\r\n"
            f"Contact: <sip:{user.name}@127.0.0.1:{port};transport=UDP>\r\n"
            f"{extra}Expires: 3600\r\nMax-Forwards: 70\r\nUser-Agent: SIPp\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

    def first(self, n: int) -> bytes:
        return self._request(self.users[n % len(self.users)], n, 1, "")

    def second(self, n: int, challenge: bytes) -> bytes:
        user = self.users[n % len(self.users)]
        match = _NONCE.search(challenge)
        if match is None or not challenge.startswith(b"SIP/2.0 401 "):
            raise RuntimeError(f"expected a 401 with a nonce, got {challenge[:200]!r}")
        nonce = match.group(1).decode()
        cnonce, nc = f"c{n}", "00000001"
        response = hashlib.md5(
            f"{self.ha1[user.name]}:{nonce}:{nc}:{cnonce}:auth:{self.ha2}".encode()).hexdigest()
        auth = (f'Authorization: Digest username="{user.name}",realm="{user.domain}",'
                f'cnonce="{cnonce}",nc={nc},qop=auth,uri="sip:127.0.0.1:5060",'
                f'nonce="{nonce}",response="{response}",algorithm=MD5\r\n')
        return self._request(user, n, 2, auth)


class Driver:
    def __init__(self, app: Application, client: Client) -> None:
        assert app.ctx is not None
        self.stack = app.ctx.stack
        self.client = client
        self.sent: list[bytes] = []
        self._want = 0
        self._done: asyncio.Future[None] | None = None
        self.stack.transports.send = self._send  # type: ignore[method-assign]
        self.serial = 0

    def _send(self, data: bytes, peer: Peer, on_failure: object = None) -> None:
        self.sent.append(data)
        if self._done is not None and len(self.sent) >= self._want and not self._done.done():
            self._done.set_result(None)

    async def run(self, pairs: int, batch: int) -> Round:
        client, stack, sent = self.client, self.stack, self.sent
        leg1 = client_cpu = 0.0
        loop = asyncio.get_running_loop()
        done = 0
        start = time.process_time()
        while done < pairs:  # whole batches: ``pairs`` rounded up to a multiple of ``batch``
            done += batch
            c0 = time.process_time()
            numbers = range(self.serial, self.serial + batch)
            self.serial += batch
            firsts = [client.first(n) for n in numbers]
            sent.clear()
            c1 = time.process_time()
            for data in firsts:
                stack.message_received(data, _SOURCE, False)
            c2 = time.process_time()
            if len(sent) != batch:
                raise RuntimeError(f"{len(sent)} answers to {batch} REGISTERs without credentials")
            seconds = [client.second(n, challenge)
                       for n, challenge in zip(numbers, sent, strict=True)]
            sent.clear()
            c3 = time.process_time()
            for data in seconds:
                stack.message_received(data, _SOURCE, False)
            if len(sent) < batch:
                self._want, self._done = batch, loop.create_future()
                await self._done
                self._done = None
            bad = [d[:40] for d in sent if not d.startswith(b"SIP/2.0 200 ")]
            if bad:
                raise RuntimeError(f"REGISTER with credentials not accepted: {bad[0]!r}")
            leg1 += c2 - c1
            client_cpu += (c1 - c0) + (c3 - c2)
        total = time.process_time() - start - client_cpu
        return Round(done, leg1, total)


async def measure(args: argparse.Namespace, settings_path: Path) -> list[tuple[int, Round]]:
    register_module_settings()  # as `sipbill serve` does: the modules' sections
    app = Application(load_settings(settings_path))
    await app.start()
    tune_gc()
    app.gc_pacer.start()
    try:
        assert app.ctx is not None
        started = [m for m in sip_load.SipbillServer.MODULES if m in app.ctx.services]
        print(f"modules: {', '.join(started) or 'none'}", file=sys.stderr, flush=True)
        driver = Driver(app, Client(sip_load.load_users(args.users)))
        await driver.run(args.warmup, 16)  # every user registered, caches warm
        results = []
        for batch in args.batch:
            rounds = [await driver.run(args.pairs, batch) for _ in range(args.rounds)]
            best = min(rounds, key=lambda r: r.total / r.pairs)
            results.append((batch, best))
            print(f"batch {batch:>3}: " + ", ".join(f"{r.pair_ms:.4f}" for r in rounds)
                  + " CPU-ms per pair", file=sys.stderr, flush=True)
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
            await driver.run(args.pairs, args.batch[-1])
            profiler.disable()
            profiler.dump_stats(args.profile)
        return results
    finally:
        app.gc_pacer.stop()
        await app.stop(grace=0)
        gc.collect()


_COLLECTED = re.compile(r"Collected : (\d+)")
_COUNTED_PAIRS = (640, 2560)


def count_instructions(args: argparse.Namespace) -> int:
    """``--instructions``: this benchmark under callgrind for two pair counts."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    totals = []
    for pairs in _COUNTED_PAIRS:
        with tempfile.TemporaryDirectory(prefix="register-cpu-cg-") as tmp:
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
                   sys.executable, __file__, "--pairs", str(pairs), "--rounds", "1",
                   "--batch", "64", "--warmup", "640", "--users", str(args.users)]
            if args.core_only:
                cmd.append("--core-only")
            if args.dsn:
                cmd += ["--dsn", args.dsn]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        found = _COLLECTED.findall(run.stderr)
        if run.returncode != 0 or not found:
            raise SystemExit(f"callgrind run failed ({run.returncode}):\n{run.stderr[-3000:]}")
        totals.append(int(found[-1]))
        print(f"{pairs} pairs: {totals[-1]:,} instructions", file=sys.stderr, flush=True)
    per_pair = (totals[1] - totals[0]) / (_COUNTED_PAIRS[1] - _COUNTED_PAIRS[0])
    what = "core only" if args.core_only else "all modules"
    print(f"\nREGISTER 401+200 in-process ({what}, 64 in flight): "
          f"{per_pair:,.0f} instructions per pair (callgrind, start-up excluded)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=20_000, help="REGISTER pairs per round")
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64],
                    help="pairs in flight at once, comma-separated (default 8,64)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4_000)
    ap.add_argument("--users", type=int, default=1_000)
    ap.add_argument("--core-only", action="store_true",
                    help="without the modules (billing, msilo, presence, clicktodial)")
    ap.add_argument("--dsn", help="PostgreSQL server (default: an embedded one)")
    ap.add_argument("--profile", help="also write a cProfile of one more round here")
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions per pair under callgrind instead of timing")
    args = ap.parse_args(argv)
    if args.instructions:
        return count_instructions(args)
    workdir = Path(tempfile.mkdtemp(prefix="register-cpu-"))
    srv = sip_load.SipbillServer(workdir, args.users, args.dsn, 1, core_only=args.core_only,
                                 launch=False)
    try:
        settings_path = workdir / "sipbill.toml"
        settings_path.write_text(srv.config())
        import uvloop

        results = uvloop.run(measure(args, settings_path))
    finally:
        srv.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    what = "core only" if args.core_only else "all modules"
    print(f"\nREGISTER 401+200 in-process, no sockets ({what}; best of {args.rounds} rounds of "
          f"{args.pairs:,} pairs; server CPU, database excluded)\n")
    print("| pairs in flight | CPU-ms per pair | 401 leg | 200 leg | pairs per CPU-s |")
    print("|---|---|---|---|---|")
    for batch, r in results:
        print(f"| {batch} | {r.pair_ms:.3f} | {r.leg1_ms:.3f} | {r.leg2_ms:.3f} "
              f"| {1000.0 / r.pair_ms:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
