"""Tests for sipcore.digest: RFC vectors, client/server round trips, nonces, replay, parsing."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping
from types import EllipsisType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipcore import digest
from sipcore.digest import (
    _RECENT,
    ALGORITHMS,
    AuthStatus,
    DigestChallenge,
    DigestCredentials,
    DigestVerifier,
    NonceIssuer,
    NonceStatus,
    build_authorization,
    build_challenges,
    digest_response,
    ha1,
    parse_challenge,
    parse_credentials,
    select_challenge,
    select_credentials,
)
from sipcore.errors import SipParseError

SECRET = b"0123456789abcdef0123456789abcdef"
REALM = "sip.example.com"
USER = "alice"
PASSWORD = "wonderland"
URI = "sip:sip.example.com"
T0 = 1_700_000_000.0

# RFC 7616 §3.9.1: one request answered with SHA-256 and with MD5.  The password is
# "Circle of Life" with a lower-case "of" (RFC 7616 erratum 4495).
RFC7616 = {
    "realm": "http-auth@example.org",
    "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    "opaque": "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS",
    "cnonce": "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    "username": "Mufasa",
    "password": "Circle of Life",
    "uri": "/dir/index.html",
    "method": "GET",
}
RFC7616_RESPONSES = {
    "SHA-256": "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
    "MD5": "8ca523f5e9506fed4657c9700eebdbec",
}


def stored(username: str = USER, password: str = PASSWORD, realm: str = REALM) -> dict[str, str]:
    """What a subscriber row holds: one HA1 per base algorithm, no password."""
    return {alg: ha1(username, realm, password, alg) for alg in ALGORITHMS}


def make_verifier(worker_id: int = 0, **kwargs: Any) -> DigestVerifier:
    return DigestVerifier(NonceIssuer(SECRET, ttl=300, worker_id=worker_id), **kwargs)


def answer(
    challenges: list[str],
    *,
    password: str = PASSWORD,
    username: str = USER,
    algorithms: tuple[str, ...] = digest.CLIENT_ALGORITHMS,
    nc: int = 1,
    method: str = "REGISTER",
    uri: str = URI,
    **kwargs: Any,
) -> DigestCredentials:
    """What a phone does with a 401: pick a challenge, answer it, and the server parses it."""
    challenge = select_challenge(challenges, algorithms=algorithms)
    assert challenge is not None
    value = build_authorization(
        challenge, method=method, uri=uri, username=username, password=password, nc=nc, **kwargs
    )
    return parse_credentials(value)


def check(
    verifier: DigestVerifier,
    creds: DigestCredentials,
    *,
    now: float = T0 + 1,
    stored_ha1: Mapping[str, str] | EllipsisType | None = ...,
    **kwargs: Any,
) -> digest.AuthResult:
    """verify() with the test user's row by default; ``stored_ha1=None`` is "no such user"."""
    return verifier.verify(
        creds,
        method=kwargs.pop("method", "REGISTER"),
        realm=kwargs.pop("realm", REALM),
        stored_ha1=stored() if isinstance(stored_ha1, EllipsisType) else stored_ha1,
        now=now,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------
# Published vectors


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_rfc7616_example_client_side(algorithm: str) -> None:
    challenge = parse_challenge(
        f'Digest realm="{RFC7616["realm"]}", qop="auth, auth-int", algorithm={algorithm}, '
        f'nonce="{RFC7616["nonce"]}", opaque="{RFC7616["opaque"]}"'
    )
    value = build_authorization(
        challenge,
        method=RFC7616["method"],
        uri=RFC7616["uri"],
        username=RFC7616["username"],
        password=RFC7616["password"],
        cnonce=RFC7616["cnonce"],
    )
    creds = parse_credentials(value)
    assert creds.response == RFC7616_RESPONSES[algorithm]
    assert (creds.qop, creds.nc, creds.params["nc"]) == ("auth", 1, "00000001")
    assert creds.opaque == RFC7616["opaque"]
    assert creds.algorithm == algorithm


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_rfc7616_example_authorization_header_checks_out(algorithm: str) -> None:
    # The Authorization header as printed in RFC 7616 §3.9.1, parsed and recomputed the way
    # the server does from a stored HA1.
    creds = parse_credentials(
        f'Digest username="Mufasa",\t realm="http-auth@example.org", uri="/dir/index.html", '
        f'algorithm={algorithm}, nonce="{RFC7616["nonce"]}", nc=00000001, '
        f'cnonce="{RFC7616["cnonce"]}", qop=auth, response="{RFC7616_RESPONSES[algorithm]}", '
        f'opaque="{RFC7616["opaque"]}"'
    )
    expected = digest_response(
        algorithm=creds.algorithm,
        ha1_hex=ha1("Mufasa", "http-auth@example.org", "Circle of Life", algorithm),
        nonce=creds.nonce,
        method="GET",
        uri=creds.uri,
        qop=creds.qop,
        nc=creds.params["nc"],
        cnonce=creds.cnonce,
    )
    assert expected == creds.response


def test_rfc2617_example_md5_without_algorithm_parameter() -> None:
    # RFC 2617 §3.5 (password "Circle Of Life", capital O); no algorithm means MD5.
    creds = parse_credentials(
        'Digest username="Mufasa", realm="testrealm@host.com", '
        'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", qop=auth, '
        'nc=00000001, cnonce="0a4f113b", response="6629fae49393a05397450978507c4ef1", '
        'opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    )
    assert creds.algorithm == "MD5"
    assert creds.base_algorithm == "MD5"
    expected = digest_response(
        algorithm="MD5",
        ha1_hex=ha1("Mufasa", "testrealm@host.com", "Circle Of Life"),
        nonce=creds.nonce,
        method="GET",
        uri=creds.uri,
        qop="auth",
        nc="00000001",
        cnonce="0a4f113b",
    )
    assert expected == "6629fae49393a05397450978507c4ef1" == creds.response


def test_rfc7616_digest_over_a_nonce_we_did_not_issue_is_stale_not_ok() -> None:
    # The RFC's request has a correct digest, but its nonce is not ours: the client evidently
    # knows the password, so it gets stale=true (RFC 7616 §3.3), never OK.
    creds = parse_credentials(
        f'Digest username="Mufasa", realm="http-auth@example.org", uri="/dir/index.html", '
        f'algorithm=SHA-256, nonce="{RFC7616["nonce"]}", nc=00000001, '
        f'cnonce="{RFC7616["cnonce"]}", qop=auth, response="{RFC7616_RESPONSES["SHA-256"]}"'
    )
    result = make_verifier().verify(
        creds,
        method="GET",
        realm="http-auth@example.org",
        stored_ha1=stored("Mufasa", "Circle of Life", "http-auth@example.org"),
        now=T0,
    )
    assert (result.status, result.reason) == (AuthStatus.STALE, "bad_nonce")


# ------------------------------------------------------------------------------------------
# Challenges: both algorithms, SHA-256 first


def test_challenges_offer_sha256_then_md5_with_one_nonce() -> None:
    values = make_verifier().challenges(REALM, T0)
    assert len(values) == 2
    sha, md5 = (parse_challenge(value) for value in values)
    assert (sha.algorithm, md5.algorithm) == ("SHA-256", "MD5")
    assert sha.nonce == md5.nonce
    assert sha.realm == md5.realm == REALM
    assert sha.qop == md5.qop == ("auth",)
    assert not sha.stale and not md5.stale
    assert (
        values[0] == f'Digest realm="{REALM}", nonce="{sha.nonce}", algorithm=SHA-256, qop="auth"'
    )


def test_stale_challenge_says_so() -> None:
    values = make_verifier(opaque="xyz").challenges(REALM, T0, stale=True)
    assert all(parse_challenge(value).stale for value in values)
    assert all(parse_challenge(value).opaque == "xyz" for value in values)
    assert values[0].endswith(", stale=true")


@pytest.mark.parametrize("realm", [REALM, 'a "quoted" \\ realm', "marker \ue000nonce\ue000 in it"])
@pytest.mark.parametrize("stale", [False, True])
def test_challenges_are_what_build_challenges_gives_with_each_new_nonce(
    realm: str, stale: bool
) -> None:
    """The verifier builds a realm's values once around the nonce; each challenge must still
    be exactly build_challenges' for its own fresh nonce."""
    verifier = make_verifier(opaque="o")
    seen = set()
    for n in range(3):
        values = verifier.challenges(realm, T0 + n, stale=stale)
        nonce = parse_challenge(values[0]).nonce
        assert values == build_challenges(realm, nonce, stale=stale, algorithms=ALGORITHMS,
                                          qop=("auth",), opaque="o")
        seen.add(nonce)
    assert len(seen) == 3


def test_build_challenges_quotes_realm_and_refuses_unknown_algorithm() -> None:
    (value,) = build_challenges('a "quoted" \\ realm', "n", algorithms=["md5"])
    assert parse_challenge(value).realm == 'a "quoted" \\ realm'
    assert parse_challenge(value).algorithm == "MD5"
    with pytest.raises(ValueError):
        build_challenges(REALM, "n", algorithms=["SHA-512-256"])
    with pytest.raises(ValueError):
        build_challenges("bad\r\nrealm", "n")


def test_md5_only_client_picks_md5_from_the_two_challenges() -> None:
    values = make_verifier().challenges(REALM, T0)
    chosen = select_challenge(values, algorithms=("MD5",))
    assert chosen is not None and chosen.algorithm == "MD5"
    chosen = select_challenge(values)
    assert chosen is not None and chosen.algorithm == "SHA-256"


def test_client_prefers_its_own_order_over_header_order() -> None:
    # An on-path attacker moving MD5 to the top does not downgrade a SHA-256 client.
    values = list(reversed(make_verifier().challenges(REALM, T0)))
    chosen = select_challenge(values)
    assert chosen is not None and chosen.algorithm == "SHA-256"


def test_client_ignores_challenges_it_does_not_understand() -> None:
    values = [
        'Basic realm="x"',
        'Digest realm="x", nonce="n1", algorithm=SHA-512-256, qop="auth"',
        'Digest realm="x", nonce="n2", algorithm=MD5, qop="auth-conf"',
        'Digest realm="x", algorithm=MD5',  # no nonce
        'Digest realm="x", nonce="n3", qop="auth-int,auth"',
    ]
    chosen = select_challenge(values)
    assert chosen is not None
    assert (chosen.nonce, chosen.algorithm, chosen.qop) == ("n3", "MD5", ("auth-int", "auth"))
    assert select_challenge(values[:4]) is None
    assert select_challenge([]) is None


# ------------------------------------------------------------------------------------------
# Server verification


@pytest.mark.parametrize("client_algorithms", [("SHA-256",), ("MD5",)])
def test_round_trip(client_algorithms: tuple[str, ...]) -> None:
    verifier = make_verifier()
    creds = answer(verifier.challenges(REALM, T0), algorithms=client_algorithms)
    assert creds.algorithm == client_algorithms[0]
    result = check(verifier, creds, request_uri=URI)
    assert result.ok
    assert (result.status, result.reason) == (AuthStatus.OK, "ok")
    assert (result.username, result.algorithm) == (USER, client_algorithms[0])


def test_server_uses_the_stored_ha1_of_the_chosen_algorithm() -> None:
    verifier = make_verifier()
    challenges = verifier.challenges(REALM, T0)
    md5_only = {"MD5": stored()["MD5"]}
    creds = answer(challenges, algorithms=("SHA-256",))
    assert (check(verifier, creds, stored_ha1=md5_only).reason) == "no_ha1"
    creds = answer(challenges, algorithms=("MD5",))
    assert check(verifier, creds, stored_ha1=md5_only).ok


@pytest.mark.parametrize("algorithm", ["SHA-256-sess", "MD5-sess"])
def test_sess_algorithms_and_auth_int_when_offered(algorithm: str) -> None:
    verifier = make_verifier(algorithms=[algorithm], qop=["auth-int", "auth"])
    challenges = verifier.challenges(REALM, T0)
    creds = answer(challenges, qop="auth-int", body=b"v=0\r\n")
    assert (creds.algorithm, creds.qop) == (algorithm, "auth-int")
    assert check(verifier, creds, body=b"v=0\r\n").ok
    creds = answer(challenges, nc=2, qop="auth-int", body=b"v=0\r\n")
    assert check(verifier, creds, body=b"v=1\r\n").reason == "bad_response"


def test_wrong_password_and_unknown_user_look_the_same() -> None:
    verifier = make_verifier()
    challenges = verifier.challenges(REALM, T0)
    wrong = check(verifier, answer(challenges, password="guess"))
    unknown = check(verifier, answer(challenges, username="mallory"), stored_ha1=None)
    # The unknown user even with the right password of someone else.
    unknown_ok_pw = verifier.verify(
        answer(challenges, username="bob"),
        method="REGISTER",
        realm=REALM,
        stored_ha1=None,
        now=T0 + 1,
    )
    assert wrong.status is unknown.status is unknown_ok_pw.status is AuthStatus.FAILED
    assert (wrong.reason, unknown.reason) == ("bad_response", "unknown_user")
    assert not wrong.ok and not unknown.ok


def test_unknown_user_costs_the_same_hashing_and_comparison(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Counted at hashlib and hmac, which the verifier looks up at each call, compiled or not.
    calls: list[str] = []
    real_compare = hmac.compare_digest

    def counting(name: str) -> Callable[..., Any]:
        real = getattr(hashlib, name)

        def hash_(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return hash_

    def counting_compare(a: bytes, b: bytes) -> bool:
        calls.append(f"compare:{len(a)}")
        return real_compare(a, b)

    verifier = make_verifier()
    challenges = verifier.challenges(REALM, T0)
    answers = [
        (answer(challenges, password="guess"), stored()),
        (answer(challenges, username="mallory"), None),
        (answer(challenges, username="mallory", algorithms=("MD5",)), None),
        (answer(challenges, password="guess", algorithms=("MD5",)), stored()),
    ]
    monkeypatch.setattr(hashlib, "sha256", counting("sha256"))
    monkeypatch.setattr(hashlib, "md5", counting("md5"))
    monkeypatch.setattr(hmac, "compare_digest", counting_compare)
    traces = []
    for creds, ha1s in answers:
        calls.clear()
        result = check(verifier, creds, stored_ha1=ha1s)
        assert result.status is AuthStatus.FAILED
        traces.append(list(calls))
    # H(A2) and the response: the same two hashes whether the user exists or not.
    assert traces[0] == traces[1] == ["sha256", "sha256", "compare:64"]
    assert traces[2] == traces[3] == ["md5", "md5", "compare:32"]


def test_expired_nonce_with_right_password_is_stale() -> None:
    verifier = make_verifier()
    challenges = verifier.challenges(REALM, T0)
    creds = answer(challenges)
    result = check(verifier, creds, now=T0 + 301)
    assert (result.status, result.reason) == (AuthStatus.STALE, "stale_nonce")
    assert not result.ok
    # The retry the client makes without asking the user.
    retry = answer(verifier.challenges(REALM, T0 + 301, stale=True))
    assert check(verifier, retry, now=T0 + 302).ok


def test_expired_nonce_with_wrong_password_is_failed() -> None:
    verifier = make_verifier()
    creds = answer(verifier.challenges(REALM, T0), password="guess")
    result = check(verifier, creds, now=T0 + 301)
    assert (result.status, result.reason) == (AuthStatus.FAILED, "bad_response")


def _tamper(nonce: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(nonce))
    raw[10] ^= 0x01  # inside the signed issue time
    return base64.urlsafe_b64encode(bytes(raw)).decode()


def test_forged_nonce_is_never_accepted() -> None:
    verifier = make_verifier()
    (challenge_value, _) = verifier.challenges(REALM, T0)
    real = parse_challenge(challenge_value)
    forged_nonce = _tamper(real.nonce)
    assert verifier.nonces.check(forged_nonce, T0) is NonceStatus.INVALID
    assert verifier.nonces.issuer_of(forged_nonce) is None
    forged = DigestChallenge(realm=REALM, nonce=forged_nonce, algorithm="SHA-256", qop=("auth",))
    for password, expected in [
        (PASSWORD, (AuthStatus.STALE, "bad_nonce")),  # knows the password: just re-challenge
        ("guess", (AuthStatus.FAILED, "bad_response")),
    ]:
        value = build_authorization(
            forged, method="REGISTER", uri=URI, username=USER, password=password
        )
        result = check(verifier, parse_credentials(value))
        assert (result.status, result.reason) == expected
        assert not result.ok


def test_nonce_signed_with_another_secret_is_invalid() -> None:
    other = NonceIssuer(b"another secret, 32 bytes long..!", worker_id=0)
    mine = NonceIssuer(SECRET, worker_id=0)
    assert mine.check(other.issue(T0), T0) is NonceStatus.INVALID


@pytest.mark.parametrize(
    "nonce",
    ["", "x", "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", "A" * 52, "!" * 52, "é" * 52],
)
def test_garbage_nonces_are_invalid(nonce: str) -> None:
    issuer = NonceIssuer(SECRET)
    assert issuer.check(nonce, T0) is NonceStatus.INVALID
    assert issuer.check_nc(nonce, 1, T0) is False
    assert issuer.issuer_of(nonce) is None


def test_nonce_count_replay_is_refused() -> None:
    verifier = make_verifier()
    challenges = verifier.challenges(REALM, T0)
    first = answer(challenges, nc=1)
    assert check(verifier, first).ok
    replay = check(verifier, first, now=T0 + 2)
    assert (replay.status, replay.reason) == (AuthStatus.STALE, "replay")
    assert check(verifier, answer(challenges, nc=2)).ok
    assert check(verifier, answer(challenges, nc=2)).reason == "replay"
    assert check(verifier, answer(challenges, nc=1)).reason == "replay"
    assert check(verifier, answer(challenges, nc=7)).ok  # gaps are fine, going back is not


def test_wrong_password_does_not_burn_nonce_counts() -> None:
    # An attacker who cannot compute the digest must not be able to push the count up and
    # lock the real phone out of its nonce.
    verifier = make_verifier()
    challenges = verifier.challenges(REALM, T0)
    assert check(verifier, answer(challenges, nc=0xFFFF, password="guess")).reason == (
        "bad_response"
    )
    assert check(verifier, answer(challenges, nc=1)).ok


def test_no_qop_is_refused_unless_allowed() -> None:
    strict = make_verifier()
    lenient = make_verifier(require_qop=False)
    for verifier, expected in [(strict, "qop_missing"), (lenient, "ok")]:
        nonce = verifier.nonces.issue(T0)
        rfc2069 = DigestChallenge(realm=REALM, nonce=nonce, algorithm="MD5")
        value = build_authorization(
            rfc2069, method="REGISTER", uri=URI, username=USER, password=PASSWORD
        )
        creds = parse_credentials(value)
        assert (creds.qop, creds.nc, creds.cnonce) == (None, None, None)
        assert check(verifier, creds).reason == expected


@pytest.mark.parametrize(
    ("verifier_kwargs", "answer_kwargs", "verify_kwargs", "reason"),
    [
        ({}, {}, {"realm": "other.example.com"}, "realm_mismatch"),
        ({}, {}, {"request_uri": "sip:elsewhere.example.com"}, "uri_mismatch"),
        ({"opaque": "abc"}, {}, {}, "ok"),
        ({}, {"qop": "auth-int"}, {}, "bad_qop"),
    ],
)
def test_public_parameter_checks(
    verifier_kwargs: dict[str, Any],
    answer_kwargs: dict[str, Any],
    verify_kwargs: dict[str, Any],
    reason: str,
) -> None:
    verifier = make_verifier(**verifier_kwargs)
    challenges = verifier.challenges(REALM, T0)
    if answer_kwargs.get("qop") == "auth-int":
        challenges = [value.replace('qop="auth"', 'qop="auth-int"') for value in challenges]
    creds = answer(challenges, **answer_kwargs)
    result = check(verifier, creds, **verify_kwargs)
    assert result.reason == reason
    assert result.status is (AuthStatus.OK if reason == "ok" else AuthStatus.FAILED)


def test_opaque_must_come_back() -> None:
    verifier = make_verifier(opaque="abc")
    challenges = [
        value.replace('opaque="abc"', 'opaque="xyz"') for value in verifier.challenges(REALM, T0)
    ]
    assert check(verifier, answer(challenges)).reason == "opaque_mismatch"


def test_algorithm_not_offered_is_refused() -> None:
    verifier = make_verifier()
    nonce = verifier.nonces.issue(T0)
    for algorithm in ["MD5-sess", "SHA-256-sess"]:
        offered = DigestChallenge(realm=REALM, nonce=nonce, algorithm=algorithm, qop=("auth",))
        value = build_authorization(
            offered, method="REGISTER", uri=URI, username=USER, password=PASSWORD
        )
        assert check(verifier, parse_credentials(value)).reason == "bad_algorithm"
    unknown = parse_credentials(
        f'Digest username="{USER}", realm="{REALM}", nonce="{nonce}", uri="{URI}", '
        f'response="00", algorithm=SHA-512-256, qop=auth, nc=00000001, cnonce="c"'
    )
    assert unknown.base_algorithm is None
    result = check(verifier, unknown)
    assert (result.status, result.reason, result.algorithm) == (
        AuthStatus.FAILED,
        "bad_algorithm",
        "SHA-512-256",
    )


def test_response_compared_case_insensitively_and_non_ascii_is_just_wrong() -> None:
    verifier = make_verifier()
    challenges = verifier.challenges(REALM, T0)
    value = build_authorization(
        select_challenge(challenges) or pytest.fail("no challenge"),
        method="REGISTER",
        uri=URI,
        username=USER,
        password=PASSWORD,
    )
    creds = parse_credentials(value)
    upper = parse_credentials(value.replace(creds.response, creds.response.upper()))
    assert check(verifier, upper).ok
    weird = parse_credentials(
        value.replace(creds.response, "ü" * 64).replace("nc=00000001", "nc=00000002")
    )
    assert check(verifier, weird).reason == "bad_response"


# ------------------------------------------------------------------------------------------
# Nonces and workers


def test_nonce_shape_and_issuer() -> None:
    issuer = NonceIssuer(SECRET, worker_id=513)
    nonce = issuer.issue(T0)
    assert len(nonce) == 52
    assert set(nonce) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    # The serial part: nonces issued in the same millisecond all differ, and each is valid
    # and gets its own nonce-count record.
    same_instant = [issuer.issue(T0) for _ in range(1000)]
    assert nonce not in same_instant and len(set(same_instant)) == 1000
    assert all(issuer.check(n, T0) is NonceStatus.VALID for n in same_instant)
    assert all(issuer.check_nc(n, 1, T0) for n in same_instant)
    # Another issuer with the same secret and worker (a restarted process) differs too.
    assert NonceIssuer(SECRET, worker_id=513).issue(T0) not in same_instant
    assert issuer.issuer_of(nonce) == 513
    assert issuer.check(nonce, T0) is NonceStatus.VALID
    assert issuer.check(nonce, T0 + 299.9) is NonceStatus.VALID
    assert issuer.check(nonce, T0 + 300) is NonceStatus.STALE
    assert issuer.check(nonce, T0 - 1) is NonceStatus.STALE  # from our future


def test_each_worker_checks_nonce_counts_for_its_own_nonces() -> None:
    worker1 = make_verifier(worker_id=1)
    worker2 = make_verifier(worker_id=2)
    nonce = worker1.nonces.issue(T0)
    assert worker2.nonces.issuer_of(nonce) == 1
    assert worker2.nonces.check(nonce, T0) is NonceStatus.FOREIGN
    assert worker2.nonces.check_nc(nonce, 1, T0) is False
    creds = answer(worker1.challenges(REALM, T0))
    result = check(worker2, creds)
    assert (result.status, result.reason) == (AuthStatus.STALE, "foreign_nonce")
    assert check(worker1, creds).ok


def test_restarted_worker_does_not_trust_its_previous_nonces() -> None:
    # Same secret and worker id, but the replay table died with the old process.
    before = make_verifier(worker_id=3)
    after = make_verifier(worker_id=3)
    creds = answer(before.challenges(REALM, T0))
    assert check(before, creds).ok
    result = check(after, creds)
    assert (result.status, result.reason) == (AuthStatus.STALE, "foreign_nonce")


def test_replay_table_forgets_expired_nonces() -> None:
    issuer = NonceIssuer(SECRET, ttl=10)
    nonces = [issuer.issue(T0 + i) for i in range(5)]
    for i, nonce in enumerate(nonces):
        assert issuer.check_nc(nonce, 1, T0 + i)
    assert issuer.tracked == 5
    assert issuer.check_nc(issuer.issue(T0 + 12), 1, T0 + 12.5)
    assert issuer.tracked == 3  # the nonces issued at T0+0..T0+2 expired
    assert issuer.check_nc(nonces[4], 2, T0 + 12.5)


def test_replay_table_is_bounded_and_evicted_nonces_stay_refused() -> None:
    issuer = NonceIssuer(SECRET, ttl=300, max_tracked=3)
    nonces = [issuer.issue(T0 + i) for i in range(6)]
    for nonce in nonces[1:5]:
        assert issuer.check_nc(nonce, 1, T0 + 10)
    assert issuer.tracked == 3
    # nonces[1] was evicted as the oldest: it cannot come back as if never seen, and
    # neither can an older nonce that was never used; newer ones still work.
    assert issuer.check_nc(nonces[1], 1, T0 + 11) is False
    assert issuer.check_nc(nonces[0], 1, T0 + 11) is False
    assert issuer.check_nc(nonces[5], 1, T0 + 11)
    assert issuer.check_nc(nonces[4], 2, T0 + 11)
    assert issuer.tracked == 3


def test_nonces_issued_long_ago_check_the_same_as_recent_ones() -> None:
    # The issuer remembers the nonces it issued last, so their answers skip the MAC check;
    # a nonce that has left that memory must still be decoded and checked the same way.
    issuer = NonceIssuer(SECRET, ttl=300)
    first = issuer.issue(T0)
    later = [issuer.issue(T0 + 1) for _ in range(3 * _RECENT)]
    held = len(issuer._recent) + len(issuer._older)
    assert _RECENT <= held <= 2 * _RECENT  # bounded, and the newest are in it
    assert later[-1] in issuer._recent and first not in issuer._recent | issuer._older
    for nonce in (first, later[-1]):
        assert issuer.check(nonce, T0 + 2) is NonceStatus.VALID
        assert issuer.issuer_of(nonce) == 0
        assert issuer.check_nc(nonce, 1, T0 + 2)
        assert issuer.check_nc(nonce, 1, T0 + 2) is False
        assert issuer.check(nonce, T0 + 301) is NonceStatus.STALE
    # A forgery of a remembered nonce is not found in that memory: it is checked, and fails.
    assert issuer.check(_tamper(later[-1]), T0 + 2) is NonceStatus.INVALID
    # Another issuer (a restart) does not share the memory.
    assert NonceIssuer(SECRET, ttl=300).check(later[-1], T0 + 2) is NonceStatus.FOREIGN


def test_nonce_issuer_arguments() -> None:
    with pytest.raises(ValueError):
        NonceIssuer(b"short")
    with pytest.raises(ValueError):
        NonceIssuer(SECRET, worker_id=65536)
    with pytest.raises(ValueError):
        NonceIssuer(SECRET, ttl=0)
    with pytest.raises(ValueError):
        NonceIssuer(SECRET, max_tracked=0)
    with pytest.raises(ValueError):
        NonceIssuer(SECRET).issue(-1.0)
    with pytest.raises(ValueError):
        DigestVerifier(NonceIssuer(SECRET), algorithms=["SHA-512-256"])
    with pytest.raises(ValueError):
        DigestVerifier(NonceIssuer(SECRET), qop=["auth-conf"])
    with pytest.raises(ValueError):
        DigestVerifier(NonceIssuer(SECRET), qop=[])


# ------------------------------------------------------------------------------------------
# Client helper details


def test_build_authorization_with_stored_ha1_instead_of_password() -> None:
    challenge = DigestChallenge(realm=REALM, nonce="n", algorithm="SHA-256", qop=("auth",))
    with_password = build_authorization(
        challenge, method="INVITE", uri=URI, username=USER, password=PASSWORD, cnonce="c"
    )
    with_ha1 = build_authorization(
        challenge, method="INVITE", uri=URI, username=USER, ha1_hex=stored()["SHA-256"], cnonce="c"
    )
    assert with_password == with_ha1


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"password": "p", "ha1_hex": "00"},
        {"password": "p", "nc": 0},
        {"password": "p", "nc": 2**32},
        {"password": "p", "qop": "auth-int"},
    ],
)
def test_build_authorization_refuses_bad_arguments(kwargs: dict[str, Any]) -> None:
    challenge = DigestChallenge(realm=REALM, nonce="n", algorithm="MD5", qop=("auth",))
    with pytest.raises(ValueError):
        build_authorization(challenge, method="REGISTER", uri=URI, username=USER, **kwargs)


def test_build_authorization_refuses_unanswerable_challenge() -> None:
    challenge = DigestChallenge(realm=REALM, nonce="n", algorithm="SHA-512-256")
    assert not challenge.answerable
    with pytest.raises(ValueError):
        build_authorization(challenge, method="REGISTER", uri=URI, username=USER, password="p")


def test_authorization_quoting_follows_rfc7616() -> None:
    challenge = DigestChallenge(
        realm=REALM, nonce="n", algorithm="MD5-sess", qop=("auth",), opaque="o"
    )
    value = build_authorization(
        challenge, method="REGISTER", uri=URI, username='a"b\\c', password="p", cnonce="c", nc=10
    )
    assert value.startswith('Digest username="a\\"b\\\\c", realm="sip.example.com", nonce="n", ')
    assert ", algorithm=MD5-sess, " in value
    assert value.endswith(', cnonce="c", qop=auth, nc=0000000a, opaque="o"')
    assert parse_credentials(value).username == 'a"b\\c'


# ------------------------------------------------------------------------------------------
# Parsing


def test_parse_credentials_is_lenient_where_phones_are_sloppy() -> None:
    creds = parse_credentials(
        '  digest  USERNAME="alice" ,, Realm="r",nonce=abc/def==,uri=sip:r;transport=tcp,'
        'response="ABCDEF", algorithm=sha-256, qop="AUTH", nc="0000000A", cnonce=xyz, '
        'opaque="", x-vendor="\\"hello\\"",'
    )
    assert creds == DigestCredentials(
        username="alice",
        realm="r",
        nonce="abc/def==",
        uri="sip:r;transport=tcp",
        response="ABCDEF",
        algorithm="SHA-256",
        cnonce="xyz",
        qop="auth",
        nc=10,
        opaque="",
    )
    assert creds.params["x-vendor"] == '"hello"'
    assert creds.params["nc"] == "0000000A"


def test_parse_credentials_keeps_utf8_usernames() -> None:
    creds = parse_credentials(
        'Digest username="jürgen", realm="r", nonce="n", uri="u", response="00"'
    )
    assert creds.username == "jürgen"
    assert (creds.qop, creds.nc, creds.cnonce) == (None, None, None)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Digest",
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
        'Digest username="alice", realm="r", nonce="n", uri="u"',  # no response
        'Digest username="alice, realm="r", nonce="n", uri="u", response="0"',  # bad quoting
        'Digest username="alice" realm="r", nonce="n", uri="u", response="0"',  # no comma
        'Digest username="a", username="b", realm="r", nonce="n", uri="u", response="0"',
        'Digest username="a", realm="r", nonce="n", uri="u", response="0", qop=auth, nc=1, '
        'cnonce="c"',  # nc not 8 hex digits
        'Digest username="a", realm="r", nonce="n", uri="u", response="0", qop=auth, '
        'nc=0000000g, cnonce="c"',
        'Digest username="a", realm="r", nonce="n", uri="u", response="0", qop=auth, '
        "nc=00000001",  # qop without cnonce
        'Digest username="a\r\nVia: x", realm="r", nonce="n", uri="u", response="0"',
        'Digest username="a\x00", realm="r", nonce="n", uri="u", response="0"',
        'Digest username="\ud800", realm="r", nonce="n", uri="u", response="0"',
        'Digest, username="a", realm="r", nonce="n", uri="u", response="0"',
        'Digest username=, realm="r", nonce="n", uri="u", response="0"',
        'Digest username="a", realm="r", nonce="n", uri="u", response="0\\"',
        'Digest =x, username="a", realm="r", nonce="n", uri="u", response="0"',
    ],
)
def test_parse_credentials_refuses_malformed(value: str) -> None:
    with pytest.raises(SipParseError) as info:
        parse_credentials(value)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "value",
    ['Basic realm="x"', 'Digest nonce="n"', 'Digest realm="r"', 'Digest realm="r", nonce="n" x'],
)
def test_parse_challenge_refuses_malformed(value: str) -> None:
    with pytest.raises(SipParseError):
        parse_challenge(value)


