"""SIP Digest authentication, both sides, sans-IO.

What this module covers, and where each rule comes from:

* **The scheme** is HTTP Digest as SIP uses it: RFC 3261 §22 (§22.2 user-to-user with
  401/WWW-Authenticate, §22.3 proxy-to-user with 407/Proxy-Authenticate, §22.4 the differences
  from HTTP: ``uri`` carries the Request-URI, Basic is forbidden) with the grammar of §25.1,
  updated by RFC 8760 for the SHA-2 algorithms.  The hash chain is RFC 7616 §3.4.1-§3.4.3
  (response, A1 and its ``-sess`` form, A2 and its ``auth-int`` form); RFC 7616 §3.9.1 and
  RFC 2617 §3.5 give the worked examples the tests pin it to.
* **Several algorithms at once.**  The server sends one challenge per algorithm, most preferred
  first (RFC 8760 §2.3): SHA-256 then MD5, the same nonce in both, as RFC 7616 §3.9.1 does.
  A client uses the topmost challenge it supports (RFC 8760 §2.4) and ignores the ones it does
  not understand, so an MD5-only phone answers the MD5 challenge and a SHA-256 phone the
  SHA-256 one.  The server checks the answer against the stored HA1 of the algorithm the client
  chose; it stores HA1 values only, never a password (RFC 7616 §5, storing passwords).
* **Headers are not combined.**  RFC 3261 §7.3.1 exempts WWW-Authenticate, Authorization,
  Proxy-Authenticate and Proxy-Authorization from comma-joining: every header line is one
  challenge or one set of credentials, and every function here takes one line's value.  A
  caller must not feed these headers through a generic comma splitter.
* **Stateless nonces** (RFC 7616 §3.3 suggests a time stamp and a secret hash): a nonce is the
  issuing worker's id, a per-process instance tag, the issue time and a serial, signed with
  keyed BLAKE2s (RFC 7693's MAC mode) under a key derived from the server secret.  Checking
  one needs no memory.  An expired nonce, or one this process did not issue, is answered
  ``stale=true`` when the digest over it is right (RFC 7616 §3.3: the client knows the
  password, so it retries without asking the user).
* **Replay protection** with the nonce count (RFC 7616 §3.4, §5): the highest ``nc`` accepted
  for each nonce is remembered, in a bounded table that forgets a nonce when it expires; an
  ``nc`` that is not greater is refused.  See :class:`NonceIssuer` for how this works with
  several worker processes.
* **No user enumeration** (RFC 7616 §5 on online dictionary attacks): an unknown user is
  checked against a dummy HA1 with the same hashing and the same constant-time comparison as a
  real one, and gets the same :class:`AuthStatus` as a wrong password; only the ``reason``
  meant for logs and metrics differs.

Nothing here does I/O, reads a clock or keeps global state: the caller passes ``now`` (seconds,
any clock all workers share, e.g. ``time.time()``), the header values and the stored HA1s.
The only randomness is the nonce's random part, the dummy HA1 and a default client nonce.

Bad input raises :class:`~sipcore.errors.SipParseError` with status 400 and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import heapq
import hmac
import itertools
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, NamedTuple

from sipcore import accel
from sipcore.errors import SipParseError

__all__ = [
    "ALGORITHMS",
    "CLIENT_ALGORITHMS",
    "AuthReason",
    "AuthResult",
    "AuthStatus",
    "DigestChallenge",
    "DigestCredentials",
    "DigestVerifier",
    "NonceIssuer",
    "NonceStatus",
    "build_authorization",
    "build_challenges",
    "digest_response",
    "ha1",
    "parse_challenge",
    "parse_credentials",
    "select_challenge",
    "select_credentials",
]

#: What the server offers, in the order it offers it (RFC 8760 §2.3: most preferred first).
#: These are the two HA1 columns a subscriber row stores.
ALGORITHMS: Final[tuple[str, ...]] = ("SHA-256", "MD5")

#: What the client side can answer, in its order of preference.
CLIENT_ALGORITHMS: Final[tuple[str, ...]] = ("SHA-256", "SHA-256-sess", "MD5", "MD5-sess")


def _md5(data: bytes) -> str:
    # Digest needs MD5 for interoperability, not as a security primitive; saying so keeps it
    # usable on FIPS-restricted OpenSSL builds.
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Canonical algorithm name -> (hash function, is a -sess variant, base algorithm).
_HASHES: Final[dict[str, tuple[Callable[[bytes], str], bool, str]]] = {
    "MD5": (_md5, False, "MD5"),
    "MD5-sess": (_md5, True, "MD5"),
    "SHA-256": (_sha256, False, "SHA-256"),
    "SHA-256-sess": (_sha256, True, "SHA-256"),
}
# Algorithm tokens are compared case-insensitively: phones send "md5" and "sha-256" too.
_CANONICAL: Final[dict[str, str]] = {name.lower(): name for name in _HASHES}
_HEX_LEN: Final[dict[str, int]] = {"MD5": 32, "SHA-256": 64}


def _canonical_algorithm(token: str) -> str:
    """The registered spelling of ``token``, or ``token`` itself if it is not one we know."""
    return _CANONICAL.get(token.lower(), token)


def ha1(username: str, realm: str, password: str, algorithm: str = "MD5") -> str:
    """The stored HA1, ``H(username ":" realm ":" password)`` in lower-case hex (RFC 7616 §3.4.2).

    ``algorithm`` may name a ``-sess`` variant: the stored value is the same, the folding in of
    the nonces happens per request in :func:`digest_response`.  Raises ``ValueError`` for an
    algorithm this module does not implement.
    """
    hash_fn = _hash_for(algorithm)
    return hash_fn(f"{username}:{realm}:{password}".encode())


def _hash_for(algorithm: str) -> Callable[[bytes], str]:
    entry = _HASHES.get(_canonical_algorithm(algorithm))
    if entry is None:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return entry[0]


def digest_response(
    *,
    algorithm: str,
    ha1_hex: str,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The ``response`` value (RFC 7616 §3.4.1), computed the same way by client and server.

    ``ha1_hex`` is the stored HA1 (see :func:`ha1`); for a ``-sess`` algorithm it is folded with
    the nonce and cnonce here (RFC 7616 §3.4.2).  ``nc`` is the eight-hex-digit string exactly
    as sent, because the hash covers the text, not the number.  ``qop`` None is the RFC 2069
    form without nonce count; ``"auth-int"`` hashes ``body`` into A2 (RFC 7616 §3.4.3).
    """
    canonical = _canonical_algorithm(algorithm)
    entry = _HASHES.get(canonical)
    if entry is None:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    hash_fn, sess, _ = entry
    key = ha1_hex.lower()
    if sess:
        key = hash_fn(f"{key}:{nonce}:{cnonce or ''}".encode())
    a2 = f"{method}:{uri}:{hash_fn(body)}" if qop == "auth-int" else f"{method}:{uri}"
    ha2 = hash_fn(a2.encode())
    if qop is None:
        return hash_fn(f"{key}:{nonce}:{ha2}".encode())
    return hash_fn(f"{key}:{nonce}:{nc or ''}:{cnonce or ''}:{qop}:{ha2}".encode())


