"""Splitting a SIP byte stream into messages (RFC 3261 §18.3, §7.5; RFC 5626 §3.5.1, §4.4.1).

Theory of operation
-------------------
On a stream transport (TCP, TLS) messages follow each other with nothing in between but
optional CRLFs, and the Content-Length header -- mandatory on streams -- is the only way to
know where a body ends.  :class:`StreamFramer` is fed whatever the socket delivered and
returns the complete messages it now holds, each exactly as sent, ready for
``parse_message(data, stream=True)``.  Between messages it is in one of three states:

* **idle**: skipping CRLFs.  RFC 3261 §7.5 says to ignore CRLFs before a start line;
  RFC 5626 §3.5.1 gives a double CRLF ("ping") a meaning: the client wants a single CRLF
  ("pong") back.  Each ping found increments :attr:`StreamFramer.pings`; the transport
  writes that many CRLFs and resets it (or calls :meth:`StreamFramer.take_pings`).  CRLFs
  at the end of the data that could still become a ping stay buffered until the next
  bytes decide; a lone CRLF followed by anything else is ignored.
* **headers**: looking for the blank line that ends the header block.  The search resumes
  where the previous one stopped, so a message trickling in byte by byte costs linear time.
* **body**: the header block is complete and its Content-Length known; waiting for that
  many body bytes (the header block is not scanned again).

Limits: a header block that has not ended within ``max_message_size`` bytes is 513, a
Content-Length that would make the message larger than that is 413, a missing, repeated or
malformed Content-Length is 400, and more than ``max_buffer`` bytes held for an incomplete
message is 513.  Any of these leaves the stream unrecoverable (we no longer know where the
next message starts): the framer raises :class:`SipParseError` now and on every later
``feed``, and the transport closes the connection.  Nothing but SipParseError escapes.
"""

from __future__ import annotations

from sipcore import message as _message
from sipcore.errors import SipParseError

__all__ = ["StreamFramer", "is_keepalive"]

_CONTENT_LENGTH_NAMES = frozenset({"content-length", "l"})


def is_keepalive(datagram: bytes) -> bool:
    """True for a datagram holding nothing but CR/LF (a CRLF keep-alive sent over UDP by
    many phones; RFC 5626 uses STUN there, but the CRLF form is common); it is not a SIP
    message and needs no answer."""
    return not datagram.strip(b"\r\n")


def _content_length(head: bytes) -> int:
    """The Content-Length of a complete header block (start line included, no final blank
    line), as RFC 3261 §18.3 requires on streams.  Only this header is examined: anything
    else wrong with the message is for ``parse_message`` to answer with a 400."""
    text = head.decode("latin-1")
    fields: list[list[str]] = []
    current: list[str] | None = None
    for line in text.split("\r\n")[1:]:
        if line[:1] in (" ", "\t"):
            if current is not None:
                current.append(line)  # folded continuation of Content-Length
            continue
        name, colon, value = line.partition(":")
        if colon and name.strip(" \t").lower() in _CONTENT_LENGTH_NAMES:
            current = [value]
            fields.append(current)
        else:
            current = None
    if not fields:
        raise SipParseError(400, "Missing Content-Length on a stream")
    if len(fields) > 1:
        raise SipParseError(400, "Several Content-Length header fields")
    value = " ".join(part.strip(" \t") for part in fields[0]).strip(" ")
    if not value.isdigit() or not value.isascii() or len(value) > 10:
        raise SipParseError(400, "Bad Content-Length")
    return int(value)


class StreamFramer:
    """Incremental framer for one stream connection; see the module docstring."""

    __slots__ = (
        "_body_end",
        "_buf",
        "_failed",
        "_scan",
        "max_buffer",
        "max_message_size",
        "pings",
    )

    def __init__(self, *, max_message_size: int | None = None, max_buffer: int | None = None):
        #: Largest message accepted (default: :data:`sipcore.message.MAX_MESSAGE_SIZE`).
        self.max_message_size = (
            max_message_size if max_message_size is not None else _message.MAX_MESSAGE_SIZE
        )
        #: Most bytes held for an incomplete message (default: ``max_message_size``).
        self.max_buffer = max_buffer if max_buffer is not None else self.max_message_size
        #: Double-CRLF pings received and not yet answered (RFC 5626 §4.4.1).
        self.pings = 0
        self._buf = bytearray()
        self._scan = 0  # where to resume looking for the end of the header block
        self._body_end = -1  # end of the current message once its header block is known
        self._failed: SipParseError | None = None

    def take_pings(self) -> int:
        """Return the number of pings to answer (each with one CRLF) and reset it."""
        pings, self.pings = self.pings, 0
        return pings

    @property
    def buffered(self) -> int:
        """Bytes held for a message not yet complete."""
        return len(self._buf)

    @property
    def failed(self) -> SipParseError | None:
        """The error that broke the stream, if any (the connection should be closed)."""
        return self._failed

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes from the stream; return the messages completed by them, in order.

        If the data breaks the framing after some complete messages, those are returned and
        the error is kept in :attr:`failed` and raised by the next call; otherwise it is
        raised at once.
        """
        if self._failed is not None:
            raise SipParseError(self._failed.status, self._failed.reason)
        out: list[bytes] = []
        try:
            self._feed(data, out)
        except SipParseError as exc:
            self._failed = exc
        except Exception as exc:  # never anything but SipParseError out of a framer
            self._failed = SipParseError(400, f"Unframeable stream ({type(exc).__name__})")
            self._failed.__cause__ = exc
        if self._failed is not None and not out:
            raise self._failed
        return out

    def _feed(self, data: bytes, out: list[bytes]) -> None:
        buf = self._buf
        buf += data
        n = len(buf)
        pos = 0
        max_size = self.max_message_size
        while pos < n:
            if self._body_end < 0 and self._scan <= pos:
                # idle: between messages, only CRLFs are allowed (and meaningful).
                char = buf[pos]
                if char == 0x0D or char == 0x0A:
                    if buf.startswith(b"\r\n\r\n", pos):
                        self.pings += 1
                        pos += 4
                    elif n - pos < 4 and b"\r\n\r\n".startswith(buf[pos:]):
                        break  # maybe the start of a ping: wait for what follows
                    elif buf.startswith(b"\r\n", pos):
                        pos += 2  # a lone CRLF (a pong, or padding): ignored
                    else:
                        raise SipParseError(400, "Bare CR or LF between messages")
                    continue
                self._scan = pos
            if self._body_end < 0:
                # headers: find the blank line, resuming where the last search stopped.
                end = buf.find(b"\r\n\r\n", self._scan)
                if end < 0:
                    if n - pos > max_size:
                        raise SipParseError(513, "Message Too Large")
                    self._scan = max(pos, n - 3)
                    break
                if end + 4 - pos > max_size:
                    raise SipParseError(513, "Message Too Large")
                length = _content_length(bytes(buf[pos:end]))
                if end + 4 + length - pos > max_size:
                    raise SipParseError(413, "Request Entity Too Large")
                self._body_end = end + 4 + length
            # body: wait until all of it is here.
            if self._body_end > n:
                break
            out.append(bytes(buf[pos : self._body_end]))
            pos = self._body_end
            self._body_end = -1
            self._scan = pos
        # Drop what has been consumed; offsets kept across calls are relative to the buffer.
        if pos:
            del buf[:pos]
            self._scan = max(0, self._scan - pos)
            if self._body_end >= 0:
                self._body_end -= pos
        if len(buf) > self.max_buffer:
            raise SipParseError(513, "Too much buffered for one message")
