"""Prometheus metrics for ``/metrics`` on the HTTP port (issue 6, "Metrics").

Theory of operation: the SIP hot path never touches prometheus-client. Every component
already keeps plain integer counters (``SipStack.stats``, ``Transports.stats``,
``TransactionStats``, ``ProxyCore.stats``, ``Registrar.stats``, ``DigestAuth.stats`` ...);
:class:`SipbillCollector` reads them when Prometheus scrapes and turns them into metric
families, so the cost of metrics is paid per scrape, not per message. Only the control socket,
which is not on the SIP path, feeds a real prometheus Histogram through its ``on_request``
hook.

Each :class:`Application` owns a :class:`Metrics` with its own ``CollectorRegistry`` (never the
process-global one): tests run several servers in one process, and a global registry would
refuse the second set of collectors and mix their numbers.

Status classes follow RFC 3261 §7.2 / §21 (1xx provisional ... 6xx global failure).

Several worker processes (``server.workers``): only worker 0 serves ``/metrics``. At each
scrape it asks the other workers over the worker channel for their samples
(:meth:`Metrics.snapshot`, name, labels and value of every sample of their registry) and adds
them to its own, sample by sample, so the node's totals come out under the usual names with no
extra label. The gauges of the location cache (:data:`NOT_SUMMED`), which every worker holds
whole, are worker 0's alone. A worker that does not answer within a second is left out of that
scrape (counters then dip; Prometheus' ``rate`` treats that as a reset, rarely).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from sipbill.gcpace import GcPacer
from sipcore.latency import LatencyHistogram

if TYPE_CHECKING:
    from sipbill.app import AppContext

#: Transport counters exported one metric each (``sipbill_transport_<key>_total``).
TRANSPORT_COUNTERS = {
    "udp_datagrams_in": "UDP datagrams received.",
    "udp_datagrams_out": "UDP datagrams sent.",
    "udp_errors": "UDP socket errors.",
    "tcp_connections_opened": "TCP connections accepted or opened.",
    "tcp_connections_closed": "TCP connections closed.",
    "tcp_refused_limit": "TCP connections refused at the connection cap.",
    "tcp_framing_errors": "TCP streams closed for framing errors.",
    "tcp_slow_peer_closed": "TCP connections closed because the peer did not read.",
    "tcp_idle_closed": "TCP connections closed when idle.",
    "tcp_connect_failed": "Outgoing TCP connections that failed.",
}

#: ProxyCore counters (``sipbill_proxy_<key>_total``).
PROXY_COUNTERS = {
    "requests": "Requests handed to the proxy core (new server transactions).",
    "branches": "Client branches forked.",
    "failovers": "Failovers to the next destination after a failure.",
    "loops": "Requests rejected as loops (483/482).",
    "acks_forwarded": "ACKs for 2xx forwarded.",
    "acks_dropped": "ACKs dropped (no matching dialog or route).",
    "cancels": "CANCELs processed.",
    "in_dialog_relayed": "In-dialog requests relayed.",
    "in_dialog_rejected": "In-dialog requests rejected.",
    "bad_responses": "Unusable responses from downstream.",
    "contact_unreachable": "Branches whose contact could not be reached.",
}

#: DigestAuth outcome keys that are failures (the "reason:..." keys give the verifier's reason).
AUTH_FAILURES = ("failed", "stale", "bad_credentials", "blocked_source", "blocked_user",
                 "identity_mismatch")

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "6xx")


def _by_class(counts: dict[int, int]) -> Iterator[tuple[str, int]]:
    for klass, label in enumerate(STATUS_CLASSES, start=1):
        yield label, counts.get(klass, 0)


class SipbillCollector(Collector):
    """Reads the server's counters at scrape time; registered in one :class:`Metrics` registry."""

    def __init__(self, ctx: AppContext, control_counts: dict[tuple[str, str], int]) -> None:
        self.ctx = ctx
        self.control_counts = control_counts

    def collect(self) -> Iterator[Metric]:
        yield from self._traffic()
        yield from self._transactions()
        yield from self._proxy()
        yield from self._registrations()
        yield from self._auth()
        yield from self._control()
        yield from self._db()
        yield from self._latency()
        yield from self._modules()

    def _traffic(self) -> Iterator[Metric]:
        stack = self.ctx.stack
        transports = stack.transports
        for key, doc in TRANSPORT_COUNTERS.items():
            yield CounterMetricFamily(f"sipbill_transport_{key}", doc,
                                      value=transports.stats.get(key, 0))
        yield GaugeMetricFamily("sipbill_transport_tcp_connections",
                                "Open TCP connections.", value=len(transports.connections))
        req = CounterMetricFamily("sipbill_sip_requests_received",
                                  "SIP requests received, by method (unknown methods: other).",
                                  labels=["method"])
        for method, n in sorted(stack.requests_in.items()):
            req.add_metric([method], n)
        yield req
        rin = CounterMetricFamily("sipbill_sip_responses_received",
                                  "SIP responses received, by status class.", labels=["class"])
        for label, n in _by_class(stack.responses_in):
            rin.add_metric([label], n)
        yield rin
        rout = CounterMetricFamily("sipbill_sip_responses_sent",
                                   "SIP responses sent on server transactions (ours and "
                                   "forwarded), by status class.", labels=["class"])
        for label, n in _by_class(stack.responses_out):
            rout.add_metric([label], n)
        yield rout
        perr = CounterMetricFamily("sipbill_parse_errors",
                                   "Unparsable SIP messages, by the status they warrant.",
                                   labels=["status"])
        for status, n in sorted(stack.parse_error_reasons.items()):
            perr.add_metric([status], n)
        yield perr
        for key, doc in (
            ("stateless_replies", "Stateless error replies to unparsable requests."),
            ("responses_dropped_unparsable", "Unparsable messages dropped unanswered."),
            ("stray_responses", "Responses that matched no client transaction."),
            ("overload_rejections", "Requests refused with 503 at the transaction cap."),
        ):
            yield CounterMetricFamily(f"sipbill_{key}", doc, value=stack.stats.get(key, 0))

    def _transactions(self) -> Iterator[Metric]:
        layer = self.ctx.stack.layer
        ts = layer.stats
        yield GaugeMetricFamily("sipbill_transactions_in_progress",
                                "Live transactions, client and server.",
                                value=layer.transaction_count)
        yield GaugeMetricFamily("sipbill_server_transactions_in_progress",
                                "Live server transactions.", value=layer.server_transaction_count)
        yield CounterMetricFamily("sipbill_retransmissions",
                                  "Timer A, E and G retransmissions sent.",
                                  value=ts.retransmissions_sent)
        absorbed = CounterMetricFamily("sipbill_retransmissions_absorbed",
                                       "Retransmissions absorbed by the transaction layer.",
                                       labels=["kind"])
        absorbed.add_metric(["request"], ts.requests_absorbed)
        absorbed.add_metric(["ack"], ts.acks_absorbed)
        absorbed.add_metric(["response"], ts.responses_absorbed)
        yield absorbed
        yield CounterMetricFamily("sipbill_lingering_transactions_evicted",
                                  "Server transactions that only absorbed retransmissions, "
                                  "ended early to make room at the transaction cap.",
                                  value=ts.lingering_evicted)
        ended = CounterMetricFamily("sipbill_transactions_failed",
                                    "Transactions ended by a timeout or a transport error.",
                                    labels=["reason"])
        ended.add_metric(["timeout"], ts.timeouts)
        ended.add_metric(["transport"], ts.transport_errors)
        yield ended

    def _proxy(self) -> Iterator[Metric]:
        proxy = self.ctx.proxy
        for key, doc in PROXY_COUNTERS.items():
            yield CounterMetricFamily(f"sipbill_proxy_{key}", doc, value=proxy.stats.get(key, 0))
        yield GaugeMetricFamily("sipbill_dialogs_active", "Dialogs the proxy tracks (calls).",
                                value=len(proxy.dialogs))
        yield GaugeMetricFamily("sipbill_proxy_contexts_active",
                                "Requests being processed by the proxy.",
                                value=len(proxy.contexts))
        yield CounterMetricFamily("sipbill_pipeline_errors",
                                  "Pipeline stages that raised.", value=self.ctx.pipeline.errors)

    def _registrations(self) -> Iterator[Metric]:
        loc = self.ctx.location
        yield GaugeMetricFamily("sipbill_registrations_current", "Registered bindings (contacts).",
                                value=loc.binding_count)
        yield GaugeMetricFamily("sipbill_registered_aors", "Addresses of record with a binding.",
                                value=loc.aor_count)
        yield CounterMetricFamily("sipbill_registrations_expired", "Bindings that expired.",
                                  value=loc.stats.get("expired", 0))
        yield CounterMetricFamily("sipbill_location_flush_errors",
                                  "Failed writes of bindings to the database.",
                                  value=loc.stats.get("flush_errors", 0))
        outcomes = CounterMetricFamily("sipbill_registrar_outcomes",
                                       "REGISTER outcomes: ok or the rejection label.",
                                       labels=["outcome"])
        registrar = self.ctx.services.get("registrar")
        stats: dict[str, int] = dict(getattr(registrar, "stats", {}))
        stats.setdefault("ok", 0)
        for outcome, n in sorted(stats.items()):
            outcomes.add_metric([outcome], n)
        yield outcomes

    def _auth(self) -> Iterator[Metric]:
        auth = self.ctx.services.get("auth")
        stats: dict[str, int] = dict(getattr(auth, "stats", {}))
        yield CounterMetricFamily("sipbill_auth_challenges", "Digest challenges sent (401/407).",
                                  value=stats.get("challenged", 0))
        yield CounterMetricFamily("sipbill_auth_successes", "Requests authenticated.",
                                  value=stats.get("ok", 0))
        subscribers = self.ctx.subscribers
        yield GaugeMetricFamily("sipbill_subscribers_listening",
                                "Subscriber caches hearing other nodes' changes (one per "
                                "worker process; 0 from a lost LISTEN connection until a new "
                                "one listens and the cache has been re-read).",
                                value=int(subscribers.listening))
        yield CounterMetricFamily("sipbill_subscribers_listen_lost",
                                  "Lost LISTEN connections seen by the subscriber cache.",
                                  value=subscribers.stats.get("listen_lost", 0))
        notify = self.ctx.notify
        yield GaugeMetricFamily("sipbill_notify_listening",
                                "LISTEN connections up with every cache kept current by NOTIFY "
                                "(location, subscribers, rates, balances, diversions) re-read "
                                "since the last loss (one connection per worker process).",
                                value=int(notify.listening))
        yield CounterMetricFamily("sipbill_notify_lost",
                                  "Lost LISTEN connections (each is replaced, with backoff).",
                                  value=notify.stats["lost"])
        fail = CounterMetricFamily("sipbill_auth_failures", "Authentication failures by reason.",
                                   labels=["reason"])
        for reason in AUTH_FAILURES:
            fail.add_metric([reason], stats.get(reason, 0))
        yield fail
        detail = CounterMetricFamily("sipbill_auth_verify_failures",
                                     "Credentials the digest verifier refused, by its reason.",
                                     labels=["reason"])
        for key, n in sorted(stats.items()):
            if key.startswith("reason:"):
                detail.add_metric([key.removeprefix("reason:")], n)
        yield detail

    def _control(self) -> Iterator[Metric]:
        fam = CounterMetricFamily("sipbill_control_requests",
                                  "Control-socket requests by method and result code.",
                                  labels=["method", "code"])
        for (method, code), n in sorted(self.control_counts.items()):
            fam.add_metric([method, code], n)
        yield fam

    def _db(self) -> Iterator[Metric]:
        pool = self.ctx.pool
        size = pool.get_size()
        idle = pool.get_idle_size()
        fam = GaugeMetricFamily("sipbill_db_pool_connections",
                                "Database pool connections by state.", labels=["state"])
        fam.add_metric(["idle"], idle)
        fam.add_metric(["in_use"], max(size - idle, 0))
        yield fam
        yield GaugeMetricFamily("sipbill_db_pool_max_connections",
                                "Database pool size limit.", value=pool.get_max_size())
        db_latency = self.ctx.services.get("db_latency")
        if isinstance(db_latency, LatencyHistogram):
            yield _histogram("sipbill_db_query_duration_seconds",
                             "Database query time by statement kind.", "kind", db_latency)

    def _latency(self) -> Iterator[Metric]:
        yield _histogram("sipbill_sip_request_processing_seconds",
                         "Time from a request's arrival until the server answered or relayed "
                         "it (the pipeline walk), by method.", "method", self.ctx.proxy.latency)
        pacer = self.ctx.services.get("gc_pacer")
        if isinstance(pacer, GcPacer):
            yield _histogram("sipbill_gc_pause_seconds",
                             "Cyclic garbage collections (the event loop stands still for "
                             "each), by generation.", "generation", pacer.pauses)


    def _modules(self) -> Iterator[Metric]:
        """Each module's own counters (``<module>.stats``, keys chosen by its code, so the
        label set is bounded) and the gauges that say how much it holds right now."""
        services = self.ctx.services
        for name in MODULE_COUNTERS:
            stats = getattr(services.get(name), "stats", None)
            if not isinstance(stats, Mapping):
                continue
            fam = CounterMetricFamily(f"sipbill_{name}_events", MODULE_COUNTERS[name],
                                      labels=["event"])
            for event, count in sorted(stats.items()):
                fam.add_metric([str(event)], float(count))
            yield fam
        presence = services.get("presence")
        subscriptions = getattr(presence, "subscriptions", None)
        if isinstance(subscriptions, Mapping):
            yield GaugeMetricFamily("sipbill_presence_subscriptions",
                                    "Active presence subscriptions (RFC 3856 watchers).",
                                    value=len(subscriptions))
        c2d = services.get("clicktodial")
        running = getattr(c2d, "running", None)
        if isinstance(running, Mapping):
            yield GaugeMetricFamily("sipbill_clicktodial_jobs_running",
                                    "Click-to-dial jobs in progress.", value=len(running))
        billing = services.get("billing")
        calls = getattr(billing, "calls", None)
        if isinstance(calls, Mapping):
            yield GaugeMetricFamily("sipbill_billing_calls_tracked",
                                    "Calls billing is tracking (reserved or in progress).",
                                    value=len(calls))
            count = GaugeMetricFamily("sipbill_billing_reservations",
                                      "Open credit reservations, by currency.",
                                      labels=["currency"])
            amount = GaugeMetricFamily("sipbill_billing_reserved_amount",
                                       "Money reserved by calls in progress, by currency.",
                                       labels=["currency"])
            held: dict[str, tuple[int, float]] = {}
            for call in calls.values():
                auth = getattr(call, "auth", None)
                reserved = getattr(call, "reserved", 0)
                if auth is not None and reserved:
                    n, total = held.get(auth.currency or "", (0, 0.0))
                    held[auth.currency or ""] = (n + 1, total + float(reserved))
            for currency, (n, total) in sorted(held.items()):
                count.add_metric([currency], n)
                amount.add_metric([currency], total)
            yield count
            yield amount
        revenue = getattr(billing, "revenue", None)
        if isinstance(revenue, Mapping):
            fam = CounterMetricFamily("sipbill_billing_revenue",
                                      "Money charged by settled calls, by currency.",
                                      labels=["currency"])
            for currency, total in sorted(revenue.items()):
                fam.add_metric([currency], float(total))
            yield fam


