"""The ``[billing]`` section of the TOML configuration (ARCHITECTURE.md principle 6).

Loaded by :func:`sipbill.configschema.load_section`; every ``validate()`` returns
``(relative_key, message)`` pairs so an error names the dotted key
(``billing.balance_header.decimals: must be 0-8``). Amounts are strings, not TOML floats, so
``"0.10"`` stays exactly ten cents.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from billing.money import (
    MAX_DECIMALS,
    MoneyError,
    format_amount,
    is_currency,
    minor_units,
    parse_amount,
)

_SIP_METHODS = ("REGISTER", "INVITE")

SECTION = "billing"
"""The TOML section (:mod:`sipbill.modules` registers :data:`SETTINGS` under it)."""


def _amount_problem(key: str, text: str, *, allow_negative: bool = False) -> list[tuple[str, str]]:
    try:
        parse_amount(text, allow_negative=allow_negative)
    except MoneyError as exc:
        return [(key, str(exc))]
    return []


@dataclass(frozen=True, slots=True)
class NumberSettings:
    """How a dialled number becomes the digits-only form rates are keyed by.

    ``+4930123`` and ``004930123`` both become ``4930123``; with ``national_prefix = "0"`` and
    ``country_code = "49"``, ``030123`` becomes ``4930123`` too.
    """

    international_prefix: str = "00"
    strip_plus: bool = True
    national_prefix: str = ""
    country_code: str = ""

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for key in ("international_prefix", "national_prefix", "country_code"):
            value = getattr(self, key)
            if value and not value.isdigit():
                problems.append((key, f"must be digits, got {value!r}"))
        if bool(self.national_prefix) != bool(self.country_code):
            problems.append(("country_code", "national_prefix and country_code go together"))
        if self.national_prefix and self.national_prefix == self.international_prefix:
            problems.append(("national_prefix", "must differ from international_prefix"))
        return problems


@dataclass(frozen=True, slots=True)
class BalanceHeaderSettings:
    """The ``Balance-amount`` header on 200 OK to REGISTER and INVITE (seed 000)."""

    enabled: bool = True
    name: str = "Balance-amount"
    decimals: int = 2
    methods: tuple[str, ...] = _SIP_METHODS

    def header(self, method: str, amount: Decimal) -> tuple[str, str] | None:
        """``(name, value)`` to add to a 200 OK to ``method``, or None if not configured:
        ``("Balance-amount", "10.25")``. The amount is rounded half-up for display only."""
        if not self.enabled or method.upper() not in self.methods:
            return None
        return self.name, format_amount(amount, self.decimals)

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        token = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
        if not self.name or not set(self.name) <= token:
            problems.append(("name", f"must be a SIP header name token, got {self.name!r}"))
        if not 0 <= self.decimals <= MAX_DECIMALS:
            problems.append(("decimals", f"must be 0-{MAX_DECIMALS}, got {self.decimals}"))
        for i, method in enumerate(self.methods):
            if method not in _SIP_METHODS:
                problems.append((f"methods[{i}]", f"must be REGISTER or INVITE, got {method!r}"))
        return problems


@dataclass(frozen=True, slots=True)
class BalanceHttpSettings:
    """The softphone balance page of seed 000: ``GET /balance.php?login=..&password=..``."""

    enabled: bool = True
    path: str = "/balance.php"
    login_param: str = "login"
    password_param: str = "password"
    max_failures: int = 5  # failed logins per source address ...
    failure_window: float = 60.0  # ... within this many seconds before answering 429

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.path.startswith("/"):
            problems.append(("path", f"must start with '/', got {self.path!r}"))
        if not self.login_param:
            problems.append(("login_param", "must not be empty"))
        if not self.password_param or self.password_param == self.login_param:
            problems.append(("password_param", "must be set and differ from login_param"))
        if self.max_failures < 1:
            problems.append(("max_failures", "must be at least 1"))
        if self.failure_window <= 0:
            problems.append(("failure_window", "must be positive"))
        return problems


@dataclass(frozen=True, slots=True)
class DefaultAccountSettings:
    """Accounts created for seeded subscribers (``[[seed.subscribers]]``) when missing."""

    currency: str = "EUR"
    initial_balance: str = "10.00"
    credit_limit: str = "0"
    low_balance_threshold: str = ""  # empty: no low-balance handling
    auto_recharge_amount: str = ""  # empty: no auto-recharge (locked when low)

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not is_currency(self.currency):
            problems.append(("currency", f"unknown ISO 4217 currency {self.currency!r}"))
        problems += _amount_problem("initial_balance", self.initial_balance)
        problems += _amount_problem("credit_limit", self.credit_limit)
        if self.low_balance_threshold:
            problems += _amount_problem("low_balance_threshold", self.low_balance_threshold)
        if self.auto_recharge_amount:
            problems += _amount_problem("auto_recharge_amount", self.auto_recharge_amount)
            if not problems and Decimal(self.auto_recharge_amount) == 0:
                problems.append(("auto_recharge_amount", "must be positive"))
        return problems


@dataclass(frozen=True, slots=True)
class RecoverySettings:
    """The crash-recovery sweep of open reservations (credit.CreditControl.recover)."""

    heartbeat_interval: float = 15.0  # how often a node records the last known point of calls
    node_timeout: float = 60.0  # a node silent this long is considered gone
    grace: float = 30.0  # slack after a call's max duration before it is forced closed

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.heartbeat_interval <= 0:
            problems.append(("heartbeat_interval", "must be positive"))
        if self.node_timeout <= self.heartbeat_interval:
            problems.append(("node_timeout", "must be longer than heartbeat_interval"))
        if self.grace < 0:
            problems.append(("grace", "must not be negative"))
        return problems


@dataclass(frozen=True, slots=True)
class BillingSettings:
    """The ``[billing]`` section."""

    enabled: bool = True
    currency: str = "EUR"  # currency of rate tables imported without an explicit one
    timezone: str = "UTC"  # time-of-day/weekday rate bands are read in this zone
    rate_table: str = "default"  # table used by accounts created without one
    rates_csv: str = ""  # seed rate table imported at start-up when the table is empty
    numbers: NumberSettings = field(default_factory=NumberSettings)
    max_call_duration: int = 3600  # seconds; no reservation covers more
    unbillable_status: Literal[403, 404] = 404
    no_account_status: Literal[403, 404] = 403
    max_concurrent_calls_per_account: int = 0  # 0: no limit
    concurrent_calls_status: Literal[403, 486] = 486
    diversion_uri: str = ""  # voicemail for calls to locked accounts (an account may override)
    balance_header: BalanceHeaderSettings = field(default_factory=BalanceHeaderSettings)
    balance_http: BalanceHttpSettings = field(default_factory=BalanceHttpSettings)
    default_account: DefaultAccountSettings = field(default_factory=DefaultAccountSettings)
    recovery: RecoverySettings = field(default_factory=RecoverySettings)

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        try:
            minor_units(self.currency)
        except MoneyError as exc:
            problems.append(("currency", str(exc)))
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            problems.append(("timezone", f"unknown time zone {self.timezone!r}"))
        if not self.rate_table:
            problems.append(("rate_table", "must not be empty"))
        if not 1 <= self.max_call_duration <= 86400:
            problems.append(("max_call_duration", "must be 1-86400 seconds"))
        if self.max_concurrent_calls_per_account < 0:
            problems.append(("max_concurrent_calls_per_account", "must be 0 (no limit) or more"))
        if self.diversion_uri and not self.diversion_uri.startswith(("sip:", "sips:", "tel:")):
            problems.append(("diversion_uri", "must be a sip:, sips: or tel: URI"))
        return problems

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


SETTINGS = BillingSettings
