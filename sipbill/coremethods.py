"""Control-socket methods of the core: ``stats``, ``config.show``, ``subscriber.*``.

Module methods (``ul.*``, ``account.*``, ``msilo.*`` ...) are registered by the modules
themselves; this file only holds what belongs to the composition root.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any

from sipbill.configschema import as_dict
from sipbill.control import NOT_FOUND, ControlError, MethodRegistry
from sipcore.errors import SipParseError
from sipcore.registrar import canonical_aor
from sipcore.subscribers import SubscriberError
from sipcore.uri import SipUri, parse_uri
from sipcore.workers import WorkerChannel

if TYPE_CHECKING:
    from sipbill.app import AppContext


def core_stats(ctx: AppContext) -> dict[str, Any]:
    """This process's counters (``stats`` on the control socket), plain dicts and numbers."""
    layer = ctx.stack.layer
    out: dict[str, Any] = {
        "uptime": round(time.time() - ctx.started_at, 3),
        "transport": dict(ctx.stack.transports.stats),
        "tcp_connections": len(ctx.stack.transports.connections),
        "stack": dict(ctx.stack.stats),
        "requests_in": dict(ctx.stack.requests_in),
        "parse_errors_by_status": dict(ctx.stack.parse_error_reasons),
        "transactions": layer.transaction_count,
        "server_transactions": layer.server_transaction_count,
        "transaction_stats": dataclasses.asdict(layer.stats),
        "proxy": dict(ctx.proxy.stats),
        "dialogs": len(ctx.proxy.dialogs),
        "location": {"aors": ctx.location.aor_count,
                     "bindings": ctx.location.binding_count, **ctx.location.stats},
        "subscribers": {"listening": int(ctx.subscribers.listening),
                        **ctx.subscribers.stats},
        "notify": {"listening": int(ctx.notify.listening), **ctx.notify.stats},
        "pipeline_errors": ctx.pipeline.errors,
    }
    channel = ctx.services.get("workers")
    if isinstance(channel, WorkerChannel):
        out["worker"] = {"index": channel.index, "pid": os.getpid(),
                         "channel": dict(channel.stats),
                         "diverted_to": {str(k): v for k, v in channel.diverted_to.items()}}
    return out


#: What every worker holds a whole copy of (the location cache, whose expiry timers run in
#: each worker) or that is not a count: reported as worker 0 sees it, never summed.
NOT_SUMMED: frozenset[tuple[str, ...]] = frozenset({
    ("uptime",), ("location", "aors"), ("location", "bindings"), ("location", "expired"),
    ("worker",),
})


def merge_stats(total: dict[str, Any], other: dict[str, Any],
                path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Add the numbers of ``other`` into ``total`` (nested dicts by key), except
    :data:`NOT_SUMMED`. Returns ``total``."""
    for key, value in other.items():
        where = (*path, key)
        if where in NOT_SUMMED or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            current = total.get(key, 0)
            if isinstance(current, int | float) and not isinstance(current, bool):
                total[key] = current + value
        elif isinstance(value, dict):
            inner = total.setdefault(key, {})
            if isinstance(inner, dict):
                merge_stats(inner, value, where)
    return total


async def node_stats(ctx: AppContext) -> dict[str, Any]:
    """The node's totals: this process's counters plus every other worker's (asked over the
    worker channel), with each worker's own figures under ``workers``."""
    local = core_stats(ctx)
    channel = ctx.services.get("workers")
    if not isinstance(channel, WorkerChannel):
        return local
    others = await channel.query("stats")
    per_worker = [local, *(others[i] for i in sorted(others) if isinstance(others[i], dict))]
    total = copy.deepcopy(local)
    total.pop("worker", None)
    for snap in per_worker[1:]:
        merge_stats(total, snap)
    total["workers"] = [
        {"index": snap.get("worker", {}).get("index"), "pid": snap.get("worker", {}).get("pid"),
         "requests_in": snap.get("requests_in", {}),
         "udp_datagrams_in": snap.get("transport", {}).get("udp_datagrams_in", 0),
         "channel": snap.get("worker", {}).get("channel", {}),
         "dialogs": snap.get("dialogs", 0)}
        for snap in per_worker
    ]
    total["workers_answering"] = len(per_worker)
    total["workers_configured"] = channel.workers
    return total


