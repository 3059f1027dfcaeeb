"""SIP/SIPS/TEL URI parsing and formatting (RFC 3261 §19.1, RFC 3966)."""

from __future__ import annotations

import pytest

from sipcore import uri
from sipcore.errors import SipParseError
from sipcore.uri import SipUri, TelUri, parse_uri, split_host_port


def sip(text: str) -> SipUri:
    uri = parse_uri(text)
    assert isinstance(uri, SipUri)
    return uri


def test_full_sip_uri() -> None:
    uri = sip("sips:alice:secret@atlanta.example.com:5061;transport=tcp;lr?subject=project&x=y")
    assert uri.scheme == "sips"
    assert uri.user == "alice"
    assert uri.password == "secret"
    assert uri.host == "atlanta.example.com"
    assert uri.port == 5061
    assert uri.params == {"transport": "tcp", "lr": None}
    assert uri.headers == {"subject": "project", "x": "y"}
    assert uri.hostport == "atlanta.example.com:5061"
    assert (
        str(uri)
        == "sips:alice:secret@atlanta.example.com:5061;transport=tcp;lr?subject=project&x=y"
    )


def test_minimal_and_scheme_case() -> None:
    uri = sip("SIP:example.com")
    assert uri.scheme == "sip"
    assert uri.user is None and uri.password is None and uri.port is None
    assert str(uri) == "sip:example.com"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("sip:[2001:db8::1]", "[2001:db8::1]", None),
        ("sip:u@[2001:db8::1]:5070;lr", "[2001:db8::1]", 5070),
        ("sip:192.0.2.1:5060", "192.0.2.1", 5060),
        ("sip:u@host_with_underscore.example.com", "host_with_underscore.example.com", None),
    ],
)
def test_hosts(text: str, host: str, port: int | None) -> None:
    uri = sip(text)
    assert (uri.host, uri.port) == (host, port)


def test_percent_escapes_are_decoded_and_reencoded() -> None:
    uri = sip("sip:%61lice%20smith@example.com;m%61ddr=h%6Fst")
    assert uri.user == "alice smith"
    assert uri.params == {"maddr": "host"}
    assert str(uri) == "sip:alice%20smith@example.com;maddr=host"
    assert sip(str(uri)) == uri
    # RFC 3261 §19.1.4: escaped and unescaped forms compare equal.
    assert sip("sip:%61lice@EXAMPLE.com") == sip("sip:alice@example.com")


def test_user_part_may_hold_semicolons_and_question_marks() -> None:
    uri = sip("sip:user;par=u%40example.net@example.com")
    assert uri.user == "user;par=u@example.net"
    assert uri.params == {}
    uri = sip("sip:a?b/c@example.com?h=v")
    assert uri.user == "a?b/c"
    assert uri.headers == {"h": "v"}


def test_uri_headers_decode() -> None:
    uri = sip("sip:user@example.com?Route=%3Csip:sip.example.com%3E")
    assert uri.headers == {"Route": "<sip:sip.example.com>"}
    assert str(uri) == "sip:user@example.com?Route=%3Csip:sip.example.com%3E"


def test_non_utf8_escapes_round_trip() -> None:
    uri = sip("sip:%FF%00@example.com")
    assert str(uri) == "sip:%FF%00@example.com"


def test_aor_is_canonical() -> None:
    assert sip("sip:Alice@Example.COM:5070;transport=tcp?x=y").aor == "sip:Alice@example.com"
    assert sip("sip:%61lice@example.com").aor == "sip:alice@example.com"


def test_tel_uri() -> None:
    uri = parse_uri("tel:+1-201-555-0123;phone-context=example.com;ext=12")
    assert isinstance(uri, TelUri)
    assert uri.number == "+1-201-555-0123"
    assert uri.is_global
    assert uri.params == {"phone-context": "example.com", "ext": "12"}
    assert str(uri) == "tel:+1-201-555-0123;phone-context=example.com;ext=12"
    local = parse_uri("tel:7042;phone-context=example.com")
    assert isinstance(local, TelUri) and not local.is_global


@pytest.mark.parametrize(
    "text",
    ["http://www.example.com", "isbn:2983792873", "name:John_Smith", "soap.beep://x", "im:u@h"],
)
def test_other_schemes_are_416(text: str) -> None:
    with pytest.raises(SipParseError) as info:
        parse_uri(text)
    assert info.value.status == 416


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sip",
        ":foo",
        "1sip:host",
        "sip:",
        "sip:user@",
        "sip:host:port",
        "sip:host:99999",
        "sip:host:123456",
        "sip:ho st",
        "sip:host;",
        "sip:host;a=b;",
        "sip:host?",
        "sip:host?novalue",
        "sip:[2001:db8::1",
        "sip:[2001:db8::1]x",
        "sip:[zz]",
        "sip:%zz@host",
        "sip:us<er@host",
        "sip:host;p=a b",
        "tel:",
        "tel:12+34",
        "tel:12 34",
    ],
)
def test_malformed_are_400(text: str) -> None:
    with pytest.raises(SipParseError) as info:
        parse_uri(text)
    assert info.value.status == 400


def test_split_host_port() -> None:
    assert split_host_port("example.com") == ("example.com", None)
    assert split_host_port("example.com:5060") == ("example.com", 5060)
    assert split_host_port("[::1]:5060") == ("[::1]", 5060)
    with pytest.raises(SipParseError):
        split_host_port("[::1]5060")


def test_constructed_uri_formats() -> None:
    uri = SipUri("sip", "proxy.example.com", user="a b", params={"lr": None, "transport": "udp"})
    assert str(uri) == "sip:a%20b@proxy.example.com;lr;transport=udp"
    assert repr(uri) == "SipUri('sip:a%20b@proxy.example.com;lr;transport=udp')"
    assert hash(uri) == hash(sip(str(uri)))
    assert str(TelUri("+12015550123")) == "tel:+12015550123"


def test_parsed_uris_are_kept_for_the_next_message_within_bounds() -> None:
    # A phone's URIs come back in each of its messages: the second parse is the first
    # result (read-only by convention), not a new one.
    text = "sip:kept@example.com;transport=udp"
    assert parse_uri(text) is parse_uri(text)
    # Long texts are parsed every time (a peer's URIs must not fill memory), and the store
    # starts over when it is full.
    long_text = "sip:" + "a" * 300 + "@example.com"
    assert parse_uri(long_text) is not parse_uri(long_text)
    assert parse_uri(long_text).user == "a" * 300
    for n in range(uri._PARSED_MAX + 10):
        parse_uri(f"sip:u{n}@example.com")
    assert len(uri._PARSED) <= uri._PARSED_MAX
    # Errors are raised every time, never kept.
    for _ in range(2):
        with pytest.raises(SipParseError):
            parse_uri("sip:bad host@example.com")
