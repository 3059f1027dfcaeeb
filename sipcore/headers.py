"""Header field values: names, lists, quoting, Via, name-addr, CSeq (RFC 3261 §7.3, §20, §25).

* Header names are case-insensitive and have compact forms (RFC 3261 §7.3.3, §20; RFC 3265,
  RFC 3515, RFC 3892, RFC 4028, RFC 3841, RFC 4474).  :func:`canonical_name` maps any spelling
  to the lower-case long form, which is what the message index stores.
* Several header field rows of one name may be combined with commas (RFC 3261 §7.3.1) -- but
  only for headers whose grammar is a comma-separated list.  :data:`LIST_HEADERS` names those;
  credentials/challenges (whose parameters are separated by commas), Date, and free text like
  Subject or User-Agent are never split, and neither are unknown extension headers, whose
  grammar we cannot know.  Splitting honours quoted strings and ``<...>``.
* LWS folding (RFC 3261 §7.3.1, §25.1: ``LWS = [*WSP CRLF] 1*WSP``) is equivalent to one SP;
  :func:`unfold` does that replacement.
* name-addr / addr-spec (RFC 3261 §20.10): in the addr-spec form, ``;params`` belong to the
  header, not the URI, so such a URI may not contain ``,``, ``?`` or ``;``.

Every scanner here moves strictly forward through its input using ``str.find``/``split``, so
the cost is linear in the input; there are no backtracking regular expressions.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import NamedTuple

from mypy_extensions import mypyc_attr

from sipcore.errors import SipParseError
from sipcore.uri import (
    TOKEN_CHARS,
    SipUri,
    TelUri,
    checker,
    is_scheme,
    is_token,
    parse_uri,
    split_host_port,
)

_is_gen_value = checker(TOKEN_CHARS + ":[]")

# Fast paths for the common shapes of Via and name-addr values.  Every quantifier is
# possessive (``++``, ``*+``) and every alternative starts with a different character, so the
# engine never backtracks: matching is linear.  A value these do not match goes to the
# general parser, which accepts a superset and gives identical results on what both accept
# (tests/sipcore/test_message_props.py checks that equivalence).
_T = r"[A-Za-z0-9\-.!%*_+`'~]"
_GV = r"[A-Za-z0-9\-.!%*_+`'~:\[\]]"
_SCHEME_RE = r"[A-Za-z][A-Za-z0-9+\-.]*+:"
_VIA_FAST = re.compile(
    r"SIP/2\.0/(" + _T + r"++) "
    r"([A-Za-z0-9\-._]++|\[[0-9A-Fa-f.]*+:[0-9A-Fa-f:.]*+\])"
    r"(?::([0-9]{1,5}+))?"
    r"((?:;" + _T + r"++(?:=" + _GV + r"++)?)*+)"
)
_PARAMS_FAST = (
    r"((?:[ \t]*+;[ \t]*+" + _T + r"++(?:[ \t]*+=[ \t]*+(?:" + _GV + r'++|"[^"\\;]*+"))?)*+)[ \t]*+'
)
_NAME_ADDR_FAST = re.compile(
    r'(?:"([^"\\]*+)"[ \t]*+|(' + _T + r"++(?:[ \t]++" + _T + r"++)*+)[ \t]*+)?"
    r"<(" + _SCHEME_RE + r'[^<>" \t]++)>' + _PARAMS_FAST
)
_ADDR_SPEC_FAST = re.compile(r"(" + _SCHEME_RE + r'[^<>" \t;,?]++)' + _PARAMS_FAST)
# The same shapes as a header field's value follows its colon, surrounding LWS included
# (the original fullmatch the stripped value, so these accept exactly the same values):
# the message indexer matches them on the text after the colon without stripping it first.
_VIA_VALUE = re.compile(r"[ \t]*+" + _VIA_FAST.pattern + r"[ \t]*+")
_NAME_ADDR_VALUE = re.compile(r"[ \t]*+" + _NAME_ADDR_FAST.pattern)
_CSEQ_VALUE = re.compile(r"[ \t]*+([0-9]{1,10}+)[ \t]++(" + _T + r"++)[ \t]*+")


def _fast_params(text: str) -> dict[str, str | None]:
    """Parameters already validated by one of the fast regexes above."""
    params: dict[str, str | None] = {}
    for piece in text.split(";")[1:]:
        name, eq, value = piece.partition("=")
        params[name.strip(" \t").lower()] = value.strip(" \t") if eq else None
    return params


__all__ = [
    "COMPACT_FORMS",
    "LIST_HEADERS",
    "MAGIC_COOKIE",
    "CSeq",
    "NameAddr",
    "Via",
    "canonical_name",
    "display_name",
    "parse_cseq",
    "parse_name_addr",
    "parse_name_addrs",
    "parse_params",
    "parse_via",
    "parse_vias",
    "quote_string",
    "split_values",
    "unfold",
    "unquote",
]

#: RFC 3261 §8.1.1.7: branch values of RFC 3261 elements start with this.
MAGIC_COOKIE = "z9hG4bK"

#: Compact form -> canonical (lower-case long) header name.
COMPACT_FORMS: dict[str, str] = {
    "i": "call-id",
    "m": "contact",
    "f": "from",
    "t": "to",
    "v": "via",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
    "s": "subject",
    "e": "content-encoding",
    "o": "event",  # RFC 6665
    "u": "allow-events",  # RFC 6665
    "r": "refer-to",  # RFC 3515
    "b": "referred-by",  # RFC 3892
    "x": "session-expires",  # RFC 4028
    "y": "identity",  # RFC 8224
    "a": "accept-contact",  # RFC 3841
    "j": "reject-contact",  # RFC 3841
    "d": "request-disposition",  # RFC 3841
}

#: Canonical names of headers whose value is a comma-separated list (RFC 3261 §7.3.1 applies).
LIST_HEADERS: frozenset[str] = frozenset(
    {
        "via",
        "route",
        "record-route",
        "contact",
        "accept",
        "accept-encoding",
        "accept-language",
        "alert-info",
        "allow",
        "allow-events",
        "call-info",
        "content-encoding",
        "content-language",
        "error-info",
        "in-reply-to",
        "proxy-require",
        "require",
        "supported",
        "unsupported",
        "warning",
        "path",
        "service-route",
        "p-asserted-identity",
        "p-preferred-identity",
        "history-info",
        "reason",
        "accept-contact",
        "reject-contact",
        "request-disposition",
        "security-client",
        "security-server",
        "security-verify",
        "privacy",
    }
)

# Canonical names for spellings already seen, keyed by the name as written up to its colon
# (what the message indexer looks up).  Bounded so that a flood of distinct header names
# cannot grow it without limit; past the bound names are still canonicalised, just not
# remembered.  sipcore/_fastparse.c holds a copy of the entries made here at import.
_NAME_CACHE: dict[str, str] = {}
_NAME_CACHE_MAX = 4096
for _long in (
    "Via",
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Max-Forwards",
    "Contact",
    "Content-Length",
    "Content-Type",
    "Route",
    "Record-Route",
    "Expires",
    "Allow",
    "Supported",
    "User-Agent",
    "Authorization",
    "Proxy-Authorization",
    "WWW-Authenticate",
    "Proxy-Authenticate",
    "Require",
    "Proxy-Require",
    "Event",
    "Subject",
    "Server",
    "Date",
    "Accept",
):
    _NAME_CACHE[_long] = sys.intern(_long.lower())
    _NAME_CACHE[_long.lower()] = sys.intern(_long.lower())
for _short, _long in COMPACT_FORMS.items():
    _NAME_CACHE[_short] = sys.intern(_long)
    _NAME_CACHE[_short.upper()] = sys.intern(_long)


def canonical_name(name: str) -> str:
    """Lower-case long form of a header name as written (compact forms expanded, the LWS
    allowed before HCOLON stripped).  400 if the name is not a token."""
    canon = _NAME_CACHE.get(name)
    if canon is not None:
        return canon
    stripped = name.rstrip(" \t")
    if not is_token(stripped):
        raise SipParseError(400, "Malformed header name")
    lower = stripped.lower()
    canon = sys.intern(COMPACT_FORMS.get(lower, lower))
    if len(_NAME_CACHE) < _NAME_CACHE_MAX:
        _NAME_CACHE[name] = canon
    return canon


def unfold(value: str) -> str:
    """Replace each LWS fold (``*WSP CRLF 1*WSP``) by one SP and strip outer whitespace."""
    if "\r" not in value:
        return value.strip(" \t")
    return " ".join(filter(None, (part.strip(" \t") for part in value.split("\r\n"))))


def _skip_quoted(text: str, start: int) -> int:
    """Index just past the quoted-string opening at ``text[start] == '"'`` (RFC 3261 §25.1,
    with quoted-pair).  400 if it never closes.  Linear: the closing-quote candidate is only
    searched for again once the scan has passed it, and backslashes are only searched for
    before it."""
    pos = start + 1
    quote = text.find('"', pos)
    while True:
        if quote < 0:
            raise SipParseError(400, "Unterminated quoted string")
        backslash = text.find("\\", pos, quote)
        if backslash < 0:
            return quote + 1
        pos = backslash + 2  # skip the escaped character, whatever it is
        if quote < pos:
            quote = text.find('"', pos)


def unquote(text: str) -> str:
    """The content of a quoted-string (escapes resolved); other text is returned unchanged."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    inner = text[1:-1]
    if "\\" not in inner:
        return inner
    out: list[str] = []
    pos = 0
    while True:
        backslash = inner.find("\\", pos)
        if backslash < 0 or backslash + 1 >= len(inner):
            out.append(inner[pos:])
            return "".join(out)
        out.append(inner[pos:backslash])
        out.append(inner[backslash + 1])
        pos = backslash + 2


