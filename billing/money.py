"""Money arithmetic: currency minor units, explicit rounding, parsing amounts from text.

Every amount is a :class:`decimal.Decimal` (``NUMERIC`` in PostgreSQL), never a float
(ARCHITECTURE.md principle 5). Rounding never happens implicitly: a computed price is an exact
:class:`fractions.Fraction` until :func:`round_fraction` turns it into a Decimal with a stated
number of decimals and a stated mode, so a rate that divides by 60 (price per minute, billed
per second) rounds the true value, not a value already rounded by a Decimal context.

Minor units follow ISO 4217 (EUR 2, JPY 0, BHD 3, ...). An unknown currency code is an error
rather than a guess, because guessing two decimals for a zero-decimal currency would bill a
hundred times too much.
"""

from __future__ import annotations

import re
from decimal import ROUND_DOWN, ROUND_FLOOR, ROUND_HALF_EVEN, ROUND_HALF_UP, ROUND_UP, Decimal
from fractions import Fraction
from typing import Literal, get_args

RoundingMode = Literal["up", "half_up", "half_even", "down"]
"""How a rate rounds a cost: ``up`` (away from zero: never under-bill, the default),
``half_up`` (commercial rounding), ``half_even`` (banker's rounding), ``down`` (truncate)."""

ROUNDING_MODES: tuple[str, ...] = get_args(RoundingMode)

_DECIMAL_MODES: dict[str, str] = {
    "up": ROUND_UP,
    "half_up": ROUND_HALF_UP,
    "half_even": ROUND_HALF_EVEN,
    "down": ROUND_DOWN,
}

MAX_DECIMALS = 8
"""Most decimals any amount may carry (rates are often quoted to 4 or 5 decimals)."""

# ISO 4217 currencies whose minor unit is not 2 decimals.
_EXPONENT_NOT_2: dict[str, int] = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0,
    "PYG": 0, "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0,
    "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
    "CLF": 4, "UYW": 4,
}  # fmt: skip

# ISO 4217 active currencies with 2 decimals.
_EXPONENT_2_CODES = """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BRL BSD BTN BWP BYN
    BZD CAD CDF CHF CNY COP CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS
    GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR
    LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD
    PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN
    SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD UYU UZS VES WST XCD YER ZAR ZMW ZWL
"""
_EXPONENT_2: frozenset[str] = frozenset(_EXPONENT_2_CODES.split())


class MoneyError(ValueError):
    """An amount or currency that cannot be used; the message says what was wrong."""


def rounding_mode(text: str) -> RoundingMode:
    """``text`` as a :data:`RoundingMode`, or MoneyError naming the valid ones."""
    for mode in get_args(RoundingMode):
        if text == mode:
            return mode  # type: ignore[no-any-return]  # get_args() is untyped
    raise MoneyError(f"must be one of {', '.join(ROUNDING_MODES)}, got {text!r}")


def minor_units(currency: str) -> int:
    """Decimals of ``currency``'s minor unit (ISO 4217): EUR -> 2, JPY -> 0, KWD -> 3."""
    code = currency.upper()
    if code in _EXPONENT_NOT_2:
        return _EXPONENT_NOT_2[code]
    if code in _EXPONENT_2:
        return 2
    raise MoneyError(f"unknown currency code: {currency!r} (expected an ISO 4217 code)")


def is_currency(code: str) -> bool:
    """True if ``code`` is an ISO 4217 code this module knows the minor unit of."""
    return code in _EXPONENT_NOT_2 or code in _EXPONENT_2


def _quantum(decimals: int) -> Decimal:
    if not 0 <= decimals <= MAX_DECIMALS:
        raise MoneyError(f"decimals must be 0-{MAX_DECIMALS}, got {decimals}")
    return Decimal(1).scaleb(-decimals)


def quantize(amount: Decimal, decimals: int, mode: RoundingMode = "up") -> Decimal:
    """``amount`` rounded to ``decimals`` places with ``mode`` (exact: no context rounding)."""
    if not amount.is_finite():
        raise MoneyError(f"not a finite amount: {amount}")
    return round_fraction(Fraction(amount), decimals, mode)


def round_fraction(value: Fraction, decimals: int, mode: RoundingMode = "up") -> Decimal:
    """The exact rational ``value`` rounded to ``decimals`` places with ``mode``.

    Works on integers (value scaled by 10**decimals), so the result does not depend on the
    precision of any Decimal context and a value just above a cent really rounds up.
    """
    _quantum(decimals)  # validates decimals
    if mode not in _DECIMAL_MODES:
        raise MoneyError(f"unknown rounding mode {mode!r} (one of {', '.join(ROUNDING_MODES)})")
    scaled = value * 10**decimals
    negative = scaled < 0
    magnitude = -scaled if negative else scaled
    whole, rest = divmod(magnitude.numerator, magnitude.denominator)
    if rest:
        twice = 2 * rest
        den = magnitude.denominator
        if (
            mode == "up"
            or (mode == "half_up" and twice >= den)
            or (mode == "half_even" and (twice > den or (twice == den and whole % 2 == 1)))
        ):
            whole += 1
    signed = -whole if negative else whole
    return Decimal(signed).scaleb(-decimals)


def floor_to(amount: Decimal, decimals: int) -> Decimal:
    """The largest multiple of 10**-decimals not above ``amount`` (what funds can really pay)."""
    return amount.quantize(_quantum(decimals), rounding=ROUND_FLOOR)


_AMOUNT = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")


def parse_amount(
    text: str,
    *,
    decimals: int | None = None,
    allow_negative: bool = False,
    allow_zero: bool = True,
) -> Decimal:
    """Parse a plain decimal amount (``"10"``, ``"10.25"``, ``"-3.5"``) into a Decimal.

    Exponents, NaN/Infinity, thousands separators and commas are refused rather than guessed
    at. ``decimals`` caps the number of fractional digits (``"1.234"`` for EUR is an error,
    not a silently rounded 1.23).
    """
    if not isinstance(text, str):
        raise MoneyError(f"not a number: {text!r}")
    stripped = text.strip()
    if not stripped:
        raise MoneyError("empty amount")
    if not _AMOUNT.match(stripped):
        raise MoneyError(f"not a number: {text!r}")
    value = Decimal(stripped)
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # the pattern admits finite numbers only
    places = max(0, -exponent)
    limit = MAX_DECIMALS if decimals is None else decimals
    if places > limit:
        raise MoneyError(f"too many decimals (at most {limit}): {text!r}")
    if value < 0 and not allow_negative:
        raise MoneyError(f"must not be negative: {text!r}")
    if value == 0 and not allow_zero:
        raise MoneyError(f"must not be zero: {text!r}")
    return value + 0  # normalises "-0" to "0"


def format_amount(amount: Decimal, decimals: int) -> str:
    """``amount`` as text with exactly ``decimals`` places (rounded half-up for display only)."""
    return str(amount.quantize(_quantum(decimals), rounding=ROUND_HALF_UP))
