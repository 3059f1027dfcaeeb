"""The core's ``[auth]`` and ``[registrar]`` sections (ARCHITECTURE.md principle 6).

They live here, not next to the code they configure, because that code is compiled with mypyc
(see ``setup.py``), and a compiled dataclass keeps only erased annotations (``tuple`` for
``tuple[str, ...]``), from which :func:`sipbill.configschema.load_section` could not check a
value.  This module is never compiled; :mod:`sipcore.auth` and :mod:`sipcore.registrar`
re-export their section, so ``from sipcore.auth import AuthSettings`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

from sipcore.digest import ALGORITHMS

__all__ = ["AuthSettings", "RegistrarSettings", "expires_problems"]


def expires_problems(min_expires: int, default_expires: int,
                     max_expires: int) -> list[tuple[str, str]]:
    """What is wrong with an Expires policy (``min_expires``, ``default_expires``,
    ``max_expires`` keys): a registrar's (RFC 3261 §10.3) or a presence server's (RFC 6665)."""
    problems: list[tuple[str, str]] = []
    if min_expires < 1:
        problems.append(("min_expires", "must be at least 1"))
    if max_expires < min_expires:
        problems.append(("max_expires", "must not be smaller than min_expires"))
    if not min_expires <= default_expires <= max_expires:
        problems.append(("default_expires", "must be between min_expires and max_expires"))
    return problems


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """``[auth]``: digest policy and the brute-force limits (times in seconds)."""

    nonce_ttl: float = 300.0  # for the NonceIssuer the composition root builds
    require_qop: bool = True  # refuse the RFC 2069 form (no qop, so no nonce count)
    algorithms: tuple[str, ...] = ALGORITHMS  # offered in this order: SHA-256, MD5
    check_uri: bool = True  # credentials' uri must equal the Request-URI (RFC 7616 §3.4.6)
    failure_window: float = 60.0
    source_failure_limit: int = 20  # failures per source within the window -> blocked
    user_failure_limit: int = 40  # failures per user@realm within the window; 0: no block
    block_seconds: float = 300.0

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.nonce_ttl <= 0:
            problems.append(("nonce_ttl", "must be positive"))
        if not self.algorithms or not set(self.algorithms) <= set(ALGORITHMS):
            problems.append(("algorithms", f"must be a non-empty subset of {list(ALGORITHMS)}"))
        if self.failure_window <= 0:
            problems.append(("failure_window", "must be positive"))
        if not 1 <= self.source_failure_limit <= 1000:
            problems.append(("source_failure_limit", "must be 1-1000"))
        if not 0 <= self.user_failure_limit <= 1000:
            problems.append(("user_failure_limit", "must be 0-1000 (0 disables)"))
        if self.block_seconds <= 0:
            problems.append(("block_seconds", "must be positive"))
        return problems


@dataclass(frozen=True, slots=True)
class RegistrarSettings:
    """``[registrar]``: binding lifetimes in seconds and the per-AoR contact limit."""

    default_expires: int = 3600  # when neither the contact nor the request says
    min_expires: int = 60  # shorter (non-zero) requests get 423 with Min-Expires
    max_expires: int = 7200  # longer requests are shortened to this
    max_contacts: int = 10  # per AoR; a REGISTER adding more gets 403

    def validate(self) -> list[tuple[str, str]]:
        problems = expires_problems(self.min_expires, self.default_expires, self.max_expires)
        if self.max_contacts < 1:
            problems.append(("max_contacts", "must be at least 1"))
        return problems
