"""Sans-IO tests of the transaction layer (RFC 3261 §17, §9, RFC 6026) with a fake clock.

Messages are real bytes parsed by the real ``parse_message``; time is whatever float the test
passes as ``now``; the "wire" is ``datagrams_to_send``.
"""

from __future__ import annotations

import gc

import pytest

import sipcore
from sipcore.message import Request, Response, build_response, parse_message
from sipcore.transaction import (
    CANCEL_GUARD,
    AckReceived,
    CancelReceived,
    ClientTxKey,
    Event,
    LegacyServerTxKey,
    Overloaded,
    RequestReceived,
    ResponseReceived,
    ServerTxKey,
    StrayResponse,
    TimerSettings,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimedOut,
    TransportErrorOccurred,
    TxState,
)
from sipcore.transport_types import Peer

UAC = Peer("UDP", "192.0.2.10", 5060)
UAC_TCP = Peer("TCP", "192.0.2.10", 40123)
UAS = Peer("UDP", "198.51.100.20", 5060)
UAS_TCP = Peer("TCP", "198.51.100.20", 5060)

# Retransmission schedules with the default T1 = 0.5 s, T2 = 4 s, 64*T1 = 32 s.
TIMER_A_TIMES = [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # doubling, no cap (§17.1.1.2)
CAPPED_TIMES = [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]  # E and G, cap T2


# --------------------------------------------------------------------------- helpers


def request_bytes(
    method: str = "INVITE",
    *,
    branch: str | None = "z9hG4bK-uac-1",
    via_host: str = "192.0.2.10",
    via_port: int | None = 5060,
    transport: str = "UDP",
    uri: str = "sip:bob@example.com",
    cseq: int = 1,
    cseq_method: str | None = None,
    call_id: str = "call-1@192.0.2.10",
    from_tag: str | None = "from-1",
    to_tag: str | None = None,
    routes: tuple[str, ...] = (),
    extra_vias: tuple[str, ...] = (),
    body: bytes = b"",
) -> bytes:
    sent_by = via_host if via_port is None else f"{via_host}:{via_port}"
    via = f"SIP/2.0/{transport} {sent_by}"
    if branch is not None:
        via += f";branch={branch}"
    lines = [f"{method} {uri} SIP/2.0", f"Via: {via}"]
    lines += [f"Via: {v}" for v in extra_vias]
    lines.append("Max-Forwards: 70")
    lines += [f"Route: {r}" for r in routes]
    from_hdr = "Alice <sip:alice@example.com>"
    if from_tag is not None:
        from_hdr += f";tag={from_tag}"
    to_hdr = "Bob <sip:bob@example.com>"
    if to_tag is not None:
        to_hdr += f";tag={to_tag}"
    lines += [
        f"From: {from_hdr}",
        f"To: {to_hdr}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method or method}",
        "Contact: <sip:alice@192.0.2.10:5060>",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_request(data: bytes) -> Request:
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def make_request(method: str = "INVITE", **kwargs: object) -> Request:
    return parse_request(request_bytes(method, **kwargs))  # type: ignore[arg-type]


def parse_response(data: bytes) -> Response:
    msg = parse_message(data)
    assert isinstance(msg, Response)
    return msg


def respond(request: Request, status: int, to_tag: str | None = None) -> Response:
    """What the next hop would answer to a request we sent."""
    return parse_response(build_response(request, status, to_tag=to_tag))


def events(layer: TransactionLayer) -> list[Event]:
    out: list[Event] = []
    while (event := layer.next_event()) is not None:
        out.append(event)
    return out


def wire(layer: TransactionLayer, now: float = 0.0) -> list[tuple[bytes, Peer]]:
    return layer.datagrams_to_send(now)


def run_timers(layer: TransactionLayer, until: float) -> list[tuple[float, bytes, Peer]]:
    """Fire every timer due up to ``until`` at its exact deadline; what went out, when."""
    sent: list[tuple[float, bytes, Peer]] = []
    while (deadline := layer.get_timer()) is not None and deadline <= until:
        layer.handle_timer(deadline)
        sent.extend((deadline, data, peer) for data, peer in layer.datagrams_to_send(deadline))
    return sent


def start_server(
    layer: TransactionLayer, method: str = "INVITE", source: Peer = UAC, **kwargs: object
) -> tuple[ServerTxKey | LegacyServerTxKey, Request]:
    req = make_request(method, **kwargs)
    layer.receive_request(req, source, 0.0)
    (event,) = [e for e in events(layer) if isinstance(e, RequestReceived)]
    wire(layer)
    return event.tx_key, req


def start_client(
    layer: TransactionLayer, method: str = "INVITE", dest: Peer = UAS, **kwargs: object
) -> tuple[ClientTxKey, Request, bytes]:
    kwargs.setdefault("branch", "z9hG4bK-proxy-1")
    data = request_bytes(method, **kwargs)  # type: ignore[arg-type]
    req = parse_request(data)
    key = layer.send_request(data, req, dest, 0.0)
    assert wire(layer) == [(data, dest)]
    return key, req, data


def header_lines(data: bytes, name: str) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    prefix = name.lower() + ":"
    return [line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:]
            if line.lower().startswith(prefix)]


# --------------------------------------------------------------------------- settings


def test_timer_settings_derive_from_t1_and_t4() -> None:
    t = TimerSettings()
    assert (t.T1, t.T2, t.T4) == (0.5, 4.0, 5.0)
    assert t.TIMER_A == t.TIMER_E == t.TIMER_G == 0.5
    assert t.TIMER_B == t.TIMER_F == t.TIMER_H == t.TIMER_J == 32.0
    assert t.TIMER_L == t.TIMER_M == 32.0
    assert t.TIMER_D == 32.0
    assert t.TIMER_I == t.TIMER_K == 5.0
    fast = TimerSettings(T1=0.125, T4=1.0, timer_b=3.0)
    assert fast.TIMER_B == 3.0
    assert fast.TIMER_F == fast.TIMER_L == 8.0
    assert fast.TIMER_I == 1.0


@pytest.mark.parametrize("kwargs", [{"T1": 0.0}, {"T2": 0.1}, {"T4": -1.0}, {"timer_h": -1.0}])
def test_timer_settings_reject_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TimerSettings(**kwargs)


# --------------------------------------------------------------------------- INVITE server


def test_new_invite_reaches_tu_and_gets_100_trying() -> None:
    layer = TransactionLayer()
    req = make_request("INVITE")
    layer.receive_request(req, UAC, 0.0)
    key = ServerTxKey("z9hG4bK-uac-1", "192.0.2.10", 5060, "INVITE")
    assert events(layer) == [RequestReceived(key, req, UAC)]
    ((data, peer),) = wire(layer)
    assert peer == UAC
    trying = parse_response(data)
    assert (trying.status, trying.call_id, trying.cseq) == (100, req.call_id, req.cseq)
    assert trying.top_via.branch == "z9hG4bK-uac-1"
    assert trying.to_addr.tag is None  # §17.2.1: no To tag in the 100
    assert layer.state_of(key) is TxState.PROCEEDING


def test_auto_100_can_be_turned_off() -> None:
    layer = TransactionLayer(auto_100=False)
    layer.receive_request(make_request("INVITE"), UAC, 0.0)
    assert wire(layer) == []
    # A retransmission before any response re-sends nothing and still stays out of the TU.
    events(layer)
    layer.receive_request(make_request("INVITE"), UAC, 0.1)
    assert wire(layer) == [] and events(layer) == []
    assert layer.stats.requests_absorbed == 1


def test_invite_retransmission_resends_latest_provisional_not_the_tu() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer)
    layer.receive_request(make_request("INVITE"), UAC, 0.5)
    ((data, _),) = wire(layer)
    assert parse_response(data).status == 100
    ringing = build_response(req, 180, to_tag="uas-1")
    assert layer.send_response(key, ringing, 180, 1.0)
    assert wire(layer) == [(ringing, UAC)]
    layer.receive_request(make_request("INVITE"), UAC, 1.5)
    assert wire(layer) == [(ringing, UAC)]
    assert events(layer) == []
    assert layer.stats.requests_absorbed == 2


