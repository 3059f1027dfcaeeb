"""Helpers for end-to-end tests: a real ``sipbill serve`` process and real SIPp runs.

The server runs as a subprocess started exactly as an operator would (``sipbill serve
--config FILE``) against the test module's database, listening on free loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncpg

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "sipp-scenarios"
SIPBILL = str(Path(sys.executable).parent / "sipbill")


class RefusingPool:
    """A real asyncpg pool, except that a connection taken to LISTEN on (``await
    acquire()``, as :class:`sipcore.pglisten.NotifyHub` does) fails while ``refuse`` is set,
    and one taken for a query (``async with acquire()``) while ``refuse_queries`` is: a
    database that is down, for one kind of use or both."""

    def __init__(self, pool: asyncpg.Pool, *, refuse: bool = True,
                 refuse_queries: bool = False) -> None:
        self.pool = pool
        self.refuse = refuse
        self.refused = 0
        self.refuse_queries = refuse_queries
        self.refused_queries = 0

    def acquire(self) -> object:
        outer = self

        class Acquire:
            def __init__(self) -> None:
                self.cm = outer.pool.acquire()

            def __await__(self) -> Generator[Any, None, object]:
                if outer.refuse:
                    outer.refused += 1
                    raise ConnectionRefusedError("LISTEN refused (test)")
                return self.cm.__await__()

            async def __aenter__(self) -> object:
                if outer.refuse_queries:
                    outer.refused_queries += 1
                    raise ConnectionRefusedError("database unreachable (test)")
                return await self.cm.__aenter__()

            async def __aexit__(self, *exc: object) -> None:
                await self.cm.__aexit__(*exc)

        return Acquire()

    async def release(self, conn: object) -> None:
        await self.pool.release(conn)  # type: ignore[arg-type]


async def eventually(condition: Callable[[], object], what: str = "the condition",
                     timeout: float = 5.0) -> None:
    """Poll ``condition`` every 10 ms on the running loop until it holds; fail naming
    ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def compiler_available() -> bool:
    """Whether this machine can build the C accelerators (setup.py skips them otherwise)."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    return shutil.which(cc) is not None and headers.is_file()


def require_accelerator(name: str, built: bool) -> None:
    """Fail a test that needs ``sipcore.<name>`` when it is missing or stale although it
    could be built; skip it where no C compiler exists (the pure-Python code is in use)."""
    import pytest

    if not built:
        if compiler_available():
            pytest.fail(
                f"sipcore.{name} is missing or stale although a C compiler exists: "
                "rebuild it (make install, or pip install -e .)"
            )
        pytest.skip("no C compiler or Python headers: the pure-Python code is in use")


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML writing for test configs (tables, arrays of tables, scalars, lists)."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        is_table_list = isinstance(value, list) and all(isinstance(x, dict) for x in value)
        is_table_list = is_table_list and bool(value)
        if isinstance(value, dict) or is_table_list:
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out += f"\n[{name}]\n" + to_toml(value, name)
        else:
            for item in value:
                out += f"\n[[{name}]]\n" + to_toml(item, name)
    return out


@dataclass
class ServerProcess:
    """A running ``sipbill serve``; ``port`` is its SIP port (UDP and TCP)."""

    dsn: str
    extra: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    http_port: int = 0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sipbill-e2e-")))
    proc: subprocess.Popen[bytes] | None = None
    #: Wraps the command, e.g. ``["ip", "netns", "exec", NAME]`` to run it in a namespace.
    command_prefix: list[str] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.workdir / "sipbill.toml"

    @property
    def control_socket(self) -> Path:
        return self.workdir / "sipbill.ctl"

    def config(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "server": {
                "domains": ["localhost"],
                "data_dir": str(self.workdir),
                "log_level": "info",
                "listen": [
                    {"transport": "udp", "host": "127.0.0.1", "port": self.port},
                    {"transport": "tcp", "host": "127.0.0.1", "port": self.port},
                ],
            },
            "database": {"url": self.dsn, "pool_min": 1, "pool_max": 4},
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "control": {"socket": str(self.control_socket)},
            "seed": {"subscribers": [
                {"username": u, "password": f"demo{u}"} for u in ("1001", "1002", "1003")
            ]},
        }
        for section, values in self.extra.items():
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                base[section] = {**base[section], **values}
            else:
                base[section] = values
        return base

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        if not self.port:
            self.port = free_port()
        if not self.http_port:
            self.http_port = free_port()
        self.config_path.write_text(to_toml(self.config()))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # A restart appends to the same log: only this run's lines say it is up.
        seen = len(self.logs())
        # Output goes to a file: a pipe nobody drains would block a chatty server.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command_prefix, SIPBILL, "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "sipbill listening on" in self.logs()[seen:]:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        text = self.logs()
        self.stop()
        raise RuntimeError(f"server did not start:\n{text}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


#: Auth settings the SIPp 3.6 scenarios (and baresip) can pass: SIPp answers only an MD5
#: challenge and puts the server's address into the digest uri.
SIPP_AUTH: dict[str, Any] = {"auth": {"algorithms": ["MD5"], "check_uri": False}}


@contextlib.contextmanager
def running_server(dsn: str, extra: dict[str, Any] | None = None) -> Iterator[ServerProcess]:
    """A started ``sipbill serve`` with config ``extra`` (copied), cleaned up afterwards."""
    srv = ServerProcess(dsn, extra=copy.deepcopy(extra or {}))
    srv.start()
    try:
        yield srv
    finally:
        srv.cleanup()


@dataclass
class SippResult:
    returncode: int
    successful: int
    failed: int
    output: str


def _read_stat(path: Path) -> tuple[int, int]:
    """(successful, failed) cumulative call counts from SIPp's -trace_stat CSV."""
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return 0, 0
    if len(lines) < 2:
        return 0, 0
    header = lines[0].split(";")
    last = lines[-1].split(";")
    row = dict(zip(header, last, strict=False))
    return int(row.get("SuccessfulCall(C)", 0) or 0), int(row.get("FailedCall(C)", 0) or 0)


