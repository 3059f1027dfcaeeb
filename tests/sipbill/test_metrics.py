"""``/metrics`` of a running server moves with SIPp traffic; the dashboard uses real metrics."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sipbill.ctlclient import ControlClient
from tests.support import SCENARIOS, SIPP_AUTH, ServerProcess, free_port, run_sipp, running_server

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana" / "sipbill.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def server(db_dsn: str) -> Iterator[ServerProcess]:
    with running_server(db_dsn, SIPP_AUTH) as srv:
        yield srv


def scrape_text(server: ServerProcess) -> tuple[str, str]:
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def scrape(server: ServerProcess) -> Samples:
    _, text = scrape_text(server)
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_sipp_traffic(server: ServerProcess) -> None:
    content_type, _ = scrape_text(server)
    assert content_type.startswith("text/plain")
    before = scrape(server)

    res = run_sipp("options.xml", server.port, local_port=free_port(), calls=3, timeout=15)
    assert res.returncode == 0, res.output
    res = run_sipp("register_auth.xml", server.port, "-inf", str(SCENARIOS / "users.csv"),
                   local_port=free_port(), calls=1, timeout=15)
    assert res.returncode == 0, res.output
    # A MESSAGE to offline 1003 is stored by msilo (202): its counters must show it.
    res = run_sipp("message_uac.xml", server.port, "-inf", str(SCENARIOS / "users.csv"),
                   "-s", "1003", local_port=free_port(), calls=1, timeout=15)
    assert res.returncode == 0, res.output
    with ControlClient(str(server.control_socket)) as client:
        client.call("stats")

    after = scrape(server)
    opts = "sipbill_sip_requests_received_total"
    assert value(after, opts, method="OPTIONS") >= value(before, opts, method="OPTIONS") + 3
    assert value(after, opts, method="REGISTER") >= value(before, opts, method="REGISTER") + 2
    sent = "sipbill_sip_responses_sent_total"
    assert value(after, sent, **{"class": "2xx"}) >= value(before, sent, **{"class": "2xx"}) + 4
    assert value(after, sent, **{"class": "4xx"}) > value(before, sent, **{"class": "4xx"})
    assert value(after, "sipbill_registrations_current") >= 1
    outcomes = "sipbill_registrar_outcomes_total"
    assert value(after, outcomes, outcome="ok") > value(before, outcomes, outcome="ok")
    assert value(after, "sipbill_auth_challenges_total") > value(
        before, "sipbill_auth_challenges_total")
    udp_in = "sipbill_transport_udp_datagrams_in_total"
    assert value(after, udp_in) >= value(before, udp_in) + 5
    assert value(after, "sipbill_control_requests_total", method="stats", code="ok") >= 1
    pool = value(after, "sipbill_db_pool_connections", state="idle") + value(
        after, "sipbill_db_pool_connections", state="in_use")
    assert pool >= 1
    # Latency histograms: the pipeline walk per method and the database queries.
    proc = "sipbill_sip_request_processing_seconds_count"
    assert value(after, proc, method="REGISTER") >= value(before, proc, method="REGISTER") + 2
    assert value(after, "sipbill_db_query_duration_seconds_count", kind="SELECT") >= 1
    assert value(after, "sipbill_subscribers_listening") == 1
    assert value(after, "sipbill_subscribers_listen_lost_total") == 0
    assert value(after, "sipbill_notify_listening") == 1
    assert value(after, "sipbill_notify_lost_total") == 0
    # The garbage collector's pauses (the pacer collects the young generation every 0.1 s).
    gc_young = "sipbill_gc_pause_seconds_count"
    assert value(after, gc_young, generation="0") > value(before, gc_young, generation="0")
    msilo_events = sum(v for (name, labels), v in after.items()
                       if name == "sipbill_msilo_events_total"
                       and dict(labels).get("event", "").startswith("store_"))
    assert msilo_events >= 1
    assert ("sipbill_presence_subscriptions", ()) in after


def dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, object]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []) or []:  # type: ignore[attr-defined]
                exprs.append(target["expr"])
            walk(panel.get("panels", []) or [])  # type: ignore[arg-type]

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query or ""))
    names = set()
    for expr in exprs:
        for name in re.findall(r"sipbill_[a-z0-9_]+", expr):
            names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def test_dashboard_references_only_exported_metrics(server: ServerProcess) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    assert any(i["name"] == "DS_PROMETHEUS" for i in dash["__inputs"])
    with ControlClient(str(server.control_socket)) as client:
        client.call("stats")  # so the control-socket histogram has a sample
    _, text = scrape_text(server)
    # Declared families count even before their first labelled sample (no parse error yet);
    # the text format names counters with their _total suffix and histograms by base name.
    exported = set(re.findall(r"^# TYPE (\S+) \S+$", text, re.MULTILINE))
    used = dashboard_metric_names()
    assert len(used) >= 20
    missing = sorted(used - exported)
    assert not missing, f"dashboard uses metrics the server does not export: {missing}"
