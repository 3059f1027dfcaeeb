"""SIP messages: parsing, lazy header access, byte-level forwarding, builders.

RFC 3261 §7 (message format), §7.3 (header fields, folding, compact forms, lists),
§8.1.1 / §8.2.2 / §16.3 (mandatory headers and request validation), §18.3 (framing,
Content-Length), §20 (header fields), §25 (grammar).  ARCHITECTURE.md principles 2 and 3.

Theory of operation
-------------------
``parse_message`` does the minimum a proxy must be able to trust, once:

1. split off the header block at the first blank line, enforce the size caps
   (:data:`MAX_MESSAGE_SIZE`, :data:`MAX_HEADERS`, :data:`MAX_LINE_LENGTH`; module globals,
   read at each call so configuration can change them) and reject a bare CR or LF, which
   a downstream parser could read as line breaks;
2. parse the start line (method token, Request-URI without LWS, ``<>`` or headers, scheme we
   support -> else 416, version SIP/2.0 -> else 505; or status code 100-699);
3. index the header block: each header field's text (folded continuation lines joined to
   it) and its lower-case canonical name (compact forms expanded), plus a name -> index
   map.  In the common case -- every name spelt as seen before, no folding -- that is one
   dict lookup per line; byte offsets are only worked out when a splice needs them;
4. validate what every proxy relies on: To, From, CSeq, Call-ID and Via present; those and
   Max-Forwards / Content-Length not repeated (RFC 4475 §3.3.8, §3.3.9); CSeq, Call-ID, the
   top Via, From and To parsed (and cached), CSeq method equal to the request method,
   Max-Forwards 0-255, Content-Length consistent with the bytes (§18.3).

Everything else -- the other Via values, Route, Record-Route, Contact, Expires, the parsed
Request-URI, any other header -- is parsed the first time it is asked for and cached.  Those
lazy accessors raise :class:`SipParseError` (status 400) if that header is malformed, and
nothing else; :func:`sipcore.checks.request_checks` touches the ones a proxy needs so
REQINIT can turn such errors into a 400 before the request goes further.

``raw`` is the exact message bytes (leading CRLF keep-alives and bytes past Content-Length
in a datagram excluded), so an untouched message serialises to ``raw``.  Forwarding
(:meth:`Request.forward`, :meth:`Response.forward`) is a splice over ``raw``: a list of
(offset, offset, replacement) edits applied in one pass, so untouched header lines are
copied byte for byte, compact forms and odd spacing included.

Header text is decoded as UTF-8 (surrogate escapes for anything else, so no input fails to
decode and encoding gives the same bytes back); for pure ASCII header blocks -- nearly all
-- string offsets are byte offsets, otherwise byte offsets are computed once per line.

Steps 1-4 have an optional C accelerator, ``sipcore._fastparse`` (``_fastparse.c``, built
by setup.py where a C compiler exists).  It only recognises: given a message in the common
shape (ASCII header block, no folding, names spelt as seen before, the mandatory values in
the forms the regex fast paths here take, a body Content-Length frames without error) it
builds the very Request or Response the code below would (filling the slots directly, and
a lone Route in the common shape as ``routes`` would cache it), and for anything else it
returns None and the pure-Python code runs as if it did not exist.  It never rejects, so
every verdict stays here; tests/sipcore/test_fastparse.py and bench/fuzz_fastparse.py
check that both paths give identical messages.  It is used only when its compiled-in
SHA-256 matches ``_fastparse.c`` (a stale build is ignored); ``SIPBILL_PURE_PYTHON=1``
turns it off.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Sequence
from itertools import accumulate, repeat
from operator import add, itemgetter, methodcaller
from typing import TYPE_CHECKING, Final, cast

from mypy_extensions import mypyc_attr

from sipcore import accel
from sipcore.errors import SipParseError
from sipcore.headers import (
    _CSEQ_VALUE,
    _NAME_ADDR_VALUE,
    _NAME_CACHE,
    _VIA_VALUE,
    COMPACT_FORMS,
    LIST_HEADERS,
    CSeq,
    NameAddr,
    Via,
    _name_addr_from_match,
    _via_from_match,
    canonical_name,
    parse_cseq,
    parse_name_addr,
    parse_name_addrs,
    parse_via,
    parse_vias,
    split_values,
    unfold,
    value_spans,
)
from sipcore.transport_types import Peer
from sipcore.uri import (
    SUPPORTED_URI_SCHEMES,
    SipUri,
    TelUri,
    is_scheme,
    is_token,
    parse_uri,
)

if TYPE_CHECKING:
    from types import ModuleType

    from sipcore._fastparse import Parse as _Parse
    from sipcore._fastparse import Respond as _Respond
    from sipcore._fastparse import Splice as _Splice

__all__ = [
    "MAX_HEADERS",
    "MAX_LINE_LENGTH",
    "MAX_MESSAGE_SIZE",
    "REASON_PHRASES",
    "Request",
    "Response",
    "SipMessage",
    "build_request",
    "build_response",
    "parse_message",
    "stateless_error_reply",
]

#: Largest message accepted (start line + headers + body), bytes.  513 above it
#: (413 when it is the declared body that does not fit).
MAX_MESSAGE_SIZE = 65536
#: Most header fields accepted in one message (513 above it).
MAX_HEADERS = 256
#: Longest physical line accepted in the header block, bytes (513 above it; 414 for the
#: request line).
MAX_LINE_LENGTH = 8192

#: RFC 3261 §21 reason phrases (plus the few extension codes a registrar/proxy sends).
REASON_PHRASES: Final[dict[int, str]] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    199: "Early Dialog Terminated",
    200: "OK",
    202: "Accepted",
    204: "No Notification",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    412: "Conditional Request Failed",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    429: "Provide Referrer Identity",
    439: "First Hop Lacks Outbound Support",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    493: "Undecipherable",
    494: "Security Agreement Required",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    580: "Precondition Failure",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}

# Single-valued headers that must not be repeated (RFC 3261 §7.3.1 only allows repetition
# for list headers; RFC 4475 §3.3.8 and §3.3.9 show why it matters for these).
_SINGLETONS: Final = ("to", "from", "call-id", "cseq", "max-forwards", "content-length")
_MANDATORY_NAMES: Final = frozenset({"to", "from", "call-id", "cseq", "via"})
_MANDATORY: Final = (
    ("to", "To"),
    ("from", "From"),
    ("call-id", "Call-ID"),
    ("cseq", "CSeq"),
    ("via", "Via"),
)
_METHODS_SEEN: set[str] = {
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "REGISTER",
    "OPTIONS",
    "INFO",
    "PRACK",
    "UPDATE",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "MESSAGE",
    "PUBLISH",
}


def _lookup_name(name: str) -> str:
    """Canonical name for an API caller's header name (never raises: a name that is not a
    token simply matches nothing)."""
    canon = _NAME_CACHE.get(name)  # the names code asks for are all in it after one use
    if canon is not None:
        return canon
    try:
        return canonical_name(name)
    except SipParseError:
        return name.strip().lower()


def _check_text(value: str, what: str) -> None:
    """Values we write into messages must not be able to start a new line (header
    injection)."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"{what} must not contain CR or LF: {value!r}")