# ----------------------------------------------------------------------------------------------
# Header syntax: RFC 3261 §25.1 challenge / credentials, RFC 7235 §2.1 auth-param lists.

# "scheme 1*blank", then the auth-params one regex match each.  A param is
# ``token BWS "=" BWS (quoted-string / bare value) BWS`` and must be followed by a comma or the
# end; a run of blanks and commas before it skips empty list elements.  The quoted-string
# pattern is the unrolled ``[^"\\]*(\\.[^"\\]*)*`` form, linear on any input.
_SCHEME_RE: Final = re.compile(r"[ \t]*([A-Za-z0-9.!%*_+`'~-]+)(?:[ \t]+|\Z)")
_PARAM_RE: Final = re.compile(
    r"[ \t,]*([A-Za-z0-9.!%*_+`'~-]+)[ \t]*=[ \t]*"
    r'(?:"([^"\\]*(?:\\.[^"\\]*)*)"'
    # Unquoted values: the grammar says token, but phones send unquoted URIs and base64
    # nonces too, so anything visible up to the next comma or blank is taken.
    r"|([\x21\x23-\x2b\x2d-\x7e]+))"
    r"[ \t]*(?:,|\Z)",
    re.DOTALL,
)
_QUOTED_PAIR_RE: Final = re.compile(r"\\(.)", re.DOTALL)
# Controls other than HTAB never belong in a header value that has been unfolded; rejecting
# them up front also keeps CR/LF out of anything that is later logged or echoed.
_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NC_RE: Final = re.compile(r"[0-9A-Fa-f]{8}")
_BLANKS: Final = " \t"


def _bad(reason: str) -> SipParseError:
    return SipParseError(400, reason)


def _load_fast_auth() -> Callable[[str], tuple[str, dict[str, str]] | None] | None:
    module = accel.load("_fastparse")
    return None if module is None else getattr(module, "auth_params", None)


#: The C accelerator's ``auth_params``: this function's result for a value in the common
#: shape (printable ASCII, no quoted-pair, well formed), None for any other (see
#: _fastparse.c; tests/sipcore/test_fastparse.py checks the two agree).
_fast_auth = _load_fast_auth()


def _parse_auth_header(value: str, what: str) -> tuple[str, dict[str, str]]:
    """Split ``scheme 1*SP auth-param *("," auth-param)`` into the scheme and its parameters.

    Parameter names are lower-cased (they are case-insensitive), values are unquoted
    (quoted-pair, RFC 3261 §25.1).  Empty list elements are skipped (RFC 7230 §7 asks
    recipients to accept them); a repeated parameter is an error (RFC 7235 §2.1).
    """
    if _fast_auth is not None:
        parsed = _fast_auth(value)
        if parsed is not None:
            return parsed
    if _CONTROL_RE.search(value) is not None:
        raise _bad(f"control character in {what}")
    if not value.isascii():
        # Non-ASCII is allowed inside quoted strings (UTF8-NONASCII) but must be encodable:
        # a lone surrogate would only fail later, when the value is hashed.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(f"invalid character in {what}") from None
    match = _SCHEME_RE.match(value)
    if match is None:
        raise _bad(f"{what} does not start with an authentication scheme")
    scheme = match.group(1)
    i = match.end()
    params: dict[str, str] = {}
    while True:
        match = _PARAM_RE.match(value, i)
        if match is None:
            if not value[i:].strip(" \t,"):
                return scheme, params
            raise _bad(f"{what}: malformed parameter list at offset {i}")
        name, quoted, bare = match.groups()
        name = name.lower()
        if name in params:
            raise _bad(f"{what}: repeated parameter {name!r}")
        if quoted is None:
            params[name] = bare
        elif "\\" in quoted:
            params[name] = _QUOTED_PAIR_RE.sub(r"\1", quoted)
        else:
            params[name] = quoted
        i = match.end()