def test_invite_2xx_enters_accepted_and_timer_l_ends_it() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer)
    ok = build_response(req, 200, to_tag="uas-1")
    assert layer.send_response(key, ok, 200, 1.0)
    assert wire(layer) == [(ok, UAC)]
    assert layer.state_of(key) is TxState.ACCEPTED
    # RFC 6026 §8.7: retransmitted INVITEs are absorbed without an answer...
    layer.receive_request(make_request("INVITE"), UAC, 2.0)
    assert wire(layer) == [] and events(layer) == []
    # ...the TU may pass more 2xx (a proxy relays each one from downstream)...
    assert layer.send_response(key, ok, 200, 3.0)
    assert wire(layer) == [(ok, UAC)]
    # ...but nothing else after a 2xx.
    assert not layer.send_response(key, build_response(req, 486, to_tag="x"), 486, 3.0)
    assert not layer.send_response(key, build_response(req, 180, to_tag="x"), 180, 3.0)
    assert wire(layer) == []
    assert layer.get_timer() == 33.0  # Timer L = 64*T1 from the first 2xx
    run_timers(layer, 32.9)
    assert layer.state_of(key) is TxState.ACCEPTED
    run_timers(layer, 33.0)
    assert events(layer) == [TransactionTerminated(key)]
    assert layer.state_of(key) is None
    assert layer.transaction_count == 0
    assert layer.get_timer() is None


def test_invite_non_2xx_timer_g_retransmits_capped_at_t2_until_timer_h() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer)
    busy = build_response(req, 486, to_tag="uas-1")
    layer.send_response(key, busy, 486, 0.0)
    assert wire(layer) == [(busy, UAC)]
    assert layer.state_of(key) is TxState.COMPLETED
    sent = run_timers(layer, 40.0)
    assert [t for t, _, _ in sent] == CAPPED_TIMES
    assert all(data == busy and peer == UAC for _, data, peer in sent)
    assert events(layer) == [TransactionTimedOut(key, "H"), TransactionTerminated(key)]
    assert layer.stats.retransmissions_sent == len(CAPPED_TIMES)
    assert layer.stats.timeouts == 1
    assert layer.transaction_count == 0


def test_invite_retransmission_in_completed_resends_the_final() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer)
    busy = build_response(req, 486, to_tag="uas-1")
    layer.send_response(key, busy, 486, 0.0)
    wire(layer)
    layer.receive_request(make_request("INVITE"), UAC, 0.2)
    assert wire(layer) == [(busy, UAC)]
    assert events(layer) == []


def ack_for(req: Request, response: bytes, **kwargs: object) -> Request:
    """The ACK a UAC sends for a non-2xx final to ``req`` (same branch, response's To tag)."""
    to_tag = parse_response(response).to_addr.tag
    return make_request("ACK", to_tag=to_tag, cseq=req.cseq.number, **kwargs)


def test_ack_for_non_2xx_is_absorbed_and_timer_i_ends_the_transaction() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer)
    busy = build_response(req, 486, to_tag="uas-1")
    layer.send_response(key, busy, 486, 0.0)
    wire(layer)
    sent = run_timers(layer, 1.0)  # Timer G once, at 0.5
    assert [t for t, _, _ in sent] == [0.5]
    layer.receive_request(ack_for(req, busy), UAC, 1.2)
    assert layer.state_of(key) is TxState.CONFIRMED
    assert events(layer) == [] and wire(layer) == []
    # Confirmed: G and H are gone; ACK and INVITE retransmissions are absorbed silently.
    layer.receive_request(ack_for(req, busy), UAC, 2.0)
    layer.receive_request(make_request("INVITE"), UAC, 2.5)
    assert events(layer) == [] and wire(layer) == []
    assert layer.stats.acks_absorbed == 2
    assert layer.get_timer() == 6.2  # Timer I = T4 after the ACK
    assert run_timers(layer, 6.2) == []
    assert events(layer) == [TransactionTerminated(key)]