def _is_sip_version(text: str) -> bool:
    """SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT (case-insensitive "SIP")."""
    if text[:4].upper() != "SIP/":
        return False
    major, dot, minor = text[4:].partition(".")
    return bool(dot) and major.isdigit() and minor.isdigit() and text.isascii()


# --------------------------------------------------------------------------- messages


# Not native classes where this module is compiled: _fastparse.c fills their __slots__ (see
# sipcore/__init__.py).  Their methods are compiled all the same.
@mypyc_attr(native_class=False)
class SipMessage:
    """A parsed SIP message; see the module docstring for what is checked when."""

    __slots__ = (
        "_ascii",
        "_blens",
        "_body_offset",
        "_call_id",
        "_contacts",
        "_cseq",
        "_from",
        "_lines",
        "_max_forwards",
        "_names",
        "_offs",
        "_pos",
        "_record_routes",
        "_routes",
        "_start_blen",
        "_to",
        "_top_via",
        "_top_via_text",
        "_vias",
        "body",
        "raw",
    )

    raw: bytes
    body: bytes
    # The index: _lines[i] is header field i as written (folded continuation lines joined by
    # their CRLF), _names[i] its canonical name, _pos the index of the last field of each
    # name (for membership and the single-valued headers).  Byte offsets (_offs, _blens)
    # are only computed when a splice needs them.
    _lines: list[str]
    _names: list[str]
    _pos: dict[str, int]
    _ascii: bool
    _offs: list[int] | None
    _blens: list[int] | None
    _start_blen: int
    _body_offset: int
    _call_id: str
    _cseq: CSeq
    _top_via: Via
    _top_via_text: str | None
    _from: NameAddr
    _to: NameAddr
    _max_forwards: int | None
    _vias: list[Via] | None
    _routes: list[NameAddr] | None
    _record_routes: list[NameAddr] | None
    _contacts: list[NameAddr] | None

    # ------------------------------------------------------------------ generic access
    def _value(self, i: int) -> str:
        """Unfolded, stripped value of header field ``i``."""
        return _field_value(self._lines[i])

    def _indices(self, canon: str) -> list[int]:
        last = self._pos.get(canon)
        if last is None:
            return []
        first = self._names.index(canon)
        if first == last:
            return [first]
        return [i for i in range(first, last + 1) if self._names[i] == canon]

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (any case, compact form ok), unfolded; None when
        absent.  For list headers (:data:`~sipcore.headers.LIST_HEADERS`) that is the first
        comma-separated element, otherwise the whole first field value."""
        canon = _lookup_name(name)
        if canon not in self._pos:
            return None
        value = self._value(self._names.index(canon))
        if canon in LIST_HEADERS:
            parts = split_values(value)
            return parts[0] if parts else ""
        return value

    def header_values(self, name: str, *, split: bool | None = None) -> list[str]:
        """All values of header ``name`` over all its field rows, unfolded.

        List headers are split at commas outside quotes and ``<>`` (empty elements dropped);
        other headers give one value per field row -- credentials, challenges, Date and
        unknown extension headers are never split.  ``split`` forces either behaviour.
        """
        canon = _lookup_name(name)
        if canon not in self._pos:
            return []
        values = [self._value(i) for i in self._indices(canon)]
        if split is None:
            split = canon in LIST_HEADERS
        if not split:
            return values
        return [part for value in values for part in split_values(value)]

    def has_header(self, name: str) -> bool:
        return _lookup_name(name) in self._pos

    def header_items(self) -> list[tuple[str, str]]:
        """Every header field as (canonical lower-case name, unfolded value), in order."""
        return [(name, self._value(i)) for i, name in enumerate(self._names)]

    # ------------------------------------------------------------------ validated at parse
    @property
    def call_id(self) -> str:
        return self._call_id

    @property
    def cseq(self) -> CSeq:
        return self._cseq

    @property
    def top_via(self) -> Via:
        return self._top_via

    @property
    def from_addr(self) -> NameAddr:
        return self._from

    @property
    def to_addr(self) -> NameAddr:
        return self._to

    @property
    def max_forwards(self) -> int | None:
        return self._max_forwards

    @property
    def content_length(self) -> int:
        """Length of the body (what Content-Length says, or the datagram's remainder)."""
        return len(self.body)

    # ------------------------------------------------------------------ lazy, cached
    @property
    def one_via(self) -> bool:
        """Whether the message has a single Via value: one field without a comma (nearly
        every request from a phone).  Cheaper than ``len(vias) == 1``: parses nothing."""
        if self._vias is not None:
            return len(self._vias) == 1
        first = self._names.index("via")
        return self._pos["via"] == first and "," not in self._lines[first]

    @property
    def vias(self) -> list[Via]:
        """Every Via value, top first (400 if any is malformed)."""
        if self._vias is None:
            vias: list[Via] = []
            for n, i in enumerate(self._indices("via")):
                value = self._value(i)
                if n == 0:
                    rest = split_values(value, keep_empty=True)[1:]
                    vias.append(self._top_via)
                    vias.extend(parse_vias(",".join(rest)) if rest else ())
                else:
                    vias.extend(parse_vias(value))
            self._vias = vias
        return self._vias

    def _name_addrs(self, canon: str, allow_star: bool = False) -> list[NameAddr]:
        last = self._pos.get(canon)
        if last is None:
            return []
        if self._names.index(canon) == last:
            # One field holding one <URI> value in the common shape (what parse_name_addrs
            # would match after stripping): parse it from the line as it is.
            line = self._lines[last]
            if "\r" not in line:  # not folded
                match = _NAME_ADDR_VALUE.fullmatch(line, line.find(":") + 1)
                if match is not None:
                    return [_name_addr_from_match(match)]
        out: list[NameAddr] = []
        for i in self._indices(canon):
            out.extend(parse_name_addrs(self._value(i), allow_star=allow_star))
        return out

    @property
    def routes(self) -> list[NameAddr]:
        if self._routes is None:
            self._routes = self._name_addrs("route") if "route" in self._pos else []
        return self._routes

    @property
    def record_routes(self) -> list[NameAddr]:
        if self._record_routes is None:
            self._record_routes = self._name_addrs("record-route")
        return self._record_routes

    @property
    def contacts(self) -> list[NameAddr]:
        """Contact values; ``Contact: *`` gives one NameAddr with ``is_star`` set (400 if the
        star is combined with other values, RFC 3261 §10.2.2)."""
        if self._contacts is None:
            contacts = self._name_addrs("contact", allow_star=True)
            if len(contacts) > 1 and any(c.is_star for c in contacts):
                raise SipParseError(400, "Contact: * combined with other contacts")
            self._contacts = contacts
        return self._contacts

    @property
    def content_type(self) -> str | None:
        return self.header("content-type")

    @property
    def expires(self) -> int | None:
        """Expires header (RFC 3261 §20.19): None when absent; 400 when not a delta-seconds
        value within 32 bits."""
        if "expires" not in self._pos:
            return None
        value = _field_value(self._lines[self._names.index("expires")])
        if not value.isdigit() or not value.isascii() or len(value) > 10:
            raise SipParseError(400, "Bad Expires")
        seconds = int(value)
        if seconds > 2**32 - 1:
            raise SipParseError(400, "Bad Expires")
        return seconds

    # ------------------------------------------------------------------ serialising
    def _offsets(self) -> tuple[list[int], list[int]]:
        """Byte offset in ``raw`` of each header field, and its byte length (without CRLF)."""
        offs = self._offs
        blens = self._blens
        if offs is None or blens is None:
            lines = self._lines
            if self._ascii:
                blens = list(map(len, lines))
            else:
                blens = [len(line.encode("utf-8", "surrogateescape")) for line in lines]
            # Field k starts after the start line and fields 0..k-1, each with its CRLF.
            offs = list(accumulate(map(add, blens, repeat(2)), initial=self._start_blen + 2))
            del offs[-1]
            self._offs = offs
            self._blens = blens
        return offs, blens

    def _line_span(self, i: int) -> tuple[int, int]:
        """Byte span of header field ``i`` including its CRLF."""
        offs, blens = self._offsets()
        return offs[i], offs[i] + blens[i] + 2

    def _byte_pos(self, i: int, char_pos: int) -> int:
        """Byte offset in ``raw`` of character ``char_pos`` of header field ``i``."""
        offs, _ = self._offsets()
        if self._ascii:
            return offs[i] + char_pos
        return offs[i] + len(self._lines[i][:char_pos].encode("utf-8", "surrogateescape"))

    def _spans(self, i: int) -> tuple[int, list[tuple[int, int]]]:
        """Character offset of header ``i``'s value and the spans of its comma-separated
        values relative to it."""
        line = self._lines[i]
        vstart = line.find(":") + 1
        return vstart, value_spans(line[vstart:])

    def _value_span(self, i: int, k: int) -> tuple[int, int]:
        """Byte span of the ``k``-th comma-separated value of header ``i``, up to the start
        of the next value (so removing it removes its comma too)."""
        vstart, spans = self._spans(i)
        start = vstart + spans[k][0]
        end = vstart + (spans[k + 1][0] if k + 1 < len(spans) else spans[k][1])
        return self._byte_pos(i, start), self._byte_pos(i, end)

    def _count_values(self, i: int) -> int:
        line = self._lines[i]
        if "," not in line:
            return 1
        return len(self._spans(i)[1])

    def _stamped_via_line(self) -> tuple[int, str]:
        """Index and text of the first Via field with the top value rewritten by
        :meth:`Request.stamp_received`."""
        i = self._names.index("via")
        line = self._lines[i]
        vstart, spans = self._spans(i)
        start = vstart + spans[0][0]
        text = self._top_via_text or ""
        if len(spans) > 1:
            end = vstart + spans[1][0]
            text += ", "
        else:
            end = vstart + spans[0][1]
        return i, line[:start] + text + line[end:]

    def _base_edits(self) -> list[tuple[int, int, bytes]]:
        """Edits every serialisation applies (a top Via rewritten by stamp_received)."""
        if self._top_via_text is None:
            return []
        i, line = self._stamped_via_line()
        offs, blens = self._offsets()
        return [(offs[i], offs[i] + blens[i], line.encode("utf-8", "surrogateescape"))]

    def _splice(self, edits: list[tuple[int, int, bytes]]) -> bytes:
        """Apply non-overlapping (start, end, replacement) edits to ``raw`` in one pass.
        Insertions (start == end) at an offset go before a replacement at that offset and
        keep their given order.  The C accelerator's splice does the same in one allocation
        (and hands anything unusual back to the loop here)."""
        raw = self.raw
        if _fast_splice is not None:
            spliced = _fast_splice(raw, edits)
            if spliced is not None:
                return spliced
        edits.sort(key=_EDIT_KEY)
        out: list[bytes] = []
        pos = 0
        for start, end, replacement in edits:
            out.append(raw[pos:start])
            out.append(replacement)
            pos = end
        out.append(raw[pos:])
        return b"".join(out)

    def _remove_edits(
        self, remove_headers: Collection[str]
    ) -> tuple[list[tuple[int, int, bytes]], set[int]]:
        if not remove_headers:
            return [], set()
        remove = {_lookup_name(name) for name in remove_headers}
        gone = {i for i, name in enumerate(self._names) if name in remove}
        return [(*self._line_span(i), b"") for i in sorted(gone)], gone

    def _tail_edits(self, add_headers: Sequence[tuple[str, str]]) -> list[tuple[int, int, bytes]]:
        """Added headers (and a Content-Length if the message had none: streams need one)
        at the end of the header block."""
        lines = []
        for name, value in add_headers:
            _check_text(name, "header name")
            _check_text(value, "header value")
            lines.append(f"{name}: {value}\r\n")
        if "content-length" not in self._pos:
            lines.append(f"Content-Length: {len(self.body)}\r\n")
        if not lines:
            return []
        end = self._body_offset - 2  # just after the last header's CRLF
        return [(end, end, "".join(lines).encode("utf-8", "surrogateescape"))]

    def to_bytes(self) -> bytes:
        """The message as bytes: ``raw``, unless :meth:`Request.stamp_received` rewrote the
        top Via."""
        if self._top_via_text is None:
            return self.raw
        return self._splice(self._base_edits())

    def __bytes__(self) -> bytes:
        return self.to_bytes()


_EDIT_KEY = itemgetter(0, 1)  # sort edits by span only: equal spans keep their given order


@mypyc_attr(native_class=False)
class Request(SipMessage):
    """A SIP request; ``uri`` is the Request-URI text, ``request_uri`` it parsed (lazily)."""

    __slots__ = ("_request_uri", "method", "uri")

    method: str
    uri: str
    _request_uri: SipUri | TelUri | None

    @property
    def request_uri(self) -> SipUri | TelUri:
        """The Request-URI parsed (cached); 400 if malformed (its scheme was already
        checked: only sip, sips and tel get this far)."""
        if self._request_uri is None:
            self._request_uri = parse_uri(self.uri)
        return self._request_uri

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri} call-id={self._call_id!r}>"

    def stamp_received(self, source: Peer) -> bool:
        """RFC 3261 §18.2.1 and RFC 3581 §4: record where the request really came from in the
        top Via -- ``received`` when the sent-by host differs from the source address (or
        rport was requested), and the source port in an empty ``rport``.  Forwarded copies
        and built responses then carry it.  Returns True when the Via changed."""
        via = self._top_via
        old = via.params
        shost = source.host
        rport = "rport" in old
        host = via.host
        if host[:1] == "[":
            host = host[1:-1]
        add_received = (rport or host != shost) and old.get("received") != shost
        fill_rport = rport and not old.get("rport")
        if not (add_received or fill_rport):
            return False
        params = old.copy()
        if add_received:
            params["received"] = shost
        if fill_rport:
            params["rport"] = str(source.port)
        new = Via(via.transport, via.host, via.port, params, via.protocol)
        self._top_via = new
        self._top_via_text = str(new)
        if self._vias is not None:
            self._vias[0] = new
        return True

    def forward(
        self,
        *,
        via: str,
        request_uri: str | None = None,
        record_route: str | None = None,
        pop_route: bool = False,
        max_forwards: int | None = None,
        add_headers: Sequence[tuple[str, str]] = (),
        remove_headers: Collection[str] = (),
    ) -> bytes:
        """The bytes of this request as a proxy forwards it (RFC 3261 §16.6), by splicing.

        * ``via`` (a Via value, e.g. ``SIP/2.0/UDP host;branch=z9hG4bK...``) goes above the
          existing Vias (step 8);
        * ``request_uri`` replaces the Request-URI (steps 2, 6);
        * ``record_route`` (a value such as ``<sip:proxy;lr>``) goes above any existing
          Record-Route values (step 4), else after the Via fields;
        * ``pop_route`` removes the first Route value (loose routing, §16.4 / step 6);
        * Max-Forwards becomes ``max_forwards``, or one less than received, or 70 when
          absent (step 3); forwarding a request that arrived with 0 is a ValueError --
          :func:`sipcore.checks.request_checks` answers those with 483;
        * ``remove_headers`` drops original header fields of those names, ``add_headers``
          appends fields; a missing Content-Length is added (stream transports need it).

        Every other byte of the header block is copied unchanged.
        """
        _check_text(via, "Via")
        names = self._names
        pos = self._pos
        offs = self._offs
        blens = self._blens
        if offs is None or blens is None:
            offs, blens = self._offsets()
        gone: Collection[int]
        if remove_headers:
            edits, gone = self._remove_edits(remove_headers)
        else:
            edits, gone = [], ()

        if request_uri is not None:
            _check_text(request_uri, "Request-URI")
            if not request_uri or " " in request_uri:
                raise ValueError(f"bad Request-URI {request_uri!r}")
            start_line = f"{self.method} {request_uri} SIP/2.0"
            edits.append((0, self._start_blen, start_line.encode("utf-8", "surrogateescape")))

        if max_forwards is None:
            if self._max_forwards is None:
                max_forwards = 70
            elif self._max_forwards == 0:
                raise ValueError("Max-Forwards is 0: answer 483 instead of forwarding")
            else:
                max_forwards = self._max_forwards - 1
        mf_line = b"Max-Forwards: %d\r\n" % max_forwards

        first_via = names.index("via")
        via_at = offs[first_via]
        edits.append((via_at, via_at, b"Via: " + via.encode("utf-8", "surrogateescape") + b"\r\n"))
        if self._top_via_text is not None and first_via not in gone:
            edits.extend(self._base_edits())

        mf_index = pos.get("max-forwards", -1)
        if mf_index >= 0 and mf_index not in gone:
            edits.append((offs[mf_index], offs[mf_index] + blens[mf_index] + 2, mf_line))
        else:
            edits.append((via_at, via_at, mf_line))

        if record_route is not None:
            _check_text(record_route, "Record-Route")
            rr_line = b"Record-Route: " + record_route.encode("utf-8", "surrogateescape") + b"\r\n"
            if "record-route" in pos:
                rr_at = offs[names.index("record-route")]
            else:
                last_via = pos["via"]
                rr_at = offs[last_via] + blens[last_via] + 2
            edits.append((rr_at, rr_at, rr_line))

        if pop_route and "route" in pos:
            i = names.index("route")
            if i not in gone:
                if self._count_values(i) > 1:
                    start, end = self._value_span(i, 0)
                    edits.append((start, end, b""))
                else:
                    edits.append((offs[i], offs[i] + blens[i] + 2, b""))

        if add_headers or "content-length" not in pos:
            edits.extend(self._tail_edits(add_headers))
        return self._splice(edits)


