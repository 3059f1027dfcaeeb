"""Request validation a proxy's REQINIT block runs after a successful parse (RFC 3261 §16.3).

:func:`sipcore.message.parse_message` already rejects what no element may accept (RFC 3261
§16.3 step 2's 416 included).  What remains depends on the element's role and configuration
and on headers the parser leaves for later:

1. reasonable syntax (step 1) of the lazily parsed headers the proxy and registrar go on to
   use -- Request-URI, Route, Record-Route, Contact, Expires -- so a malformed one is a 400
   here rather than an exception deep in routing (RFC 4475 §3.1.2.13);
2. Max-Forwards 0 (step 3): 483 Too Many Hops, except an OPTIONS the element answers
   itself (RFC 3261 §11, RFC 4475 §3.3.11);
3. Proxy-Require (step 5), and Require when the element is the UAS (§8.2.2.3): 420 Bad
   Extension with an Unsupported header listing what is not supported (RFC 4475 §3.3.5).

Everything is raised as :class:`~sipcore.errors.SipParseError` carrying the status (and for
420 the Unsupported header), so the caller answers every rejection the same way.
"""

from __future__ import annotations

from collections.abc import Collection

from sipcore.errors import SipParseError
from sipcore.message import Request

__all__ = ["request_checks"]


def request_checks(
    req: Request,
    *,
    supported: Collection[str] = (),
    local_target: bool = False,
) -> None:
    """Raise :class:`SipParseError` (400, 483 or 420) if ``req`` must be rejected.

    ``supported`` are the option tags this element implements (compared case-insensitively,
    RFC 3261 §7.3.1: option tags are tokens).  ``local_target`` says the Request-URI targets
    this element itself (the registrar's domain for REGISTER, an OPTIONS ping to the
    server): it then acts as the UAS, so Require is checked too and an OPTIONS with
    Max-Forwards 0 is answered rather than rejected.
    """
    # Step 1: every header the later stages parse must be parseable (each raises 400).
    _ = req.request_uri
    if req.has_header("route"):
        _ = req.routes
    if req.has_header("record-route"):
        _ = req.record_routes
    if req.has_header("contact"):
        for contact in req.contacts:
            _ = contact.expires
    _ = req.expires

    # Step 3: Max-Forwards.
    if req.max_forwards == 0 and not (local_target and req.method == "OPTIONS"):
        raise SipParseError(483, "Too Many Hops")

    # Step 5 and §8.2.2.3: extensions.  ACK and CANCEL are never rejected for them: an ACK
    # cannot be answered and a CANCEL carries no Require (RFC 3261 §9.2).
    if req.method in ("ACK", "CANCEL"):
        return
    required = req.header_values("proxy-require")
    if local_target:
        required += req.header_values("require")
    if not required:
        return
    known = {tag.lower() for tag in supported}
    unsupported = [tag for tag in required if tag.lower() not in known]
    if unsupported:
        raise SipParseError(
            420, "Bad Extension", [("Unsupported", ", ".join(dict.fromkeys(unsupported)))]
        )
