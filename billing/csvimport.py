"""Rate tables from CSV (``sipbill rates import``): every row validated, all or nothing.

The file has a header row naming its columns, in any order; only ``prefix`` and
``price_per_minute`` are required::

    prefix,description,price_per_minute,first_increment,next_increment,connect_fee
    49,Germany,0.1000,1,1,0.0500

Optional columns: ``connect_fee`` (0), ``first_increment`` / ``next_increment`` (60/60),
``min_duration`` (0), ``rounding`` (up | half_up | half_even | down), ``decimals`` (empty:
the currency's minor units), ``currency`` (the import's default), ``weekdays`` (``mon-fri``,
``sat,sun``; empty: every day), ``time_from`` / ``time_to`` (``HH:MM``, ``24:00`` allowed;
a band may wrap past midnight), ``valid_from`` / ``valid_to`` (ISO date or date-time; without
an offset it is read in the configured time zone). Blank lines and lines starting with ``#``
are skipped.

Every bad cell is reported with its line and column (``line 7, price_per_minute: not a
number: 'abc'``), and if any row is bad nothing is imported: the whole file goes in one
transaction, so a rate table is never half replaced.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from billing.money import (
    MAX_DECIMALS,
    MoneyError,
    RoundingMode,
    is_currency,
    parse_amount,
    rounding_mode,
)
from billing.rating import ALL_WEEKDAYS, RATES_CHANGED_CHANNEL, Rate

if TYPE_CHECKING:
    from billing.db import Pool

REQUIRED_COLUMNS: Final = ("prefix", "price_per_minute")
OPTIONAL_COLUMNS: Final = (
    "description", "connect_fee", "first_increment", "next_increment", "min_duration",
    "rounding", "decimals", "currency", "weekdays", "time_from", "time_to", "valid_from",
    "valid_to",
)  # fmt: skip
COLUMNS: Final = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
_DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^(\d{1,2}):(\d{2})$")


@dataclass(frozen=True, slots=True)
class RowError:
    line: int
    column: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}, {self.column}: {self.message}" if self.column else (
            f"line {self.line}: {self.message}"
        )


class RateImportError(Exception):
    """The file has bad rows; nothing was imported. ``errors`` lists every one."""

    def __init__(self, errors: list[RowError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class ImportReport:
    rate_table: str
    imported: int
    replaced: int  # rates of the table removed first (0 when appending)


class _Row:
    """One CSV record being validated; collects an error per bad cell."""

    def __init__(self, line: int, cells: dict[str, str], errors: list[RowError]) -> None:
        self.line = line
        self.cells = cells
        self.errors = errors

    def text(self, column: str) -> str:
        return self.cells.get(column, "").strip()

    def fail(self, column: str, message: str) -> None:
        self.errors.append(RowError(self.line, column, message))

    def amount(self, column: str, default: Decimal | None = None) -> Decimal | None:
        raw = self.text(column)
        if not raw and default is not None:
            return default
        try:
            return parse_amount(raw, decimals=MAX_DECIMALS)
        except MoneyError as exc:
            self.fail(column, str(exc) if raw else "required")
            return None

    def integer(self, column: str, default: int, minimum: int) -> int | None:
        raw = self.text(column)
        if not raw:
            return default
        if not raw.isascii() or not raw.isdigit():
            self.fail(column, f"not a whole number of seconds: {raw!r}")
            return None
        value = int(raw)
        if value < minimum:
            self.fail(column, f"must be at least {minimum}, got {value}")
            return None
        return value


def _weekdays(text: str) -> int:
    """``mon-fri,sun`` -> bit mask (bit 0 = Monday); raises ValueError with a message."""
    if not text:
        return ALL_WEEKDAYS
    mask = 0
    for part in text.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if first not in _DAYS or (last and last not in _DAYS):
            raise ValueError(f"not a weekday or range (mon..sun, e.g. mon-fri): {part!r}")
        a, b = _DAYS.index(first), _DAYS.index(last or first)
        span = range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)]
        for day in span:
            mask |= 1 << day
    return mask


def _minutes(text: str, default: int, *, allow_24: bool) -> int:
    if not text:
        return default
    m = _HHMM.match(text)
    if not m:
        raise ValueError(f"not a time of day HH:MM: {text!r}")
    hours, minutes = int(m.group(1)), int(m.group(2))
    value = hours * 60 + minutes
    if minutes > 59 or value > (1440 if allow_24 else 1439):
        raise ValueError(f"not a time of day HH:MM: {text!r}")
    return value


def _moment(text: str, zone: tzinfo) -> datetime | None:
    if not text:
        return None
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day, time(0), tzinfo=zone)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO date or date-time: {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)


def _parse_row(row: _Row, rate_table: str, currency: str, zone: tzinfo) -> Rate | None:
    before = len(row.errors)
    prefix = row.text("prefix")
    if not prefix:
        row.fail("prefix", "required")
    elif not prefix.isascii() or not prefix.isdigit():
        row.fail("prefix", f"must be digits of the normalised number (no '+'): {prefix!r}")
    price = row.amount("price_per_minute")
    fee = row.amount("connect_fee", Decimal(0))
    first = row.integer("first_increment", 60, 1)
    step = row.integer("next_increment", 60, 1)
    minimum = row.integer("min_duration", 0, 0)
    rounding: RoundingMode = "up"
    try:
        rounding = rounding_mode(row.text("rounding") or "up")
    except MoneyError as exc:
        row.fail("rounding", str(exc))
    decimals: int | None = None
    if row.text("decimals"):
        decimals = row.integer("decimals", 0, 0)
        if decimals is not None and decimals > MAX_DECIMALS:
            row.fail("decimals", f"must be 0-{MAX_DECIMALS}, got {decimals}")
    row_currency = (row.text("currency") or currency).upper()
    if not is_currency(row_currency):
        row.fail("currency", f"unknown ISO 4217 currency: {row_currency!r}")
    weekdays = ALL_WEEKDAYS
    try:
        weekdays = _weekdays(row.text("weekdays"))
    except ValueError as exc:
        row.fail("weekdays", str(exc))
    band_start, band_end = 0, 1440
    try:
        band_start = _minutes(row.text("time_from"), 0, allow_24=False)
    except ValueError as exc:
        row.fail("time_from", str(exc))
    try:
        band_end = _minutes(row.text("time_to"), 1440, allow_24=True)
    except ValueError as exc:
        row.fail("time_to", str(exc))
    if band_end == 0:
        band_end = 1440  # "00:00" as an end means midnight at the end of the day
    if band_start == band_end:
        row.fail("time_to", "the band is empty (time_from equals time_to)")
    valid: list[datetime | None] = [None, None]
    for i, column in enumerate(("valid_from", "valid_to")):
        try:
            valid[i] = _moment(row.text(column), zone)
        except ValueError as exc:
            row.fail(column, str(exc))
    if valid[0] is not None and valid[1] is not None and valid[0] >= valid[1]:
        row.fail("valid_to", "must be after valid_from")
    if len(row.errors) > before:
        return None
    assert price is not None and fee is not None
    assert first is not None and step is not None and minimum is not None
    return Rate(
        prefix=prefix,
        price_per_minute=price,
        currency=row_currency,
        connect_fee=fee,
        first_increment=first,
        next_increment=step,
        min_duration=minimum,
        rounding=rounding,
        decimals=decimals,
        description=row.text("description"),
        rate_table=rate_table,
        weekdays=weekdays,
        band_start=band_start,
        band_end=band_end,
        valid_from=valid[0],
        valid_to=valid[1],
    )


def _key(rate: Rate) -> tuple[Any, ...]:
    """What makes a rate unique within its table (the ``rates_unique_band`` index)."""
    return (rate.prefix, rate.weekdays, rate.band_start, rate.band_end, rate.valid_from)


def parse_rates(
    source: TextIO | Iterable[str],
    *,
    rate_table: str = "default",
    currency: str = "EUR",
    zone: tzinfo = UTC,
) -> list[Rate]:
    """Validate a rate CSV into :class:`Rate` objects; raises :class:`RateImportError`
    listing every bad cell (nothing is returned unless every row is good)."""
    return [rate for _, rate in _parse(source, rate_table, currency, zone)]


def _parse(
    source: TextIO | Iterable[str], rate_table: str, currency: str, zone: tzinfo
) -> list[tuple[int, Rate]]:
    errors: list[RowError] = []
    reader = csv.reader(source)
    header: list[str] | None = None
    rates: list[tuple[int, Rate]] = []
    seen: dict[tuple[Any, ...], int] = {}
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [c.strip().lower() for c in cells]
            for column in header:
                if column not in COLUMNS:
                    errors.append(RowError(line, column, f"unknown column (known: "
                                                         f"{', '.join(COLUMNS)})"))
            for column in REQUIRED_COLUMNS:
                if column not in header:
                    errors.append(RowError(line, column, "required column is missing"))
            if len(set(header)) != len(header):
                errors.append(RowError(line, "", "a column is named twice"))
            if errors:
                raise RateImportError(errors)
            continue
        if len(cells) > len(header):
            errors.append(RowError(line, "", f"{len(cells)} fields, the header has "
                                             f"{len(header)}"))
            continue
        row = _Row(line, dict(zip(header, cells, strict=False)), errors)
        rate = _parse_row(row, rate_table, currency, zone)
        if rate is None:
            continue
        key = _key(rate)
        if key in seen:
            errors.append(RowError(line, "prefix", f"duplicate of line {seen[key]} (same "
                                                   "prefix, band and validity)"))
            continue
        seen[key] = line
        rates.append((line, rate))
    if header is None:
        errors.append(RowError(1, "", "empty file: expected a header row"))
    if errors:
        raise RateImportError(errors)
    return rates


async def import_rates(
    pool: Pool,
    source: str | Path | TextIO,
    *,
    rate_table: str = "default",
    currency: str = "EUR",
    zone: tzinfo = UTC,
    replace: bool = True,
) -> ImportReport:
    """Validate and load a rate CSV (a path or an open text file) into ``rate_table``.

    ``replace`` swaps the whole table; otherwise the rows are added, and a row that
    duplicates an existing rate is an error. One transaction either way; listeners on
    :data:`~billing.rating.RATES_CHANGED_CHANNEL` are notified on commit.
    """
    if isinstance(source, str | Path):
        with open(source, encoding="utf-8-sig", newline="") as fh:
            numbered = _parse(fh, rate_table, currency, zone)
    else:
        numbered = _parse(source, rate_table, currency, zone)
    rates = [rate for _, rate in numbered]
    async with pool.acquire() as conn, conn.transaction():
        # Serialise imports of the same table (replace + replace would otherwise interleave).
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('rates:' || $1))", rate_table)
        replaced = 0
        if replace:
            status = await conn.execute("DELETE FROM rates WHERE rate_table = $1", rate_table)
            replaced = int(status.rsplit(" ", 1)[-1])
        else:
            existing = await conn.fetch(
                "SELECT prefix, weekdays, band_start, band_end, valid_from FROM rates "
                "WHERE rate_table = $1",
                rate_table,
            )
            taken = {tuple(r.values()) for r in existing}
            clashes = [
                RowError(line, "prefix", f"a rate for {r.prefix} with this band and validity "
                                         f"exists in table {rate_table!r} already")
                for line, r in numbered
                if _key(r) in taken
            ]
            if clashes:
                raise RateImportError(clashes)
        await conn.copy_records_to_table(
            "rates",
            columns=[
                "rate_table", "prefix", "description", "currency", "price_per_minute",
                "connect_fee", "first_increment", "next_increment", "min_duration", "rounding",
                "decimals", "weekdays", "band_start", "band_end", "valid_from", "valid_to",
            ],
            records=[
                (r.rate_table, r.prefix, r.description, r.currency, r.price_per_minute,
                 r.connect_fee, r.first_increment, r.next_increment, r.min_duration, r.rounding,
                 r.decimals, r.weekdays, r.band_start, r.band_end, r.valid_from, r.valid_to)
                for r in rates
            ],
        )  # fmt: skip
        await conn.execute("SELECT pg_notify($1, $2)", RATES_CHANGED_CHANNEL, rate_table)
    return ImportReport(rate_table, len(rates), replaced)


def rates_to_csv(rates: Iterable[Rate]) -> str:
    """Rates as CSV in the import format (round-trips through :func:`parse_rates`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["prefix", "description", "currency", "price_per_minute", "connect_fee",
                     "first_increment", "next_increment", "min_duration", "rounding",
                     "decimals", "weekdays", "time_from", "time_to", "valid_from", "valid_to"])
    for r in rates:
        days = ",".join(d for i, d in enumerate(_DAYS) if r.weekdays >> i & 1)
        writer.writerow([
            r.prefix, r.description, r.currency, r.price_per_minute, r.connect_fee,
            r.first_increment, r.next_increment, r.min_duration, r.rounding,
            "" if r.decimals is None else r.decimals,
            "" if r.weekdays == ALL_WEEKDAYS else days,
            f"{r.band_start // 60:02d}:{r.band_start % 60:02d}",
            f"{r.band_end // 60:02d}:{r.band_end % 60:02d}",
            "" if r.valid_from is None else r.valid_from.isoformat(),
            "" if r.valid_to is None else r.valid_to.isoformat(),
        ])  # fmt: skip
    return out.getvalue()