#: Modules whose ``stats`` counters are exported as ``sipbill_<module>_events_total{event}``.
MODULE_COUNTERS = {
    "billing": "Credit-control events: authorized, refused:<reason>, cut (credit exhausted), "
               "settled, recovered, failed:<status> ...",
    "msilo": "Offline-message events: store_*, delivered, attempts, refused, unreachable, "
             "expired ...",
    "presence": "Presence events: subscribed, refreshed, unsubscribed, expired, notify_sent, "
                "notify_failed, rejected_<status> ...",
    "clicktodial": "Click-to-dial job outcomes.",
}


def _histogram(name: str, doc: str, label: str, hist: LatencyHistogram) -> Metric:
    fam = HistogramMetricFamily(name, doc, labels=[label])
    for value, buckets, total in hist.cumulative():
        fam.add_metric([value], buckets, total)
    return fam


#: Families every worker reports in full (each holds the whole location cache, and runs the
#: expiry timers of every binding): worker 0's value is the node's.
NOT_SUMMED = frozenset({"sipbill_registrations_current", "sipbill_registered_aors",
                        "sipbill_registrations_expired"})


class _Peers(Protocol):
    async def query(self, what: str, timeout: float = 1.0) -> dict[int, Any]: ...


class _Families:
    """A registry stand-in for ``generate_latest``: fixed metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_samples(families: list[Metric], others: Iterable[list[list[Any]]]) -> list[Metric]:
    """Add other workers' samples (``[family, sample name, labels, value]``) into
    ``families`` (modified in place): same name and labels add up, new label sets are
    appended to their family; :data:`NOT_SUMMED` families and unknown families are skipped."""
    by_name = {f.name: f for f in families}
    index: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Metric, int]] = {}
    for fam in families:
        for i, sample in enumerate(fam.samples):
            index[(sample.name, tuple(sorted(sample.labels.items())))] = (fam, i)
    for samples in others:
        for family, name, labels, value in samples:
            target = by_name.get(family)
            if target is None or family in NOT_SUMMED or name.endswith("_created"):
                continue  # (a _created sample is a timestamp, not a count)
            key = (name, tuple(sorted(labels.items())))
            found = index.get(key)
            if found is None:
                target.samples.append(Sample(name, dict(labels), float(value)))
                index[key] = (target, len(target.samples) - 1)
            else:
                owner, i = found
                old = owner.samples[i]
                owner.samples[i] = old._replace(value=old.value + float(value))
    return families


class Metrics:
    """One server's registry, its collector, the control-socket hook and the HTTP handler."""

    def __init__(self, ctx: AppContext) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.control_counts: dict[tuple[str, str], int] = {}
        #: The control registry's method names; anything else is counted as "unknown".
        self.control_methods: Container[str] = ()
        self.control_latency = Histogram(
            "sipbill_control_request_duration_seconds",
            "Time to answer a control-socket request.", ["method"], registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
        )
        self.registry.register(SipbillCollector(ctx, self.control_counts))
        #: The other workers of this node (worker 0 sums their samples into each scrape).
        self.workers: _Peers | None = None

    async def snapshot(self) -> list[list[Any]]:
        """Every sample of this registry as ``[family, sample name, labels, value]``."""
        return [[fam.name, sample.name, sample.labels, sample.value]
                for fam in self.registry.collect() for sample in fam.samples]

    def observe_control(self, method: str, code: int | None, seconds: float) -> None:
        """:data:`sipbill.control.RequestObserver`: count one answered control request."""
        # Method names of bad requests come from clients; folding the ones we do not serve
        # keeps label cardinality bounded.
        if method not in self.control_methods:
            method = "unknown"
        key = (method, "ok" if code is None else str(code))
        self.control_counts[key] = self.control_counts.get(key, 0) + 1
        self.control_latency.labels(method).observe(seconds)

    async def handler(self, request: web.Request) -> web.Response:
        if self.workers is None:
            body = generate_latest(self.registry)
        else:
            families = list(self.registry.collect())
            others = await self.workers.query("metrics")
            merged = merge_samples(families, (others[i] for i in sorted(others)))
            body = generate_latest(_Families(merged))
        resp = web.Response(body=body)
        # CONTENT_TYPE_LATEST carries a charset parameter, which aiohttp's content_type refuses.
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp
