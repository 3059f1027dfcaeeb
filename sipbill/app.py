"""``sipbill serve``: wire the database, the SIP stack, the modules, HTTP and the control socket.

The composition root (ARCHITECTURE.md): it connects pieces, it does not implement them.
Start-up order: database (embedded PostgreSQL when no URL), migrations, demo seed, SIP core
(transaction layer, stack, pipeline, proxy core, registrar), modules, listeners, HTTP, control
socket. Shutdown runs the same list backwards on SIGINT/SIGTERM: listeners close first so no
new transaction starts, in-flight transactions get a short grace period to finish, then the
pool closes and the embedded PostgreSQL stops.

With ``server.workers = N > 1`` :mod:`sipbill.supervisor` runs N of these as processes, each
given a :class:`WorkerSpec`. Every worker binds the UDP listeners with ``SO_REUSEPORT``, tags
its branches and Record-Route/Contact URIs and routes misdelivered messages to their owner
(:mod:`sipcore.workers`). Only worker 0 listens on TCP, serves HTTP and the control socket;
its ``stats`` and ``/metrics`` report the node's totals, asking the other workers over the
worker channel. Modules run in every worker (each with its own pool and, for billing, its own
node identity).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
from aiohttp import web

import sipcore
from sipbill.control import ControlServer, MethodRegistry
from sipbill.coremethods import core_stats, register_core_methods
from sipbill.db import EmbeddedPostgres, create_pool, migrate
from sipbill.gcpace import GcPacer
from sipbill.metrics import Metrics
from sipbill.modules import setup_modules
from sipbill.settings import Settings, auth_secret
from sipcore.auth import DigestAuth, realms_for_domains
from sipcore.digest import NonceIssuer
from sipcore.gateways import Gateway, GatewayRouter
from sipcore.latency import LatencyHistogram
from sipcore.location import LocationService
from sipcore.pglisten import NotifyHub
from sipcore.pipeline import EventBus, Pipeline, Stage
from sipcore.proxy import LocalIdentity, ProxyCore, ProxySettings
from sipcore.registrar import LocationLookup, Registrar
from sipcore.stack import SipStack
from sipcore.subscribers import SubscriberStore
from sipcore.transaction import TimerSettings, TransactionLayer
from sipcore.transport import TransportLimits, Transports
from sipcore.workers import WorkerChannel, set_worker

log = logging.getLogger("sipbill.app")

ShutdownHook = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Which worker of how many this process is, and where the worker sockets live."""

    index: int
    count: int
    run_dir: Path


@dataclass
class AppContext:
    """What modules get handed at set-up: the shared pieces, no globals."""

    settings: Settings
    pool: asyncpg.Pool
    stack: SipStack
    pipeline: Pipeline
    events: EventBus
    proxy: ProxyCore
    identity: LocalIdentity
    subscribers: SubscriberStore
    http: web.Application
    location: LocationService
    methods: MethodRegistry
    #: The process's one LISTEN connection, shared by every cache kept current by NOTIFY.
    notify: NotifyHub
    started_at: float = field(default_factory=time.time)
    shutdown_hooks: list[ShutdownHook] = field(default_factory=list)
    services: dict[str, Any] = field(default_factory=dict)

    @property
    def node_name(self) -> str:
        """This server process across restarts: host name and first SIP listen address (a
        restarted server is the same node; two servers on one host are not), and the worker
        number of a server with several worker processes. Modules that keep per-node state
        in the shared database (billing's calls, presence's subscriptions) label it so."""
        listen = self.identity.listen
        where = f"{listen[0][1]}:{listen[0][2]}" if listen else "-"
        worker = self.services.get("worker_index", 0)
        return f"{socket.gethostname()}/{where}" + (f"/w{worker}" if worker else "")