def run_sipp(scenario: str, server_port: int, *args: str, local_port: int | None = None,
             calls: int = 1, rate: float = 10, timeout: float = 60,
             transport: str = "u1") -> SippResult:
    """Run SIPp with a scenario from sipp-scenarios/ against 127.0.0.1:server_port.

    Exit status 0 means every call succeeded; the counts come from SIPp's statistics file.
    """
    sipp = shutil.which("sipp")
    if sipp is None:
        raise RuntimeError("sipp not installed (Debian package sip-tester; .ci/run installs it)")
    scen = scenario if os.path.isabs(scenario) else str(SCENARIOS / scenario)
    statdir = Path(tempfile.mkdtemp(prefix="sipp-"))
    stat = statdir / "stat.csv"
    cmd = [sipp, f"127.0.0.1:{server_port}", "-sf", scen, "-i", "127.0.0.1",
           "-m", str(calls), "-r", str(rate), "-timeout", f"{int(timeout)}s",
           "-timeout_error", "-nostdin", "-trace_stat", "-stf", str(stat), "-fd", "1",
           "-t", transport, "-trace_err", "-error_file", str(statdir / "errors.log")]
    # Always a fresh port: SIPp would otherwise take 5060 when free, where a demo server or
    # a stale binding of an earlier test may point.
    cmd += ["-p", str(local_port if local_port is not None else free_port())]
    cmd += list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30,
                          stdin=subprocess.DEVNULL, cwd=statdir)
    ok, failed = _read_stat(stat)
    errors = (statdir / "errors.log").read_text() if (statdir / "errors.log").exists() else ""
    shutil.rmtree(statdir, ignore_errors=True)
    return SippResult(proc.returncode, ok, failed, proc.stdout + proc.stderr + errors)
