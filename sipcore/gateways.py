"""Outbound routing of numbers to gateways, and the no-open-relay rule (RFC 3261 §16.5).

Runs in the ``LOCATION`` stage after the location service. A request whose Request-URI is
not a registered or known local user is a candidate for a gateway only when

* the caller authenticated as a local subscriber (``ctx.user``), and
* the Request-URI user is a number (digits, optionally with a leading ``+``), and
* a configured gateway's prefix matches the normalised number.

Gateways are chosen by the longest matching prefix; all gateways sharing that prefix length
are tried one after another (failover on 408/5xx/timeout, driven by the proxy's response
context through ``ctx.serial_targets``), in configuration order. A local AoR always wins: the
location service runs first and numeric subscriber names such as ``1001`` are found there.

Everything else for a domain we don't serve is refused (``location = "foreign"`` -> 403): the
server never resolves or contacts a foreign host on an unauthenticated request's say-so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sipcore.errors import SipParseError
from sipcore.pipeline import RequestContext, Target
from sipcore.transport_types import Peer
from sipcore.uri import SipUri, TelUri

__all__ = ["Gateway", "GatewayRouter", "normalise_number"]


@dataclass(frozen=True, slots=True)
class Gateway:
    name: str
    host: str                       # IP address literal: no DNS on the call path
    port: int = 5060
    transport: str = "UDP"
    prefixes: tuple[str, ...] = ("",)  # "" matches every number
    strip: int = 0                  # digits removed from the front of the number
    prepend: str = ""               # then prepended

    @property
    def peer(self) -> Peer:
        return Peer(self.transport.upper(), self.host, self.port)

    def uri_for(self, number: str) -> str:
        dialled = self.prepend + number[self.strip:]
        t = ";transport=tcp" if self.transport.upper() == "TCP" else ""
        return f"sip:{dialled}@{self.host}:{self.port}{t}"


def normalise_number(user: str, international_prefix: str = "00") -> str | None:
    """``+CC...`` / ``00CC...`` / ``CC...`` -> ``CC...``; None if it isn't a number.

    Visual separators allowed by RFC 3966 (``-``, ``.``, ``(``, ``)``) are dropped.
    """
    text = user.strip()
    for sep in "-.() ":
        text = text.replace(sep, "")
    if text.startswith("+"):
        text = text[1:]
    elif international_prefix and text.startswith(international_prefix):
        text = text[len(international_prefix):]
    if not text or not text.isdigit():
        return None
    return text


class GatewayRouter:
    """LOCATION-stage handler: numbers to gateways, foreign domains refused."""

    def __init__(self, gateways: Sequence[Gateway], *, international_prefix: str = "00") -> None:
        self.gateways = list(gateways)
        self.international_prefix = international_prefix

    def route(self, number: str) -> list[list[Gateway]]:
        """Failover groups for ``number``: the longest matching prefix, one gateway each."""
        best = -1
        chosen: list[Gateway] = []
        for gw in self.gateways:
            for prefix in gw.prefixes:
                if number.startswith(prefix):
                    if len(prefix) > best:
                        best, chosen = len(prefix), [gw]
                    elif len(prefix) == best and gw not in chosen:
                        chosen.append(gw)
        return [[gw] for gw in chosen]

    def __call__(self, ctx: RequestContext) -> bool:
        if ctx.targets or ctx.attrs.get("location") == "found":
            return False
        req = ctx.request
        try:
            uri = req.request_uri
        except SipParseError:
            return ctx.reply(416, "Unsupported URI Scheme")
        user = uri.number if isinstance(uri, TelUri) else (uri.user if isinstance(uri, SipUri)
                                                           else None)
        # The location service marks every Request-URI in our domains (found/offline/unknown).
        local = "location" in ctx.attrs
        number = normalise_number(user, self.international_prefix) if user else None
        if ctx.user is not None and number is not None and ctx.attrs.get("location") != "offline":
            groups = self.route(number)
            if groups:
                ctx.attrs["dialled_number"] = number
                targets = [[Target(gw.uri_for(number), gw.peer, kind="gateway", gateway=gw.name)]
                           for (gw,) in groups]
                ctx.targets = targets[0]
                ctx.serial_targets = targets[1:]
                return False
        if not local:
            ctx.attrs["location"] = "foreign"
        return False