class Application:
    def __init__(self, settings: Settings, worker: WorkerSpec | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.channel: WorkerChannel | None = None
        self.embedded: EmbeddedPostgres | None = None
        self.pool: asyncpg.Pool | None = None
        self.ctx: AppContext | None = None
        self.http_runner: web.AppRunner | None = None
        self.listening: list[str] = []
        self.control: ControlServer | None = None
        self.metrics: Metrics | None = None
        self.worker_id = worker.index if worker is not None else 0
        self.db_latency = LatencyHistogram()
        self.gc_pacer = GcPacer()

    async def start(self) -> None:
        s = self.settings
        s.data_path.mkdir(parents=True, exist_ok=True)
        dsn = s.database.url
        if not dsn:
            self.embedded = EmbeddedPostgres(s.data_path / "pg")
            dsn = await asyncio.to_thread(self.embedded.start)
        self.pool = await create_pool(dsn, latency=self.db_latency, min_size=s.database.pool_min,
                                      max_size=s.database.pool_max,
                                      command_timeout=s.database.command_timeout)
        async with self.pool.acquire() as conn:
            await migrate(conn)
        subscribers = SubscriberStore(self.pool)
        for seed in s.seed.subscribers:
            domain = seed.domain or s.server.domains[0]
            if await subscribers.ensure(seed.username, domain, seed.password):
                log.info("event=subscriber_seeded user=%s@%s", seed.username, domain)
        # One LISTEN connection for every cache kept current by NOTIFY (sipcore/pglisten.py).
        notify = NotifyHub(self.pool)
        await subscribers.listen(notify)

        t = s.sip.timers
        layer = TransactionLayer(
            TimerSettings(T1=t.t1, T2=t.t2, T4=t.t4),
            max_server_transactions=s.sip.limits.max_server_transactions,
        )
        lim = s.sip.limits
        limits = TransportLimits(max_message_size=lim.max_message_size,
                                 max_tcp_connections=lim.max_tcp_connections,
                                 max_tcp_buffer=lim.max_tcp_buffer,
                                 tcp_idle_timeout=lim.tcp_idle_timeout)
        worker = self.worker if self.worker is not None and self.worker.count > 1 else None
        # Tag branches and Record-Route/Contact URIs before anything generates one.
        set_worker(worker.index if worker is not None else None)
        stack = SipStack(lambda st: Transports(st, limits), layer,
                         server_header=s.server.user_agent)
        reuse = worker is not None
        first = worker is None or worker.index == 0
        bound: list[tuple[str, str, int]] = []
        for listen in s.server.listen:
            transport = listen.transport.upper()
            if transport == "UDP":
                host, port = await stack.transports.listen_udp(listen.host, listen.port,
                                                               reuse_port=reuse)
            elif first:
                host, port = await stack.transports.listen_tcp(listen.host, listen.port)
            else:
                # Worker 0 holds the TCP listener and connections; this worker's TCP sends go
                # through it, but Via, Record-Route and "is this us?" still name the port.
                bound.append((transport, listen.host, listen.port))
                continue
            bound.append((transport, host, port))
            self.listening.append(f"{transport.lower()}:{host}:{port}")
        if worker is not None:
            self.channel = WorkerChannel(worker.index, worker.count, worker.run_dir, stack,
                                         max_message=lim.max_message_size)
            stack.router = self.channel.divert
            if first:
                self.channel.tcp = stack.transports
            else:
                stack.transports.tcp_relay = self.channel.send_tcp
        aliases = s.server.domain_aliases
        identity = LocalIdentity([*s.server.domains, *aliases], bound, s.server.advertised_host)
        pipeline = Pipeline()
        events = EventBus()
        proxy = ProxyCore(stack, pipeline, events, identity,
                          ProxySettings(record_route=s.proxy.record_route, timer_c=t.timer_c))
        location = LocationService(self.pool, events)
        restored = await location.load()
        await location.listen(notify)
        log.info("event=location_loaded bindings=%d", restored)
        nonces = NonceIssuer(auth_secret(s), ttl=s.auth.nonce_ttl, worker_id=self.worker_id)
        realm_of = realms_for_domains(s.server.domains, aliases)
        auth = DigestAuth(subscribers, nonces, realm_of, s.auth)
        pipeline.add(Stage.AUTH, auth, name="auth")
        registrar = Registrar(location, s.server.domains, s.registrar, aliases=aliases)
        pipeline.add(Stage.REGISTRAR, registrar, methods={"REGISTER"}, name="registrar")
        pipeline.add(Stage.LOCATION, LocationLookup(location, subscribers, s.server.domains,
                                                    aliases),
                     name="location")
        gateways = [Gateway(g.name, g.host, g.port, g.transport.upper(), g.prefixes, g.strip,
                            g.prepend) for g in s.proxy.gateways]
        pipeline.add(Stage.LOCATION, GatewayRouter(gateways,
                     international_prefix=s.proxy.international_prefix), name="gateways")
        http = web.Application()
        registry = MethodRegistry()
        self.ctx = AppContext(s, self.pool, stack, pipeline, events, proxy, identity,
                              subscribers, http, location, registry, notify)
        self.ctx.services.update(auth=auth, nonces=nonces, db_latency=self.db_latency,
                                 gc_pacer=self.gc_pacer,
                                 worker_index=self.worker_id)
        if self.channel is not None:
            self.ctx.services["workers"] = self.channel
        register_core_methods(registry, self.ctx)
        # The metrics collector reads the registrar's (and auth's) counters at scrape time.
        self.ctx.services["registrar"] = registrar
        self.metrics = Metrics(self.ctx)
        # Modules add their own collectors here (their counters, read at scrape time).
        self.ctx.services["metrics_registry"] = self.metrics.registry
        http.router.add_get("/health", self._health)
        http.router.add_get("/metrics", self.metrics.handler)
        # Modules plug in last: pipeline handlers, event listeners, methods, HTTP routes.
        for name in await setup_modules(self.ctx):
            log.info("event=module_started module=%s", name)
        if self.channel is not None:
            self.channel.handlers["stats"] = self._stats_snapshot
            self.channel.handlers["metrics"] = self.metrics.snapshot
            self.metrics.workers = self.channel
        # One HTTP server and one control socket per node: worker 0's (node totals).
        if s.http.enabled and first:
            self.http_runner = web.AppRunner(http, access_log=None)
            await self.http_runner.setup()
            host, port = s.http.host_port
            site = web.TCPSite(self.http_runner, host, port)
            await site.start()
            self.listening.append(f"http:{host}:{port}")
        if s.control.enabled and first:
            self.metrics.control_methods = registry
            self.control = ControlServer(registry, s.control_socket_path,
                                         on_request=self.metrics.observe_control)
            await self.control.start()
            self.listening.append(f"control:{s.control_socket_path}")
        for where in self.listening:
            log.info("event=listening address=%s", where)
        if worker is not None and self.channel is not None:
            # Ready: the supervisor waits for this socket, and prints the node's banner.
            self.channel.start()
            print(f"sipbill worker {worker.index} (pid {os.getpid()}) listening on "
                  + ", ".join(self.listening), flush=True)
        else:
            print("sipbill listening on " + ", ".join(self.listening), flush=True)

    async def _stats_snapshot(self) -> dict[str, Any]:
        assert self.ctx is not None
        return core_stats(self.ctx)

    async def _health(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        db_ok = False
        if ctx is not None:
            try:
                async with ctx.pool.acquire(timeout=2) as conn:
                    db_ok = await conn.fetchval("SELECT 1") == 1
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                db_ok = False
        body = {"status": "ok" if db_ok else "degraded", "database": db_ok,
                "listeners": self.listening}
        return web.json_response(body, status=200 if db_ok else 503)

    async def stop(self, grace: float = 2.0) -> None:
        ctx = self.ctx
        if ctx is not None:
            # Give in-flight transactions a moment to answer before the sockets go.
            deadline = time.monotonic() + grace
            while ctx.proxy.contexts and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for hook in reversed(ctx.shutdown_hooks):
                try:
                    await hook()
                except Exception:
                    log.exception("event=shutdown_hook_failed")
            await ctx.proxy.close()
            if self.channel is not None:
                await self.channel.close()
            await ctx.location.close()
            await ctx.stack.close()
            await ctx.events.drain()
            await ctx.subscribers.close()
            await ctx.notify.close()
        if self.control is not None:
            await self.control.close()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        if self.pool is not None:
            await self.pool.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
        log.info("event=stopped")


#: Young-generation threshold of the cyclic garbage collector (CPython's default is 700).
#: A busy server allocates thousands of short-lived objects per second; collecting every 700
#: promotes live ones (open transactions, queued writes) to the older generations, whose
#: full collections walk the whole heap and paused the event loop for 30-400 ms (measured
#: with gc.callbacks under bench/sip_load.py: the p99 of every transaction was such pauses).
#: Under steady load this count hardly moves (see :mod:`sipbill.gcpace`), so the young and
#: middle generations are also collected on a clock.
GC_THRESHOLD: Final = (20_000, 20, 20)


def tune_gc() -> None:
    """Once the server has started: collect, then move everything that exists now (modules,
    settings, loaded bindings and rates) into the permanent generation with ``gc.freeze()``,
    so later collections never walk it again, and collect the young generation less often
    on allocation counts (:class:`sipbill.gcpace.GcPacer` collects it on a clock as well)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    log.info("event=gc_tuned frozen=%d threshold=%s", gc.get_freeze_count(), GC_THRESHOLD)


async def run(settings: Settings, stop: asyncio.Event | None = None,
              worker: WorkerSpec | None = None) -> int:
    app = Application(settings, worker)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except Exception:
        log.exception("event=start_failed")
        await app.stop(grace=0)
        return 1
    tune_gc()
    app.gc_pacer.start()
    log.info("event=started native=%s core=%r", sipcore.NATIVE, sipcore.NATIVE_STATUS)
    try:
        await stop.wait()
    finally:
        app.gc_pacer.stop()
    log.info("event=stopping")
    await app.stop()
    return 0


def serve(settings: Settings, worker: WorkerSpec | None = None) -> int:
    import uvloop

    return uvloop.run(run(settings, worker=worker))