@mypyc_attr(native_class=False)
class Response(SipMessage):
    """A SIP response."""

    __slots__ = ("reason", "status")

    status: int
    reason: str

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason} call-id={self._call_id!r}>"

    def forward(
        self,
        *,
        add_headers: Sequence[tuple[str, str]] = (),
        remove_headers: Collection[str] = (),
    ) -> bytes:
        """The bytes of this response as a proxy forwards it upstream (RFC 3261 §16.7 step 3):
        the top Via value removed -- only that value when the first Via field carries several
        -- everything else copied byte for byte.  A ValueError when no Via would remain (the
        response was for this element, not for forwarding)."""
        names = self._names
        first = names.index("via")
        several = self._count_values(first) > 1
        if not several and self._pos["via"] == first:
            raise ValueError("response has a single Via: it is not to be forwarded")
        gone: Collection[int]
        if remove_headers:
            edits, gone = self._remove_edits(remove_headers)
        else:
            edits, gone = [], ()
        if first not in gone:
            if several:
                start, end = self._value_span(first, 0)
                edits.append((start, end, b""))
            else:
                edits.append((*self._line_span(first), b""))
        if add_headers or "content-length" not in self._pos:
            edits.extend(self._tail_edits(add_headers))
        return self._splice(edits)


# --------------------------------------------------------------------------- parsing