def test_select_credentials_picks_our_realm_and_skips_other_schemes() -> None:
    ours = 'Digest username="a", realm="r1", nonce="n", uri="u", response="0"'
    theirs = 'Digest username="b", realm="r2", nonce="n", uri="u", response="0"'
    values = ["Bearer abc", theirs, ours]
    creds = select_credentials(values, "r1")
    assert creds is not None and creds.username == "a"
    assert select_credentials(values, "r3") is None
    assert select_credentials(["Digestive x=y"], "r1") is None
    with pytest.raises(SipParseError):
        select_credentials(['Digest username="a'], "r1")


# Fragments that reach the interesting corners of the grammar far more often than random text.
_FRAGMENTS = st.sampled_from(
    [
        "Digest",
        "digest ",
        " ",
        "\t",
        ",",
        "=",
        '"',
        "\\",
        "username",
        "realm",
        "nonce",
        "uri",
        "response",
        "qop",
        "auth",
        "nc",
        "00000001",
        "0000000g",
        "cnonce",
        "algorithm",
        "SHA-256",
        "MD5-sess",
        "opaque",
        "x",
        "ü",
        "\r\n",
        "\x00",
        "\ud800",
        "é",
    ]
)
_HEADERISH = st.lists(_FRAGMENTS, max_size=40).map("".join)


