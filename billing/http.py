"""The softphone balance page of seed 000: ``GET /balance.php?login=1234&password=5678``.

The softphone fetches a small HTML page and reads the number after ``Balance:`` (the seed's
PHP script prints ``Balance: 2.79``); a client sending ``Accept: application/json`` gets
``{"balance": "2.79", "currency": "EUR"}`` instead (the amount as a string: no float touches
money). The path and the parameter names are configurable (``/billing.php?account=..&pwd=..``).

The password is accepted in plain text or as its MD5 hex digest (the seed's softphone may send
either). Only ``MD5(password)`` is stored (:mod:`sipcore.subscribers`), so both forms are
compared against it, in constant time (``hmac.compare_digest``), and an unknown login costs the
same comparisons as a known one. Wrong credentials get 403 and no balance; a source address
with ``max_failures`` failures within ``failure_window`` seconds gets 429 Too Many Requests
(RFC 6585 §4) until the window has passed (:class:`sipcore.ratelimit.FailureCounter`).

The balance is the one the ``Balance-amount`` header shows: less the reservations of calls in
progress (:meth:`billing.ledger.Ledger.display_balance`, cached by
:class:`billing.balances.BalanceCache`).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from billing.credit import DATABASE_UNREACHABLE
from billing.money import format_amount
from billing.settings import BillingSettings
from sipcore.ratelimit import FailureCounter

if TYPE_CHECKING:
    from billing.balances import BalanceCache
    from sipcore.subscribers import SubscriberStore

log = logging.getLogger("billing.http")

_NO_SUCH_USER = hashlib.md5(b"\0no such subscriber\0").hexdigest()


def password_matches(given: str, stored_md5: str) -> bool:
    """``given`` is the password or its MD5 hex digest, ``stored_md5`` the stored MD5."""
    plain = hmac.compare_digest(hashlib.md5(given.encode()).hexdigest(), stored_md5)
    hashed = hmac.compare_digest(given.strip().lower().encode(), stored_md5.encode())
    return plain | hashed  # both compared every time: no early exit to time


class BalancePage:
    """aiohttp handler of the balance page (``app.router.add_get(path, page.handle)``)."""

    def __init__(
        self,
        settings: BillingSettings,
        balances: BalanceCache,
        subscribers: SubscriberStore,
        default_domain: str,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.cfg = settings.balance_http
        self.balances = balances
        self.subscribers = subscribers
        self.default_domain = default_domain
        self.monotonic = monotonic
        self.failures = FailureCounter(self.cfg.failure_window,
                                       max_events=max(64, self.cfg.max_failures))

    async def handle(self, request: web.Request) -> web.Response:
        source = request.remote or "-"
        now = self.monotonic()
        if self.failures.blocked(source, now, self.cfg.max_failures):
            return web.Response(status=429, text="Too Many Requests\n",
                                headers={"Retry-After": str(int(self.cfg.failure_window))})
        login = request.query.get(self.cfg.login_param, "")
        password = request.query.get(self.cfg.password_param, "")
        username, _, domain = login.partition("@")
        domain = domain or self.default_domain
        try:
            subscriber = (await self.subscribers.get(username, domain)) if username else None
            ok = password_matches(password, subscriber.password_md5 if subscriber
                                  else _NO_SUCH_USER) and subscriber is not None
            shown = await self.balances.display_balance(username, domain) if ok else None
        except DATABASE_UNREACHABLE as exc:
            log.warning("event=balance_page_failed error=%r", exc)
            return web.Response(status=503, text="Service Unavailable\n")
        if not ok:
            self.failures.record(source, now)
            log.info("event=balance_login_failed source=%s login=%r", source, login[:64])
            return web.Response(status=403, text="Forbidden\n")
        if shown is None:
            return web.Response(status=404, text="No billing account\n")
        amount = format_amount(shown.amount, self.settings.balance_header.decimals)
        if "application/json" in request.headers.get("Accept", ""):
            return web.json_response({"balance": amount, "currency": shown.currency})
        body = (f"<HTML>\n<HEAD><TITLE>Balance</TITLE></HEAD>\n<BODY>\n"
                f"Balance: {html.escape(amount)}\n</BODY>\n</HTML>\n")
        return web.Response(text=body, content_type="text/html")
