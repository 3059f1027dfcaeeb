"""A headless baresip (Debian's ``baresip``) as a real user agent for end-to-end tests.

baresip runs with a private config directory (``-f``): no audio modules, ``account`` for the
one account, ``menu`` (which answers MESSAGE), ``contact`` + ``presence`` for watching
contacts marked ``;presence=p2p`` (RFC 3856 SUBSCRIBE, PIDF parsing), and ``-s`` so its SIP
trace shows exactly what it received and answered.  Output goes to a file the test polls.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.support import free_port

BARESIP = shutil.which("baresip")


class Baresip:
    """One baresip process for ``user`` (password ``demo<user>``) at the server's port."""

    def __init__(self, workdir: Path, user: str, server_port: int, *,
                 watch: tuple[str, ...] = (), regint: int = 600) -> None:
        if BARESIP is None:
            raise RuntimeError("baresip not installed (Debian package baresip-core)")
        self.dir = workdir / f"baresip-{user}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.dir / "out.log"
        (self.dir / "config").write_text(
            "poll_method epoll\n"
            f"sip_listen 127.0.0.1:{self.port}\n"
            "module_path /usr/lib/baresip/modules\n"
            "module account.so\nmodule menu.so\nmodule contact.so\nmodule presence.so\n")
        (self.dir / "accounts").write_text(
            f'<sip:{user}@localhost>;auth_pass=demo{user};'
            f'outbound="sip:127.0.0.1:{server_port};transport=udp";regint={regint}\n')
        (self.dir / "contacts").write_text(
            "".join(f'"{w}" <sip:{w}@localhost>;presence=p2p\n' for w in watch))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Baresip:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                ["stdbuf", "-oL", "-eL", str(BARESIP), "-s", "-f", str(self.dir)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        return self

    def output(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return re.sub(r"\x1b\[[0-9;]*m", "", text)  # colour codes

    def wait_for(self, pattern: str, timeout: float = 15.0, count: int = 1) -> list[str]:
        """Wait until ``pattern`` (regex, multiline) matched ``count`` times in the output."""
        deadline = time.monotonic() + timeout
        found: list[str] = []
        while time.monotonic() < deadline:
            found = re.findall(pattern, self.output(), re.M)
            if len(found) >= count:
                return found
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"baresip output never matched {pattern!r} x{count} "
                             f"(got {len(found)}):\n{self.output()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
