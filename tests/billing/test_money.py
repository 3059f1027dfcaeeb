"""Money arithmetic: minor units, exact rounding, strict parsing (hypothesis for the rules)."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.money import (
    ROUNDING_MODES,
    MoneyError,
    RoundingMode,
    floor_to,
    format_amount,
    minor_units,
    parse_amount,
    quantize,
    round_fraction,
)

fractions = st.fractions(min_value=-1000, max_value=1000, max_denominator=10**6)
decimals = st.integers(min_value=0, max_value=6)
modes = st.sampled_from(ROUNDING_MODES)


def test_minor_units_follow_iso_4217() -> None:
    assert minor_units("EUR") == 2
    assert minor_units("usd") == 2
    assert minor_units("JPY") == 0
    assert minor_units("KWD") == 3
    assert minor_units("CLF") == 4
    with pytest.raises(MoneyError, match="unknown currency"):
        minor_units("XYZ")


@pytest.mark.parametrize(
    ("value", "mode", "expected"),
    [
        (Fraction(20833, 100000), "up", "0.21"),  # 0.20833 -> up to the cent
        (Fraction(20833, 100000), "half_up", "0.21"),
        (Fraction(20833, 100000), "down", "0.20"),
        (Fraction(1, 40), "half_up", "0.03"),  # 0.025
        (Fraction(1, 40), "half_even", "0.02"),
        (Fraction(3, 40), "half_even", "0.08"),  # 0.075
        (Fraction(1, 100), "up", "0.01"),  # exact: no rounding
        (Fraction(-20833, 100000), "up", "-0.21"),  # away from zero
        (Fraction(1, 3), "up", "0.34"),
    ],
)
def test_round_fraction_examples(value: Fraction, mode: RoundingMode, expected: str) -> None:
    assert round_fraction(value, 2, mode) == Decimal(expected)
    assert str(round_fraction(value, 2, mode)) == expected


def test_round_up_of_a_hair_above_a_cent_is_exact() -> None:
    # 0.21 + 1e-30: a 28-digit Decimal context would lose the excess; Fractions do not.
    assert round_fraction(Fraction(21, 100) + Fraction(1, 10**30), 2, "up") == Decimal("0.22")


@given(fractions, decimals, modes)
def test_rounding_stays_within_one_quantum(
    value: Fraction, places: int, mode: RoundingMode
) -> None:
    result = round_fraction(value, places, mode)
    q = Fraction(1, 10**places)
    assert result == result.quantize(Decimal(1).scaleb(-places))
    error = Fraction(result) - value
    assert abs(error) < q
    if mode == "up":
        assert abs(Fraction(result)) >= abs(value)
    if mode == "down":
        assert abs(Fraction(result)) <= abs(value)
    if mode in ("half_up", "half_even"):
        assert abs(error) <= q / 2


@given(fractions, fractions, decimals, modes)
def test_rounding_is_monotonic(a: Fraction, b: Fraction, places: int, mode: RoundingMode) -> None:
    lo, hi = sorted((a, b))
    assert round_fraction(lo, places, mode) <= round_fraction(hi, places, mode)


@given(st.decimals(min_value=-10**6, max_value=10**6, places=2), modes)
def test_quantize_of_an_exact_amount_is_identity(amount: Decimal, mode: RoundingMode) -> None:
    assert quantize(amount, 2, mode) == amount
    assert quantize(amount, 4, mode) == amount


@given(st.decimals(min_value=0, max_value=10**6, places=4))
def test_floor_to_never_exceeds(amount: Decimal) -> None:
    floored = floor_to(amount, 2)
    assert floored <= amount < floored + Decimal("0.01")


@given(st.decimals(min_value=-10**9, max_value=10**9, places=4))
def test_parse_amount_roundtrips(amount: Decimal) -> None:
    assert parse_amount(str(amount), allow_negative=True) == amount


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "not a number: 'abc'"),
        ("1e3", "not a number"),
        ("NaN", "not a number"),
        ("Infinity", "not a number"),
        ("1,50", "not a number"),
        ("1 000", "not a number"),
        ("", "empty amount"),
        ("-1.00", "must not be negative"),
        ("1.234", "too many decimals"),
    ],
)
def test_parse_amount_refuses_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(MoneyError, match=message):
        parse_amount(text, decimals=2)


def test_parse_amount_accepts_plain_forms() -> None:
    assert parse_amount(" 10 ") == Decimal(10)
    assert parse_amount("+2.5") == Decimal("2.5")
    assert parse_amount(".5") == Decimal("0.5")
    assert parse_amount("-0.00", allow_negative=True) == 0
    assert parse_amount("-3.5", allow_negative=True) == Decimal("-3.5")
    with pytest.raises(MoneyError, match="must not be zero"):
        parse_amount("0", allow_zero=False)


def test_format_amount_pads_to_the_decimals() -> None:
    assert format_amount(Decimal("10"), 2) == "10.00"
    assert format_amount(Decimal("2.785"), 2) == "2.79"
    assert format_amount(Decimal("5"), 0) == "5"
