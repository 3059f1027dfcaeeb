"""Rate CSV import: the shipped example, every bad cell reported by line and column, and
nothing imported when any row is bad."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from billing.csvimport import RateImportError, import_rates, parse_rates, rates_to_csv
from billing.rating import Rating, cost

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "rates.example.csv"


def test_example_is_the_demo_table() -> None:
    rates = {r.prefix: r for r in parse_rates(EXAMPLE.open(encoding="utf-8"))}
    assert sorted(rates) == ["1", "44", "49", "4930"]
    de = rates["49"]
    assert (de.price_per_minute, de.first_increment, de.next_increment, de.connect_fee) == (
        Decimal("0.1000"), 1, 1, Decimal("0.0500")
    )
    assert (rates["44"].first_increment, rates["44"].next_increment) == (30, 6)
    assert (rates["1"].first_increment, rates["1"].next_increment) == (60, 60)
    assert (rates["4930"].first_increment, rates["4930"].next_increment) == (60, 1)
    assert cost(de, 95) == Decimal("0.21")  # 0.05 + 95/60 * 0.10 = 0.2083.. -> 0.21


def test_every_bad_cell_is_reported_with_line_and_column() -> None:
    text = (
        "prefix,description,price_per_minute,first_increment,next_increment,connect_fee\n"
        "1,USA,0.02,60,60,0\n"
        "\n"
        "# a comment line\n"
        "+44,UK,0.05,30,6,0\n"
        "49,Germany,abc,1,1,0.05\n"
        "4930,Berlin,0.04,0,x,-1\n"
        "1,USA again,0.03,60,60,0\n"
        ",empty,0.01\n"
        "33,France,0.05,60,60,0,extra\n"
    )
    with pytest.raises(RateImportError) as info:
        parse_rates(io.StringIO(text))
    assert [str(e) for e in info.value.errors] == [
        "line 5, prefix: must be digits of the normalised number (no '+'): '+44'",
        "line 6, price_per_minute: not a number: 'abc'",
        "line 7, connect_fee: must not be negative: '-1'",
        "line 7, first_increment: must be at least 1, got 0",
        "line 7, next_increment: not a whole number of seconds: 'x'",
        "line 8, prefix: duplicate of line 2 (same prefix, band and validity)",
        "line 9, prefix: required",
        "line 10: 7 fields, the header has 6",
    ]


def test_header_problems() -> None:
    with pytest.raises(RateImportError, match="line 1, price: unknown column"):
        parse_rates(io.StringIO("prefix,price\n1,0.02\n"))
    with pytest.raises(RateImportError, match="line 1, price_per_minute: required column"):
        parse_rates(io.StringIO("prefix\n1\n"))
    with pytest.raises(RateImportError, match="empty file"):
        parse_rates(io.StringIO(""))


def test_optional_columns_bands_and_dates() -> None:
    text = (
        "prefix,price_per_minute,weekdays,time_from,time_to,valid_from,valid_to,rounding,"
        "decimals,min_duration,currency\n"
        "49,0.05,sat-sun,,,,,,,,\n"
        "49,0.08,mon-fri,20:00,08:00,2026-01-01,2027-01-01T00:00:00+00:00,half_up,4,30,eur\n"
        "49,0.1,fri-mon,24:00,,,,sideways,9,-5,XYZ\n"
    )
    with pytest.raises(RateImportError) as info:
        parse_rates(io.StringIO(text), zone=ZoneInfo("Europe/Berlin"))
    assert [str(e) for e in info.value.errors] == [
        "line 4, min_duration: not a whole number of seconds: '-5'",
        "line 4, rounding: must be one of up, half_up, half_even, down, got 'sideways'",
        "line 4, decimals: must be 0-8, got 9",
        "line 4, currency: unknown ISO 4217 currency: 'XYZ'",
        "line 4, time_from: not a time of day HH:MM: '24:00'",
    ]
    weekend, night = parse_rates(io.StringIO(text.rsplit("49,0.1", 1)[0]),
                                 zone=ZoneInfo("Europe/Berlin"))
    assert weekend.weekdays == 0b1100000 and (weekend.band_start, weekend.band_end) == (0, 1440)
    assert night.weekdays == 0b0011111 and (night.band_start, night.band_end) == (1200, 480)
    assert night.valid_from == datetime(2026, 1, 1, tzinfo=ZoneInfo("Europe/Berlin"))
    assert night.valid_to == datetime(2027, 1, 1, tzinfo=UTC)
    assert (night.rounding, night.decimals, night.min_duration, night.currency) == (
        "half_up", 4, 30, "EUR"
    )
    again = parse_rates(io.StringIO(rates_to_csv([weekend, night])))
    assert again == [weekend, night]


async def test_import_is_all_or_nothing(db_pool: asyncpg.Pool, tmp_path: Path) -> None:
    report = await import_rates(db_pool, EXAMPLE)
    assert (report.imported, report.replaced) == (4, 0)
    bad = tmp_path / "bad.csv"
    bad.write_text("prefix,price_per_minute\n33,0.05\n34,abc\n", encoding="utf-8")
    with pytest.raises(RateImportError, match="line 3, price_per_minute: not a number: 'abc'"):
        await import_rates(db_pool, bad)
    rating = await Rating.load(db_pool)
    assert sorted(r.prefix for r in rating.rates()) == ["1", "44", "49", "4930"]  # untouched
    # Appending a rate that exists already is refused with its line, and adds nothing.
    dup = io.StringIO("prefix,price_per_minute\n33,0.05\n49,0.2\n")
    with pytest.raises(RateImportError, match="line 3, prefix: a rate for 49"):
        await import_rates(db_pool, dup, replace=False)
    added = await import_rates(db_pool, io.StringIO("prefix,price_per_minute\n33,0.05\n"),
                               replace=False)
    assert (added.imported, added.replaced) == (1, 0)
    await rating.reload(db_pool)
    assert len(rating) == 5
    # Replacing swaps the whole table; another table is independent.
    replaced = await import_rates(db_pool, EXAMPLE)
    assert (replaced.imported, replaced.replaced) == (4, 5)
    other = await import_rates(db_pool, EXAMPLE, rate_table="wholesale", currency="USD")
    assert other.imported == 4
    await rating.reload(db_pool)
    assert rating.tables == ["default", "wholesale"]
    assert {r.currency for r in rating.rates("wholesale")} == {"USD"}
