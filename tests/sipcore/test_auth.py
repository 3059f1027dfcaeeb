"""DigestAuth, the AUTH stage: real requests, real subscribers in PostgreSQL, fake clocks.

The clients are built from :mod:`sipcore.digest`'s client side: an MD5-only phone (what the
PJSIP in pjsua2-pybind11 is) picks the MD5 challenge, a SHA-256 client the SHA-256 one.
"""

from __future__ import annotations

import asyncpg
import pytest

from sipcore.auth import AuthSettings, DigestAuth, realms_for_domains
from sipcore.digest import NonceIssuer, parse_challenge
from sipcore.message import Request, Response
from sipcore.pipeline import RequestContext
from sipcore.subscribers import SubscriberStore
from sipcore.transport_types import Peer
from tests.sipcore.regkit import DOMAIN, PHONE, answer, context, recorder_of, register, request

PASSWORD = "correct horse"
AOR = f"sip:alice@{DOMAIN}"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Harness:
    def __init__(self, subscribers: SubscriberStore, settings: AuthSettings) -> None:
        self.wall = Clock(1_700_000_000.0)
        self.mono = Clock(1000.0)
        self.nonces = NonceIssuer(b"s" * 32, ttl=settings.nonce_ttl)
        self.auth = DigestAuth(
            subscribers,
            self.nonces,
            realms_for_domains([DOMAIN]),
            settings,
            clock=self.wall,
            monotonic=self.mono,
        )

    async def run(self, req: Request, source: Peer = PHONE) -> tuple[bool, RequestContext]:
        ctx = context(req, source)
        result = self.auth(ctx)
        if not isinstance(result, bool):
            result = await result
        return result, ctx

    async def reply_to(self, req: Request, source: Peer = PHONE) -> Response:
        done, ctx = await self.run(req, source)
        assert done is True
        return recorder_of(ctx).last


@pytest.fixture(scope="module")
async def subscribers(db_pool: asyncpg.Pool) -> SubscriberStore:
    store = SubscriberStore(db_pool)
    await store.ensure("alice", DOMAIN, PASSWORD)
    await store.ensure("bob", DOMAIN, "bobs password")
    return store


@pytest.fixture
def h(subscribers: SubscriberStore) -> Harness:
    return Harness(
        subscribers,
        AuthSettings(
            source_failure_limit=5, user_failure_limit=8, failure_window=60, block_seconds=120
        ),
    )


def reg(cseq: int = 1, authorization: str | None = None, user: str = "alice") -> Request:
    headers = [("Authorization", authorization)] if authorization else []
    return register(user, ["<sip:alice@10.0.0.7>"], cseq=cseq, headers=headers)


def invite(
    cseq: int = 1,
    proxy_authorization: str | None = None,
    from_uri: str = AOR,
    header: str = "Proxy-Authorization",
) -> Request:
    headers = [(header, proxy_authorization)] if proxy_authorization else []
    return request(
        "INVITE",
        f"sip:bob@{DOMAIN}",
        from_uri=from_uri,
        to_uri=f"sip:bob@{DOMAIN}",
        call_id="inv-1@phone",
        cseq=cseq,
        headers=headers,
    )


async def authenticated(h: Harness, req: Request, source: Peer = PHONE) -> RequestContext:
    done, ctx = await h.run(req, source)
    assert done is False and not ctx.replied, recorder_of(ctx).responses
    return ctx


# ------------------------------------------------------------------------------ challenges


async def test_register_gets_401_with_sha256_and_md5_challenges(h: Harness) -> None:
    resp = await h.reply_to(reg())
    assert resp.status == 401
    challenges = [parse_challenge(v) for v in resp.header_values("WWW-Authenticate")]
    assert [c.algorithm for c in challenges] == ["SHA-256", "MD5"]  # RFC 8760: preferred first
    assert {c.realm for c in challenges} == {DOMAIN}
    assert challenges[0].nonce == challenges[1].nonce
    assert all(c.qop == ("auth",) and not c.stale for c in challenges)
    assert not resp.has_header("Proxy-Authenticate")