def test_reliable_invite_server_no_timer_g_and_ack_terminates_at_once() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer, source=UAC_TCP, transport="TCP")
    busy = build_response(req, 486, to_tag="uas-1")
    layer.send_response(key, busy, 486, 0.0)
    assert wire(layer) == [(busy, UAC_TCP)]
    assert layer.get_timer() == 32.0  # only Timer H: the ACK can still fail to come
    layer.receive_request(ack_for(req, busy, transport="TCP"), UAC_TCP, 0.1)
    assert events(layer) == [TransactionTerminated(key)]  # Timer I is zero
    assert layer.get_timer() is None


def test_reliable_invite_server_still_times_out_on_timer_h() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer, source=UAC_TCP, transport="TCP")
    layer.send_response(key, build_response(req, 404, to_tag="t"), 404, 0.0)
    wire(layer)
    assert run_timers(layer, 100.0) == []
    assert events(layer) == [TransactionTimedOut(key, "H"), TransactionTerminated(key)]


def test_ack_for_2xx_matches_nothing_and_goes_to_the_tu() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer)
    layer.send_response(key, build_response(req, 200, to_tag="uas-1"), 200, 0.0)
    wire(layer)
    ack = make_request("ACK", branch="z9hG4bK-uac-ack", to_tag="uas-1")
    layer.receive_request(ack, UAC, 0.1)
    assert events(layer) == [AckReceived(ack, UAC)]
    assert layer.state_of(key) is TxState.ACCEPTED


def test_ack_reusing_the_invite_branch_in_accepted_still_reaches_the_tu() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer)
    layer.send_response(key, build_response(req, 200, to_tag="uas-1"), 200, 0.0)
    ack = make_request("ACK", to_tag="uas-1")
    layer.receive_request(ack, UAC, 0.1)
    assert events(layer) == [AckReceived(ack, UAC)]


# --------------------------------------------------------------------------- non-INVITE server


def test_non_invite_server_trying_absorbs_retransmissions_silently() -> None:
    layer = TransactionLayer()
    key, _ = start_server(layer, "OPTIONS")
    assert key == ServerTxKey("z9hG4bK-uac-1", "192.0.2.10", 5060, "OPTIONS")
    assert layer.state_of(key) is TxState.TRYING
    layer.receive_request(make_request("OPTIONS"), UAC, 0.5)
    assert wire(layer) == [] and events(layer) == []
    assert layer.stats.requests_absorbed == 1


def test_a_lingering_server_transaction_leaves_the_collector_only_itself() -> None:
    # Thousands of answered requests linger for Timer J: their key and timer entry are plain
    # tuples the garbage collector stops tracking, so its collections walk one object each.
    layer = TransactionLayer()
    key, req = start_server(layer, "OPTIONS")
    layer.send_response(key, build_response(req, 200, to_tag="t"), 200, 0.0)
    assert layer.state_of(key) is TxState.COMPLETED
    # A collection untracks a tuple whose items are untracked by then, and compiled code (see
    # sipcore/__init__.py) may list the entry before its key: so after the second one.
    gc.collect()
    gc.collect()
    tx = layer._txs[key]
    (entry,) = [e for e in layer._heap if e[2] is tx.key]
    assert not gc.is_tracked(tx.key) and not gc.is_tracked(entry)
    assert tx.key == ServerTxKey("z9hG4bK-uac-1", "192.0.2.10", 5060, "OPTIONS")


def test_non_invite_server_resends_last_response_and_timer_j_ends_it() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer, "REGISTER")
    trying = build_response(req, 100)
    layer.send_response(key, trying, 100, 0.1)
    assert layer.state_of(key) is TxState.PROCEEDING
    assert wire(layer) == [(trying, UAC)]
    layer.receive_request(make_request("REGISTER"), UAC, 0.5)
    assert wire(layer) == [(trying, UAC)]
    ok = build_response(req, 200, to_tag="reg-1")
    assert layer.send_response(key, ok, 200, 1.0)
    assert layer.state_of(key) is TxState.COMPLETED
    assert wire(layer) == [(ok, UAC)]
    layer.receive_request(make_request("REGISTER"), UAC, 1.5)
    assert wire(layer) == [(ok, UAC)]
    assert not layer.send_response(key, build_response(req, 500, to_tag="x"), 500, 2.0)
    assert events(layer) == []
    assert layer.get_timer() == 33.0  # Timer J = 64*T1
    assert run_timers(layer, 33.0) == []  # J never retransmits
    assert events(layer) == [TransactionTerminated(key)]
    assert layer.server_transaction_count == 0


def test_reliable_non_invite_server_terminates_on_the_final() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer, "OPTIONS", source=UAC_TCP, transport="TCP")
    ok = build_response(req, 200, to_tag="t")
    layer.send_response(key, ok, 200, 0.0)
    assert wire(layer) == [(ok, UAC_TCP)]
    assert events(layer) == [TransactionTerminated(key)]  # Timer J is zero
    assert layer.get_timer() is None


def test_send_response_to_unknown_transaction_or_bad_status() -> None:
    layer = TransactionLayer()
    gone = ServerTxKey("z9hG4bK-gone", "h", 5060, "INVITE")
    assert not layer.send_response(gone, b"x", 200, 0.0)
    key, req = start_server(layer, "OPTIONS")
    with pytest.raises(ValueError):
        layer.send_response(key, build_response(req, 200), 700, 0.0)


# --------------------------------------------------------------------------- server matching


def test_matching_uses_branch_sent_by_and_method() -> None:
    layer = TransactionLayer(auto_100=False)
    layer.receive_request(make_request("INVITE"), UAC, 0.0)
    # Same branch from another sent-by (port, then host) is another transaction (§17.2.3).
    layer.receive_request(make_request("INVITE", via_port=5070), UAC, 0.0)
    layer.receive_request(make_request("INVITE", via_host="192.0.2.99"), UAC, 0.0)
    # Same branch and sent-by but another method (not ACK/CANCEL) too.
    layer.receive_request(make_request("OPTIONS"), UAC, 0.0)
    assert [type(e) for e in events(layer)] == [RequestReceived] * 4
    assert layer.server_transaction_count == 4
    # sent-by hosts compare case-insensitively.
    layer.receive_request(make_request("INVITE", via_host="Proxy.Example.COM"), UAC, 0.0)
    layer.receive_request(make_request("INVITE", via_host="proxy.example.com"), UAC, 0.1)
    assert len(events(layer)) == 1
    assert layer.stats.requests_absorbed == 1


