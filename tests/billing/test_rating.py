"""Rating: normalisation, longest-prefix match, bands, exact costs and max_duration properties.

The demo rate table (issue 4): 1 -> 0.0200 60/60; 44 -> 0.0500 30/6;
49 -> 0.1000 1/1 + 0.0500 connect; 4930 -> 0.0400 60/1. Costs round up to the cent.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.money import ROUNDING_MODES
from billing.rating import (
    Rate,
    Rating,
    billed_duration,
    cost,
    max_duration,
    normalise_number,
    rate_from_snapshot,
)
from billing.settings import NumberSettings

US = Rate("1", Decimal("0.0200"), first_increment=60, next_increment=60)
UK = Rate("44", Decimal("0.0500"), first_increment=30, next_increment=6)
DE = Rate("49", Decimal("0.1000"), connect_fee=Decimal("0.0500"), first_increment=1,
          next_increment=1)
BERLIN = Rate("4930", Decimal("0.0400"), first_increment=60, next_increment=1)
NOON = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)  # a Wednesday


def test_normalisation_of_international_forms() -> None:
    assert normalise_number("+4930123456") == "4930123456"
    assert normalise_number("004930123456") == "4930123456"
    assert normalise_number("+44 20 7946-0000") == "442079460000"
    assert normalise_number("(0049) 30.123") == "4930123"
    assert normalise_number("alice") is None
    assert normalise_number("+") is None
    assert normalise_number("+4930", NumberSettings(strip_plus=False)) is None
    assert normalise_number("0114930", NumberSettings(international_prefix="011")) == "4930"
    national = NumberSettings(national_prefix="0", country_code="49")
    assert normalise_number("030123", national) == "4930123"
    assert normalise_number("004930123", national) == "4930123"


def test_longest_prefix_wins() -> None:
    rating = Rating([US, UK, DE, BERLIN])
    assert rating.lookup("4930123456", NOON) == BERLIN
    assert rating.lookup("4940123456", NOON) == DE
    assert rating.lookup("442079460000", NOON) == UK
    assert rating.lookup("12125550100", NOON) == US
    assert rating.lookup("33123456", NOON) is None
    assert rating.lookup("4930123456", NOON, rate_table="other") is None
    assert len(rating) == 4 and rating.tables == ["default"]


def test_examples_from_the_issue_with_the_arithmetic() -> None:
    # 49, 1/1 with connect fee: 95 s -> 0.05 + 95/60 * 0.10 = 0.2083.. -> up 0.21
    assert billed_duration(DE, 95) == 95
    assert cost(DE, 95) == Decimal("0.21")
    # 1 s -> 0.05 + 1/60 * 0.10 = 0.0516.. -> 0.06
    assert cost(DE, 1) == Decimal("0.06")
    # 44, 30/6: 10 s -> billed 30 s -> 30/60 * 0.05 = 0.025 -> 0.03
    assert billed_duration(UK, 10) == 30
    assert cost(UK, 10) == Decimal("0.03")
    # 31 s -> 30 + 6 = 36 s -> 36/60 * 0.05 = 0.03 exactly
    assert billed_duration(UK, 31) == 36
    assert cost(UK, 31) == Decimal("0.03")
    # 95 s -> 30 + ceil(65/6)=11 * 6 = 96 s -> 96/60 * 0.05 = 0.08 exactly
    assert billed_duration(UK, 95) == 96
    assert cost(UK, 95) == Decimal("0.08")
    # 1, 60/60: 1 s -> 60 s -> 0.02; 61 s -> 120 s -> 0.04; 95 s -> 120 s -> 0.04
    assert cost(US, 1) == Decimal("0.02")
    assert cost(US, 61) == Decimal("0.04")
    assert cost(US, 95) == Decimal("0.04")
    # 4930, 60/1: 30 s -> 60 s -> 0.04; 61 s -> 61/60 * 0.04 = 0.04066.. -> 0.05
    assert cost(BERLIN, 30) == Decimal("0.04")
    assert cost(BERLIN, 61) == Decimal("0.05")
    # An unanswered call costs nothing, connect fee included.
    assert cost(DE, 0) == 0 and cost(US, 0) == 0


def test_rounding_and_decimals_per_rate() -> None:
    four = Rate("49", Decimal("0.1000"), connect_fee=Decimal("0.05"), first_increment=1,
                next_increment=1, decimals=4)
    assert cost(four, 95) == Decimal("0.2084")  # 0.208333.. up to 4 places
    half = Rate("49", Decimal("0.1000"), connect_fee=Decimal("0.05"), first_increment=1,
                next_increment=1, rounding="half_up")
    assert cost(half, 95) == Decimal("0.21")
    down = Rate("49", Decimal("0.1000"), connect_fee=Decimal("0.05"), first_increment=1,
                next_increment=1, rounding="down")
    assert cost(down, 95) == Decimal("0.20")
    yen = Rate("81", Decimal("10"), currency="JPY", first_increment=1, next_increment=1)
    assert cost(yen, 7) == Decimal("2")  # 7/60 * 10 = 1.17 -> up to the yen


def test_min_duration() -> None:
    rate = Rate("44", Decimal("0.06"), first_increment=30, next_increment=6, min_duration=40)
    assert billed_duration(rate, 1) == 40
    assert billed_duration(rate, 40) == 42  # 30 + 2*6
    assert cost(rate, 1) == Decimal("0.04")  # 40/60 * 0.06


def test_max_duration_examples() -> None:
    # 49 with 0.21: 96 s cost 0.05 + 0.16 = 0.21; 97 s cost 0.2116.. -> 0.22.
    assert max_duration(Decimal("0.21"), DE) == 96
    # 0.05 pays the connect fee but not the first second (0.0516.. -> 0.06).
    assert max_duration(Decimal("0.05"), DE) == 0
    assert max_duration(Decimal("0.06"), DE) == 6  # 0.05 + 6/60*0.10 = 0.06
    # 10.00 at 49: 0.05 + s/600 <= 10 -> s <= 5970, capped at the hour.
    assert max_duration(Decimal("10.00"), DE) == 3600
    assert max_duration(Decimal("10.00"), DE, cap=120) == 120
    # 60/60 at 0.02: 0.05 buys two minutes (0.04), not three (0.06).
    assert max_duration(Decimal("0.05"), US) == 120
    assert max_duration(Decimal("0.01"), US) == 0
    # 30/6 at 0.05: 0.10 buys 120 s = 30 + 15*6.
    assert max_duration(Decimal("0.10"), UK) == 120
    # A free destination is limited by the cap only.
    assert max_duration(Decimal(0), Rate("800", Decimal(0))) == 3600
    assert max_duration(Decimal(5), DE, cap=0) == 0


def test_time_bands_and_validity() -> None:
    zone = ZoneInfo("Europe/Berlin")
    day = Rate("49", Decimal("0.10"), band_start=8 * 60, band_end=20 * 60, weekdays=0b0011111)
    night = Rate("49", Decimal("0.05"), band_start=20 * 60, band_end=8 * 60)
    weekend = Rate("49", Decimal("0.02"), weekdays=0b1100000)
    base = Rate("49", Decimal("0.20"))
    rating = Rating([base, day, night, weekend], zone=zone)
    wed_noon = datetime(2026, 11, 18, 11, 0, tzinfo=UTC)  # 12:00 in Berlin
    wed_late = datetime(2026, 11, 18, 22, 30, tzinfo=UTC)  # 23:30
    wed_early = datetime(2026, 11, 18, 5, 0, tzinfo=UTC)  # 06:00
    sat_noon = datetime(2026, 11, 21, 11, 0, tzinfo=UTC)
    assert rating.lookup("4989", wed_noon) == day
    assert rating.lookup("4989", wed_late) == night
    assert rating.lookup("4989", wed_early) == night
    assert rating.lookup("4989", sat_noon) == weekend  # 2 days x 24 h is narrower than 7 x 12
    promo = Rate("49", Decimal("0.01"), valid_from=wed_noon, valid_to=wed_noon + timedelta(hours=1),
                 band_start=0, band_end=1440, weekdays=0b0000100)
    rating.replace([base, promo])
    assert rating.lookup("4989", wed_noon) == promo
    assert rating.lookup("4989", wed_noon + timedelta(hours=1)) == base
    assert rating.lookup("4989", wed_noon - timedelta(seconds=1)) == base


def test_snapshot_roundtrip() -> None:
    assert rate_from_snapshot(DE.snapshot_json()) == Rate(
        "49", Decimal("0.1000"), connect_fee=Decimal("0.0500"), first_increment=1,
        next_increment=1, decimals=2,
    )


def test_invalid_rates_are_refused() -> None:
    with pytest.raises(ValueError):
        Rate("1", Decimal("0.1"), next_increment=0)
    with pytest.raises(ValueError):
        Rate("1", Decimal("-0.1"))


prices = st.decimals(min_value=0, max_value=2, places=4)
rates = st.builds(
    Rate,
    prefix=st.just("1"),
    price_per_minute=prices,
    connect_fee=st.decimals(min_value=0, max_value=Decimal("0.2"), places=4),
    first_increment=st.sampled_from([1, 6, 30, 60]) | st.integers(1, 120),
    next_increment=st.sampled_from([1, 6, 30, 60]) | st.integers(1, 120),
    min_duration=st.sampled_from([0, 0, 0, 30, 45]),
    rounding=st.sampled_from(ROUNDING_MODES),
    decimals=st.sampled_from([None, 0, 2, 3, 4]),
)
funds = st.decimals(min_value=0, max_value=50, places=4)
durations = st.integers(min_value=0, max_value=10_000)


@given(rates, durations, durations)
def test_cost_is_monotonic_in_duration(rate: Rate, a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assert cost(rate, lo) <= cost(rate, hi)
    assert billed_duration(rate, lo) <= billed_duration(rate, hi)


@given(rates, durations)
def test_billed_duration_covers_the_call_by_at_most_one_step(rate: Rate, d: int) -> None:
    billed = billed_duration(rate, d)
    if d == 0:
        assert billed == 0
        return
    assert billed >= d and billed >= rate.min_duration and billed >= rate.first_increment
    slack = max(rate.first_increment, rate.next_increment, rate.min_duration)
    assert billed - d < slack
    # A billed duration is billed as itself -- except the minimum charge, a floor applied
    # after rounding, which need not lie on the increment grid (40 s minimum at 30/6: a 1 s
    # call bills 40 s, a 40 s call bills 42 s; test_min_duration pins that).
    if billed != rate.min_duration:
        assert billed_duration(rate, billed) == billed


@settings(max_examples=300)
@given(rates, funds, st.integers(min_value=1, max_value=7200))
def test_max_duration_is_the_longest_affordable_call(rate: Rate, f: Decimal, cap: int) -> None:
    m = max_duration(f, rate, cap)
    assert 0 <= m <= cap
    if m == 0:
        assert cost(rate, 1) > f  # cannot pay the first increment
        return
    assert cost(rate, m) <= f
    if m < cap:
        assert cost(rate, m + 1) > f
        assert cost(rate, m + rate.next_increment) > f