async def test_only_a_challenge_to_a_request_without_credentials_is_stateless(
        h: Harness) -> None:
    # No credentials: a retransmission may as well get a fresh challenge (RFC 3261 §8.2.7),
    # so the transaction need not linger.
    first = reg(cseq=1)
    done, ctx = await h.run(first)
    assert done and recorder_of(ctx).last.status == 401 and ctx.stateless
    # Wrong credentials: the failure is counted, so a retransmission must be absorbed by the
    # transaction rather than counted again.
    bad = reg(cseq=2, authorization=answer(recorder_of(ctx).last, first, username="alice",
                                           password="wrong"))
    done, ctx = await h.run(bad)
    assert done and recorder_of(ctx).last.status == 401 and not ctx.stateless


async def test_md5_only_client_registers(h: Harness) -> None:
    first = reg(cseq=1)
    challenge = await h.reply_to(first)
    second = reg(
        cseq=2,
        authorization=answer(
            challenge, first, username="alice", password=PASSWORD, algorithms=("MD5",)
        ),
    )
    assert "algorithm=MD5" in (second.header("Authorization") or "")
    ctx = await authenticated(h, second)
    assert (ctx.user, ctx.user_domain) == ("alice", DOMAIN)
    assert ctx.attrs["remove_headers"] == {"Authorization"}


async def test_sha256_client_registers(h: Harness) -> None:
    first = reg(cseq=1)
    challenge = await h.reply_to(first)
    second = reg(
        cseq=2,
        authorization=answer(
            challenge, first, username="alice", password=PASSWORD, algorithms=("SHA-256",)
        ),
    )
    assert "algorithm=SHA-256" in (second.header("Authorization") or "")
    ctx = await authenticated(h, second)
    assert ctx.user == "alice"


async def test_a_cached_subscriber_is_checked_without_waiting(
        subscribers: SubscriberStore) -> None:
    # A store that has not looked alice up yet asks the database (the handler returns an
    # awaitable, which costs the pipeline a task); once it has, her next REGISTER is checked
    # on the spot.
    h = Harness(SubscriberStore(subscribers.pool), AuthSettings())
    for cseq, on_the_spot in ((2, False), (4, True)):
        first = reg(cseq=cseq - 1)
        challenge = await h.reply_to(first)
        second = reg(cseq=cseq, authorization=answer(challenge, first, username="alice",
                                                     password=PASSWORD))
        ctx = context(second, PHONE)
        result = h.auth(ctx)
        assert isinstance(result, bool) is on_the_spot
        if not isinstance(result, bool):
            result = await result
        assert result is False and ctx.user == "alice"


async def test_wrong_password_and_unknown_user_look_the_same(h: Harness) -> None:
    first = reg()
    challenge = await h.reply_to(first)
    wrong = await h.reply_to(
        reg(cseq=2, authorization=answer(challenge, first, username="alice", password="guess"))
    )
    unknown_req = register("mallory", ["<sip:m@10.0.0.9>"], cseq=1)
    unknown_challenge = await h.reply_to(unknown_req)
    unknown = await h.reply_to(
        register(
            "mallory",
            ["<sip:m@10.0.0.9>"],
            cseq=2,
            headers=[
                (
                    "Authorization",
                    answer(unknown_challenge, unknown_req, username="mallory", password="guess"),
                )
            ],
        )
    )

    def shape(resp: Response) -> object:
        challenges = [parse_challenge(v) for v in resp.header_values("WWW-Authenticate")]
        return (
            resp.status,
            resp.reason,
            [n for n, _ in resp.header_items()],
            [(c.realm, c.algorithm, c.qop, c.stale, c.opaque) for c in challenges],
        )

    assert shape(wrong) == shape(unknown)
    assert wrong.status == 401  # never 403/404: nothing tells which users exist