def test_cancel_is_its_own_transaction_and_names_the_invite() -> None:
    layer = TransactionLayer()
    invite_key, _ = start_server(layer)
    cancel = make_request("CANCEL")
    layer.receive_request(cancel, UAC, 1.0)
    cancel_key = ServerTxKey("z9hG4bK-uac-1", "192.0.2.10", 5060, "CANCEL")
    assert events(layer) == [CancelReceived(cancel_key, cancel, invite_key, UAC)]
    assert wire(layer) == []  # no 100 Trying for CANCEL
    ok = build_response(cancel, 200, to_tag="t")
    layer.send_response(cancel_key, ok, 200, 1.1)
    assert wire(layer) == [(ok, UAC)]
    # A retransmitted CANCEL gets the 200 again and is not a second CancelReceived.
    layer.receive_request(make_request("CANCEL"), UAC, 1.5)
    assert wire(layer) == [(ok, UAC)] and events(layer) == []
    assert layer.state_of(invite_key) is TxState.PROCEEDING


def test_cancel_without_invite_transaction_has_no_target() -> None:
    layer = TransactionLayer()
    cancel = make_request("CANCEL", branch="z9hG4bK-nothing")
    layer.receive_request(cancel, UAC, 0.0)
    (event,) = events(layer)
    assert isinstance(event, CancelReceived) and event.invite_tx_key is None
    # A CANCEL from another sent-by does not target our INVITE either.
    start_server(layer)
    layer.receive_request(make_request("CANCEL", via_port=5070), UAC, 0.0)
    (event,) = events(layer)
    assert isinstance(event, CancelReceived) and event.invite_tx_key is None


# --------------------------------------------------------------------------- RFC 2543 fallback


# A bare cookie is no unique branch either (RFC 4475 §3.2.1).
@pytest.mark.parametrize("branch", [None, "1234-old-style", "z9hG4bK"])
def test_rfc2543_requests_match_on_the_legacy_key(branch: str | None) -> None:
    layer = TransactionLayer()
    key, req = start_server(layer, branch=branch)
    assert isinstance(key, LegacyServerTxKey)
    assert (key.request_uri, key.to_tag, key.from_tag, key.call_id, key.cseq_number,
            key.method) == ("sip:bob@example.com", None, "from-1", req.call_id, 1, "INVITE")
    # A retransmission matches and re-sends the 100.
    layer.receive_request(make_request("INVITE", branch=branch), UAC, 0.5)
    ((data, _),) = wire(layer)
    assert parse_response(data).status == 100
    assert events(layer) == []
    # Any of Request-URI, From tag, Call-ID, CSeq or top Via differing: a new transaction.
    variants: list[dict[str, object]] = [
        {"uri": "sip:carol@example.com"}, {"from_tag": "other"}, {"call_id": "c2"},
        {"cseq": 2}, {"via_port": 5080},
    ]
    for change in variants:
        layer.receive_request(make_request("INVITE", branch=branch, **change), UAC, 1.0)
    assert [type(e) for e in events(layer)] == [RequestReceived] * len(variants)


def test_rfc2543_ack_matches_with_the_response_to_tag_only() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer, branch=None)
    busy = build_response(req, 486, to_tag="uas-1")
    layer.send_response(key, busy, 486, 0.0)
    wire(layer)
    stranger = make_request("ACK", branch=None, to_tag="someone-else")
    layer.receive_request(stranger, UAC, 0.1)
    assert events(layer) == [AckReceived(stranger, UAC)]
    assert layer.state_of(key) is TxState.COMPLETED
    layer.receive_request(make_request("ACK", branch=None, to_tag="uas-1"), UAC, 0.2)
    assert events(layer) == [] and layer.state_of(key) is TxState.CONFIRMED


def test_rfc2543_cancel_targets_the_invite_and_2xx_ack_reaches_the_tu() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer, branch=None)
    cancel = make_request("CANCEL", branch=None)
    layer.receive_request(cancel, UAC, 0.1)
    (event,) = events(layer)
    assert isinstance(event, CancelReceived)
    assert event.invite_tx_key == key
    assert isinstance(event.tx_key, LegacyServerTxKey) and event.tx_key.method == "CANCEL"
    layer.send_response(key, build_response(req, 200, to_tag="uas-1"), 200, 0.2)
    ack = make_request("ACK", branch=None, to_tag="uas-1")
    layer.receive_request(ack, UAC, 0.3)
    assert events(layer) == [AckReceived(ack, UAC)]


# --------------------------------------------------------------------------- INVITE client


def test_timer_a_doubles_without_cap_until_timer_b() -> None:
    layer = TransactionLayer()
    key, _, data = start_client(layer)
    assert key == ClientTxKey("z9hG4bK-proxy-1", "INVITE")
    assert layer.state_of(key) is TxState.CALLING
    sent = run_timers(layer, 100.0)
    assert [t for t, _, _ in sent] == TIMER_A_TIMES
    assert all(d == data and p == UAS for _, d, p in sent)
    assert events(layer) == [TransactionTimedOut(key, "B"), TransactionTerminated(key)]
    assert layer.stats.timeouts == 1
    assert layer.transaction_count == 0


def test_reliable_invite_client_never_retransmits_but_times_out() -> None:
    layer = TransactionLayer()
    key, _, _ = start_client(layer, dest=UAS_TCP, transport="TCP")
    assert layer.get_timer() == 32.0
    assert run_timers(layer, 100.0) == []
    assert events(layer) == [TransactionTimedOut(key, "B"), TransactionTerminated(key)]


def test_provisional_stops_timer_a_and_timer_b() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer)
    run_timers(layer, 0.5)
    trying = respond(req, 100)
    layer.receive_response(trying, UAS, 0.7)
    assert events(layer) == [ResponseReceived(key, trying, UAS)]
    assert layer.state_of(key) is TxState.PROCEEDING
    # Proceeding waits for the final as long as it takes: the proxy's Timer C rules now.
    assert layer.get_timer() is None
    ringing = respond(req, 180, "uas-1")
    layer.receive_response(ringing, UAS, 5.0)
    assert events(layer) == [ResponseReceived(key, ringing, UAS)]


