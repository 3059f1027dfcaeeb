"""The sans-IO pieces of click-to-dial: SDP writing and restamping (RFC 3264, RFC 3725),
sipfrag status lines (RFC 3420), outcome labels, addresses given on the control socket, the
settings section."""

from __future__ import annotations

import pytest

from clicktodial import sdp
from clicktodial.job import Job, callee_reason, sipfrag_status
from clicktodial.service import parse_callee, parse_caller
from clicktodial.settings import ClickToDialSettings
from sipbill.configschema import ConfigError, load_section
from sipbill.control import ControlError

OFFER = (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
         b"m=audio 4000 RTP/AVP 96 0\r\na=rtpmap:96 opus/48000/2\r\na=fmtp:96 useinbandfec=1\r\n"
         b"a=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
         b"m=video 0 RTP/AVP 97\r\na=rtpmap:97 H264/90000\r\n")


def lines(body: bytes) -> list[str]:
    return body.decode().split("\r\n")


# ------------------------------------------------------------------------------ SDP
def test_hold_offer_points_media_nowhere() -> None:
    origin = sdp.Origin("192.0.2.9")
    body = sdp.hold_offer(origin, "sendonly")
    text = lines(body)
    assert text[0] == "v=0" and text[1] == origin.line()
    assert "c=IN IP4 0.0.0.0" in text and "a=sendonly" in text
    assert sdp.media_count(body) == 1
    assert b"a=inactive" in sdp.hold_offer(sdp.Origin("192.0.2.9"), "inactive")


def test_origin_version_moves_only_when_the_description_changes() -> None:
    origin = sdp.Origin("192.0.2.9")
    first = sdp.hold_offer(origin)
    version = origin.version
    assert sdp.hold_offer(origin) == first  # unchanged: same version (RFC 3264 §8)
    changed = origin.stamp(OFFER)
    assert origin.version == version + 1
    o_line = next(x for x in lines(changed) if x.startswith("o="))
    assert o_line == f"o=sipbill {origin.session_id} {version + 1} IN IP4 192.0.2.9"
    assert sum(x.startswith("o=") for x in lines(changed)) == 1  # the phone's o= is replaced
    assert origin.media_count == 2
    assert "IN IP6 2001:db8::1" in sdp.Origin("2001:db8::1").line()


def test_hold_answer_mirrors_every_stream_inactive() -> None:
    answer = sdp.hold_answer(OFFER, sdp.Origin("192.0.2.9"))
    text = lines(answer)
    media = [x for x in text if x.startswith("m=")]
    # One m-line per offered one, in order (RFC 3264 §6); a rejected one stays rejected.
    assert media == ["m=audio 9 RTP/AVP 96", "m=video 0 RTP/AVP 97"]
    assert "a=rtpmap:96 opus/48000/2" in text and "a=fmtp:96 useinbandfec=1" in text
    assert "a=rtpmap:0 PCMU/8000" not in text
    assert "a=inactive" in text and "c=IN IP4 0.0.0.0" in text


def test_pad_and_trim_media_lines() -> None:
    one = sdp.trim_media(OFFER, 1)
    assert sdp.media_count(one) == 1 and b"m=video" not in one and b"a=sendrecv" in one
    assert sdp.trim_media(OFFER, 5) == OFFER
    padded = sdp.pad_media(one, 3)
    assert [x for x in lines(padded) if x.startswith("m=")][1:] == ["m=audio 0 RTP/AVP 0"] * 2
    assert sdp.pad_media(OFFER, 1) == OFFER


def test_is_sdp() -> None:
    assert sdp.is_sdp("application/SDP; charset=utf-8", b"v=0")
    assert not sdp.is_sdp("application/sdp", b"")
    assert not sdp.is_sdp("message/sipfrag", b"v=0")
    assert not sdp.is_sdp(None, b"v=0")