async def test_expired_nonce_gets_stale_true(h: Harness) -> None:
    first = reg()
    challenge = await h.reply_to(first)
    h.wall.t += 301  # past nonce_ttl
    resp = await h.reply_to(
        reg(cseq=2, authorization=answer(challenge, first, username="alice", password=PASSWORD))
    )
    assert resp.status == 401
    challenges = [parse_challenge(v) for v in resp.header_values("WWW-Authenticate")]
    assert all(c.stale for c in challenges)
    # The phone retries with the new nonce without asking its user.
    retry = reg(cseq=3)
    ctx = await authenticated(
        h, reg(cseq=3, authorization=answer(resp, retry, username="alice", password=PASSWORD))
    )
    assert ctx.user == "alice"


async def test_replayed_nonce_count_is_refused(h: Harness) -> None:
    first = reg()
    challenge = await h.reply_to(first)
    creds = answer(challenge, first, username="alice", password=PASSWORD, nc=1, cnonce="abc")
    await authenticated(h, reg(cseq=2, authorization=creds))
    # The captured request replayed verbatim: refused, with a fresh (stale) challenge.
    resp = await h.reply_to(reg(cseq=2, authorization=creds))
    assert resp.status == 401
    assert all(parse_challenge(v).stale for v in resp.header_values("WWW-Authenticate"))
    # The real client counts up and goes on.
    await authenticated(
        h,
        reg(
            cseq=3,
            authorization=answer(
                challenge, first, username="alice", password=PASSWORD, nc=2, cnonce="abc"
            ),
        ),
    )


async def test_credentials_for_another_user_are_403(h: Harness) -> None:
    # bob authenticates correctly but registers alice's AoR.
    first = reg()
    challenge = await h.reply_to(first)
    resp = await h.reply_to(
        reg(
            cseq=2, authorization=answer(challenge, first, username="bob", password="bobs password")
        )
    )
    assert resp.status == 403


async def test_malformed_credentials_are_400(h: Harness) -> None:
    resp = await h.reply_to(reg(authorization='Digest username="alice", realm="example.com"'))
    assert resp.status == 400


async def test_credentials_for_another_realm_get_a_challenge(h: Harness) -> None:
    first = reg()
    challenge = await h.reply_to(first)
    creds = answer(challenge, first, username="alice", password=PASSWORD)
    other = creds.replace(f'realm="{DOMAIN}"', 'realm="elsewhere.org"')
    assert (await h.reply_to(reg(cseq=2, authorization=other))).status == 401


async def test_uri_must_match_the_request_uri(h: Harness) -> None:
    first = reg()
    challenge = await h.reply_to(first)
    creds = answer(challenge, first, username="alice", password=PASSWORD)
    other = request(
        "REGISTER",
        "sip:other.example.com",
        from_uri=AOR,
        to_uri=AOR,
        cseq=2,
        headers=[("Authorization", creds), ("Contact", "<sip:a@1>")],
    )
    assert (await h.reply_to(other)).status == 401


# ------------------------------------------------------------------------------ proxy auth


async def test_invite_from_local_user_gets_407_then_passes(h: Harness) -> None:
    first = invite()
    challenge = await h.reply_to(first)
    assert challenge.status == 407
    assert len(challenge.header_values("Proxy-Authenticate")) == 2
    assert not challenge.has_header("WWW-Authenticate")
    second = invite(
        cseq=2, proxy_authorization=answer(challenge, first, username="alice", password=PASSWORD)
    )
    ctx = await authenticated(h, second)
    assert ctx.user == "alice"
    assert ctx.attrs["remove_headers"] == {"Proxy-Authorization"}


async def test_invite_with_authorization_instead_of_proxy_authorization_is_challenged(
    h: Harness,
) -> None:
    first = invite()
    challenge = await h.reply_to(first)
    wrong_header = invite(
        cseq=2,
        header="Authorization",
        proxy_authorization=answer(challenge, first, username="alice", password=PASSWORD),
    )
    assert (await h.reply_to(wrong_header)).status == 407