def test_2xx_enters_accepted_and_every_2xx_reaches_the_tu_until_timer_m() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer)
    ok1 = respond(req, 200, "fork-1")
    layer.receive_response(ok1, UAS, 1.0)
    assert layer.state_of(key) is TxState.ACCEPTED
    assert wire(layer) == []  # the ACK for a 2xx is the TU's (§13.2.2.4)
    ok2 = respond(req, 200, "fork-2")
    layer.receive_response(ok2, UAS, 2.0)
    layer.receive_response(ok1, UAS, 2.5)  # a retransmission
    assert events(layer) == [ResponseReceived(key, r, UAS) for r in (ok1, ok2, ok1)]
    # A late non-2xx or provisional is absorbed.
    layer.receive_response(respond(req, 486, "fork-3"), UAS, 3.0)
    layer.receive_response(respond(req, 180, "fork-3"), UAS, 3.0)
    assert events(layer) == [] and wire(layer) == []
    assert layer.stats.responses_absorbed == 2
    assert layer.get_timer() == 33.0  # Timer M = 64*T1 from the first 2xx
    run_timers(layer, 33.0)
    assert events(layer) == [TransactionTerminated(key)]
    # After Timer M a 2xx is stray.
    layer.receive_response(ok2, UAS, 34.0)
    assert events(layer) == [StrayResponse(ok2, UAS)]


def test_ack_for_non_2xx_is_built_per_17_1_1_3() -> None:
    layer = TransactionLayer()
    routes = ("<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>")
    key, req, _ = start_client(
        layer, uri="sip:bob@198.51.100.20", cseq=7, routes=routes,
        extra_vias=("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-uac-1",),
    )
    busy = respond(req, 486, "uas-1")
    layer.receive_response(busy, UAS, 1.0)
    assert events(layer) == [ResponseReceived(key, busy, UAS)]
    assert layer.state_of(key) is TxState.COMPLETED
    ((data, peer),) = wire(layer)
    assert peer == UAS
    ack = parse_request(data)
    assert ack.method == "ACK"
    assert ack.uri == "sip:bob@198.51.100.20"
    assert header_lines(data, "Via") == [req.header_values("Via")[0]]  # one Via, the top one
    assert ack.top_via.branch == "z9hG4bK-proxy-1"
    assert ack.header("From") == req.header("From")
    assert ack.from_addr.tag == "from-1"
    assert ack.header("To") == busy.header("To")
    assert ack.to_addr.tag == "uas-1"
    assert ack.call_id == req.call_id
    assert (ack.cseq.number, ack.cseq.method) == (7, "ACK")
    assert header_lines(data, "Route") == list(routes)
    assert ack.body == b""


def test_retransmitted_final_resends_the_ack_until_timer_d() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer)
    busy = respond(req, 486, "uas-1")
    layer.receive_response(busy, UAS, 1.0)
    ((ack, _),) = wire(layer)
    events(layer)
    layer.receive_response(busy, UAS, 2.0)
    assert wire(layer) == [(ack, UAS)]
    assert events(layer) == []  # §17.1.1.2: not passed up again
    assert layer.stats.responses_absorbed == 1
    assert layer.get_timer() == 33.0  # Timer D: 32 s, not tied to T1
    run_timers(layer, 33.0)
    assert events(layer) == [TransactionTerminated(key)]


def test_reliable_non_2xx_sends_ack_and_terminates_at_once() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer, dest=UAS_TCP, transport="TCP")
    busy = respond(req, 603, "uas-1")
    layer.receive_response(busy, UAS_TCP, 1.0)
    ((ack, peer),) = wire(layer)
    assert peer == UAS_TCP and parse_request(ack).method == "ACK"
    assert events(layer) == [ResponseReceived(key, busy, UAS_TCP), TransactionTerminated(key)]
    assert layer.get_timer() is None


def test_timer_d_is_configurable() -> None:
    layer = TransactionLayer(TimerSettings(timer_d=40.0))
    _, req, _ = start_client(layer)
    layer.receive_response(respond(req, 404, "t"), UAS, 0.0)
    assert layer.get_timer() == 40.0


def test_stray_responses_are_reported_not_forwarded() -> None:
    layer = TransactionLayer()
    start_client(layer)
    unknown = parse_response(build_response(make_request("INVITE", branch="z9hG4bK-x"), 200,
                                            to_tag="t"))
    layer.receive_response(unknown, UAS, 0.1)
    # Same branch but another CSeq method (§17.1.3) matches nothing either.
    wrong_method = parse_response(
        build_response(make_request("OPTIONS", branch="z9hG4bK-proxy-1"), 200, to_tag="t"))
    layer.receive_response(wrong_method, UAS, 0.1)
    assert events(layer) == [StrayResponse(unknown, UAS), StrayResponse(wrong_method, UAS)]
    assert wire(layer) == []
    assert layer.stats.stray_responses == 2


def test_send_request_refuses_ack_duplicates_and_missing_branch() -> None:
    layer = TransactionLayer()
    ack_data = request_bytes("ACK", branch="z9hG4bK-a")
    with pytest.raises(ValueError):
        layer.send_request(ack_data, parse_request(ack_data), UAS, 0.0)
    start_client(layer)
    dup = request_bytes("INVITE", branch="z9hG4bK-proxy-1")
    with pytest.raises(ValueError):
        layer.send_request(dup, parse_request(dup), UAS, 0.0)
    nobranch = request_bytes("OPTIONS", branch=None)
    with pytest.raises(ValueError):
        layer.send_request(nobranch, parse_request(nobranch), UAS, 0.0)


# --------------------------------------------------------------------------- non-INVITE client


def test_timer_e_caps_at_t2_until_timer_f() -> None:
    layer = TransactionLayer()
    key, _, data = start_client(layer, "OPTIONS")
    assert layer.state_of(key) is TxState.TRYING
    sent = run_timers(layer, 100.0)
    assert [t for t, _, _ in sent] == CAPPED_TIMES
    assert all(d == data and p == UAS for _, d, p in sent)
    assert events(layer) == [TransactionTimedOut(key, "F"), TransactionTerminated(key)]


