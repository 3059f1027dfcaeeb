"""The little SDP (RFC 4566) the click-to-dial user agent writes and rewrites.

The server never carries media. It writes three kinds of session description:

* the **hold offer** of the first INVITE to the caller (seed 002: "0.0.0.0 as IP address in
  SDP because there is no remote phone"): one audio stream, ``c=IN IP4 0.0.0.0`` (the RFC 2543
  hold address RFC 3725 §4.4 calls the "black hole") and ``a=sendonly`` or ``a=inactive``
  (RFC 3264 §8.4);
* a **hold answer** to an offer that arrives in a dialog where no media is wanted (a phone's
  re-INVITE during the transfer, or the ACK answer owed to a callee whose call is abandoned):
  every stream accepted with its first format, inactive, at the black-hole address
  (RFC 3264 §6: an answer has as many m-lines as the offer, in the same order);
* **restamped** descriptions relayed between two phones in third-party call control
  (RFC 3725): each dialog has one origin line of ours (RFC 3264 §8: "the origin line MUST be
  the same as the previous one from that party, with the version incremented" when the
  description changed, unchanged when not), and m-lines are padded with rejected streams or
  trimmed so each side sees at least as many m-lines as before (RFC 3264 §8) and an answer
  has exactly as many as its offer (RFC 3725 §4.4: offer2' / answer2).

Bodies are handled as text lines; anything not touched is copied as is.
"""

from __future__ import annotations

import secrets

__all__ = [
    "Origin", "hold_answer", "hold_offer", "is_sdp", "media_count", "pad_media", "trim_media",
]

_BLACK_HOLE = "IN IP4 0.0.0.0"


def _lines(body: bytes) -> list[str]:
    text = body.decode("utf-8", "replace").replace("\r\n", "\n")
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _join(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


class Origin:
    """Our ``o=`` line in one dialog: fixed session id, version bumped on every change."""

    __slots__ = ("address", "last", "session_id", "version")

    def __init__(self, address: str) -> None:
        self.address = address
        self.session_id = str(secrets.randbelow(2**31) + 1)
        self.version = int(self.session_id)
        self.last: list[str] | None = None

    @property
    def media_count(self) -> int:
        """m-lines in the last description stamped (0 before the first)."""
        return sum(1 for line in self.last or () if line.startswith("m="))

    def line(self) -> str:
        family = "IP6" if ":" in self.address else "IP4"
        return f"o=sipbill {self.session_id} {self.version} IN {family} {self.address}"

    def stamp(self, body: bytes) -> bytes:
        """``body`` with our origin line; the version goes up only if the rest changed."""
        lines = [line for line in _lines(body) if not line.startswith("o=")]
        if self.last is not None and lines != self.last:
            self.version += 1
        self.last = lines
        out = [*lines[:1], self.line(), *lines[1:]]  # o= follows v= (RFC 4566 §5)
        return _join(out)


def hold_offer(origin: Origin, direction: str = "sendonly") -> bytes:
    """The first offer to the caller: one audio stream on hold, nowhere to send media to."""
    lines = [
        "v=0",
        "s=click-to-dial",
        f"c={_BLACK_HOLE}",
        "t=0 0",
        "m=audio 9 RTP/AVP 0 8 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-15",
        f"a={direction}",
    ]
    return origin.stamp(_join(lines))


def _sections(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    """(session-level lines, one list per media section starting with its m= line)."""
    session: list[str] = []
    media: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            media.append([line])
        elif media:
            media[-1].append(line)
        else:
            session.append(line)
    return session, media


def media_count(body: bytes) -> int:
    return sum(1 for line in _lines(body) if line.startswith("m="))


def hold_answer(offer: bytes, origin: Origin) -> bytes:
    """An answer accepting every offered stream inactive, at the black-hole address."""
    _session, media = _sections(_lines(offer))
    out = ["v=0", "s=click-to-dial", f"c={_BLACK_HOLE}", "t=0 0"]
    for section in media:
        fields = section[0][2:].split()
        if len(fields) < 4 or fields[1] == "0":
            # Rejected in the offer (or unreadable): rejected in the answer too.
            kind = fields[0] if fields else "audio"
            proto = fields[2] if len(fields) > 2 else "RTP/AVP"
            fmt = fields[3] if len(fields) > 3 else "0"
            out.append(f"m={kind} 0 {proto} {fmt}")
            continue
        kind, _port, proto, fmt = fields[:4]
        out.append(f"m={kind} 9 {proto} {fmt}")
        for attr in section[1:]:
            if attr.startswith((f"a=rtpmap:{fmt} ", f"a=fmtp:{fmt} ")):
                out.append(attr)
        out.append("a=inactive")
    return origin.stamp(_join(out))


def pad_media(body: bytes, count: int) -> bytes:
    """``body`` with rejected audio streams appended up to ``count`` m-lines."""
    missing = count - media_count(body)
    if missing <= 0:
        return body
    return _join(_lines(body) + ["m=audio 0 RTP/AVP 0"] * missing)


def trim_media(body: bytes, count: int) -> bytes:
    """``body`` with only its first ``count`` media sections."""
    session, media = _sections(_lines(body))
    if len(media) <= count:
        return body
    return _join(session + [line for section in media[:count] for line in section])


def is_sdp(content_type: str | None, body: bytes) -> bool:
    return bool(body) and (content_type or "").split(";")[0].strip().lower() == "application/sdp"