def _quote(value: str) -> str:
    """``value`` as a quoted-string; refuses what no quoted-string can carry."""
    if _CONTROL_RE.search(value) is not None:
        raise ValueError(f"control character in {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ----------------------------------------------------------------------------------------------
# Client and server views of the two headers.


@dataclass(init=False, unsafe_hash=True, slots=True)
class DigestCredentials:
    """One Authorization / Proxy-Authorization value (RFC 3261 §22.4, RFC 7616 §3.4).

    ``algorithm`` is the canonical spelling when known ("MD5" when the client left it out, as
    RFC 3261 §25.1 says), otherwise the token as sent.  ``nc`` is the nonce count as a number;
    the exact text the hash covers stays in ``params["nc"]``.  ``params`` holds every parameter
    as sent (names lower-cased, values unquoted), including ones this module ignores.
    """

    username: Final[str]
    realm: Final[str]
    nonce: Final[str]
    uri: Final[str]
    response: Final[str]
    algorithm: Final[str]
    cnonce: Final[str | None]
    qop: Final[str | None]
    nc: Final[int | None]
    opaque: Final[str | None]
    params: Mapping[str, str] = field(compare=False, repr=False)

    def __init__(
        self,
        username: str,
        realm: str,
        nonce: str,
        uri: str,
        response: str,
        algorithm: str = "MD5",
        cnonce: str | None = None,
        qop: str | None = None,
        nc: int | None = None,
        opaque: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> None:
        self.username = username
        self.realm = realm
        self.nonce = nonce
        self.uri = uri
        self.response = response
        self.algorithm = algorithm
        self.cnonce = cnonce
        self.qop = qop
        self.nc = nc
        self.opaque = opaque
        self.params = {} if params is None else params

    @property
    def base_algorithm(self) -> str | None:
        """Which stored HA1 answers these credentials ("MD5", "SHA-256"), None if unsupported."""
        entry = _HASHES.get(self.algorithm)
        return entry[2] if entry is not None else None


_REQUIRED_CREDENTIALS: Final = ("username", "realm", "nonce", "uri", "response")


def parse_credentials(header_value: str) -> DigestCredentials:
    """Parse one Authorization or Proxy-Authorization header value.

    Raises ``SipParseError(400)`` for anything malformed: another scheme than Digest (RFC 3261
    §22.1 forbids Basic), bad quoting, a repeated or missing required parameter (username, realm,
    nonce, uri, response; cnonce and nc too when qop is present, RFC 7616 §3.4), or an nc that
    is not eight hex digits (RFC 3261 §25.1 ``nc-value = 8LHEX``).  No other exception escapes,
    whatever the string.
    """
    scheme, params = _parse_auth_header(header_value, "credentials")
    if scheme.lower() != "digest":
        raise _bad(f"unsupported authorization scheme {scheme!r}")
    for name in _REQUIRED_CREDENTIALS:
        if name not in params:
            raise _bad(f"Authorization lacks {name}")
    qop = params.get("qop")
    if qop is not None:
        qop = qop.lower()
        if "cnonce" not in params or "nc" not in params:
            raise _bad("Authorization with qop lacks cnonce or nc")
    nc_text = params.get("nc")
    nc: int | None = None
    if nc_text is not None:
        if _NC_RE.fullmatch(nc_text) is None:
            raise _bad("Authorization nc is not eight hex digits")
        nc = int(nc_text, 16)
    return DigestCredentials(
        username=params["username"],
        realm=params["realm"],
        nonce=params["nonce"],
        uri=params["uri"],
        response=params["response"],
        algorithm=_canonical_algorithm(params.get("algorithm", "MD5")),
        cnonce=params.get("cnonce"),
        qop=qop,
        nc=nc,
        opaque=params.get("opaque"),
        params=MappingProxyType(params),
    )


def select_credentials(header_values: Iterable[str], realm: str) -> DigestCredentials | None:
    """The Digest credentials for ``realm`` among a request's Authorization header values.

    A request may carry credentials for several realms, one per header line (RFC 3261 §22.3,
    §22.4); the server uses the ones for its own realm.  Values of other schemes are skipped;
    a malformed Digest value raises ``SipParseError(400)``.  None means "challenge".
    """
    for value in header_values:
        stripped = value.lstrip(_BLANKS)
        if stripped[:6].lower() != "digest" or stripped[6:7] not in (" ", "\t"):
            continue
        creds = parse_credentials(value)
        if creds.realm == realm:
            return creds
    return None


@dataclass(init=False, unsafe_hash=True, slots=True)
class DigestChallenge:
    """One WWW-Authenticate / Proxy-Authenticate value (RFC 7616 §3.3), as a client sees it."""

    realm: Final[str]
    nonce: Final[str]
    algorithm: Final[str]
    qop: Final[tuple[str, ...]]
    opaque: Final[str | None]
    stale: Final[bool]
    params: Mapping[str, str] = field(compare=False, repr=False)

    def __init__(
        self,
        realm: str,
        nonce: str,
        algorithm: str = "MD5",
        qop: tuple[str, ...] = (),
        opaque: str | None = None,
        stale: bool = False,
        params: Mapping[str, str] | None = None,
    ) -> None:
        self.realm = realm
        self.nonce = nonce
        self.algorithm = algorithm
        self.qop = qop
        self.opaque = opaque
        self.stale = stale
        self.params = {} if params is None else params

    @property
    def answerable(self) -> bool:
        """Whether :func:`build_authorization` can answer it: a known algorithm, and either
        no qop (the RFC 2069 form) or one of auth / auth-int."""
        if self.algorithm not in _HASHES:
            return False
        return not self.qop or "auth" in self.qop or "auth-int" in self.qop


def parse_challenge(header_value: str) -> DigestChallenge:
    """Parse one WWW-Authenticate or Proxy-Authenticate header value.

    Raises ``SipParseError(400)`` when it is not a Digest challenge with a realm and a nonce, or
    is malformed.  ``qop`` becomes the tuple of offered options, lower-cased; ``algorithm`` is
    canonical when known and "MD5" when absent (RFC 7616 §3.3).
    """
    scheme, params = _parse_auth_header(header_value, "challenge")
    if scheme.lower() != "digest":
        raise _bad(f"unsupported authentication scheme {scheme!r}")
    for name in ("realm", "nonce"):
        if name not in params:
            raise _bad(f"challenge lacks {name}")
    qop_text = params.get("qop")
    qop: tuple[str, ...] = ()
    if qop_text is not None:
        qop = tuple(option.strip().lower() for option in qop_text.split(",") if option.strip())
    return DigestChallenge(
        realm=params["realm"],
        nonce=params["nonce"],
        algorithm=_canonical_algorithm(params.get("algorithm", "MD5")),
        qop=qop,
        opaque=params.get("opaque"),
        stale=params.get("stale", "").lower() == "true",
        params=MappingProxyType(params),
    )


def select_challenge(
    header_values: Iterable[str], *, algorithms: Sequence[str] = CLIENT_ALGORITHMS
) -> DigestChallenge | None:
    """The challenge a client should answer among a response's authenticate header values.

    RFC 8760 §2.4: a client ignores challenges it does not understand (malformed ones, other
    schemes, unknown algorithms or qop) and uses the topmost one it supports "unless a local
    policy dictates otherwise".  The local policy here is ``algorithms``, the client's order of
    preference: it picks the challenge whose algorithm comes first in that list, and the
    topmost among equals.  Preferring by the client's own order rather than the server's keeps
    an on-path attacker who reorders the headers from downgrading a SHA-256 client to MD5
    (RFC 8760 §3).  An MD5-only client passes ``algorithms=("MD5",)``.
    """
    rank = {_canonical_algorithm(name): index for index, name in enumerate(algorithms)}
    best: DigestChallenge | None = None
    best_rank = len(rank)
    for value in header_values:
        try:
            challenge = parse_challenge(value)
        except SipParseError:
            continue
        position = rank.get(challenge.algorithm)
        if position is None or not challenge.answerable:
            continue
        if position < best_rank:
            best, best_rank = challenge, position
    return best


def build_authorization(
    challenge: DigestChallenge,
    *,
    method: str,
    uri: str,
    username: str,
    password: str | None = None,
    ha1_hex: str | None = None,
    nc: int = 1,
    cnonce: str | None = None,
    qop: str | None = None,
    body: bytes = b"",
) -> str:
    """The Authorization (or Proxy-Authorization) value answering ``challenge``.

    Give either ``password`` or a precomputed ``ha1_hex`` (what the server stores, so a
    server-side user agent can answer for a subscriber without knowing the password).  ``qop``
    defaults to "auth" when offered, else "auth-int" when offered, else the RFC 2069 form
    without one.  ``cnonce`` defaults to 16 random hex digits.  Quoting follows RFC 7616
    §3.4: algorithm, qop and nc bare, everything else quoted.  ``ValueError`` for a challenge
    that is not :attr:`~DigestChallenge.answerable` or bad arguments.
    """
    if not challenge.answerable:
        raise ValueError(
            f"cannot answer a {challenge.algorithm} challenge with qop {challenge.qop}"
        )
    if password is not None and ha1_hex is not None:
        raise ValueError("give password or ha1_hex, not both")
    if not 1 <= nc <= 0xFFFFFFFF:
        raise ValueError(f"nonce count {nc} out of range")
    if qop is None:
        if "auth" in challenge.qop:
            qop = "auth"
        elif "auth-int" in challenge.qop:
            qop = "auth-int"
    elif qop not in challenge.qop:
        raise ValueError(f"qop {qop!r} was not offered")
    sess = _HASHES[challenge.algorithm][1]
    if cnonce is None and (qop is not None or sess):
        cnonce = secrets.token_hex(8)
    if password is not None:
        key = ha1(username, challenge.realm, password, challenge.algorithm)
    elif ha1_hex is not None:
        key = ha1_hex
    else:
        raise ValueError("give password or ha1_hex")
    nc_text = f"{nc:08x}" if qop is not None else None
    response = digest_response(
        algorithm=challenge.algorithm,
        ha1_hex=key,
        nonce=challenge.nonce,
        method=method,
        uri=uri,
        qop=qop,
        nc=nc_text,
        cnonce=cnonce,
        body=body,
    )
    parts = [
        f"username={_quote(username)}",
        f"realm={_quote(challenge.realm)}",
        f"nonce={_quote(challenge.nonce)}",
        f"uri={_quote(uri)}",
        f"response={_quote(response)}",
        f"algorithm={challenge.algorithm}",
    ]
    if cnonce is not None:
        parts.append(f"cnonce={_quote(cnonce)}")
    if qop is not None:
        parts.append(f"qop={qop}")
        parts.append(f"nc={nc_text}")
    if challenge.opaque is not None:
        parts.append(f"opaque={_quote(challenge.opaque)}")
    return "Digest " + ", ".join(parts)


def build_challenges(
    realm: str,
    nonce: str,
    *,
    stale: bool = False,
    algorithms: Sequence[str] = ALGORITHMS,
    qop: Sequence[str] = ("auth",),
    opaque: str | None = None,
) -> list[str]:
    """WWW-Authenticate / Proxy-Authenticate values, one per algorithm in the order given.

    RFC 8760 §2.3: one header line per algorithm, most preferred first, so each goes out as
    its own header line (they must not be comma-joined, RFC 3261 §7.3.1).  ``stale=True``
    tells the client its password was right and only the nonce was not (RFC 7616 §3.3).
    """
    values: list[str] = []
    qop_part = f", qop={_quote(','.join(qop))}" if qop else ""
    opaque_part = f", opaque={_quote(opaque)}" if opaque is not None else ""
    stale_part = ", stale=true" if stale else ""
    for algorithm in algorithms:
        canonical = _canonical_algorithm(algorithm)
        if canonical not in _HASHES:
            raise ValueError(f"unsupported digest algorithm {algorithm!r}")
        values.append(
            f"Digest realm={_quote(realm)}, nonce={_quote(nonce)}, algorithm={canonical}"
            f"{qop_part}{opaque_part}{stale_part}"
        )
    return values


# ----------------------------------------------------------------------------------------------
# Nonces.


class NonceStatus(enum.Enum):
    """What :meth:`NonceIssuer.check` found."""

    VALID = "valid"  # issued by this issuer and not expired
    STALE = "stale"  # issued by this issuer, expired (or dated in its future)
    FOREIGN = "foreign"  # correctly signed, but by another worker or an earlier process
    INVALID = "invalid"  # malformed or the signature does not match: not ours at all


# version(1) worker_id(2) instance(4) issued_ms(8) serial(8), then a 16-byte MAC.  The
# serial makes every nonce of an issuer unique (the replay table is keyed by the nonce); it
# need not be secret, because nothing about a nonce can be forged without the MAC key.
_NONCE_VERSION: Final = 2  # 1 was signed with HMAC-SHA-256
_NONCE_LAYOUT: Final = struct.Struct(">BHIQQ")
_MAC_LEN: Final = 16
_NONCE_BYTES: Final = _NONCE_LAYOUT.size + _MAC_LEN
_NONCE_CHARS: Final = (_NONCE_BYTES * 4 + 2) // 3
_NONCE_RE: Final = re.compile(rf"[A-Za-z0-9_-]{{{_NONCE_CHARS}}}")
#: Nonces per generation of NonceIssuer's cache of the ones it issued last (two generations:
#: 2,048 to 4,096 nonces, under a megabyte).
_RECENT: Final = 2048


class _NonceFields(NamedTuple):  # a tuple: cheaper to make than a frozen dataclass
    worker_id: int
    instance: int
    issued_ms: int


class NonceIssuer:
    """Stateless signed nonces with expiry, and nonce-count replay protection.

    Theory of operation
    -------------------
    A nonce is ``base64url(version, worker_id, instance, issued_ms, serial, MAC)``, 52
    characters.  The MAC -- keyed BLAKE2s with a 128-bit output, under a key derived from
    ``secret`` -- covers everything before it, so :meth:`check` needs no memory to tell a
    nonce we issued from a forged one, and the embedded issue time makes it expire after
    ``ttl`` seconds.

    Replay protection needs memory: :meth:`check_nc` remembers the highest nonce count accepted
    for each nonce and refuses any count that is not greater (RFC 7616 §3.4: the client counts
    up by one with each request under a nonce).  An entry is created only when a request with a
    *correct* digest is accepted (the caller checks the digest first, see
    :meth:`DigestVerifier.verify`), so unauthenticated traffic cannot grow the table or burn
    nonce counts.  Entries are kept in a heap by issue time, the order in which they expire,
    and dropped when they expire; past ``max_tracked`` the oldest is evicted early and a
    watermark remembers up to when, so an evicted nonce cannot come back as "never seen" -- it
    is refused and the client is sent a fresh one.

    Several workers (processes sharing a port) share the secret but not this table, so each
    worker only accepts nonce counts for nonces it issued itself: the nonce carries the
    ``worker_id`` (see :meth:`issuer_of`) and a random ``instance`` tag drawn when the issuer
    is created.  A nonce signed by another worker, or by this worker before a restart (whose
    table is gone), checks as :attr:`NonceStatus.FOREIGN`; the verifier answers it
    ``stale=true``, which costs the client one round trip and never asks the user.  Sockets
    shared with SO_REUSEPORT hash each flow to one worker, so this is rare.  Worker ids must be
    unique among all processes sharing the secret, across nodes too (e.g. node * 64 + worker).

    ``now`` is seconds on any clock every worker shares (``time.time()``; not a per-process
    clock).  The secret should survive restarts (configured, or kept in the database); a new
    secret makes every outstanding nonce INVALID, which costs each client a round trip too.
    """

    def __init__(
        self,
        secret: bytes,
        ttl: float = 300.0,
        worker_id: int = 0,
        *,
        max_tracked: int = 100_000,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("nonce secret must be at least 16 bytes")
        if not 0 <= worker_id <= 0xFFFF:
            raise ValueError(f"worker_id {worker_id} is not in 0..65535")
        if ttl <= 0:
            raise ValueError("nonce ttl must be positive")
        if max_tracked < 1:
            raise ValueError("max_tracked must be positive")
        # BLAKE2s takes keys up to 32 bytes: one derived from the secret (any length >= 16).
        self._key = hashlib.blake2s(secret, person=b"sbnonce").digest()
        self.ttl = ttl
        self.worker_id = worker_id
        self.max_tracked = max_tracked
        self._ttl_ms = int(ttl * 1000)
        self._instance = int.from_bytes(os.urandom(4), "big")
        # A counter instead of os.urandom(8) per nonce: a getrandom() syscall per challenge.
        self._serial = itertools.count(int.from_bytes(os.urandom(6), "big"))
        # nonce -> highest nc accepted; heap of (issued_ms, nonce) in expiry order.
        self._highest_nc: dict[str, int] = {}
        self._expiry_heap: list[tuple[int, str]] = []
        # Nonces issued at or before this instant that are not in the table were evicted.
        self._evicted_up_to_ms = -1
        self._last_decoded: tuple[str, _NonceFields | None] | None = None
        # The nonces issued last (two generations of up to _RECENT each) and their fields:
        # the answer to a challenge nearly always comes within milliseconds, and finding its
        # nonce here saves decoding it and checking its MAC (we made it, so it is genuine).
        self._recent: dict[str, _NonceFields] = {}
        self._older: dict[str, _NonceFields] = {}

    def issue(self, now: float) -> str:
        """A fresh nonce."""
        issued_ms = _to_ms(now)
        payload = _NONCE_LAYOUT.pack(
            _NONCE_VERSION, self.worker_id, self._instance, issued_ms, next(self._serial)
        )
        nonce = base64.urlsafe_b64encode(payload + self._mac(payload)).decode("ascii")
        recent = self._recent
        if len(recent) >= _RECENT:
            self._older = recent
            recent = self._recent = {}
        recent[nonce] = _NonceFields(self.worker_id, self._instance, issued_ms)
        return nonce

    def check(self, nonce: str, now: float) -> NonceStatus:
        """Whether ``nonce`` is one of ours and still fresh.  Needs no state."""
        fields = self._decode(nonce)
        if fields is None:
            return NonceStatus.INVALID
        if fields.worker_id != self.worker_id or fields.instance != self._instance:
            return NonceStatus.FOREIGN
        age_ms = _to_ms(now) - fields.issued_ms
        if not 0 <= age_ms < self._ttl_ms:
            return NonceStatus.STALE
        return NonceStatus.VALID

    def check_nc(self, nonce: str, nc: int, now: float) -> bool:
        """Accept nonce count ``nc`` for ``nonce`` if it is greater than any accepted before.

        Records ``nc`` when it returns True, so call it once per request and only after the
        digest was found correct.  False also for a nonce that is not :attr:`NonceStatus.VALID`.
        """
        now_ms = _to_ms(now)
        self._expire(now_ms)
        fields = self._decode(nonce)
        if (
            fields is None
            or fields.worker_id != self.worker_id
            or fields.instance != self._instance
            or not 0 <= now_ms - fields.issued_ms < self._ttl_ms
        ):
            return False
        highest = self._highest_nc.get(nonce)
        if highest is not None:
            if nc <= highest:
                return False
            self._highest_nc[nonce] = nc
            return True
        if nc < 1 or fields.issued_ms <= self._evicted_up_to_ms:
            return False
        self._highest_nc[nonce] = nc
        heapq.heappush(self._expiry_heap, (fields.issued_ms, nonce))
        if len(self._highest_nc) > self.max_tracked:
            issued_ms, evicted = heapq.heappop(self._expiry_heap)
            del self._highest_nc[evicted]
            self._evicted_up_to_ms = max(self._evicted_up_to_ms, issued_ms)
        return True

    def issuer_of(self, nonce: str) -> int | None:
        """The ``worker_id`` that issued ``nonce``, or None when it is not correctly signed."""
        fields = self._decode(nonce)
        return fields.worker_id if fields is not None else None

    @property
    def tracked(self) -> int:
        """How many nonces the replay table holds now (for a gauge)."""
        return len(self._highest_nc)

    def _expire(self, now_ms: int) -> None:
        heap = self._expiry_heap
        cutoff = now_ms - self._ttl_ms
        while heap and heap[0][0] <= cutoff:
            _, nonce = heapq.heappop(heap)
            del self._highest_nc[nonce]

    def _mac(self, payload: bytes) -> bytes:
        # Keyed BLAKE2 is a MAC by design (RFC 7693 §2.9) and CPython's own C: ~0.7 µs,
        # against ~2.8 µs for OpenSSL's one-shot HMAC-SHA-256 with cold caches.
        return hashlib.blake2s(payload, key=self._key, digest_size=_MAC_LEN).digest()

    def _decode(self, nonce: str) -> _NonceFields | None:
        # check() and check_nc() of one request decode the same nonce: verify its MAC once.
        last = self._last_decoded
        if last is not None and last[0] == nonce:
            return last[1]
        fields = self._recent.get(nonce) or self._older.get(nonce)
        if fields is None:
            fields = self._decode_uncached(nonce)
        self._last_decoded = (nonce, fields)
        return fields

    def _decode_uncached(self, nonce: str) -> _NonceFields | None:
        # The shape check comes first because base64 decoding silently skips characters
        # outside its alphabet, and the nonce is whatever the client sent.
        if _NONCE_RE.fullmatch(nonce) is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce)
        except (binascii.Error, ValueError):
            return None
        payload, mac = raw[: _NONCE_LAYOUT.size], raw[_NONCE_LAYOUT.size :]
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        version, worker_id, instance, issued_ms, _ = _NONCE_LAYOUT.unpack(payload)
        if version != _NONCE_VERSION:
            return None
        return _NonceFields(worker_id, instance, issued_ms)


def _to_ms(now: float) -> int:
    if now < 0:
        raise ValueError("now must not be negative")
    return int(now * 1000)


# ----------------------------------------------------------------------------------------------
# Server-side verification.


class AuthStatus(enum.Enum):
    """The outcome the client may learn (through the response the caller sends)."""

    OK = "ok"  # authenticated
    STALE = "stale"  # right password, nonce not acceptable: re-challenge with stale=true
    FAILED = "failed"  # re-challenge (or refuse); never tells wrong password from unknown user


#: Why, for logs and metrics only; never put it in a response.
AuthReason = Literal[
    "ok",
    "bad_response",  # wrong password (or a corrupted answer)
    "unknown_user",  # no such user; checked against a dummy HA1 all the same
    "no_ha1",  # the user exists but has no stored HA1 for the algorithm chosen
    "realm_mismatch",
    "uri_mismatch",
    "bad_algorithm",  # an algorithm we did not offer
    "qop_missing",  # no qop while require_qop is set
    "bad_qop",  # a qop we did not offer
    "opaque_mismatch",
    "stale_nonce",  # STALE: our nonce, expired
    "foreign_nonce",  # STALE: signed by another worker or an earlier process
    "bad_nonce",  # STALE: not signed by us (e.g. the secret changed)
    "replay",  # STALE: nonce count not greater than one already accepted
]


@dataclass(init=False, unsafe_hash=True, slots=True)
class AuthResult:
    """What :meth:`DigestVerifier.verify` decided.  ``status`` drives the reply; ``reason``
    is for logs and metrics (a label), never for the client."""

    status: Final[AuthStatus]
    reason: Final[AuthReason]
    username: Final[str]
    algorithm: Final[str]

    def __init__(
        self,
        status: AuthStatus,
        reason: AuthReason,
        username: str,
        algorithm: str,
    ) -> None:
        self.status = status
        self.reason = reason
        self.username = username
        self.algorithm = algorithm

    @property
    def ok(self) -> bool:
        return self.status is AuthStatus.OK


#: Stands for the nonce in the challenge templates of DigestVerifier.challenges.
_MARKER: Final = "\ue000nonce\ue000"
#: Realm and stale combinations whose challenge templates a verifier keeps.
_MAX_TEMPLATES: Final = 256


class DigestVerifier:
    """The server side: issue challenges, check credentials.

    ``algorithms`` are offered in that order and are the only ones accepted; ``qop`` likewise.
    ``require_qop=False`` also accepts the RFC 2069 form without qop, which has no nonce count
    and so no replay protection beyond the nonce's lifetime.  ``opaque``, when set, is sent in
    every challenge and must come back unchanged.
    """

    def __init__(
        self,
        nonces: NonceIssuer,
        *,
        algorithms: Sequence[str] = ALGORITHMS,
        qop: Sequence[str] = ("auth",),
        require_qop: bool = True,
        opaque: str | None = None,
    ) -> None:
        canonical = tuple(_canonical_algorithm(name) for name in algorithms)
        for name in canonical:
            if name not in _HASHES:
                raise ValueError(f"unsupported digest algorithm {name!r}")
        if not canonical:
            raise ValueError("at least one algorithm must be offered")
        if not set(qop) <= {"auth", "auth-int"}:
            raise ValueError(f"unsupported qop in {qop!r}")
        if require_qop and not qop:
            raise ValueError("require_qop needs a qop to offer")
        self.nonces = nonces
        self.algorithms = canonical
        self.qop = tuple(qop)
        self.require_qop = require_qop
        self.opaque = opaque
        # Stand-in HA1s for users that do not exist, so they cost the same hashing and
        # comparison as real ones.  Random per verifier: no password can ever match them.
        self._dummy_ha1 = {
            base: secrets.token_hex(length // 2) for base, length in _HEX_LEN.items()
        }
        # (realm, stale) -> the challenge values split around the nonce (see challenges).
        self._templates: dict[tuple[str, bool], list[tuple[str, str]]] = {}

    def challenges(self, realm: str, now: float, *, stale: bool = False) -> list[str]:
        """Fresh challenge header values for a 401 (WWW-Authenticate) or 407
        (Proxy-Authenticate), one per offered algorithm, sharing one new nonce: what
        :func:`build_challenges` gives, from the realm's values built once around a marker
        (a nonce is base64url, so it is quoted as it is)."""
        nonce = self.nonces.issue(now)
        templates = self._templates.get((realm, stale))
        if templates is None:
            values = build_challenges(realm, _MARKER, stale=stale, algorithms=self.algorithms,
                                      qop=self.qop, opaque=self.opaque)
            if not all(value.count(_MARKER) == 1 for value in values):
                # The realm or opaque holds the marker itself: no template for it.
                return build_challenges(realm, nonce, stale=stale, algorithms=self.algorithms,
                                        qop=self.qop, opaque=self.opaque)
            templates = [(head, tail) for head, _, tail in
                         (value.partition(_MARKER) for value in values)]
            if len(self._templates) >= _MAX_TEMPLATES:
                self._templates.clear()
            self._templates[(realm, stale)] = templates
        return [head + nonce + tail for head, tail in templates]

    def verify(
        self,
        creds: DigestCredentials,
        *,
        method: str,
        realm: str,
        stored_ha1: Mapping[str, str] | None,
        now: float,
        request_uri: str | None = None,
        body: bytes = b"",
    ) -> AuthResult:
        """Check ``creds`` for a request with ``method`` in ``realm``.

        ``stored_ha1`` maps a base algorithm ("MD5", "SHA-256") to the user's stored HA1 hex, or is
        None when there is no such user.  ``request_uri``, when given, must equal the
        credentials' ``uri`` (RFC 7616 §3.4.6; RFC 3261 §22.4 makes it the Request-URI); leave
        it None when a proxy on the way may have rewritten the Request-URI.  ``body`` is for
        qop=auth-int.

        The steps, in an order chosen so that every outcome costs the same hashing:

        1. Checks on public values (realm, algorithm, qop, opaque, uri) pick a FAILED reason.
        2. The response is always computed, from the stored HA1 or a dummy one, and always
           compared in constant time.
        3. Only a correct response looks at the nonce: not ours or expired -> STALE (the
           client knows the password, RFC 7616 §3.3); then the nonce count -> STALE "replay"
           when not greater than before, so a client that re-used a count recovers with a
           fresh nonce and an attacker replaying a captured request learns nothing.
        """
        reason: AuthReason | None = None
        entry = _HASHES.get(creds.algorithm)
        if creds.realm != realm:
            reason = "realm_mismatch"
        elif entry is None or creds.algorithm not in self.algorithms:
            reason = "bad_algorithm"
        elif creds.qop is None and self.require_qop:
            reason = "qop_missing"
        elif creds.qop is not None and creds.qop not in self.qop:
            reason = "bad_qop"
        elif self.opaque is not None and creds.opaque != self.opaque:
            reason = "opaque_mismatch"
        elif request_uri is not None and creds.uri != request_uri:
            reason = "uri_mismatch"

        algorithm = creds.algorithm if entry is not None else "SHA-256"
        base = _HASHES[algorithm][2]
        key = stored_ha1.get(base) if stored_ha1 is not None else None
        if key is None:
            key = self._dummy_ha1[base]
            if reason is None:
                reason = "unknown_user" if stored_ha1 is None else "no_ha1"
        expected = digest_response(
            algorithm=algorithm,
            ha1_hex=key,
            nonce=creds.nonce,
            method=method,
            uri=creds.uri,
            qop=creds.qop,
            nc=creds.params.get("nc"),
            cnonce=creds.cnonce,
            body=body,
        )
        # Bytes, not str: compare_digest refuses non-ASCII str, and the response is client text.
        matches = hmac.compare_digest(expected.encode(), creds.response.lower().encode())
        if reason is None and not matches:
            reason = "bad_response"
        if reason is not None:
            return AuthResult(AuthStatus.FAILED, reason, creds.username, creds.algorithm)

        status = self.nonces.check(creds.nonce, now)
        if status is not NonceStatus.VALID:
            stale_reason: AuthReason
            if status is NonceStatus.STALE:
                stale_reason = "stale_nonce"
            elif status is NonceStatus.FOREIGN:
                stale_reason = "foreign_nonce"
            else:
                stale_reason = "bad_nonce"
            return AuthResult(AuthStatus.STALE, stale_reason, creds.username, creds.algorithm)
        if creds.nc is not None and not self.nonces.check_nc(creds.nonce, creds.nc, now):
            return AuthResult(AuthStatus.STALE, "replay", creds.username, creds.algorithm)
        return AuthResult(AuthStatus.OK, "ok", creds.username, creds.algorithm)
