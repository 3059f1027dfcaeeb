"""The one error type for bad SIP input (ARCHITECTURE.md principle 2).

Everything that turns bytes into SIP objects -- ``parse_message``, the URI and header parsers,
the stream framer -- raises :class:`SipParseError` and nothing else.  The error carries the
status code a server should answer with (RFC 3261 §8.2, §16.3, §21.4), so the transport can
build a stateless reply for a bad request (never for ACK, RFC 3261 §17.2.3 / §8.2.6) or count
and drop a bad response (RFC 3261 §18.1.2).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SipParseError"]


class SipParseError(Exception):
    """Bad SIP input, with the status to answer with.

    Typical statuses: 400 (Bad Request, RFC 3261 §21.4.1), 413 (Request Entity Too Large,
    §21.4.11), 414 (Request-URI Too Long), 416 (Unsupported URI Scheme, §21.4.14),
    420 (Bad Extension, §21.4.15), 483 (Too Many Hops, §21.4.22), 505 (Version Not Supported,
    §21.5.6), 513 (Message Too Large, §21.5.7).

    ``headers`` are extra header fields the reply must carry, e.g. ``Unsupported`` with a 420
    (RFC 3261 §8.2.2.3) -- empty for plain syntax errors.
    """

    __slots__ = ("headers", "reason", "status")

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def __init__(self, status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.status = status
        self.reason = reason
        self.headers = tuple(headers)
        # args mirror the constructor so that pickling (e.g. across a process pool) keeps all.
        if self.headers:
            super().__init__(status, reason, self.headers)
        else:
            super().__init__(status, reason)

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"SipParseError({self.status!r}, {self.reason!r})"
