"""``sipbill serve`` with ``server.workers = N > 1``: a small supervisor of N worker processes.

Theory of operation
-------------------
The supervisor does no SIP. It

1. starts the embedded PostgreSQL when no ``database.url`` is set (once, for all workers: each
   worker gets its address in ``SIPBILL_DATABASE_URL``), and creates a private run directory
   (mode 0700, under the system temp dir, short enough for ``AF_UNIX`` paths) for the worker
   sockets of :mod:`sipcore.workers`;
2. starts worker 0 and waits until it is ready (its ``w0.sock`` appears: it binds it last),
   then the others together. Worker 0 first, because it alone applies what the database may
   lack (migrations, demo seed, rate import) without racing anyone, and holds TCP, HTTP and the
   control socket. Then it prints the usual ``sipbill listening on ...`` line;
3. restarts a worker that exits, at once if it had run for a while, otherwise after a delay
   that doubles from 0.5 s to 10 s (a worker that cannot start must not spin the CPU). A
   restarted worker is a new incarnation: a fresh process with empty transaction and dialog
   tables (its calls in progress are lost, as after a crash of a single-process server; billing
   settles them by its recovery sweep, see ``billing.credit``);
4. on SIGTERM or SIGINT sends SIGTERM to every worker, waits for them (``STOP_TIMEOUT``, then
   SIGKILL), removes the run directory, stops the embedded PostgreSQL and exits 0.

Workers are ``python -m sipbill.cli serve`` processes with ``SIPBILL_WORKER_INDEX`` and
``SIPBILL_WORKER_DIR`` in their environment (:func:`worker_from_env`); they inherit stdout and
stderr, so the log is one stream (each line says ``worker=N``). On Linux each worker asks the
kernel for SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``), so a killed supervisor
leaves no orphans holding the port.

Why processes, not threads: CPython runs Python code on one core at a time, and everything on
the SIP path is Python. Why a supervisor of our own instead of systemd templates or
multiprocessing: it is 200 lines, keeps one unit/one command, and ``subprocess`` gives each
worker a clean interpreter (no inherited event loop, locks or sockets).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from sipbill.db import EmbeddedPostgres
from sipbill.settings import Settings
from sipcore.workers import socket_path

log = logging.getLogger("sipbill.supervisor")

ENV_INDEX = "SIPBILL_WORKER_INDEX"
ENV_DIR = "SIPBILL_WORKER_DIR"
#: How long a worker may take to start (embedded database, loading the bindings ...).
START_TIMEOUT = 120.0
#: How long stopping workers get before they are killed (their own grace is 2 s).
STOP_TIMEOUT = 15.0
#: A worker that ran this long before exiting is restarted at once.
STABLE_AFTER = 10.0
_PR_SET_PDEATHSIG = 1


def worker_from_env() -> tuple[int, Path] | None:
    """``(index, run_dir)`` when this process is a worker the supervisor started."""
    index = os.environ.get(ENV_INDEX)
    run_dir = os.environ.get(ENV_DIR)
    if index is None or not run_dir:
        return None
    return int(index), Path(run_dir)


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the supervisor dies (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready: bool = False
    restarts: int = 0
    delay: float = 0.0
    restart_at: float = 0.0
    pids: list[int] = field(default_factory=list)


class Supervisor:
    """Runs ``settings.server.workers`` workers of the server configured in ``config_path``."""

    def __init__(self, settings: Settings, config_path: str) -> None:
        self.settings = settings
        self.config_path = os.path.abspath(config_path)
        self.count = settings.server.workers
        self.workers = [_Worker(i) for i in range(self.count)]
        self.run_dir: Path | None = None
        self.embedded: EmbeddedPostgres | None = None
        self.env: dict[str, str] = {}
        self._stopping = False

    # -- signals
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("event=supervisor_stopping signal=%s", signal.Signals(signum).name)
        self._stopping = True

    # -- main
    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            self._prepare()
            if not self._start_all():
                return 1
            self._print_banner()
            while not self._stopping:
                self._watch()
                time.sleep(0.1)
            return 0
        finally:
            self._shutdown()

    def _prepare(self) -> None:
        s = self.settings
        s.data_path.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if not s.database.url:
            self.embedded = EmbeddedPostgres(s.data_path / "pg")
            env["SIPBILL_DATABASE_URL"] = self.embedded.start()
        self.run_dir = Path(tempfile.mkdtemp(prefix="sipbill-w-"))
        env[ENV_DIR] = str(self.run_dir)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.env = env
        log.info("event=supervisor_started workers=%d run_dir=%s", self.count, self.run_dir)

    def _start_all(self) -> bool:
        first, rest = self.workers[0], self.workers[1:]
        self._spawn(first)
        if not self._wait_ready([first]):
            return False
        for w in rest:
            self._spawn(w)
        return self._wait_ready(rest)

    def _wait_ready(self, workers: list[_Worker]) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._stopping and time.monotonic() < deadline:
            for w in workers:
                assert w.proc is not None
                if w.proc.poll() is not None:
                    log.error("event=worker_start_failed worker=%d returncode=%s", w.index,
                              w.proc.returncode)
                    return False
                w.ready = w.ready or self._is_ready(w)
            if all(w.ready for w in workers):
                return True
            time.sleep(0.05)
        if not self._stopping:
            log.error("event=worker_start_timeout workers=%s",
                      ",".join(str(w.index) for w in workers if not w.ready))
        return False

    def _is_ready(self, w: _Worker) -> bool:
        assert self.run_dir is not None
        return socket_path(self.run_dir, w.index).exists()

    def _spawn(self, w: _Worker) -> None:
        assert self.run_dir is not None
        with contextlib.suppress(FileNotFoundError):
            socket_path(self.run_dir, w.index).unlink()  # its appearance means "ready"
        env = {**self.env, ENV_INDEX: str(w.index)}
        w.proc = subprocess.Popen(
            [sys.executable, "-m", "sipbill.cli", "--config", self.config_path, "serve"],
            env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        w.started_at = time.monotonic()
        w.ready = False
        w.pids.append(w.proc.pid)
        log.info("event=worker_started worker=%d pid=%d", w.index, w.proc.pid)

    def _print_banner(self) -> None:
        s = self.settings
        where = [f"{lst.transport}:{lst.host}:{lst.port}" for lst in s.server.listen]
        if s.http.enabled:
            host, port = s.http.host_port
            where.append(f"http:{host}:{port}")
        if s.control.enabled:
            where.append(f"control:{s.control_socket_path}")
        pids = ",".join(str(w.proc.pid) for w in self.workers if w.proc is not None)
        print(f"sipbill listening on {', '.join(where)} ({self.count} workers, pids {pids})",
              flush=True)

    def _watch(self) -> None:
        """Restart workers that exited (module docstring, step 3)."""
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None:
                if now >= w.restart_at and not self._stopping:
                    w.restarts += 1
                    self._spawn(w)
                continue
            if not w.ready and self._is_ready(w):
                w.ready = True
                log.info("event=worker_ready worker=%d pid=%d", w.index, w.proc.pid)
            code = w.proc.poll()
            if code is None:
                continue
            ran = now - w.started_at
            w.delay = 0.0 if ran >= STABLE_AFTER else min(max(w.delay * 2, 0.5), 10.0)
            w.restart_at = now + w.delay
            log.warning("event=worker_exited worker=%d pid=%d returncode=%s ran=%.1fs "
                        "restart_in=%.1fs", w.index, w.proc.pid, code, ran, w.delay)
            w.proc = None
            w.ready = False

    def _shutdown(self) -> None:
        alive = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in alive:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("event=worker_killed pid=%d", proc.pid)
                proc.kill()
                proc.wait()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.embedded is not None:
            self.embedded.stop()
        log.info("event=supervisor_stopped")


def supervise(settings: Settings, config_path: str) -> int:
    return Supervisor(settings, config_path).run()
