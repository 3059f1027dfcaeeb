"""The demo of ``make run`` (config/demo.toml): its [billing] section loads, names the shipped
rate table wherever the server is started from, and that table rates the numbers of issue 4
as dialled (+CC..., 00CC...) with the costs its table gives."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from billing.csvimport import parse_rates
from billing.rating import Rating, cost, normalise_number
from billing.service import rates_csv_path
from billing.settings import BillingSettings
from sipbill.modules import register_module_settings
from sipbill.settings import load_settings

CONFIG = Path(__file__).resolve().parents[2] / "config"


def demo_billing() -> BillingSettings:
    register_module_settings()
    section = load_settings(CONFIG / "demo.toml").modules["billing"]
    assert isinstance(section, BillingSettings)
    return section


@pytest.mark.parametrize("cwd", [CONFIG.parent, Path("/")])
def test_demo_rates_are_found_from_any_directory(cwd: Path) -> None:
    settings = demo_billing()
    assert settings.default_account.initial_balance == "10.00"
    assert settings.default_account.currency == "EUR"
    here = Path.cwd()
    os.chdir(cwd)
    try:
        path = rates_csv_path(settings.rates_csv, CONFIG)
        assert path.resolve() == (CONFIG / "rates.example.csv").resolve()
    finally:
        os.chdir(here)


@pytest.mark.parametrize(
    ("dialled", "prefix", "seconds", "expected"),
    [
        ("+12125550100", "1", 61, "0.04"),  # 60/60: 120 s * 0.02/min
        ("00442079460000", "44", 31, "0.03"),  # 30/6: 36 s * 0.05/min = 0.03
        ("+49891234567", "49", 10, "0.07"),  # 1/1 + 0.05: 0.05 + 10 s * 0.10/min -> 0.07
        ("004930123456", "4930", 61, "0.05"),  # 60/1: 61 s * 0.04/min = 0.0407 -> 0.05
    ],
)
def test_demo_rate_table(dialled: str, prefix: str, seconds: int, expected: str) -> None:
    settings = demo_billing()
    path = rates_csv_path(settings.rates_csv, CONFIG)
    with open(path, encoding="utf-8") as fh:
        rating = Rating(parse_rates(fh, currency=settings.currency))
    number = normalise_number(dialled, settings.numbers)
    assert number is not None
    rate = rating.lookup(number, datetime(2026, 11, 18, 12, tzinfo=UTC))
    assert rate is not None and rate.prefix == prefix
    assert cost(rate, seconds) == Decimal(expected)