def _only_parse_errors(parse: Callable[[str], object], value: str) -> None:
    try:
        parse(value)
    except SipParseError as exc:
        assert exc.status == 400


@given(st.one_of(st.text(), _HEADERISH))
def test_parse_credentials_raises_nothing_but_sip_parse_error(value: str) -> None:
    _only_parse_errors(parse_credentials, value)


@given(st.one_of(st.text(), _HEADERISH))
def test_parse_challenge_raises_nothing_but_sip_parse_error(value: str) -> None:
    _only_parse_errors(parse_challenge, value)


@given(
    st.lists(
        st.sampled_from(
            [
                'username="a"',
                'realm="r"',
                'nonce="n"',
                'uri="u"',
                'response="0"',
                "qop=auth",
                "nc=00000001",
                'cnonce="c"',
                "algorithm=MD5",
                ",",
                " ",
            ]
        ),
        max_size=12,
    ).map(lambda parts: "Digest " + ", ".join(parts))
)
def test_parse_credentials_on_near_valid_lists(value: str) -> None:
    _only_parse_errors(parse_credentials, value)


_PRINTABLE = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30)


@given(username=_PRINTABLE, realm=_PRINTABLE, password=st.text(max_size=30), uri=_PRINTABLE)
def test_any_credentials_round_trip(username: str, realm: str, password: str, uri: str) -> None:
    verifier = make_verifier()
    challenges = build_challenges(realm, verifier.nonces.issue(T0))
    creds = answer(challenges, username=username, password=password, uri=uri)
    assert (creds.username, creds.realm, creds.uri) == (username, realm, uri)
    result = verifier.verify(
        creds,
        method="REGISTER",
        realm=realm,
        stored_ha1={alg: ha1(username, realm, password, alg) for alg in ALGORITHMS},
        now=T0 + 1,
        request_uri=uri,
    )
    assert result.ok
