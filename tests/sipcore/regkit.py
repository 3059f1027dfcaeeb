"""Helpers for the auth/registrar/location tests: real requests, a real recording replier.

Requests are built as bytes and parsed by the real parser; handlers get a real
:class:`~sipcore.pipeline.RequestContext` whose replier builds each response with
``build_response`` and parses it back, so a test sees exactly what a phone would.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from sipcore.digest import build_authorization, select_challenge
from sipcore.message import Request, Response, build_request, build_response, parse_message
from sipcore.pipeline import RequestContext
from sipcore.transaction import ServerTxKey
from sipcore.transport_types import Peer

DOMAIN = "example.com"
PHONE = Peer("UDP", "198.51.100.7", 40123)  # the NAT's public side: where requests must go

_branches = itertools.count(1)


@dataclass
class Recorder:
    """The replier: every response sent, parsed back."""

    responses: list[Response] = field(default_factory=list)

    def __call__(
        self,
        ctx: RequestContext,
        status: int,
        reason: str | None,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        to_tag: str | None,
    ) -> None:
        data = build_response(
            ctx.request, status, reason, to_tag=to_tag, headers=headers, body=body
        )
        response = parse_message(data)
        assert isinstance(response, Response)
        self.responses.append(response)

    @property
    def last(self) -> Response:
        assert self.responses, "no response was sent"
        return self.responses[-1]


def request(
    method: str,
    uri: str,
    *,
    from_uri: str,
    to_uri: str,
    call_id: str = "call-1@phone",
    cseq: int = 1,
    headers: Sequence[tuple[str, str]] = (),
    to_tag: str | None = None,
) -> Request:
    branch = f"z9hG4bK-test-{next(_branches)}"
    to_value = f"<{to_uri}>" + (f";tag={to_tag}" if to_tag else "")
    raw = build_request(
        method,
        uri,
        [
            ("Via", f"SIP/2.0/UDP 10.0.0.7:5060;branch={branch};rport"),
            ("From", f"<{from_uri}>;tag=from-{cseq}"),
            ("To", to_value),
            ("Call-ID", call_id),
            ("CSeq", f"{cseq} {method}"),
            *headers,
        ],
    )
    req = parse_message(raw)
    assert isinstance(req, Request)
    return req


def register(
    user: str,
    contacts: Sequence[str] = (),
    *,
    domain: str = DOMAIN,
    call_id: str = "reg-1@phone",
    cseq: int = 1,
    expires: int | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> Request:
    """A REGISTER for ``user@domain``; ``contacts`` are Contact values as written."""
    aor = f"sip:{user}@{domain}"
    extra = [("Contact", c) for c in contacts]
    if expires is not None:
        extra.append(("Expires", str(expires)))
    return request(
        "REGISTER",
        f"sip:{domain}",
        from_uri=aor,
        to_uri=aor,
        call_id=call_id,
        cseq=cseq,
        headers=[*extra, *headers],
    )


def context(
    req: Request,
    source: Peer = PHONE,
    recorder: Recorder | None = None,
    *,
    user: str | None = None,
    user_domain: str | None = None,
) -> RequestContext:
    top = req.top_via
    tx = ServerTxKey(top.branch or "", top.host, top.port, req.method)
    return RequestContext(
        request=req,
        source=source,
        tx=tx,
        replier=recorder if recorder is not None else Recorder(),
        user=user,
        user_domain=user_domain,
    )


def recorder_of(ctx: RequestContext) -> Recorder:
    assert isinstance(ctx.replier, Recorder)
    return ctx.replier


def answer(
    challenge_response: Response,
    req: Request,
    *,
    username: str,
    password: str,
    algorithms: Sequence[str] = ("SHA-256", "MD5"),
    nc: int = 1,
    cnonce: str | None = None,
) -> str:
    """The credentials a client preferring ``algorithms`` sends for the challenge."""
    name = "Proxy-Authenticate" if challenge_response.status == 407 else "WWW-Authenticate"
    challenge = select_challenge(challenge_response.header_values(name), algorithms=algorithms)
    assert challenge is not None
    return build_authorization(
        challenge,
        method=req.method,
        uri=req.uri,
        username=username,
        password=password,
        nc=nc,
        cnonce=cnonce,
    )
