"""The ``[presence]`` section: SUBSCRIBE/NOTIFY for the presence event package.

RFC 3856 §6.4 and RFC 6665 §4.2.1.1: the notifier may shorten the subscription duration a
watcher asks for, and refuses one too short with 423 Interval Too Brief and Min-Expires.
Times are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from sipcore.settings import expires_problems

SECTION = "presence"


@dataclass(frozen=True, slots=True)
class PresenceSettings:
    enabled: bool = True
    # Subscription duration when the SUBSCRIBE has no Expires (RFC 3856 §6.4: 3600).
    default_expires: int = 3600
    # Shorter non-zero requests get 423 Interval Too Brief with Min-Expires.
    min_expires: int = 60
    # Longer requests are shortened to this (the 200 OK's Expires says so).
    max_expires: int = 7200
    # Subscriptions one watcher may hold; more get 403.
    max_per_watcher: int = 200

    def validate(self) -> list[tuple[str, str]]:
        problems = expires_problems(self.min_expires, self.default_expires, self.max_expires)
        if self.max_per_watcher < 1:
            problems.append(("max_per_watcher", "must be at least 1"))
        return problems


SETTINGS = PresenceSettings
