"""Digest authentication of local users: the AUTH stage (RFC 3261 §22, RFC 7616, RFC 8760).

:class:`DigestAuth` decides who must prove their identity and checks the proof with the
sans-IO pieces of :mod:`sipcore.digest` (challenges, stateless nonces, nonce-count replay
protection) and :mod:`sipcore.ratelimit` (failure counting).

Who is challenged
-----------------
* A REGISTER for an AoR of our domains (the To URI): 401 with ``WWW-Authenticate``
  (§22.2: a registrar is a user agent server).
* Any other request *from* a local user (the From URI's domain is ours) that reaches this
  stage: 407 with ``Proxy-Authenticate`` (§22.3).  Genuine in-dialog requests are consumed by
  the IN_DIALOG stage before AUTH; one that falls through is challenged like any other, so a
  forged To tag is no way around authentication.
* Never ACK or CANCEL (§22.1: they cannot be resubmitted with credentials; a CANCEL is
  matched to its INVITE, which was authenticated).
* Requests from other domains pass unauthenticated; ``ctx.user`` stays None and the proxy
  only lets them reach local users (no open relay).

What is answered
----------------
Every challenge offers SHA-256 and MD5 (RFC 8760 §2.3, one header line each, sharing one
nonce), qop=auth.  An MD5-only phone answers the MD5 one, a SHA-256 client the SHA-256 one.
Missing credentials, a wrong password and an unknown user all get the same fresh challenge
(RFC 7616 §5: no user enumeration; the verifier even hashes against a dummy HA1).  Right
password but expired, foreign or replayed nonce (nonce count not greater than before):
challenge with ``stale=true`` (RFC 7616 §3.3), so the phone retries without asking the user.
Credentials that verify but name another user than the From (To for REGISTER) user: 403 --
authenticating as alice does not allow calling or registering as bob.  Malformed credentials:
400.  On success ``ctx.user``/``ctx.user_domain`` are set and the consumed credentials header
is listed in ``ctx.attrs["remove_headers"]`` so the relay does not forward it (§22.3: a proxy
removes credentials meant for its own realm).

Brute force (RFC 7616 §5 online dictionary attacks, RFC 3261 §26.3.2.4): a failed check
(wrong password or unknown user, malformed credentials) is counted per source address and
per ``user@realm``.  Reaching ``source_failure_limit`` within ``failure_window`` seconds
blocks the source for ``block_seconds``: every request of it that needs authentication gets
403 "Too Many Failures", without hashing.  Reaching ``user_failure_limit`` blocks attempts
for that user name the same way, from anywhere -- which also locks the real user out for the
block time; set it to 0 to count without blocking.  Unknown and real users are counted alike,
so blocking reveals nothing either.  Successes reset nothing, or an attacker with one valid
account could launder a source's count.

The realm of a domain comes from ``realm_of(domain)`` (None: not our domain).  The stored
HA1s are derived with realm = the subscriber's domain (:mod:`sipcore.subscribers`), so a
realm_of that maps a domain to anything else makes every check fail.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final

from sipcore import coro
from sipcore.digest import (
    AuthStatus,
    DigestCredentials,
    DigestVerifier,
    NonceIssuer,
    select_credentials,
)
from sipcore.errors import SipParseError
from sipcore.pipeline import RequestContext
from sipcore.ratelimit import FailureCounter
from sipcore.settings import AuthSettings
from sipcore.subscribers import MISS, Subscriber, SubscriberStore
from sipcore.uri import SipUri

__all__ = ["AuthSettings", "DigestAuth", "realms_for_domains"]

log = logging.getLogger("sipcore.auth")

_MAX_BLOCKED: Final = 100_000


def realms_for_domains(
    domains: Iterable[str], aliases: Mapping[str, str] | None = None
) -> Callable[[str], str | None]:
    """A ``realm_of`` for :class:`DigestAuth`: each of ``domains`` is its own realm, and an
    alias (``127.0.0.1`` for ``localhost``) is the realm of the domain it stands for."""
    local = {d.lower(): d.lower() for d in domains}
    local.update({a.lower(): d.lower() for a, d in (aliases or {}).items()})

    def realm_of(domain: str) -> str | None:
        return local.get(domain.lower())

    return realm_of


class DigestAuth:
    """AUTH stage handler: ``pipeline.add(Stage.AUTH, auth)``.

    ``subscribers`` supplies the HA1s; ``nonces`` issues and checks nonces (shared secret, one
    per worker); ``realm_of`` maps a domain to its realm, None for domains we do not serve.
    ``clock`` is the wall clock nonces are dated with (shared by all workers), ``monotonic``
    the clock of the failure windows.
    """

    NEVER_CHALLENGED: Final = frozenset({"ACK", "CANCEL"})

    def __init__(
        self,
        subscribers: SubscriberStore,
        nonces: NonceIssuer,
        realm_of: Callable[[str], str | None],
        settings: AuthSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings if settings is not None else AuthSettings()
        problems = self.settings.validate()
        if problems:
            raise ValueError("; ".join(f"{k}: {v}" for k, v in problems))
        self.subscribers = subscribers
        self.realm_of = realm_of
        self.verifier = DigestVerifier(
            nonces, algorithms=self.settings.algorithms, require_qop=self.settings.require_qop
        )
        self.clock = clock
        self.monotonic = monotonic
        s = self.settings
        self._source_failures = FailureCounter(
            s.failure_window, max_events=max(s.source_failure_limit, 1)
        )
        self._user_failures = FailureCounter(
            s.failure_window, max_events=max(s.user_failure_limit, 1)
        )
        # key -> monotonic time the block ends; oldest first, bounded.
        self._blocked: OrderedDict[str, float] = OrderedDict()
        #: Outcomes ("ok", "challenged", "stale", "failed", "blocked_source", ...) and the
        #: verifier's reasons ("reason:bad_response", ...) for metrics.
        self.stats: Counter[str] = Counter()

    # -------------------------------------------------------------------------- the handler
    def __call__(self, ctx: RequestContext) -> bool | Awaitable[bool]:
        req = ctx.request
        method = req.method
        if method in self.NEVER_CHALLENGED:
            return False
        register = method == "REGISTER"
        addr = req.to_addr if register else req.from_addr
        try:
            uri = addr.parsed_uri
        except SipParseError as exc:
            if exc.status == 416:
                return False  # another scheme (tel:, urn:...): not one of our users
            return ctx.reply(exc.status, exc.reason, exc.headers)
        if not isinstance(uri, SipUri):
            return False
        realm = self.realm_of(uri.host)
        if realm is None:
            return False  # not our domain: the registrar refuses it, the proxy confines it
        # The realm is the canonical domain (an alias such as 127.0.0.1 maps to localhost),
        # which is also the domain the subscriber is stored under.
        return self._authenticate(ctx, uri.user, realm, realm, not register)

    def _authenticate(
        self, ctx: RequestContext, user: str | None, domain: str, realm: str, proxy: bool
    ) -> bool | Awaitable[bool]:
        """Everything up to the subscriber lookup runs synchronously, so a challenge (the
        first answer to most requests) costs the pipeline no task."""
        req = ctx.request
        now = self.clock()
        mono = self.monotonic()
        source = ctx.source.host
        if self._is_blocked(source, mono):
            self.stats["blocked_source"] += 1
            return ctx.reply(403, "Too Many Failures")
        header = "Proxy-Authorization" if proxy else "Authorization"
        values = req.header_values(header)
        if not values:
            self.stats["challenged"] += 1
            ctx.stateless = True  # nothing to count if it comes again: a fresh challenge
            return self._challenge(ctx, realm, now, proxy, stale=False)
        try:
            creds = select_credentials(values, realm)
        except SipParseError as exc:
            self.stats["bad_credentials"] += 1
            self._count_failure(source, None, mono)
            log.info("event=auth_bad_credentials source=%s reason=%r", ctx.source, exc.reason)
            return ctx.reply(400, f"Bad {header}")
        if creds is None:
            # Credentials for other realms only (or another scheme): ours are still missing.
            self.stats["challenged"] += 1
            return self._challenge(ctx, realm, now, proxy, stale=False)
        user_key = f"{creds.username}@{realm}"
        if self.settings.user_failure_limit and self._is_blocked(user_key, mono):
            self.stats["blocked_user"] += 1
            return ctx.reply(403, "Too Many Failures")

        subscriber = self.subscribers.peek(creds.username, domain)
        if subscriber is MISS:
            return coro.apply(
                self.subscribers.get(creds.username, domain),
                lambda found: self._check(ctx, creds, found, user, domain, realm, proxy, now, mono,
                                          user_key),
            )
        # Cached (a phone refreshing, or the answer to its own challenge): no task, no await.
        return self._check(ctx, creds, subscriber, user, domain, realm, proxy, now, mono,
                           user_key)

    def _check(
        self,
        ctx: RequestContext,
        creds: DigestCredentials,
        subscriber: Subscriber | None,
        user: str | None,
        domain: str,
        realm: str,
        proxy: bool,
        now: float,
        mono: float,
        user_key: str,
    ) -> bool:
        req = ctx.request
        source = ctx.source.host
        header = "Proxy-Authorization" if proxy else "Authorization"
        stored = (
            {"MD5": subscriber.ha1_md5, "SHA-256": subscriber.ha1_sha256}
            if subscriber is not None
            else None
        )
        result = self.verifier.verify(
            creds,
            method=req.method,
            realm=realm,
            stored_ha1=stored,
            now=now,
            request_uri=req.uri if self.settings.check_uri else None,
            body=req.body,
        )
        if result.status is AuthStatus.OK:
            if creds.username != user:
                self.stats["identity_mismatch"] += 1
                log.info(
                    "event=auth_identity_mismatch source=%s user=%r claimed=%r",
                    ctx.source,
                    creds.username[:64],
                    (user or "")[:64],
                )
                return ctx.reply(403, "Credentials Do Not Match The Identity")
            self.stats["ok"] += 1
            ctx.user = creds.username
            ctx.user_domain = domain
            remove = ctx.attrs.get("remove_headers")
            if remove is None:
                ctx.attrs["remove_headers"] = {header}
            else:
                remove.add(header)
            return False
        self.stats["reason:" + result.reason] += 1
        if result.status is AuthStatus.STALE:
            self.stats["stale"] += 1
            return self._challenge(ctx, realm, now, proxy, stale=True)
        self.stats["failed"] += 1
        self._count_failure(source, user_key, mono)
        log.info(
            "event=auth_failed source=%s user=%r realm=%s reason=%s",
            ctx.source,
            creds.username[:64],
            realm,
            result.reason,
        )
        return self._challenge(ctx, realm, now, proxy, stale=False)

    # -------------------------------------------------------------------------- helpers
    def _challenge(
        self, ctx: RequestContext, realm: str, now: float, proxy: bool, *, stale: bool
    ) -> bool:
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        values = self.verifier.challenges(realm, now, stale=stale)
        return ctx.reply(407 if proxy else 401, None, [(name, value) for value in values])

    def _count_failure(self, source: str, user_key: str | None, mono: float) -> None:
        s = self.settings
        if self._source_failures.record(source, mono) >= s.source_failure_limit:
            self._block(source, mono, "source")
        if (
            user_key is not None
            and s.user_failure_limit
            and self._user_failures.record(user_key, mono) >= s.user_failure_limit
        ):
            self._block(user_key, mono, "user")

    def _block(self, key: str, mono: float, kind: str) -> None:
        blocked = self._blocked
        if key not in blocked:
            log.warning(
                "event=auth_blocked kind=%s key=%r seconds=%s",
                kind,
                key[:100],
                self.settings.block_seconds,
            )
        blocked[key] = mono + self.settings.block_seconds
        blocked.move_to_end(key)
        while len(blocked) > _MAX_BLOCKED:
            blocked.popitem(last=False)

    def _is_blocked(self, key: str, mono: float) -> bool:
        until = self._blocked.get(key)
        if until is None:
            return False
        if until > mono:
            return True
        del self._blocked[key]
        return False

    def blocked(self) -> dict[str, float]:
        """Current blocks, key -> seconds left (for the control socket)."""
        mono = self.monotonic()
        return {key: until - mono for key, until in self._blocked.items() if until > mono}

    def unblock(self, key: str) -> bool:
        """Lift a block (a source address or ``user@realm``) and forget its failures."""
        self._source_failures.reset(key)
        self._user_failures.reset(key)
        return self._blocked.pop(key, None) is not None
