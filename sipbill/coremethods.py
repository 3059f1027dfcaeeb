"""Control-socket methods of the core: ``stats``, ``config.show``, ``subscriber.*``.

Module methods (``ul.*``, ``account.*``, ``msilo.*`` ...) are registered by the modules
themselves; this file only holds what belongs to the composition root.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sipbill.configschema import as_dict
from sipbill.control import NOT_FOUND, ControlError, MethodRegistry
from sipcore.subscribers import SubscriberError

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