# ------------------------------------------------------------------------------ sipfrag, outcomes
@pytest.mark.parametrize(("body", "status"), [
    (b"SIP/2.0 100 Trying\r\n", 100),
    (b"SIP/2.0 200 OK", 200),
    (b"sip/2.0 486 Busy Here\r\nContent-Length: 0\r\n", 486),
    (b"SIP/2.0 603\n", 603),
    (b"", 0),
    (b"INVITE sip:x SIP/2.0\r\n", 0),
    (b"SIP/2.0 abc", 0),
])
def test_sipfrag_status(body: bytes, status: int) -> None:
    assert sipfrag_status(body) == status


def test_callee_reasons() -> None:
    assert [callee_reason(s) for s in (486, 600, 603, 404, 480, 487, 402, 500)] == [
        "callee_busy", "callee_busy", "callee_declined", "callee_unknown",
        "callee_unavailable", "callee_no_answer", "callee_rejected", "callee_failed"]


def test_job_outcome_and_history() -> None:
    job = Job(id="j", caller="sip:1001@localhost", callee="sip:1002@localhost")
    job.set_state("calling_caller")
    job.set_state("connected")
    assert job.outcome == "connected"
    job.reason = "no_answer"
    job.set_state("failed")
    assert job.outcome == "no_answer"
    assert [h["state"] for h in job.as_dict()["history"]] == [
        "calling_caller", "connected", "failed"]


# ------------------------------------------------------------------------------ addresses
DOMAINS = ["localhost", "example.com"]
ALIASES = {"127.0.0.1": "localhost"}


@pytest.mark.parametrize(("text", "aor"), [
    ("1001", "sip:1001@localhost"),
    ("1001@example.com", "sip:1001@example.com"),
    ("sip:1001@LOCALHOST;transport=tcp", "sip:1001@localhost"),
    ("sip:1001@127.0.0.1:5060", "sip:1001@localhost"),
])
def test_caller_is_a_local_aor(text: str, aor: str) -> None:
    assert parse_caller(text, DOMAINS, ALIASES)[0] == aor


@pytest.mark.parametrize("text", ["1001@elsewhere.org", "tel:+4930123", "sip:localhost",
                                  "sip:1001@", "bad user@localhost"])
def test_caller_elsewhere_or_malformed_is_refused(text: str) -> None:
    with pytest.raises(ControlError) as info:
        parse_caller(text, DOMAINS, ALIASES)
    assert info.value.code == 400


@pytest.mark.parametrize(("text", "uri"), [
    ("1002", "sip:1002@localhost"),
    ("+4930123456", "sip:+4930123456@localhost"),
    ("bob@example.org", "sip:bob@example.org"),
    ("sip:bob@example.org;transport=tcp", "sip:bob@example.org;transport=tcp"),
    ("tel:+4930123456", "sip:+4930123456@localhost;user=phone"),
])
def test_callee_may_be_anyone(text: str, uri: str) -> None:
    assert parse_callee(text, "localhost") == uri


@pytest.mark.parametrize("text", ["sip:example.org", "two words", "mailto:x@example.org"])
def test_callee_must_name_someone(text: str) -> None:
    with pytest.raises(ControlError):
        parse_callee(text, "localhost")


# ------------------------------------------------------------------------------ settings
def test_settings_defaults_and_checks() -> None:
    s = load_section(ClickToDialSettings, {}, "clicktodial")
    assert (s.fallback_3pcc, s.ring_timeout, s.caller_id) == (True, 30.0, "callee")
    for key, value in (("ring_timeout", 0.5), ("max_jobs", 0), ("keep_finished", -1),
                       ("display_name", 'a "quoted" name')):
        with pytest.raises(ConfigError) as info:
            load_section(ClickToDialSettings, {key: value}, "clicktodial")
        assert info.value.key == f"clicktodial.{key}"
    with pytest.raises(ConfigError):
        load_section(ClickToDialSettings, {"hold_direction": "recvonly"}, "clicktodial")