def test_timer_e_in_proceeding_retransmits_every_t2() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer, "BYE")
    run_timers(layer, 0.5)  # first retransmission at 0.5, next due at 1.5
    trying = respond(req, 100)
    layer.receive_response(trying, UAS, 0.7)
    assert layer.state_of(key) is TxState.PROCEEDING
    assert events(layer) == [ResponseReceived(key, trying, UAS)]
    sent = run_timers(layer, 100.0)
    assert [t for t, _, _ in sent] == [1.5, 5.5, 9.5, 13.5, 17.5, 21.5, 25.5, 29.5]
    assert events(layer) == [TransactionTimedOut(key, "F"), TransactionTerminated(key)]


def test_non_invite_final_completes_and_timer_k_absorbs_retransmissions() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer, "REGISTER")
    ok = respond(req, 200, "t")
    layer.receive_response(ok, UAS, 1.0)
    assert layer.state_of(key) is TxState.COMPLETED
    assert events(layer) == [ResponseReceived(key, ok, UAS)]
    layer.receive_response(ok, UAS, 2.0)
    assert events(layer) == [] and wire(layer) == []
    assert layer.stats.responses_absorbed == 1
    assert layer.get_timer() == 6.0  # Timer K = T4, no more E or F
    assert run_timers(layer, 6.0) == []
    assert events(layer) == [TransactionTerminated(key)]


def test_reliable_non_invite_client_no_timer_e_and_no_timer_k() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer, "OPTIONS", dest=UAS_TCP, transport="TCP")
    assert layer.get_timer() == 32.0  # Timer F only
    ok = respond(req, 200, "t")
    layer.receive_response(ok, UAS_TCP, 1.0)
    assert events(layer) == [ResponseReceived(key, ok, UAS_TCP), TransactionTerminated(key)]
    assert layer.get_timer() is None


# --------------------------------------------------------------------------- CANCEL (client)


def test_cancel_waits_for_a_provisional_then_is_built_per_9_1() -> None:
    layer = TransactionLayer()
    routes = ("<sip:p1.example.com;lr>",)
    key, req, _ = start_client(layer, cseq=3, routes=routes)
    cancel_key = layer.cancel(key, 0.2)
    assert cancel_key == ClientTxKey("z9hG4bK-proxy-1", "CANCEL")
    assert wire(layer) == []  # §9.1: no CANCEL before a provisional
    assert layer.state_of(cancel_key) is None
    layer.receive_response(respond(req, 180, "uas-1"), UAS, 0.3)
    ((data, peer),) = wire(layer)
    assert peer == UAS
    cancel = parse_request(data)
    assert cancel.method == "CANCEL"
    assert cancel.uri == req.uri
    assert header_lines(data, "Via") == [req.header_values("Via")[0]]
    assert cancel.header("From") == req.header("From")
    assert cancel.header("To") == req.header("To")  # the INVITE's To: no tag
    assert cancel.to_addr.tag is None
    assert cancel.call_id == req.call_id
    assert (cancel.cseq.number, cancel.cseq.method) == (3, "CANCEL")
    assert header_lines(data, "Route") == list(routes)
    # The CANCEL is a non-INVITE client transaction of its own (Timer E to the same place).
    assert layer.state_of(cancel_key) is TxState.TRYING
    assert [(t, d) for t, d, _ in run_timers(layer, 0.8)] == [(0.8, data)]
    events(layer)
    ok = respond(cancel, 200, "uas-1")
    layer.receive_response(ok, UAS, 1.0)
    terminated = respond(req, 487, "uas-1")
    layer.receive_response(terminated, UAS, 1.1)
    assert events(layer) == [ResponseReceived(cancel_key, ok, UAS),
                             ResponseReceived(key, terminated, UAS)]


def test_cancel_after_a_provisional_goes_out_at_once_and_only_once() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer)
    layer.receive_response(respond(req, 100), UAS, 0.1)
    cancel_key = layer.cancel(key, 0.2)
    ((data, _),) = wire(layer)
    assert parse_request(data).method == "CANCEL"
    assert layer.cancel(key, 0.3) == cancel_key
    assert wire(layer) == []


def test_no_cancel_when_a_final_arrives_first() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer)
    layer.cancel(key, 0.1)
    layer.receive_response(respond(req, 200, "uas-1"), UAS, 0.2)
    layer.receive_response(respond(req, 180, "uas-2"), UAS, 0.3)
    assert wire(layer) == []
    assert layer.cancel(key, 0.4) is None  # nothing left to cancel
    key2, req2, _ = start_client(layer, branch="z9hG4bK-proxy-2")
    layer.cancel(key2, 0.1)
    layer.receive_response(respond(req2, 486, "uas-3"), UAS, 0.2)
    ((ack, _),) = wire(layer)
    assert parse_request(ack).method == "ACK"


def test_cancel_guard_times_out_an_invite_that_never_ends() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer)
    layer.receive_response(respond(req, 180, "uas-1"), UAS, 1.0)
    cancel_key = layer.cancel(key, 10.0)
    assert cancel_key is not None
    layer.receive_response(respond(parse_request(wire(layer)[0][0]), 200, "uas-1"), UAS, 10.1)
    events(layer)
    run_timers(layer, 42.0)
    assert events(layer) == [TransactionTerminated(cancel_key),  # Timer K at 15.1
                             TransactionTimedOut(key, CANCEL_GUARD), TransactionTerminated(key)]


def test_cancel_rejects_non_invite_and_ignores_unknown() -> None:
    layer = TransactionLayer()
    key, _, _ = start_client(layer, "OPTIONS")
    with pytest.raises(ValueError):
        layer.cancel(key, 0.0)
    assert layer.cancel(ClientTxKey("z9hG4bK-gone", "INVITE"), 0.0) is None


# --------------------------------------------------------------------------- transport errors


