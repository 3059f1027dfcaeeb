"""The ``[clicktodial]`` section of the TOML configuration (ARCHITECTURE.md principle 6).

Loaded by :func:`sipbill.configschema.load_section` through :mod:`sipbill.modules`; every key is
documented in ``config/sipbill.example.toml``. Times are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SECTION = "clicktodial"


@dataclass(frozen=True, slots=True)
class ClickToDialSettings:
    """How the click-to-dial user agent calls the caller and hands the call over."""

    enabled: bool = True
    # Who the caller's phone sees calling: "callee" puts the callee's address in From (the
    # phone shows whom it is about to be connected to), "server" a fixed sip:click2dial@domain.
    caller_id: Literal["callee", "server"] = "callee"
    # Display name in that From; empty for none.
    display_name: str = "Click-to-dial"
    # RFC 3264 §8.4 hold in the first offer: "sendonly" or "inactive" (c=0.0.0.0 either way).
    hold_direction: Literal["sendonly", "inactive"] = "sendonly"
    # The caller's phone may ring this long before the INVITE is CANCELled ("no_answer").
    ring_timeout: float = 30.0
    # After the REFER is accepted, the first NOTIFY must come within this ("refer_timeout").
    notify_timeout: float = 10.0
    # After the REFER is accepted, the new call must be answered or fail within this
    # ("transfer_timeout"); it covers the callee's ringing.
    transfer_timeout: float = 120.0
    # Where the caller's phone refuses REFER (403/405/420/489/501/603), connect the two
    # phones with third-party call control instead (RFC 3725, the server stays in the path).
    fallback_3pcc: bool = True
    # 3PCC: the callee may ring this long before the INVITE is CANCELled.
    callee_timeout: float = 60.0
    # Jobs running at once (bridged 3PCC calls included); beyond, click2dial.call is refused.
    max_jobs: int = 100
    # Finished jobs kept for click2dial.status / click2dial.list (oldest forgotten first).
    keep_finished: int = 1000

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for key in ("ring_timeout", "notify_timeout", "transfer_timeout", "callee_timeout"):
            value = getattr(self, key)
            if not 1.0 <= value <= 3600.0:
                problems.append((key, f"must be 1-3600 seconds, got {value!r}"))
        if self.max_jobs < 1:
            problems.append(("max_jobs", "must be at least 1"))
        if self.keep_finished < 0:
            problems.append(("keep_finished", "must not be negative"))
        if any(c in self.display_name for c in '"\\\r\n'):
            problems.append(("display_name", "must not contain quotes, backslashes or newlines"))
        return problems


SETTINGS = ClickToDialSettings

__all__ = ["SECTION", "SETTINGS", "ClickToDialSettings"]
