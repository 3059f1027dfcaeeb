"""SIP, SIPS and TEL URIs (RFC 3261 §19.1, §25.1; RFC 3966).

``parse_uri`` turns URI text into a :class:`SipUri` or :class:`TelUri`; any other scheme is
answered with 416 Unsupported URI Scheme (RFC 3261 §8.2.2.1, §21.4.14).  The parsers are
single-pass over ``str`` with ``find``/``split``/``translate``: no regular expression with
nested quantifiers, so no input costs more than linear time.

Percent-escapes (RFC 3261 §19.1.2) are decoded into the user, password, parameter and header
fields, so ``sip:%75ser@h`` and ``sip:user@h`` give equal fields (RFC 3261 §19.1.4 compares
URIs unescaped); ``str()`` escapes again whatever the component's grammar does not allow.

This module also holds the character classes of RFC 3261 §25.1 that the header parsers share.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from sipcore.errors import SipParseError

__all__ = [
    "SUPPORTED_URI_SCHEMES",
    "TOKEN_CHARS",
    "SipUri",
    "TelUri",
    "checker",
    "is_host",
    "is_scheme",
    "is_token",
    "is_word",
    "parse_uri",
    "split_host_port",
]

#: Request-URI schemes this server handles; anything else is 416 (RFC 3261 §8.2.2.1).
SUPPORTED_URI_SCHEMES: frozenset[str] = frozenset({"sip", "sips", "tel"})

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_MARK = "-_.!~*'()"
_UNRESERVED = _ALNUM + _MARK
_TOKEN = _ALNUM + "-.!%*_+`'~"
#: RFC 3261 §25.1 token characters.
TOKEN_CHARS: str = _TOKEN
# word (RFC 3261 §25.1): Call-ID halves.
_WORD = _TOKEN + '()<>:\\"/[]?{}'
_SCHEME = _ALNUM + "+-."
# Characters the grammar allows unescaped in each SIP URI component (escaped "%" handled apart).
_USER_SAFE = _UNRESERVED + "&=+$,;?/"
_PASSWORD_SAFE = _UNRESERVED + "&=+$,"
_PARAM_SAFE = _UNRESERVED + "[]/:&+$"
_HEADER_SAFE = _UNRESERVED + "[]/?:+$"
_HOSTNAME = _ALNUM + "-._"
_IPV6_INNER = "0123456789abcdefABCDEF:."
# RFC 3966 §3: phonedigit-hex plus visual separators.
_TEL_CHARS = "0123456789abcdefABCDEF*#-.()+"


def checker(allowed: str) -> Callable[[str], bool]:
    """A predicate "non-empty and only characters from ``allowed``" in C speed (str.translate)."""
    table = str.maketrans("", "", allowed)

    def check(text: str) -> bool:
        return bool(text) and not text.translate(table)

    return check


is_token = checker(_TOKEN)
is_word = checker(_WORD)
_is_scheme_chars = checker(_SCHEME)
_is_user = checker(_USER_SAFE + "%")
_is_password = checker(_PASSWORD_SAFE + "%")
_is_param = checker(_PARAM_SAFE + "%")
_is_header = checker(_HEADER_SAFE + "%")
_is_hostname = checker(_HOSTNAME)
_is_ipv6_inner = checker(_IPV6_INNER)
_is_tel = checker(_TEL_CHARS)
_is_digits = checker("0123456789")


def is_scheme(text: str) -> bool:
    """RFC 3986 scheme: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )."""
    return _is_scheme_chars(text) and text[0].isalpha()


def is_host(host: str) -> bool:
    """hostname / IPv4address / IPv6reference (RFC 3261 §25.1), leniently ("_" allowed)."""
    if host[:1] == "[":
        return host[-1] == "]" and _is_ipv6_inner(host[1:-1]) and ":" in host
    return _is_hostname(host)


def split_host_port(text: str) -> tuple[str, int | None]:
    """Split ``hostport`` ("host", "host:5060", "[::1]:5060") and validate both halves."""
    if text[:1] == "[":
        close = text.find("]")
        if close < 0:
            raise SipParseError(400, "Unterminated IPv6 reference")
        host, rest = text[: close + 1], text[close + 1 :]
        if rest and rest[0] != ":":
            raise SipParseError(400, "Bad host")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = text.partition(":")
        port_text = port_text_ if colon else None
    if not is_host(host):
        raise SipParseError(400, "Bad host")
    if port_text is None:
        return host, None
    return host, parse_port(port_text)


def parse_port(text: str) -> int:
    """port = 1*DIGIT, limited to 0..65535 (it goes into a socket address)."""
    if not _is_digits(text) or len(text) > 5:
        raise SipParseError(400, "Bad port")
    port = int(text)
    if port > 65535:
        raise SipParseError(400, "Bad port")
    return port


def unescape(text: str) -> str:
    """Decode RFC 3261 §19.1.2 percent-escapes (UTF-8; bytes that are not UTF-8 survive as
    surrogate escapes so that escaping again gives the same octets)."""
    if "%" not in text:
        return text
    pieces = text.split("%")
    out = bytearray(pieces[0].encode("utf-8", "surrogateescape"))
    for piece in pieces[1:]:
        hex2 = piece[:2]
        if len(hex2) != 2 or not _is_hex(hex2):
            raise SipParseError(400, "Bad percent-escape in URI")
        out.append(int(hex2, 16))
        out += piece[2:].encode("utf-8", "surrogateescape")
    return out.decode("utf-8", "surrogateescape")


_is_hex = checker("0123456789abcdefABCDEF")


def escape(text: str, safe: str) -> str:
    """Percent-encode everything in ``text`` outside ``safe`` (inverse of :func:`unescape`)."""
    return quote(text, safe=safe, errors="surrogateescape")


def _parse_uri_params(text: str, what: str) -> dict[str, str | None]:
    """``;name[=value]`` pieces of a SIP URI (RFC 3261 §19.1.1); names are case-insensitive."""
    params: dict[str, str | None] = {}
    for piece in text.split(";"):
        name, eq, value = piece.partition("=")
        if not _is_param(name) or (eq and not _is_param(value)):
            raise SipParseError(400, f"Bad {what} parameter")
        params[unescape(name).lower()] = unescape(value) if eq else None
    return params


class SipUri:
    """``sip:`` / ``sips:`` URI (RFC 3261 §19.1.1).

    ``user``, ``password``, parameter names/values and header names/values are unescaped;
    parameter names are lower-cased (RFC 3261 §19.1.4 compares them case-insensitively).
    ``host`` keeps the brackets of an IPv6 reference and its original case.
    """

    __slots__ = ("headers", "host", "params", "password", "port", "scheme", "user")

    def __init__(
        self,
        scheme: str,
        host: str,
        *,
        user: str | None = None,
        password: str | None = None,
        port: int | None = None,
        params: dict[str, str | None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.scheme = scheme
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self.params: dict[str, str | None] = params if params is not None else {}
        self.headers: dict[str, str] = headers if headers is not None else {}

    @property
    def hostport(self) -> str:
        """``host`` or ``host:port`` as written in a URI or Via sent-by."""
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def aor(self) -> str:
        """Canonical address-of-record (RFC 3261 §10.3 step 5): scheme, user and host only,
        unescaped, host lower-cased; URI parameters and headers dropped."""
        user = "" if self.user is None else escape(self.user, _USER_SAFE) + "@"
        return f"{self.scheme}:{user}{self.host.lower()}"

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(escape(self.user, _USER_SAFE))
            if self.password is not None:
                out += (":", escape(self.password, _PASSWORD_SAFE))
            out.append("@")
        out.append(self.hostport)
        for name, value in self.params.items():
            out += (";", escape(name, _PARAM_SAFE))
            if value is not None:
                out += ("=", escape(value, _PARAM_SAFE))
        sep = "?"
        for hname, hvalue in self.headers.items():
            out += (sep, escape(hname, _HEADER_SAFE), "=", escape(hvalue, _HEADER_SAFE))
            sep = "&"
        return "".join(out)

    def __repr__(self) -> str:
        return f"SipUri({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SipUri):
            return NotImplemented
        return (
            self.scheme == other.scheme
            and self.user == other.user
            and self.password == other.password
            and self.host.lower() == other.host.lower()
            and self.port == other.port
            and self.params == other.params
            and self.headers == other.headers
        )

    def __hash__(self) -> int:
        return hash((self.scheme, self.user, self.host.lower(), self.port))


class TelUri:
    """``tel:`` URI (RFC 3966): the number as written (visual separators kept) and params."""

    __slots__ = ("number", "params")

    def __init__(self, number: str, params: dict[str, str | None] | None = None) -> None:
        self.number = number
        self.params: dict[str, str | None] = params if params is not None else {}

    @property
    def is_global(self) -> bool:
        """True for a global number ("+" then digits, RFC 3966 §5.1.4)."""
        return self.number.startswith("+")

    def __str__(self) -> str:
        params = "".join(
            f";{name}" if value is None else f";{name}={escape(value, _PARAM_SAFE)}"
            for name, value in self.params.items()
        )
        return f"tel:{self.number}{params}"

    def __repr__(self) -> str:
        return f"TelUri({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TelUri):
            return NotImplemented
        return self.number == other.number and self.params == other.params

    def __hash__(self) -> int:
        return hash(self.number)


def uri_scheme(text: str) -> str:
    """The lower-cased scheme of URI text; 400 when there is no syntactically valid scheme."""
    colon = text.find(":")
    scheme = text[:colon]
    if colon <= 0 or not is_scheme(scheme):
        raise SipParseError(400, "Malformed URI")
    return scheme.lower()


#: Parsed URIs by their text. The same few URIs come back in every message of a phone (its
#: AoR in To and From, the registrar's Request-URI, its contact), each costing a few µs to
#: parse again. Bounded in entries and in the length of a cached text (a peer's long URIs are
#: parsed every time, not kept); when full it starts over, cheaper on the hot path than an LRU.
_PARSED: dict[str, SipUri | TelUri] = {}
_PARSED_MAX = 4096
_PARSED_MAX_TEXT = 200


def parse_uri(text: str) -> SipUri | TelUri:
    """Parse a SIP, SIPS or TEL URI; 416 for any other scheme, 400 for malformed text.

    The result may be shared with other callers that parsed the same text: treat it as
    read-only (nothing in sipbill changes a parsed URI; build a new one instead).
    """
    uri = _PARSED.get(text)
    if uri is not None:
        return uri
    uri = _parse_uri(text)
    if len(text) <= _PARSED_MAX_TEXT:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[text] = uri
    return uri


def _parse_uri(text: str) -> SipUri | TelUri:
    try:
        scheme = uri_scheme(text)
        if scheme == "sip" or scheme == "sips":
            return _parse_sip(scheme, text[len(scheme) + 1 :])
        if scheme == "tel":
            return _parse_tel(text[4:])
        raise SipParseError(416, "Unsupported URI Scheme")
    except SipParseError:
        raise
    except Exception as exc:  # a parser bug must still surface as the one input error type
        raise SipParseError(400, f"Malformed URI ({type(exc).__name__})") from exc


def _parse_sip(scheme: str, rest: str) -> SipUri:
    # userinfo ends at the first "@": user and password cannot hold an unescaped "@", while
    # the user part may hold ";", "?" and "/" (RFC 3261 §25.1 user-unreserved), so the
    # parameters and headers are only looked for after it.
    user: str | None = None
    password: str | None = None
    at = rest.find("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user_text, colon, password_text = userinfo.partition(":")
        if not _is_user(user_text) or (colon and password_text and not _is_password(password_text)):
            raise SipParseError(400, "Bad userinfo in URI")
        user = unescape(user_text)
        password = unescape(password_text) if colon else None
    headers: dict[str, str] = {}
    qmark = rest.find("?")
    if qmark >= 0:
        rest, header_text = rest[:qmark], rest[qmark + 1 :]
        for piece in header_text.split("&"):
            hname, eq, hvalue = piece.partition("=")
            if not eq or not _is_header(hname) or (hvalue and not _is_header(hvalue)):
                raise SipParseError(400, "Bad URI header")
            headers[unescape(hname)] = unescape(hvalue)
    hostport, semi, param_text = rest.partition(";")
    host, port = split_host_port(hostport)
    params = _parse_uri_params(param_text, "URI") if semi else {}
    return SipUri(
        scheme, host, user=user, password=password, port=port, params=params, headers=headers
    )


def _parse_tel(rest: str) -> TelUri:
    number, semi, param_text = rest.partition(";")
    if not _is_tel(number) or "+" in number[1:]:
        raise SipParseError(400, "Bad telephone number")
    params = _parse_uri_params(param_text, "tel URI") if semi else {}
    return TelUri(number, params)
