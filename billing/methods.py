"""Control-socket methods of billing: ``account.*``, ``calls.*``, ``rates.reload``, ``missed.*``.

Registered by :func:`register_methods` on the server's :class:`sipbill.control.MethodRegistry`
(msgpack RPC on the control socket, see :mod:`sipbill.control`); ``sipbill ctl`` and the web
portal call them. Accounts are named as ``sipbill account`` names them: an id, an account
name, or a subscriber (``1001`` meaning ``1001@<first domain>``, or ``1001@domain``). Money
goes over the wire as decimal strings, never floats.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from billing.ledger import Account, AccountNotFound, LedgerError
from billing.money import MoneyError
from sipbill.control import NOT_FOUND, ControlError, MethodRegistry

if TYPE_CHECKING:
    from billing.service import BillingService

_ACCOUNT_DOC = "account id, account name, or subscriber (1001 or 1001@domain)"
_USER_DOC = "the callee: 1001 or 1001@domain"


def register_methods(registry: MethodRegistry, service: BillingService,
                     default_domain: str) -> None:
    """Add billing's methods to ``registry`` (closures over the running service)."""
    ledger = service.ledger
    credit = service.credit

    def subscriber(user: str) -> str:
        return user if "@" in user else f"{user}@{default_domain}"

    async def find(ref: str) -> Account:
        try:
            return await ledger.find_account(ref)
        except AccountNotFound:
            pass
        try:
            return await ledger.find_account(subscriber(ref))
        except AccountNotFound as exc:
            raise ControlError(NOT_FOUND, str(exc)) from exc

    async def summary(account: Account) -> dict[str, Any]:
        reserved = await ledger.reserved(account.id)
        return {
            "id": account.id, "name": account.name, "currency": account.currency,
            "balance": account.balance, "reserved": reserved,
            "display_balance": account.balance - reserved,
            "available": account.balance + account.credit_limit - reserved,
            "credit_limit": account.credit_limit, "status": account.status,
            "lock_reason": account.lock_reason,
        }

    async def balance(account: str) -> dict[str, Any]:
        return await summary(await find(account))

    async def topup(account: str, amount: Decimal, reference: str | None = None,
                    reason: str = "top-up") -> dict[str, Any]:
        found = await find(account)
        try:
            entry = await ledger.topup(found.id, amount, reason=reason, reference=reference)
        except (MoneyError, LedgerError) as exc:
            raise ControlError(400, str(exc)) from exc
        return {"entry": entry, "account": await summary(await ledger.get_account(found.id))}

    async def lock(account: str, reason: str = "manual") -> dict[str, Any]:
        found = await find(account)
        try:
            return await summary(await ledger.lock(found.id, reason))
        except LedgerError as exc:
            raise ControlError(400, str(exc)) from exc

    async def unlock(account: str) -> dict[str, Any]:
        return await summary(await ledger.unlock((await find(account)).id))

    async def statement(account: str, start: datetime | None = None,
                        end: datetime | None = None) -> Any:
        found = await find(account)
        until = end or datetime.now(UTC)
        since = start or until - timedelta(days=31)
        return await ledger.statement(found.id, since, until)

    async def calls_active() -> list[dict[str, Any]]:
        rows = await credit.active_calls()
        return [{
            "call_id": r["call_id"], "account_id": r["account_id"],
            "caller": f"{r['caller_username']}@{r['caller_domain']}"
                      if r.get("caller_username") is not None else None,
            "callee": r.get("callee"), "destination": r.get("destination"),
            "start": r.get("start_at"), "answered": r["answered_at"],
            "reserved": r["amount"], "max_duration": r["max_duration"], "node": r["node"],
            "local": r["call_id"] in service.calls,
        } for r in rows]

    async def calls_kill(call_id: str) -> Any:
        try:
            return await service.kill(call_id)
        except LookupError as exc:
            raise ControlError(NOT_FOUND, str(exc)) from exc

    async def rates_reload() -> dict[str, Any]:
        loaded = await credit.rating.reload(service.pool)
        return {"rates": loaded, "tables": credit.rating.tables}

    async def missed_list(user: str, offset: int = 0, limit: int = 20,
                          unseen_only: bool = False) -> list[dict[str, Any]]:
        if offset < 0 or not 1 <= limit <= 1000:
            raise ControlError(400, "offset must be >= 0 and limit 1-1000")
        rows = await credit.missed_calls(subscriber(user), unseen_only=unseen_only,
                                         offset=offset, limit=limit)
        return [{
            "id": r["id"], "call_id": r["call_id"],
            "caller": f"{r['caller_username']}@{r['caller_domain']}",
            "at": r["start_at"], "status": r["status"], "reason": r["disconnect_reason"],
            "seen": r["seen"],
        } for r in rows]

    async def missed_seen(user: str, ids: list[int] | None = None) -> int:
        return await credit.mark_seen(subscriber(user), ids)

    registry.register("account.balance", balance,
                      help="Balance, reservations of calls in progress and available funds.",
                      params_doc={"account": _ACCOUNT_DOC})
    registry.register("account.topup", topup,
                      help="Credit an account; with a reference a repeated top-up is a no-op.",
                      params_doc={"account": _ACCOUNT_DOC, "amount": "positive amount",
                                  "reference": "payment reference (idempotency key)",
                                  "reason": "journal text"})
    registry.register("account.lock", lock,
                      help="Lock an account: its billable calls are refused with 403.",
                      params_doc={"account": _ACCOUNT_DOC, "reason": "why (default manual)"})
    registry.register("account.unlock", unlock, help="Unlock an account.",
                      params_doc={"account": _ACCOUNT_DOC})
    registry.register("account.statement", statement,
                      help="Journal and CDRs of a period (default: the last 31 days).",
                      params_doc={"account": _ACCOUNT_DOC, "start": "from (ISO 8601)",
                                  "end": "until, exclusive (ISO 8601, default now)"})
    registry.register("calls.active", calls_active,
                      help="Calls holding a reservation, on every node sharing the database.")
    registry.register("calls.kill", calls_kill,
                      help="End an answered call (BYE both ways) and settle it as killed.",
                      params_doc={"call_id": "the Call-ID"})
    registry.register("rates.reload", rates_reload,
                      help="Reload every rate table from the database.")

    async def rates_unbillable(all: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        if not 1 <= limit <= 1000:
            raise ControlError(400, "limit must be 1-1000")
        return await credit.unbillable_attempts(pending_only=not all, limit=limit)

    async def rates_rerate() -> list[dict[str, str]]:
        matched = await credit.rerate_unbillable()
        return [{"call_id": c, "destination": d, "prefix": p} for c, d, p in matched]

    registry.register("rates.unbillable", rates_unbillable,
                      help="Calls refused for lack of a rate, newest first (ranges to add).",
                      params_doc={"all": "include attempts already re-rated",
                                  "limit": "at most this many (1-1000)"})
    registry.register("rates.rerate", rates_rerate,
                      help="Reload the rates and rate the recorded unbillable attempts that "
                           "now match a range (nothing is charged: the calls were refused).")
    registry.register("missed.list", missed_list,
                      help="Missed calls of a subscriber, newest first.",
                      params_doc={"user": _USER_DOC, "offset": "skip this many",
                                  "limit": "at most this many (1-1000)",
                                  "unseen_only": "only those not marked seen"})
    registry.register("missed.seen", missed_seen,
                      help="Mark missed calls seen (all of them, or the given ids).",
                      params_doc={"user": _USER_DOC, "ids": "missed call ids"})