def parse_message(
    data: bytes | bytearray | memoryview, *, stream: bool = False
) -> Request | Response:
    """Parse one SIP message; raises :class:`SipParseError` and nothing else.

    ``stream=False`` (datagram, RFC 3261 §18.3): leading CRLFs are skipped, Content-Length is
    optional (absent: the body is the rest of the datagram), bytes beyond it are dropped, and
    a Content-Length larger than what arrived is 400.  ``stream=True``: ``data`` is exactly
    one message as framed by :class:`sipcore.framing.StreamFramer`; Content-Length is
    mandatory and must match.
    """
    try:
        if type(data) is not bytes:
            data = bytes(data)
        if _fast_parse is not None:
            msg = _fast_parse(
                data, stream, MAX_LINE_LENGTH, MAX_HEADERS, MAX_MESSAGE_SIZE, _NAME_CACHE
            )
            if msg is not None:
                return msg
        return _parse(data, stream)
    except SipParseError:
        raise
    except Exception as exc:
        # Belt and braces for a network-facing parser: a bug here must still come out as the
        # one input-error type (the fuzz tests check that this never actually happens).
        raise SipParseError(400, f"Malformed message ({type(exc).__name__})") from exc


def _field_value(line: str) -> str:
    value = line[line.find(":") + 1 :]
    return unfold(value) if "\r" in value else value.strip(" \t")