def quote_string(text: str) -> str:
    """``text`` as a quoted-string, escaping ``"`` and ``\\``."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _split_spans(text: str, sep: str) -> list[tuple[int, int]]:
    """(start, end) spans of the ``sep``-separated parts of ``text``, not splitting inside
    quoted strings or ``<...>``.  Spans are raw (not stripped).

    The next separator, quote and "<" are each found with ``str.find`` and remembered until
    the scan passes them, so every character is looked at a bounded number of times.
    """
    spans: list[tuple[int, int]] = []
    start = pos = 0
    n = len(text)
    next_sep = text.find(sep)
    next_quote = text.find('"')
    next_lt = text.find("<")
    while True:
        if 0 <= next_sep < pos:
            next_sep = text.find(sep, pos)
        if 0 <= next_quote < pos:
            next_quote = text.find('"', pos)
        if 0 <= next_lt < pos:
            next_lt = text.find("<", pos)
        nearest = n
        for candidate in (next_sep, next_quote, next_lt):
            if 0 <= candidate < nearest:
                nearest = candidate
        if nearest == n:
            break
        pos = nearest
        if pos == next_sep:
            spans.append((start, pos))
            start = pos = pos + 1
        elif pos == next_quote:
            pos = _skip_quoted(text, pos)
        else:
            close = text.find(">", pos)
            if close < 0:
                raise SipParseError(400, "Unbalanced <")
            pos = close + 1
    spans.append((start, n))
    return spans


def value_spans(text: str) -> list[tuple[int, int]]:
    """Spans of the comma-separated values in one raw header value (possibly folded),
    trimmed of LWS; used to splice single values out of a header line byte-exactly."""
    out = []
    for start, end in _split_spans(text, ","):
        part = text[start:end]
        left = len(part) - len(part.lstrip(" \t\r\n"))
        right = len(part.rstrip(" \t\r\n"))
        out.append((start + left, start + right) if right > left else (start, start))
    return out


def split_values(value: str, *, keep_empty: bool = False) -> list[str]:
    """Split an (unfolded) list header value at commas outside quotes and ``<>``."""
    if '"' not in value and "<" not in value:
        parts = [part.strip(" \t") for part in value.split(",")]
    else:
        parts = [value[a:b].strip(" \t") for a, b in _split_spans(value, ",")]
    return parts if keep_empty else [part for part in parts if part]


def _parse_gen_value(value: str, what: str) -> str:
    """gen-value = token / host / quoted-string (RFC 3261 §25.1), where host may also be a
    bare IPv6address (Via received, RFC 3261 §20.42); returned as written."""
    if value[:1] == '"':
        if _skip_quoted(value, 0) != len(value):
            raise SipParseError(400, f"Bad {what} parameter value")
        return value
    if _is_gen_value(value):
        return value
    raise SipParseError(400, f"Bad {what} parameter value")


def parse_params(text: str, what: str = "header") -> dict[str, str | None]:
    """Generic ``;``-separated parameters (the text after the first ``;``).

    Names are lower-cased (RFC 3261 §7.3.1: parameter names are case-insensitive); values are
    kept as written, quoted strings with their quotes (see :func:`unquote`).  An empty
    parameter (``;;``) or a malformed name or value is 400.
    """
    params: dict[str, str | None] = {}
    quoted = '"' in text
    pieces = [text[a:b] for a, b in _split_spans(text, ";")] if quoted else text.split(";")
    for piece in pieces:
        name, eq, value = piece.partition("=")
        name = name.strip(" \t")
        if not is_token(name):
            raise SipParseError(400, f"Bad {what} parameter")
        if eq:
            value = value.strip(" \t")
            params[name.lower()] = _parse_gen_value(value, what)
        else:
            params[name.lower()] = None
    return params


def _format_params(params: dict[str, str | None]) -> str:
    return "".join([f";{k}" if v is None else f";{k}={v}" for k, v in params.items()])


# --------------------------------------------------------------------------- CSeq


class CSeq(NamedTuple):
    """CSeq header (RFC 3261 §20.16)."""

    number: int
    method: str

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


#: RFC 3261 §8.1.1.5 wants < 2**31 from senders; receivers accept any 32-bit value
#: (RFC 4475 §3.1.2.4 calls > 2**32-1 the error).
CSEQ_MAX = 2**32 - 1


_CSEQ_FAST = re.compile(r"([0-9]{1,10}+) (" + _T + r"++)")


def parse_cseq(value: str) -> CSeq:
    """``1*DIGIT LWS Method``; 400 on anything else or a number beyond 32 bits."""
    match = _CSEQ_FAST.fullmatch(value)
    if match is not None:
        seq = int(match[1])
        if seq <= CSEQ_MAX:
            return CSeq(seq, match[2])
    parts = [part for part in value.replace("\t", " ").split(" ") if part]
    if len(parts) != 2:
        raise SipParseError(400, "Malformed CSeq")
    number, method = parts
    if not number.isdigit() or not number.isascii() or len(number) > 10:
        raise SipParseError(400, "Bad CSeq number")
    seq = int(number)
    if seq > CSEQ_MAX:
        raise SipParseError(400, "Bad CSeq number")
    if not is_token(method):
        raise SipParseError(400, "Bad CSeq method")
    return CSeq(seq, method)


# --------------------------------------------------------------------------- Via


# Not native where this module is compiled: _fastparse.c fills its __slots__ (as NameAddr's).
@mypyc_attr(native_class=False)
@dataclass(init=False, slots=True)
class Via:
    """One Via value (RFC 3261 §20.42, §18.2; RFC 3581 rport).

    ``host`` keeps IPv6 brackets; ``params`` has lower-cased names and values as written.
    """

    transport: str
    host: str
    port: int | None
    params: dict[str, str | None]
    protocol: str

    def __init__(
        self,
        transport: str,
        host: str,
        port: int | None = None,
        params: dict[str, str | None] | None = None,
        protocol: str = "SIP/2.0",
    ) -> None:
        self.transport = transport
        self.host = host
        self.port = port
        self.params = {} if params is None else params
        self.protocol = protocol

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        """The rport value; None when absent or present without a value (a request that
        asks for it, RFC 3581 §3)."""
        value = self.params.get("rport")
        return int(value) if value else None

    @property
    def has_rport(self) -> bool:
        """True when the rport parameter is present (with or without a value)."""
        return "rport" in self.params

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def ttl(self) -> int | None:
        value = self.params.get("ttl")
        return int(value) if value else None

    @property
    def sent_by(self) -> tuple[str, int | None]:
        return self.host, self.port

    @property
    def rfc3261_branch(self) -> bool:
        """True when the branch carries the RFC 3261 magic cookie followed by something, so
        the RFC 3261 §17.2.3 matching rules apply; otherwise RFC 2543 matching is needed
        (RFC 4475 §3.2.1: a bare "z9hG4bK" is not a usable branch)."""
        branch = self.params.get("branch")
        return branch is not None and len(branch) > 7 and branch.startswith(MAGIC_COOKIE)

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return f"{self.protocol}/{self.transport} {self.host}{port}{_format_params(self.params)}"


def parse_via(text: str) -> Via:
    """Parse one Via value (``sent-protocol LWS sent-by *( SEMI via-params )``); 400 if bad.

    SLASH, COLON, SEMI and EQUAL allow surrounding LWS (RFC 3261 §25.1), which RFC 4475
    §3.1.1.1 exercises; ``text`` must already be unfolded.
    """
    match = _VIA_FAST.fullmatch(text)
    if match is not None:
        return _via_from_match(match)
    try:
        return _parse_via(text)
    except SipParseError:
        raise
    except Exception as exc:
        raise SipParseError(400, f"Malformed Via ({type(exc).__name__})") from exc


def _via_from_match(match: re.Match[str]) -> Via:
    """The Via of a :data:`_VIA_FAST` / :data:`_VIA_VALUE` match."""
    transport, host, port_text, param_text = match.groups()
    port = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise SipParseError(400, "Bad port")
    params: dict[str, str | None] = {}
    if param_text:
        for piece in param_text.split(";")[1:]:
            name, eq, value = piece.partition("=")
            params[name.lower()] = value if eq else None
        # Only the typed parameters need more than the regex checked.
        if (
            params.get("rport") is not None
            or "ttl" in params
            or ("branch" in params and params["branch"] is None)
            or ("received" in params and params["received"] is None)
            or ("maddr" in params and params["maddr"] is None)
        ):
            _check_via_params(params)
    return Via(transport.upper(), host, port, params)


def _parse_via(text: str) -> Via:
    parts = text.split("/", 2)
    if len(parts) != 3:
        raise SipParseError(400, "Malformed Via")
    name, version, rest = parts
    name = name.strip(" \t")
    version = version.strip(" \t")
    if not is_token(name) or not is_token(version):
        raise SipParseError(400, "Malformed Via protocol")
    rest = rest.lstrip(" \t")
    space = rest.find(" ")
    tab = rest.find("\t")
    if tab >= 0 and (space < 0 or tab < space):
        space = tab
    if space <= 0:
        raise SipParseError(400, "Malformed Via")
    transport = rest[:space]
    if not is_token(transport):
        raise SipParseError(400, "Malformed Via transport")
    sent_by, semi, param_text = rest[space + 1 :].partition(";")
    sent_by = sent_by.strip(" \t")
    if " " in sent_by or "\t" in sent_by:
        sent_by = "".join(sent_by.split())  # COLON = SWS ":" SWS
    host, port = split_host_port(sent_by)
    params = parse_params(param_text, "Via") if semi else {}
    if params:
        _check_via_params(params)
    protocol = "SIP/2.0" if name == "SIP" and version == "2.0" else f"{name}/{version}"
    return Via(transport.upper(), host, port, params, protocol)


def _check_via_params(params: dict[str, str | None]) -> None:
    """The typed via-params of RFC 3261 §20.42 / RFC 3581, where a bad value would mislead
    response routing."""
    ttl = params.get("ttl", "0")
    if ttl is None or not ttl.isdigit() or len(ttl) > 3 or int(ttl) > 255:
        raise SipParseError(400, "Bad Via ttl")
    rport = params.get("rport")
    if rport is not None and (not rport.isdigit() or len(rport) > 5 or int(rport) > 65535):
        raise SipParseError(400, "Bad Via rport")
    for key in ("branch", "received", "maddr"):
        if key in params and params[key] is None:
            raise SipParseError(400, f"Via {key} needs a value")


def parse_vias(value: str) -> list[Via]:
    """All Via values of one (unfolded) header line; an empty value is 400."""
    return [parse_via(part) for part in split_values(value, keep_empty=True) if _nonempty(part)]


def _nonempty(part: str) -> bool:
    if not part:
        raise SipParseError(400, "Empty header value in list")
    return True


# --------------------------------------------------------------------------- name-addr


@mypyc_attr(native_class=False)
class NameAddr:
    """name-addr or addr-spec with header parameters (From, To, Contact, Route, ...;
    RFC 3261 §20.10, §20.20, §20.39).

    ``display`` is the display name with quotes removed (None when absent), ``uri`` the URI
    text exactly as written, ``params`` the header parameters (names lower-cased, values as
    written).  ``is_star`` marks the ``Contact: *`` of a REGISTER removing all bindings.
    """

    __slots__ = ("_parsed", "display", "is_star", "params", "uri")

    def __init__(
        self,
        display: str | None,
        uri: str,
        params: dict[str, str | None] | None = None,
        *,
        is_star: bool = False,
    ) -> None:
        self.display = display
        self.uri = uri
        self.params: dict[str, str | None] = params if params is not None else {}
        self.is_star = is_star
        self._parsed: SipUri | TelUri | None = None

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @property
    def parsed_uri(self) -> SipUri | TelUri:
        """The URI parsed (cached); SipParseError 416 for other schemes, 400 if malformed."""
        if self._parsed is None:
            self._parsed = parse_uri(self.uri)
        return self._parsed

    @property
    def expires(self) -> int | None:
        """Contact ``expires`` parameter (RFC 3261 §20.10); 400 when not a 32-bit integer."""
        value = self.params.get("expires")
        if value is None:
            return None
        if not value.isdigit() or not value.isascii() or len(value) > 10 or int(value) > 2**32 - 1:
            raise SipParseError(400, "Bad expires parameter")
        return int(value)

    def __str__(self) -> str:
        if self.is_star:
            return "*"
        display = "" if self.display is None else quote_string(self.display) + " "
        return f"{display}<{self.uri}>{_format_params(self.params)}"

    def __repr__(self) -> str:
        return f"NameAddr({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NameAddr):
            return NotImplemented
        return (
            self.display == other.display
            and self.uri == other.uri
            and self.params == other.params
            and self.is_star == other.is_star
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value


def display_name(text: str) -> str | None:
    """Validate and decode a display-name: a quoted-string or ``*(token LWS)``."""
    text = text.strip(" \t")
    if not text:
        return None
    if text[0] == '"':
        if _skip_quoted(text, 0) != len(text):
            raise SipParseError(400, "Bad display name")
        return unquote(text)
    words = [word for word in text.replace("\t", " ").split(" ") if word]
    for word in words:
        if not is_token(word):
            raise SipParseError(400, "Bad display name")
    return " ".join(words)


def parse_name_addr(text: str) -> NameAddr:
    """Parse one (unfolded) name-addr / addr-spec with header params; 400 if malformed.

    The URI must have a syntactically valid scheme but need not be one we support (RFC 4475
    §3.3.4: unknown schemes in To/From/Contact are legal); :attr:`NameAddr.parsed_uri`
    parses it on demand.
    """
    match = _NAME_ADDR_FAST.fullmatch(text)
    if match is not None:
        return _name_addr_from_match(match)
    match = _ADDR_SPEC_FAST.fullmatch(text)
    if match is not None:
        uri, param_text = match.groups()
        return NameAddr(None, uri, _fast_params(param_text) if param_text else {})
    try:
        return _parse_name_addr(text.strip(" \t"))
    except SipParseError:
        raise
    except Exception as exc:
        raise SipParseError(400, f"Malformed name-addr ({type(exc).__name__})") from exc


def _name_addr_from_match(match: re.Match[str]) -> NameAddr:
    """The NameAddr of a :data:`_NAME_ADDR_FAST` / :data:`_NAME_ADDR_VALUE` match."""
    quoted, tokens, uri, param_text = match.groups()
    if tokens is not None and (" " in tokens or "\t" in tokens):
        tokens = " ".join(word for word in tokens.replace("\t", " ").split(" ") if word)
    params = _fast_params(param_text) if param_text else {}
    return NameAddr(quoted if quoted is not None else tokens, uri, params)


def _check_uri_text(uri: str) -> None:
    colon = uri.find(":")
    if colon <= 0 or not is_scheme(uri[:colon]):
        raise SipParseError(400, "Malformed URI")
    for char in ' \t"<>':
        if char in uri:
            raise SipParseError(400, "Malformed URI")


def _parse_name_addr(text: str) -> NameAddr:
    if not text:
        raise SipParseError(400, "Empty address")
    if text[0] == '"':
        end = _skip_quoted(text, 0)
        display: str | None = unquote(text[:end])
        lt = text.find("<", end)
        if lt < 0 or text[end:lt].strip(" \t"):
            raise SipParseError(400, "Expected <URI> after display name")
    else:
        lt = text.find("<")
        # A "<" after a ":" or ";" is not a name-addr opening: it sits inside an addr-spec
        # (and will be rejected there), since display names are tokens.
        if lt >= 0:
            before = text[:lt]
            if ":" in before or ";" in before:
                lt = -1
        display = display_name(text[:lt]) if lt > 0 else None
    if lt < 0:
        # addr-spec: parameters belong to the header (RFC 3261 §20.10), so the URI ends at
        # the first ";" and may not contain "," or "?" (RFC 4475 §3.1.2.13).
        uri, semi, param_text = text.partition(";")
        uri = uri.rstrip(" \t")
        if "," in uri or "?" in uri:
            raise SipParseError(400, "URI with , or ? must be enclosed in <>")
        _check_uri_text(uri)
    else:
        gt = text.find(">", lt)
        if gt < 0:
            raise SipParseError(400, "Unbalanced <")
        uri = text[lt + 1 : gt]
        _check_uri_text(uri)
        rest = text[gt + 1 :].lstrip(" \t")
        if rest and rest[0] != ";":
            raise SipParseError(400, "Junk after >")
        semi = rest[:1]
        param_text = rest[1:]
    params = parse_params(param_text) if semi else {}
    return NameAddr(display, uri, params)


def parse_name_addrs(value: str, *, allow_star: bool = False) -> list[NameAddr]:
    """All name-addr values of one (unfolded) list header line (Contact, Route, ...)."""
    if allow_star and value.strip(" \t") == "*":
        return [NameAddr(None, "*", is_star=True)]
    match = _NAME_ADDR_FAST.fullmatch(value)
    if match is not None:
        # The fast grammar has no comma outside quotes and <>: this is a single value.
        return [_name_addr_from_match(match)]
    return [
        parse_name_addr(part) for part in split_values(value, keep_empty=True) if _nonempty(part)
    ]