def register_core_methods(registry: MethodRegistry, ctx: AppContext) -> None:
    async def stats() -> dict[str, Any]:
        return await node_stats(ctx)

    async def config_show() -> Any:
        data = as_dict(ctx.settings, redact=("password", "url", "secret"))
        return data

    async def sub_list(domain: str | None = None) -> list[dict[str, Any]]:
        return [{"username": s.username, "domain": s.domain, "created_at": s.created_at}
                for s in await ctx.subscribers.list(domain)]

    def _split(user: str) -> tuple[str, str]:
        name, _, domain = user.partition("@")
        return name, domain or ctx.settings.server.domains[0]

    async def sub_add(user: str, password: str) -> str:
        name, domain = _split(user)
        try:
            await ctx.subscribers.add(name, domain, password)
        except SubscriberError as exc:
            raise ControlError(409, str(exc)) from exc
        return f"{name}@{domain}"

    async def sub_passwd(user: str, password: str) -> str:
        name, domain = _split(user)
        try:
            await ctx.subscribers.set_password(name, domain, password)
        except SubscriberError as exc:
            raise ControlError(NOT_FOUND, str(exc)) from exc
        return f"{name}@{domain}"

    async def sub_del(user: str) -> str:
        name, domain = _split(user)
        try:
            await ctx.subscribers.delete(name, domain)
        except SubscriberError as exc:
            raise ControlError(NOT_FOUND, str(exc)) from exc
        return f"{name}@{domain}"

    def _aor(text: str) -> str:
        """``1001``, ``1001@localhost`` or ``sip:1001@localhost`` -> the canonical AoR."""
        t = text if text.startswith(("sip:", "sips:")) else "sip:" + text
        if "@" not in t:
            t = f"{t}@{ctx.settings.server.domains[0]}"
        try:
            uri = parse_uri(t)
        except SipParseError as exc:
            raise ControlError(400, f"not an address of record: {text!r}") from exc
        if not isinstance(uri, SipUri):
            raise ControlError(400, f"not a SIP address of record: {text!r}")
        return canonical_aor(uri, ctx.settings.server.domain_aliases)

    async def ul_dump() -> dict[str, Any]:
        return {"aors": ctx.location.aor_count, "bindings": ctx.location.binding_count,
                "records": ctx.location.dump()}

    async def ul_lookup(aor: str) -> list[dict[str, Any]]:
        key = _aor(aor)
        found = ctx.location.dump(key).get(key)
        if not found:
            raise ControlError(NOT_FOUND, f"no bindings for {key}")
        return found

    async def ul_rm(aor: str) -> int:
        return await ctx.location.remove(_aor(aor))

    registry.register("ul.dump", ul_dump, help="Every registered binding, by address of record.")
    registry.register("ul.lookup", ul_lookup, help="The bindings of one address of record.",
                      params_doc={"aor": "1001, 1001@domain or sip:1001@domain"})
    registry.register("ul.rm", ul_rm, help="Remove every binding of an address of record.",
                      params_doc={"aor": "1001, 1001@domain or sip:1001@domain"})
    registry.register("stats", stats, help="Counters of transports, transactions and the proxy "
                      "(with several workers: the node's totals, and each worker's under "
                      "'workers').")
    registry.register("config.show", config_show,
                      help="The running configuration, secrets redacted.")
    registry.register("subscriber.list", sub_list, help="Subscribers, optionally of one domain.",
                      params_doc={"domain": "only this domain"})
    registry.register("subscriber.add", sub_add, help="Add a subscriber.",
                      params_doc={"user": "USER or USER@DOMAIN", "password": "the password"})
    registry.register("subscriber.passwd", sub_passwd, help="Change a subscriber's password.",
                      params_doc={"user": "USER or USER@DOMAIN", "password": "new password"})
    registry.register("subscriber.del", sub_del, help="Delete a subscriber.",
                      params_doc={"user": "USER or USER@DOMAIN"})