@pytest.mark.parametrize("method", ["MESSAGE", "SUBSCRIBE", "REFER", "OPTIONS"])
async def test_other_requests_from_local_users_are_challenged(h: Harness, method: str) -> None:
    req = request(method, f"sip:bob@{DOMAIN}", from_uri=AOR, to_uri=f"sip:bob@{DOMAIN}")
    assert (await h.reply_to(req)).status == 407


async def test_requests_from_other_domains_pass_unauthenticated(h: Harness) -> None:
    ctx = await authenticated(h, invite(from_uri="sip:carol@elsewhere.org"))
    assert ctx.user is None and "remove_headers" not in ctx.attrs
    ctx = await authenticated(h, invite(from_uri="tel:+4930123456"))
    assert ctx.user is None
    # A REGISTER for a foreign domain is left to the registrar (which refuses it).
    await authenticated(h, register("alice", ["<sip:a@1>"], domain="elsewhere.org"))


@pytest.mark.parametrize("method", ["ACK", "CANCEL"])
async def test_ack_and_cancel_are_never_challenged(h: Harness, method: str) -> None:
    req = request(method, f"sip:bob@{DOMAIN}", from_uri=AOR, to_uri=f"sip:bob@{DOMAIN}")
    ctx = await authenticated(h, req)
    assert ctx.user is None


# ------------------------------------------------------------------------------ blocking


async def _fail_once(h: Harness, source: Peer, cseq: int, user: str = "alice") -> Response:
    first = register(user, ["<sip:x@1>"], cseq=cseq)
    challenge = await h.reply_to(first, source)
    if challenge.status != 401:
        return challenge
    return await h.reply_to(
        register(
            user,
            ["<sip:x@1>"],
            cseq=cseq + 1,
            headers=[("Authorization", answer(challenge, first, username=user, password="wrong"))],
        ),
        source,
    )


async def test_too_many_failures_from_a_source_block_it(h: Harness) -> None:
    attacker = Peer("UDP", "192.0.2.66", 5060)
    statuses = [(await _fail_once(h, attacker, 10 * i)).status for i in range(5)]
    assert statuses == [401] * 5  # each failure is re-challenged; the fifth reaches the limit ...
    # ... and from then on the source gets 403 without a challenge, right password or not.
    resp = await h.reply_to(reg(), attacker)
    assert (resp.status, resp.reason) == (403, "Too Many Failures")
    first = reg()
    challenge = await h.reply_to(first)  # from the real phone: unaffected
    assert challenge.status == 401
    good = reg(cseq=2, authorization=answer(challenge, first, username="alice", password=PASSWORD))
    assert (await h.reply_to(good, attacker)).status == 403
    await authenticated(h, good)
    assert "192.0.2.66" in h.auth.blocked()
    h.mono.t += 121  # block_seconds later
    assert (await h.reply_to(reg(), attacker)).status == 401


async def test_too_many_failures_for_a_user_block_the_user(h: Harness) -> None:
    for i in range(8):  # from eight sources: under the per-source limit each
        await _fail_once(h, Peer("UDP", f"192.0.2.{i + 1}", 5060), 10 * i, user="bob")
    first = register("bob", ["<sip:b@1>"])
    challenge = await h.reply_to(first)
    resp = await h.reply_to(
        register(
            "bob",
            ["<sip:b@1>"],
            cseq=2,
            headers=[
                (
                    "Authorization",
                    answer(challenge, first, username="bob", password="bobs password"),
                )
            ],
        )
    )
    assert (resp.status, resp.reason) == (403, "Too Many Failures")
    assert h.auth.unblock(f"bob@{DOMAIN}")
    resp_ok = register(
        "bob",
        ["<sip:b@1>"],
        cseq=3,
        headers=[
            (
                "Authorization",
                answer(challenge, first, username="bob", password="bobs password", nc=2),
            )
        ],
    )
    await authenticated(h, resp_ok)


def test_settings_are_validated() -> None:
    assert AuthSettings().validate() == []
    problems = dict(
        AuthSettings(nonce_ttl=0, algorithms=("SHA-512",), source_failure_limit=0).validate()
    )
    assert set(problems) == {"nonce_ttl", "algorithms", "source_failure_limit"}