def _parse(data: bytes, stream: bool) -> Request | Response:
    base = 0
    if data[:1] in b"\r\n":  # leading CRLF keep-alives (also catches b"": handled below)
        base = len(data) - len(data.lstrip(b"\r\n"))
    max_size = MAX_MESSAGE_SIZE
    head_end = data.find(b"\r\n\r\n", base, base + max_size + 4)
    if head_end < 0:
        if len(data) - base > max_size:
            raise SipParseError(513, "Message Too Large")
        raise SipParseError(400, "No blank line after the header fields")
    head_bytes = data[base:head_end]
    is_ascii = head_bytes.isascii()
    head = head_bytes.decode("ascii" if is_ascii else "utf-8", "surrogateescape")

    lines = head.split("\r\n")
    # Every CR and LF must belong to a CRLF: a bare one could be read as a line break by the
    # next hop, smuggling a header past this element.
    crlfs = len(lines) - 1
    if head.count("\n") != crlfs or head.count("\r") != crlfs:
        raise SipParseError(400, "Bare CR or LF in header")
    max_line = MAX_LINE_LENGTH
    if len(head) > max_line and max(map(len, lines)) > max_line:
        if len(lines[0]) <= max_line:
            raise SipParseError(513, "Header line too long")
        if lines[0][:4].upper() == "SIP/":
            raise SipParseError(513, "Message Too Large")
        raise SipParseError(414, "Request-URI Too Long")

    # ---- start line (fast path: the common shapes, which the general parsers accept
    # with the same result)
    first = lines[0]
    del lines[0]
    match = _REQUEST_LINE_FAST.fullmatch(first)
    msg: Request | Response
    if match is not None:
        msg = Request.__new__(Request)
        msg.method, msg.uri = match.groups()
        msg._request_uri = None
    elif first[:4].upper() == "SIP/":
        msg = _parse_status_line(first)
    else:
        msg = _parse_request_line(first)

    # ---- index the header fields: one partition and one dict lookup per line in the
    # common case (a name spelt as seen before, no folding); anything else takes the
    # careful path.  ``parts`` keeps each field's value after its colon, unstripped.
    parts = list(map(str.partition, lines, repeat(":")))
    found = list(map(_NAME_GET, map(_FIRST, parts)))
    if None in found or "" in map(_SECOND, parts):
        lines, names = _index_slow(lines)
        # Folded fields: match the fast paths against the unfolded values (a fold inside a
        # quoted string must read as one SP, as the general parsers see it).
        parts = [(name, colon, unfold(value)) for name, colon, value in map(_PARTITION, lines)]
    else:
        names = cast("list[str]", found)
    if len(names) > MAX_HEADERS:
        raise SipParseError(513, "Too many header fields")
    pos = {name: i for i, name in enumerate(names)}  # name -> index of its last field

    msg._lines = lines
    msg._names = names
    msg._pos = pos
    msg._ascii = is_ascii
    msg._offs = None
    msg._blens = None
    msg._start_blen = len(first) if is_ascii else len(first.encode("utf-8", "surrogateescape"))
    msg._top_via_text = None
    msg._vias = None
    msg._routes = None
    msg._record_routes = None
    msg._contacts = None

    # ---- mandatory headers, validated once so a proxy can trust them.  Each value is
    # first tried against a regex for its common shape (on the raw text after the colon);
    # anything else -- folded, or unusual -- goes through the general parser.
    if len(pos) != len(names):
        for canon in _SINGLETONS:
            if names.count(canon) > 1:
                raise SipParseError(400, f"Several {canon} header fields")
    if not _MANDATORY_NAMES.issubset(pos):
        missing = [label for canon, label in _MANDATORY if canon not in pos]
        raise SipParseError(400, "Missing " + ", ".join(missing))

    i = pos["call-id"]
    match = _CALL_ID_VALUE.fullmatch(parts[i][2])
    if match is not None:
        msg._call_id = match[1]
    else:
        call_id = _field_value(lines[i])
        if not _is_call_id(call_id):
            raise SipParseError(400, "Bad Call-ID")
        msg._call_id = call_id

    i = pos["cseq"]
    match = _CSEQ_VALUE.fullmatch(parts[i][2])
    if match is not None and len(match[1]) < 10:  # < 10 digits: within 32 bits
        cseq = CSeq(int(match[1]), match[2])
    else:
        cseq = parse_cseq(_field_value(lines[i]))
    if type(msg) is Request and cseq.method != msg.method:
        raise SipParseError(400, "CSeq method does not match the request method")
    msg._cseq = cseq

    i = names.index("via")
    match = _VIA_VALUE.fullmatch(parts[i][2])
    if match is not None:
        msg._top_via = _via_from_match(match)
    else:
        top = _field_value(lines[i])
        if "," in top:
            top = split_values(top, keep_empty=True)[0]
            if not top:
                raise SipParseError(400, "Empty Via value")
        msg._top_via = parse_via(top)

    i = pos["from"]
    match = _NAME_ADDR_VALUE.fullmatch(parts[i][2])
    if match is not None:
        msg._from = from_addr = _name_addr_from_match(match)
    else:
        msg._from = from_addr = parse_name_addr(_field_value(lines[i]))
    i = pos["to"]
    match = _NAME_ADDR_VALUE.fullmatch(parts[i][2])
    if match is not None:
        msg._to = to_addr = _name_addr_from_match(match)
    else:
        msg._to = to_addr = parse_name_addr(_field_value(lines[i]))
    # tag-param = "tag" EQUAL token: a bare ";tag" would read as "no tag" in dialog matching.
    if from_addr.params.get("tag", "") is None or to_addr.params.get("tag", "") is None:
        raise SipParseError(400, "tag parameter without a value")

    mf_index = pos.get("max-forwards")
    if mf_index is not None:
        match = _DIGITS_VALUE.fullmatch(parts[mf_index][2])
        mf = match[1] if match is not None else _field_value(lines[mf_index])
        if not mf.isdigit() or not mf.isascii() or len(mf) > 10 or int(mf) > 255:
            raise SipParseError(400, "Bad Max-Forwards")
        msg._max_forwards = int(mf)
    else:
        msg._max_forwards = None

    # ---- body (RFC 3261 §18.3, §20.14)
    cl_index = pos.get("content-length")
    length = None
    if cl_index is not None:
        match = _DIGITS_VALUE.fullmatch(parts[cl_index][2])
        cl_text = match[1] if match is not None else _field_value(lines[cl_index])
        if not cl_text.isdigit() or not cl_text.isascii() or len(cl_text) > 10:
            raise SipParseError(400, "Bad Content-Length")
        length = int(cl_text)
    _set_body(msg, data, base, head_end, length, stream)
    return msg


