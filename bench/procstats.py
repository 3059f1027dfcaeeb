"""CPU time and memory of process trees, read from /proc (Linux only; a helper of sip_load.py).

The benchmark charges a server for the CPU its own processes spend, not for the wall time a
step takes: on a 2-core machine SIPp, the server and its database share the cores, so a rate
alone would say as much about SIPp as about the server.  ``utime + stime`` of
``/proc/PID/stat`` (clock ticks) is read for every process of a tree before and after a step.

Trees are re-read at every sample because their membership changes: PostgreSQL starts a
backend per connection, and a multi-process server may fork workers after start-up.  A process
that exits between two samples takes its CPU time with it; connection pools keep backends
alive, so that loss is negligible here.

Memory is reported as RSS (``VmRSS``, what ``ps`` shows) and PSS (``Pss`` from
``smaps_rollup``): for one process they differ only by shared libraries, but Kamailio's
workers all map the same shared-memory segment, so summed RSS would count each touched page
once per worker while summed PSS counts it once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may contain spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 if it is gone)."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12)
    return (int(f[11]) + int(f[12])) / CLK_TCK


def parent_map() -> dict[int, list[int]]:
    """ppid -> child pids, for every process visible now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        f = _stat_fields(int(entry.name))
        if f is not None:
            children.setdefault(int(f[1]), []).append(int(entry.name))
    return children


def tree(roots: Iterable[int], exclude: Iterable[int] = ()) -> list[int]:
    """The live processes among ``roots`` and all their descendants, minus ``exclude`` trees."""
    children = parent_map()
    skip = set(exclude)
    out: list[int] = []
    stack = [p for p in roots if p not in skip]
    while stack:
        pid = stack.pop()
        if not Path(f"/proc/{pid}").exists():
            continue
        out.append(pid)
        stack.extend(c for c in children.get(pid, ()) if c not in skip)
    return sorted(out)


def tree_cpu(pids: Iterable[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    """CPU seconds each process spent between two samples (new processes: all of theirs)."""
    return {pid: after[pid] - before.get(pid, 0.0) for pid in after}


@dataclass(frozen=True, slots=True)
class Memory:
    rss: int  # bytes, summed VmRSS
    pss: int  # bytes, summed Pss (shared pages divided among their users)


def memory(pids: Iterable[int]) -> Memory:
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                    break
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return Memory(rss, pss)


def postmaster_of_datadir(pgdata: Path) -> int | None:
    """The postmaster pid recorded in a PostgreSQL data directory, if it is running."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def is_postgres(pid: int) -> bool:
    """Whether ``pid`` is a PostgreSQL process here (a pid from a remote server may name an
    unrelated local process, or none)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("postgres")
    except OSError:
        return False


def parent_of(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[1]) if f is not None else None


def udp_receive_drops() -> int:
    """UDP datagrams dropped so far because a socket's receive buffer was full (all sockets:
    the server's and SIPp's alike), from /proc/net/snmp."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()
             if ln.startswith("Udp:")]
    if len(lines) < 2 or "RcvbufErrors" not in lines[0]:
        return 0
    return int(lines[1][lines[0].index("RcvbufErrors")])


class MachineCpu:
    """Busy fraction of the whole machine between two calls of :meth:`sample` (/proc/stat)."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in first]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    def sample(self) -> float:
        total, idle = self._read()
        t0, i0 = self._last
        self._last = (total, idle)
        dt = total - t0
        return 1.0 - (idle - i0) / dt if dt > 0 else 0.0