def test_transport_error_for_a_destination_ends_its_transactions() -> None:
    layer = TransactionLayer()
    elsewhere = Peer("UDP", "203.0.113.5", 5060)
    k1, _, _ = start_client(layer, "INVITE", branch="z9hG4bK-a")
    k2, _, _ = start_client(layer, "OPTIONS", branch="z9hG4bK-b")
    k3, _, _ = start_client(layer, "OPTIONS", dest=elsewhere, branch="z9hG4bK-c")
    layer.transport_error(UAS, 1.0)
    assert events(layer) == [TransportErrorOccurred(k1), TransactionTerminated(k1),
                             TransportErrorOccurred(k2), TransactionTerminated(k2)]
    assert layer.state_of(k3) is TxState.TRYING
    assert layer.stats.transport_errors == 2
    sent = run_timers(layer, 0.5)
    assert [p for _, _, p in sent] == [elsewhere]  # nothing more for the failed ones


def test_transport_error_reported_for_one_server_transaction() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer, source=UAC_TCP, transport="TCP")
    assert layer.report_transport_error(key, 0.5)
    assert events(layer) == [TransportErrorOccurred(key), TransactionTerminated(key)]
    assert not layer.send_response(key, build_response(req, 180, to_tag="t"), 180, 0.6)
    assert not layer.report_transport_error(key, 0.7)
    assert layer.server_transaction_count == 0


# --------------------------------------------------------------------------- overload


def test_server_transaction_cap_answers_new_requests_with_stateless_503() -> None:
    layer = TransactionLayer(max_server_transactions=1, overload_retry_after=7)
    key, req = start_server(layer)
    second = make_request("INVITE", branch="z9hG4bK-uac-2", call_id="c2")
    layer.receive_request(second, UAC, 1.0)
    assert events(layer) == [Overloaded(second, UAC)]
    ((data, peer),) = wire(layer)
    assert peer == UAC
    reply = parse_response(data)
    assert reply.status == 503 and reply.header("Retry-After") == "7"
    assert reply.to_addr.tag  # a final response from us carries a To tag (§8.2.6.2)
    assert layer.server_transaction_count == 1
    assert layer.stats.overload_rejections == 1
    # The retransmission gets the same answer (same tag) and the ACK for it is absorbed.
    layer.receive_request(make_request("INVITE", branch="z9hG4bK-uac-2", call_id="c2"), UAC, 1.5)
    ((again, _),) = wire(layer)
    assert again == data
    events(layer)
    layer.receive_request(make_request("ACK", branch="z9hG4bK-uac-2", call_id="c2",
                                       to_tag=reply.to_addr.tag), UAC, 1.6)
    assert events(layer) == [] and layer.stats.acks_absorbed == 1
    # A CANCEL for the live INVITE is still taken: it sheds load.
    layer.receive_request(make_request("CANCEL"), UAC, 2.0)
    (event,) = events(layer)
    assert isinstance(event, CancelReceived) and event.invite_tx_key == key
    # Once transactions end, new requests get in again.
    layer.send_response(key, build_response(req, 487, to_tag="t"), 487, 3.0)
    layer.report_transport_error(key, 3.0)
    layer.report_transport_error(event.tx_key, 3.0)
    events(layer)
    layer.receive_request(make_request("OPTIONS", branch="z9hG4bK-uac-3"), UAC, 4.0)
    assert [type(e) for e in events(layer)] == [RequestReceived]


def test_at_the_cap_the_oldest_lingering_transaction_makes_room() -> None:
    """Answered transactions that only absorb retransmissions (Timer J, I) give way to new
    requests, oldest first; transactions still at work are never ended for that."""
    layer = TransactionLayer(max_server_transactions=3)
    k1, r1 = start_server(layer, "REGISTER", branch="z9hG4bK-l1", call_id="l1")
    k2, r2 = start_server(layer, "REGISTER", branch="z9hG4bK-l2", call_id="l2")
    k3, _ = start_server(layer, "REGISTER", branch="z9hG4bK-l3", call_id="l3")  # no answer yet
    layer.send_response(k1, build_response(r1, 200, to_tag="t"), 200, 0.1)
    layer.send_response(k2, build_response(r2, 200, to_tag="t"), 200, 0.2)
    events(layer)
    wire(layer)

    layer.receive_request(make_request("REGISTER", branch="z9hG4bK-l4", call_id="l4"), UAC, 1.0)
    assert [type(e) for e in events(layer)] == [TransactionTerminated, RequestReceived]
    assert layer.state_of(k1) is None  # the oldest answered one went
    assert layer.state_of(k2) is TxState.COMPLETED
    assert layer.stats.lingering_evicted == 1 and layer.stats.overload_rejections == 0
    # A retransmission for the evicted one is a new request now; the other is still absorbed.
    layer.receive_request(make_request("REGISTER", branch="z9hG4bK-l2", call_id="l2"), UAC, 1.1)
    assert events(layer) == [] and len(wire(layer)) == 1

    layer.receive_request(make_request("REGISTER", branch="z9hG4bK-l5", call_id="l5"), UAC, 1.2)
    assert layer.state_of(k2) is None and layer.stats.lingering_evicted == 2
    events(layer)
    wire(layer)
    # Now all three are at work (l3, l4, l5 unanswered): the next one gets the 503.
    layer.receive_request(make_request("REGISTER", branch="z9hG4bK-l6", call_id="l6"), UAC, 1.3)
    assert [type(e) for e in events(layer)] == [Overloaded]
    assert parse_response(wire(layer)[0][0]).status == 503
    assert layer.state_of(k3) is TxState.TRYING
    assert layer.stats.overload_rejections == 1


def test_a_stateless_final_response_ends_a_non_invite_transaction_at_once() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer, "REGISTER", branch="z9hG4bK-sl", call_id="sl")
    challenge = build_response(req, 401, to_tag="t")
    assert layer.send_response(key, challenge, 401, 0.1, linger=False)
    assert [data for data, _ in wire(layer)] == [challenge]
    assert events(layer) == [TransactionTerminated(key)]
    assert layer.state_of(key) is None and layer.server_transaction_count == 0
    assert layer.get_timer() is None  # no Timer J armed
    # A retransmission is a new request and gets a new answer from the TU.
    layer.receive_request(make_request("REGISTER", branch="z9hG4bK-sl", call_id="sl"), UAC, 0.5)
    assert [type(e) for e in events(layer)] == [RequestReceived]