def _set_body(
    msg: SipMessage, data: bytes, base: int, head_end: int, length: int | None, stream: bool
) -> None:
    """Frame the body by Content-Length (``length``, None when absent) and set ``raw``."""
    body_start = head_end + 4
    available = len(data) - body_start
    if length is not None:
        if body_start - base + length > MAX_MESSAGE_SIZE:
            raise SipParseError(413, "Request Entity Too Large")
        if length > available:
            raise SipParseError(400, "Content-Length larger than the message")
        if stream and length != available:
            raise SipParseError(400, "Content-Length does not match the framed message")
        end = body_start + length
    elif stream:
        raise SipParseError(400, "Missing Content-Length")
    else:
        if len(data) - base > MAX_MESSAGE_SIZE:
            raise SipParseError(513, "Message Too Large")
        end = len(data)
    msg.raw = data[base:end] if base or end != len(data) else data
    msg.body = data[body_start:end]
    msg._body_offset = body_start - base


def _index_slow(physical: list[str]) -> tuple[list[str], list[str]]:
    """Index header lines the careful way: join folded continuation lines to their field
    (RFC 3261 §7.3.1), require ``name:`` with a token name, canonicalise names not seen
    before.  Linear: continuation lines are collected per field and joined once."""
    fields: list[list[str]] = []
    names: list[str] = []
    for line in physical:
        if not line:
            raise SipParseError(400, "Empty header line")
        if line[0] == " " or line[0] == "\t":
            if not fields:
                raise SipParseError(400, "Continuation line before any header")
            fields[-1].append(line)
            continue
        colon = line.find(":")
        if colon <= 0:
            raise SipParseError(400, "Header line without a colon")
        names.append(canonical_name(line[:colon]))
        fields.append([line])
    return ["\r\n".join(parts) for parts in fields], names


