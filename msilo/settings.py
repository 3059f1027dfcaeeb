"""The ``[msilo]`` section: the offline message store (RFC 3428 store and forward).

Loaded by :func:`sipbill.configschema.load_section`; ``validate()`` returns
``(relative_key, message)`` pairs so an error names the dotted key (``msilo.quota: ...``).
Times are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SECTION = "msilo"


@dataclass(frozen=True, slots=True)
class MsiloSettings:
    enabled: bool = True
    # Stored messages older than this are deleted undelivered (3 days).
    expiry: int = 3 * 24 * 3600
    # Undelivered messages one recipient may have stored; more are refused with quota_status.
    quota: int = 100
    # 486 Busy Here (the recipient's box is full, do not retry elsewhere) or 503 (a
    # temporary condition of this server); both with reason phrase "Message Store Full".
    quota_status: Literal[486, 503] = 486
    # Largest body stored, in bytes; larger MESSAGEs get 413 (RFC 3428 §7).
    max_message_size: int = 16384
    # Tell the sender (with a MESSAGE from notice_from) that the recipient is offline.
    offline_notice: bool = False
    notice_from: str = ""  # "" = sip:msilo@<first domain>
    notice_text: str = "{recipient} is offline. Your message will be delivered later."
    # How often pending messages of registered users are retried and expired ones purged.
    retry_interval: float = 60.0
    # Recipients delivered to at the same time (each recipient's messages go one by one).
    delivery_concurrency: int = 20
    # A message refused this many times with a definitive error (415, 488, 603...) is dropped.
    max_refusals: int = 3

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.expiry < 60:
            problems.append(("expiry", "must be at least 60 seconds"))
        if self.quota < 1:
            problems.append(("quota", "must be at least 1"))
        if not 1 <= self.max_message_size <= 1024 * 1024:
            problems.append(("max_message_size", "must be 1-1048576 bytes"))
        if self.notice_from and not self.notice_from.startswith(("sip:", "sips:")):
            problems.append(("notice_from", "must be a sip: URI"))
        try:
            self.notice_text.format(recipient="")
        except (KeyError, IndexError, ValueError):
            problems.append(("notice_text", "may only use the placeholder {recipient}"))
        if not 1.0 <= self.retry_interval <= 86400:
            problems.append(("retry_interval", "must be 1-86400 seconds"))
        if not 1 <= self.delivery_concurrency <= 1000:
            problems.append(("delivery_concurrency", "must be 1-1000"))
        if not 1 <= self.max_refusals <= 100:
            problems.append(("max_refusals", "must be 1-100"))
        return problems


SETTINGS = MsiloSettings
