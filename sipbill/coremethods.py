"""Control-socket methods of the core: ``stats``, ``config.show``, ``subscriber.*``.

Module methods (``ul.*``, ``account.*``, ``msilo.*`` ...) are registered by the modules
themselves; this file only holds what belongs to the composition root.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sipbill.configschema import as_dict
from sipbill.control import NOT_FOUND, ControlError, MethodRegistry
from sipcore.errors import SipParseError
from sipcore.registrar import canonical_aor
from sipcore.subscribers import SubscriberError
from sipcore.uri import SipUri, parse_uri

if TYPE_CHECKING:
    from sipbill.app import AppContext


def register_core_methods(registry: MethodRegistry, ctx: AppContext) -> None:
    async def stats() -> dict[str, Any]:
        layer = ctx.stack.layer
        return {
            "uptime": round(time.time() - ctx.started_at, 3),
            "transport": dict(ctx.stack.transports.stats),
            "tcp_connections": len(ctx.stack.transports.connections),
            "stack": dict(ctx.stack.stats),
            "parse_errors_by_status": dict(ctx.stack.parse_error_reasons),
            "transactions": layer.transaction_count,
            "server_transactions": layer.server_transaction_count,
            "transaction_stats": layer.stats,
            "proxy": dict(ctx.proxy.stats),
            "dialogs": len(ctx.proxy.dialogs),
            "location": {"aors": ctx.location.aor_count,
                         "bindings": ctx.location.binding_count, **ctx.location.stats},
            "pipeline_errors": ctx.pipeline.errors,
        }

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
    registry.register("stats", stats, help="Counters of transports, transactions and the proxy.")
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