def _load_accelerator() -> _Parse | None:
    """``sipcore._fastparse.parse`` when the C accelerator is built from the C source next to
    this file (:func:`sipcore.accel.load`), else None: the pure-Python parser.
    ``SIPBILL_PURE_PYTHON=1`` forces the pure-Python parser."""
    module = accel.load("_fastparse")
    if module is None:
        return None
    try:
        return _install_accelerator(module)
    except (AttributeError, TypeError):
        return None  # a build that does not fit these classes: run without it


def _install_accelerator(module: ModuleType) -> _Parse:
    """Tell a built ``_fastparse`` module which classes to build (it fills their slots
    directly), use its ``splice`` for forwarding and ``respond`` for build_response, and
    return its ``parse``.  bench/fuzz_fastparse.py passes a sanitizer build."""
    global _fast_splice, _fast_respond
    module.configure(Request, Response, Via, NameAddr, CSeq)
    _fast_splice = module.splice
    _fast_respond = module.respond
    return cast("_Parse", module.parse)


#: ``_fastparse.splice`` when the accelerator is in use (SipMessage._splice).
_fast_splice: _Splice | None = None
#: ``_fastparse.respond`` when the accelerator is in use (build_response).
_fast_respond: _Respond | None = None


_fast_parse = _load_accelerator()
#: True when parse_message uses the C accelerator for common-shape messages.
ACCELERATED = _fast_parse is not None


_WORD_RE = r"[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]++"
_CALL_ID = re.compile(_WORD_RE + "(?:@" + _WORD_RE + ")?")  # possessive: no backtracking
# The same after a header colon, surrounding LWS included.
_CALL_ID_VALUE = re.compile(r"[ \t]*+(" + _CALL_ID.pattern + r")[ \t]*+")
_DIGITS_VALUE = re.compile(r"[ \t]*+([0-9]{1,10}+)[ \t]*+")
# Request-Line = Method SP Request-URI SP SIP-Version in its common shape: an upper-case
# method (a token) and a sip/sips URI of printable ASCII without SP, <, >, " or ? -- all of
# which _parse_request_line would accept with the same result.
_REQUEST_LINE_FAST = re.compile(r"([A-Z]++) (sips?:[!#-;=@-~]++) SIP/2\.0")
_NAME_GET = _NAME_CACHE.get
_FIRST = itemgetter(0)
_PARTITION = methodcaller("partition", ":")
_SECOND = itemgetter(1)


def _is_call_id(text: str) -> bool:
    """callid = word [ "@" word ] (RFC 3261 §25.1)."""
    return _CALL_ID.fullmatch(text) is not None


def _parse_request_line(line: str) -> Request:
    """Request-Line = Method SP Request-URI SP SIP-Version (RFC 3261 §7.1, §25.1)."""
    parts = line.split(" ")
    if len(parts) != 3:
        if len(parts) > 3 and _is_sip_version(parts[-1]) and parts[-1].upper() != "SIP/2.0":
            raise SipParseError(505, "Version Not Supported")
        raise SipParseError(400, "Malformed Request-Line")
    method, uri, version = parts
    if version != "SIP/2.0" and version.upper() != "SIP/2.0":
        if _is_sip_version(version):
            raise SipParseError(505, "Version Not Supported")
        raise SipParseError(400, "Malformed SIP-Version")
    if method not in _METHODS_SEEN and not is_token(method):
        raise SipParseError(400, "Malformed method")
    _check_request_uri(uri)
    req = Request.__new__(Request)
    req.method = method
    req.uri = uri
    req._request_uri = None
    return req


def _check_request_uri(uri: str) -> None:
    """What the Request-URI must satisfy before anything else looks at it (RFC 3261 §16.3
    steps 1-2, §19.1.1): a valid scheme we support (else 416), no ``<>``/quotes/controls,
    and for SIP(S) no URI headers (RFC 4475 §3.1.2.11)."""
    colon = uri.find(":")
    scheme = uri[:colon]
    if scheme == "sip" or scheme == "sips":
        pass
    elif colon <= 0 or not is_scheme(scheme):
        raise SipParseError(400, "Malformed Request-URI")
    else:
        scheme = scheme.lower()
        if scheme not in SUPPORTED_URI_SCHEMES:
            raise SipParseError(416, "Unsupported URI Scheme")
    if not uri.isprintable() or "<" in uri or ">" in uri or '"' in uri:
        raise SipParseError(400, "Malformed Request-URI")
    if scheme != "tel" and "?" in uri and "?" in uri[uri.find("@") + 1 :]:
        raise SipParseError(400, "Headers are not allowed in a Request-URI")


