"""The [billing] settings: defaults, and validation errors that name the dotted key."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from billing.settings import BalanceHeaderSettings, BillingSettings
from sipbill.configschema import ConfigError, load_section


def test_defaults() -> None:
    s = load_section(BillingSettings, {}, "billing")
    assert s.enabled and s.currency == "EUR" and s.max_call_duration == 3600
    assert s.numbers.international_prefix == "00" and s.numbers.strip_plus
    assert s.balance_header.name == "Balance-amount" and s.balance_header.decimals == 2
    assert s.balance_header.methods == ("REGISTER", "INVITE")
    assert (s.balance_http.path, s.balance_http.login_param, s.balance_http.password_param) == (
        "/balance.php", "login", "password"
    )
    assert s.default_account.initial_balance == "10.00"
    assert s.unbillable_status in (403, 404) and s.max_concurrent_calls_per_account == 0


def test_balance_header_rendering() -> None:
    s = BillingSettings()
    assert s.balance_header.header("REGISTER", Decimal("10.254")) == ("Balance-amount", "10.25")
    assert s.balance_header.header("invite", Decimal("2.785")) == ("Balance-amount", "2.79")
    assert s.balance_header.header("MESSAGE", Decimal(1)) is None
    yen = BalanceHeaderSettings(decimals=0, methods=("REGISTER",))
    assert yen.header("REGISTER", Decimal("950")) == ("Balance-amount", "950")
    assert yen.header("INVITE", Decimal("950")) is None
    assert BalanceHeaderSettings(enabled=False).header("REGISTER", Decimal(1)) is None


def test_a_full_section_loads() -> None:
    s = load_section(BillingSettings, {
        "currency": "JPY", "timezone": "Asia/Tokyo", "unbillable_status": 403,
        "numbers": {"international_prefix": "010", "national_prefix": "0", "country_code": "81"},
        "balance_header": {"name": "X-Balance", "decimals": 0, "methods": ["REGISTER"]},
        "balance_http": {"path": "/billing/bal.pl", "login_param": "account",
                         "password_param": "pwd"},
        "default_account": {"currency": "JPY", "initial_balance": "1000"},
        "diversion_uri": "sip:voicemail@example.com",
    }, "billing")  # fmt: skip
    assert s.zone.key == "Asia/Tokyo" and s.balance_http.password_param == "pwd"


@pytest.mark.parametrize(
    ("doc", "key", "words"),
    [
        ({"currency": "EURO"}, "billing.currency", "unknown currency"),
        ({"timezone": "Mars/Olympus"}, "billing.timezone", "unknown time zone"),
        ({"max_call_duration": 0}, "billing.max_call_duration", "1-86400"),
        ({"unbillable_status": 500}, "billing.unbillable_status", "one of"),
        ({"max_concurrent_calls_per_account": -1}, "billing.max_concurrent_calls_per_account",
         "0"),
        ({"diversion_uri": "voicemail"}, "billing.diversion_uri", "sip:"),
        ({"numbers": {"international_prefix": "+"}}, "billing.numbers.international_prefix",
         "digits"),
        ({"numbers": {"national_prefix": "0"}}, "billing.numbers.country_code", "together"),
        ({"balance_header": {"name": "Balance amount"}}, "billing.balance_header.name", "token"),
        ({"balance_header": {"decimals": 9}}, "billing.balance_header.decimals", "0-8"),
        ({"balance_header": {"methods": ["BYE"]}}, "billing.balance_header.methods[0]",
         "REGISTER or INVITE"),
        ({"balance_http": {"path": "balance.php"}}, "billing.balance_http.path", "'/'"),
        ({"balance_http": {"password_param": "login"}}, "billing.balance_http.password_param",
         "differ"),
        ({"default_account": {"initial_balance": "ten"}},
         "billing.default_account.initial_balance", "not a number"),
        ({"default_account": {"initial_balance": 10.0}},
         "billing.default_account.initial_balance", "string"),
        ({"default_account": {"currency": "XYZ"}}, "billing.default_account.currency",
         "ISO 4217"),
        ({"recovery": {"node_timeout": 5}}, "billing.recovery.node_timeout", "heartbeat"),
        ({"bogus": 1}, "billing.bogus", "unknown setting"),
    ],
)
def test_bad_values_name_the_key(doc: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_section(BillingSettings, doc, "billing")
    assert info.value.key == key
    assert words in info.value.message