def test_an_invite_transaction_keeps_its_state_even_when_asked_not_to() -> None:
    layer = TransactionLayer()
    key, req = start_server(layer, "INVITE", branch="z9hG4bK-sl-inv", call_id="sl-inv")
    assert layer.send_response(key, build_response(req, 407, to_tag="t"), 407, 0.1,
                               linger=False)
    assert layer.state_of(key) is TxState.COMPLETED  # its ACK must still be matched


def test_lingering_transactions_that_ended_are_not_held() -> None:
    layer = TransactionLayer()
    for n in range(50):
        key, req = start_server(layer, "OPTIONS", branch=f"z9hG4bK-e{n}", call_id=f"e{n}")
        layer.send_response(key, build_response(req, 200, to_tag="t"), 200, 0.0)
    assert len(layer._lingering) == 50
    run_timers(layer, 60.0)  # Timer J ends them all
    assert layer.server_transaction_count == 0
    assert len(layer._lingering) == 0


def test_a_foreign_ack_with_a_lookalike_tag_is_not_absorbed() -> None:
    layer = TransactionLayer()
    ack = make_request("ACK", branch="z9hG4bK-2xx-ack", to_tag="sl0000beef")
    layer.receive_request(ack, UAC, 0.0)
    assert events(layer) == [AckReceived(ack, UAC)]


# --------------------------------------------------------------------------- timers and memory


def test_get_timer_skips_stale_entries_and_late_handle_timer_catches_up() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer, "OPTIONS")
    layer.receive_response(respond(req, 200, "t"), UAS, 0.1)  # E and F become stale
    assert layer.get_timer() == 5.1  # K, not the stale E at 0.5
    k2, _, _ = start_client(layer, "OPTIONS", branch="z9hG4bK-late")
    # The adapter wakes up late: everything due fires once, retransmissions resume from now.
    layer.handle_timer(2.0)
    assert len(wire(layer, 2.0)) == 1  # E fired once at 2.0, not twice
    assert layer.get_timer() == 3.0  # re-armed at now + 2*T1
    events(layer)
    layer.handle_timer(6.0)
    assert TransactionTerminated(key) in events(layer)
    assert layer.state_of(k2) is TxState.TRYING


def test_terminated_transactions_leave_no_timer_garbage_behind() -> None:
    layer = TransactionLayer()
    for i in range(5000):
        data = request_bytes("OPTIONS", branch=f"z9hG4bK-{i}", transport="TCP")
        req = parse_request(data)
        layer.send_request(data, req, UAS_TCP, float(i) / 1000)
        layer.receive_response(respond(req, 200, "t"), UAS_TCP, float(i) / 1000)
    wire(layer)
    events(layer)
    assert layer.transaction_count == 0
    assert layer.get_timer() is None
    assert len(layer._heap) < 1024  # compacted, not 5000 dead Timer F entries


def test_keys_and_events_are_small_hashable_values() -> None:
    layer = TransactionLayer()
    key, _ = start_server(layer)
    same = ServerTxKey("z9hG4bK-uac-1", "192.0.2.10", 5060, "INVITE")
    assert hash(key) == hash(same) and key == same
    assert isinstance(key, tuple)  # tuple hashing and equality, no Python-level __hash__
    event = TransactionTerminated(key)
    if sipcore.NATIVE:  # compiled, a Final attribute has no setter; as Python, mypy holds it
        with pytest.raises(AttributeError):
            event.tx_key = same  # type: ignore[misc]


def test_zero_absorb_timers_end_udp_transactions_at_once() -> None:
    layer = TransactionLayer(TimerSettings(timer_d=0.0, timer_k=0.0, timer_j=0.0))
    key, req, _ = start_client(layer)
    layer.receive_response(respond(req, 486, "t"), UAS, 1.0)
    assert wire(layer)  # the ACK still goes out
    k2, req2, _ = start_client(layer, "OPTIONS", branch="z9hG4bK-o")
    layer.receive_response(respond(req2, 200, "t"), UAS, 1.0)
    ended = [e for e in events(layer) if isinstance(e, TransactionTerminated)]
    assert ended == [TransactionTerminated(key), TransactionTerminated(k2)]
    k3, sreq = start_server(layer, "OPTIONS")
    layer.send_response(k3, build_response(sreq, 200, to_tag="t"), 200, 1.0)
    assert events(layer) == [TransactionTerminated(k3)]
    assert layer.transaction_count == 0
    assert layer.get_timer() is None


def test_client_and_server_keys_are_not_interchangeable() -> None:
    layer = TransactionLayer()
    ckey, req, _ = start_client(layer)
    skey, _ = start_server(layer)
    assert not layer.send_response(ckey, build_response(req, 200, to_tag="t"), 200, 0.0)
    with pytest.raises(ValueError):
        layer.cancel(skey, 0.0)
    assert wire(layer) == []


def test_2xx_from_another_fork_after_a_non_2xx_still_reaches_the_tu() -> None:
    layer = TransactionLayer()
    key, req, _ = start_client(layer)
    layer.receive_response(respond(req, 486, "fork-1"), UAS, 1.0)
    wire(layer)
    events(layer)
    ok = respond(req, 200, "fork-2")
    layer.receive_response(ok, UAS, 1.5)
    assert events(layer) == [ResponseReceived(key, ok, UAS)]  # its ACK is the TU's
    assert wire(layer) == []
    assert layer.state_of(key) is TxState.COMPLETED


def test_ack_before_any_final_is_dropped() -> None:
    layer = TransactionLayer()
    key, _ = start_server(layer)
    layer.receive_request(make_request("ACK", to_tag="nothing-sent"), UAC, 0.1)
    assert events(layer) == [] and wire(layer) == []
    assert layer.state_of(key) is TxState.PROCEEDING


def test_send_stateless_queues_without_a_transaction() -> None:
    layer = TransactionLayer()
    layer.send_stateless(b"ACK ...", UAS)
    assert wire(layer) == [(b"ACK ...", UAS)]
    assert layer.transaction_count == 0 and layer.get_timer() is None