def _parse_status_line(line: str) -> Response:
    """Status-Line = SIP-Version SP Status-Code SP Reason-Phrase (RFC 3261 §7.2)."""
    version, _, rest = line.partition(" ")
    if version.upper() != "SIP/2.0":
        if _is_sip_version(version):
            raise SipParseError(505, "Version Not Supported")
        raise SipParseError(400, "Malformed SIP-Version")
    code, _, reason = rest.partition(" ")
    if len(code) != 3 or not code.isdigit() or not code.isascii() or not 100 <= int(code) <= 699:
        raise SipParseError(400, "Bad Status-Code")
    resp = Response.__new__(Response)
    resp.status = int(code)
    resp.reason = reason
    return resp


# --------------------------------------------------------------------------- building


def _header_lines(headers: Sequence[tuple[str, str]], skip: Collection[str]) -> list[str]:
    out = []
    for name, value in headers:
        _check_text(name, "header name")
        _check_text(value, "header value")
        if _lookup_name(name) in skip:
            continue
        out.append(f"{name}: {value}\r\n")
    return out


def build_response(
    req: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """A response to ``req`` per RFC 3261 §8.2.6.2: the Via fields (all, in order, with any
    :meth:`Request.stamp_received` change), From, To (plus ``;tag=to_tag`` when To has no tag
    and ``status`` > 100), Call-ID and CSeq copied byte for byte, then ``headers``, then
    Content-Length.  A 100 also echoes Timestamp (§8.2.6.1)."""
    if not 100 <= status <= 699:
        raise ValueError(f"bad status code {status}")
    if reason is None:
        reason = REASON_PHRASES.get(status, "Unknown")
    if _fast_respond is not None:
        data = _fast_respond(req, status, reason, to_tag, headers, body)
        if data is not None:
            return data
    _check_text(reason, "reason phrase")
    out = [f"SIP/2.0 {status} {reason}"]
    by_name: dict[str, list[str]] = {"via": [], "from": [], "to": [], "call-id": [], "cseq": []}
    if status == 100:
        by_name["timestamp"] = []
    lines = req._lines
    for i, name in enumerate(req._names):
        bucket = by_name.get(name)
        if bucket is not None:
            bucket.append(lines[i])
    if req._top_via_text is not None:
        by_name["via"][0] = req._stamped_via_line()[1]
    if to_tag is not None and status > 100 and req._to.tag is None:
        _check_text(to_tag, "To tag")
        by_name["to"][0] += ";tag=" + to_tag
    for values in by_name.values():
        out.extend(values)
    text = "\r\n".join(out) + "\r\n" + "".join(_header_lines(headers, ("content-length",)))
    text += f"Content-Length: {len(body)}\r\n\r\n"
    return text.encode("utf-8", "surrogateescape") + body


def build_request(
    method: str, uri: str, headers: Sequence[tuple[str, str]], body: bytes = b""
) -> bytes:
    """A request: start line, ``headers`` in order, Max-Forwards: 70 if absent, then
    Content-Length (any given Content-Length is replaced by the real one)."""
    if not is_token(method):
        raise ValueError(f"bad method {method!r}")
    _check_text(uri, "Request-URI")
    if not uri or " " in uri:
        raise ValueError(f"bad Request-URI {uri!r}")
    lines = [f"{method} {uri} SIP/2.0\r\n"]
    lines += _header_lines(headers, ("content-length",))
    if not any(_lookup_name(name) == "max-forwards" for name, _ in headers):
        lines.append("Max-Forwards: 70\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape") + body


def stateless_error_reply(
    data: bytes, error: SipParseError, *, server: str | None = None
) -> bytes | None:
    """Best-effort response to bytes that failed to parse (RFC 3261 §8.2.6, §16.3, §18.1.2).

    None when no response may or can be sent: the bytes look like a response, the request
    is an ACK (never answered, §17.2.3), or there is no Via to answer along.  Otherwise a
    ``SIP/2.0 <status> <reason>`` carrying the Via, From, To, Call-ID and CSeq lines found
    (To gets a tag derived from the message, so retransmissions get the same one, §8.2.7),
    the error's extra headers, Server, and Content-Length: 0.
    """
    chunk = data[: MAX_MESSAGE_SIZE + 4].lstrip(b"\r\n")
    head_end = chunk.find(b"\r\n\r\n")
    head = (chunk if head_end < 0 else chunk[:head_end]).decode("utf-8", "surrogateescape")
    lines = head.split("\r\n")
    method = lines[0].partition(" ")[0]
    if not is_token(method) or method == "ACK" or lines[0][:4].upper() == "SIP/":
        return None
    wanted: dict[str, list[str]] = {"via": [], "from": [], "to": [], "call-id": [], "cseq": []}
    current: list[str] | None = None
    for line in lines[1:]:
        if "\n" in line or "\r" in line or len(line) > MAX_LINE_LENGTH:
            current = None
            continue
        if line[:1] in (" ", "\t"):
            if current is not None:
                current[-1] += "\r\n" + line  # keep the fold: copied byte for byte
            continue
        name, colon, value = line.partition(":")
        name = name.strip(" \t")
        canon = COMPACT_FORMS.get(name.lower(), name.lower())
        current = wanted.get(canon) if colon else None
        if current is not None:
            current.append(line)
    if not wanted["via"]:
        return None
    if wanted["to"] and ";tag=" not in wanted["to"][0].replace(" ", "") and error.status > 100:
        tag = hashlib.sha1(head.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        wanted["to"][0] += f";tag={tag}"
    reason = error.reason if error.reason.isprintable() else REASON_PHRASES.get(error.status, "")
    out = [f"SIP/2.0 {error.status} {reason}"]
    for values in wanted.values():
        out.extend(values)
    for name, value in error.headers:
        out.append(f"{name}: {value}")
    if server:
        out.append(f"Server: {server}")
    out.append("Content-Length: 0")
    return ("\r\n".join(out) + "\r\n\r\n").encode("utf-8", "surrogateescape")
