"""Rating: from a dialled number and a moment to a rate, and from a rate and a duration to a cost.

Theory of operation
-------------------
A dialled number (the user part of the Request-URI, or a ``tel:`` URI number, RFC 3966) is
first *normalised* to digits only: visual separators go, a leading ``+`` or the international
prefix (``00``) is stripped so ``+4930..`` and ``004930..`` both become ``4930..``, and an
optional national prefix is replaced by the home country code.

The rate is the one with the *longest prefix* of that number, among the rates of the
account's rate table that apply at the call's start: inside their validity dates and inside
their weekday and time-of-day band (read in the configured time zone). If several rates of
the same prefix apply, the narrowest band wins, so a "weekend" rate can sit on top of an
all-week one. Rates are held in memory (a dict per table keyed by prefix, so a lookup is at
most len(number) dict probes) and reloaded from PostgreSQL when a table changes.

A call of ``d`` seconds is billed for ``billed_duration(d)`` seconds: nothing if it was never
answered (``d == 0``), else the first increment, then whole next increments, and never less
than the minimum duration. Its cost is the connect fee plus ``price_per_minute`` times the
billed seconds over 60, computed exactly and rounded once with the rate's rounding mode and
decimals (up to the cent by default). ``max_duration(funds)`` inverts that: the longest call
whose cost fits in the funds, which is what the credit control reserves for.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from billing.money import RoundingMode, minor_units, round_fraction
from billing.settings import NumberSettings

if TYPE_CHECKING:
    from billing.db import Pool, Record

RATES_CHANGED_CHANNEL = "billing_rates_changed"
"""NOTIFY channel: a rate table changed; nodes listening reload their :class:`Rating`."""

ALL_WEEKDAYS = 0b1111111
_VISUAL_SEPARATORS = str.maketrans("", "", " -.()/")  # RFC 3966 visual-separator (+ space, /)


def normalise_number(number: str, settings: NumberSettings | None = None) -> str | None:
    """The digits-only form of a dialled number, or None if it is not a telephone number.

    ``+44 20 7946-0000`` -> ``442079460000``; ``0049301234`` -> ``49301234``. With
    ``national_prefix="0"`` and ``country_code="49"``, ``0301234`` -> ``49301234``.
    """
    cfg = settings or NumberSettings()
    text = number.strip().translate(_VISUAL_SEPARATORS)
    if text.startswith("+"):
        if not cfg.strip_plus:
            return None
        text = text[1:]
    elif cfg.international_prefix and text.startswith(cfg.international_prefix):
        text = text[len(cfg.international_prefix) :]
    elif cfg.national_prefix and text.startswith(cfg.national_prefix):
        text = cfg.country_code + text[len(cfg.national_prefix) :]
    if not text or not text.isascii() or not text.isdigit():
        return None
    return text


@dataclass(frozen=True, slots=True)
class Rate:
    """One row of a rate table. Prices are exact Decimals in ``currency``."""

    prefix: str
    price_per_minute: Decimal
    currency: str = "EUR"
    connect_fee: Decimal = Decimal(0)
    first_increment: int = 60
    next_increment: int = 60
    min_duration: int = 0
    rounding: RoundingMode = "up"
    decimals: int | None = None  # None: the currency's minor units
    description: str = ""
    rate_table: str = "default"
    weekdays: int = ALL_WEEKDAYS  # bit 0 = Monday
    band_start: int = 0  # minutes after local midnight, inclusive
    band_end: int = 1440  # exclusive; band_start > band_end wraps past midnight
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    id: int | None = None

    def __post_init__(self) -> None:
        if self.first_increment <= 0 or self.next_increment <= 0:
            raise ValueError("increments must be positive")
        if self.min_duration < 0:
            raise ValueError("min_duration must not be negative")
        if self.price_per_minute < 0 or self.connect_fee < 0:
            raise ValueError("prices must not be negative")

    @property
    def cost_decimals(self) -> int:
        return minor_units(self.currency) if self.decimals is None else self.decimals

    def applies_at(self, at: datetime, zone: tzinfo = UTC) -> bool:
        """Whether the rate is valid at ``at`` (aware) and ``at`` falls inside its band.

        The weekday is that of the local date at ``at``: a 22:00-06:00 band on Fridays covers
        Friday 22:00-24:00 and Friday 00:00-06:00.
        """
        if self.valid_from is not None and at < self.valid_from:
            return False
        if self.valid_to is not None and at >= self.valid_to:
            return False
        local = at.astimezone(zone)
        if not (self.weekdays >> local.weekday()) & 1:
            return False
        minute = local.hour * 60 + local.minute
        if self.band_start < self.band_end:
            return self.band_start <= minute < self.band_end
        return minute >= self.band_start or minute < self.band_end

    @property
    def _specificity(self) -> tuple[int, int, float]:
        """Sort key: narrower bands first, then the most recently valid."""
        width = (self.band_end - self.band_start) % 1440 or 1440
        days = bin(self.weekdays).count("1")
        since = self.valid_from.timestamp() if self.valid_from is not None else -math.inf
        return (width * days, days, -since)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready copy kept in the CDR, so a later rate change never rewrites history."""
        return {
            "id": self.id,
            "rate_table": self.rate_table,
            "prefix": self.prefix,
            "description": self.description,
            "currency": self.currency,
            "price_per_minute": str(self.price_per_minute),
            "connect_fee": str(self.connect_fee),
            "first_increment": self.first_increment,
            "next_increment": self.next_increment,
            "min_duration": self.min_duration,
            "rounding": self.rounding,
            "decimals": self.cost_decimals,
        }

    def snapshot_json(self) -> str:
        return _snapshot_json(self)


@functools.lru_cache(maxsize=4096)
def _snapshot_json(rate: Rate) -> str:
    """Rates are immutable: each is serialised once, not at every call's authorisation."""
    return json.dumps(rate.snapshot(), sort_keys=True)


def billed_duration(rate: Rate, seconds: int) -> int:
    """Seconds charged for a call of ``seconds``: 0 if unanswered, else whole increments.

    ``first_increment`` covers the start of the call, then each started ``next_increment``
    counts whole; the result is at least ``min_duration``. 30/6 billing of 31 s -> 36 s.
    """
    if seconds <= 0:
        return 0
    first, step = rate.first_increment, rate.next_increment
    grid = first if seconds <= first else first + -(-(seconds - first) // step) * step
    return max(rate.min_duration, grid)


@functools.lru_cache(maxsize=4096)
def _exact(connect_fee: Decimal, price_per_minute: Decimal) -> tuple[Fraction, Fraction]:
    """The rate's prices as fractions, the per-minute one per second (converting a Decimal
    costs more than the rest of a cost; every call's authorisation computes a dozen)."""
    return Fraction(connect_fee), Fraction(price_per_minute) / 60


def _cost_of_billed(rate: Rate, billed: int) -> Decimal:
    fee, per_second = _exact(rate.connect_fee, rate.price_per_minute)
    return round_fraction(fee + per_second * billed, rate.cost_decimals, rate.rounding)


def cost(rate: Rate, seconds: int) -> Decimal:
    """Cost of a call answered for ``seconds``: connect fee + per-minute price of the billed
    duration, rounded once. An unanswered (zero-length) call costs nothing."""
    billed = billed_duration(rate, seconds)
    if billed == 0:
        return Decimal(0)
    return _cost_of_billed(rate, billed)


def max_duration(funds: Decimal, rate: Rate, cap: int = 3600) -> int:
    """The longest call, at most ``cap`` seconds, whose :func:`cost` fits in ``funds``.

    0 when the funds cannot pay the first increment (with the connect fee). The answer is an
    increment boundary (or ``cap``): one second more would start an increment the funds do
    not cover. Cost is monotonic in duration, so a binary search over increments is exact.
    """
    if cap <= 0:
        return 0
    first, step = rate.first_increment, rate.next_increment

    def fits(k: int) -> bool:
        return _cost_of_billed(rate, max(rate.min_duration, first + k * step)) <= funds

    if not fits(0):
        return 0
    if cap <= first:
        return cap
    k_cap = -(-(cap - first) // step)  # first grid point at or beyond the cap
    if fits(k_cap):
        return cap
    lo, hi = 0, k_cap  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return first + lo * step


def rate_from_record(row: Record | Mapping[str, Any]) -> Rate:
    """A :class:`Rate` from a ``rates`` table row."""
    return Rate(
        id=row["id"],
        rate_table=row["rate_table"],
        prefix=row["prefix"],
        description=row["description"],
        currency=row["currency"],
        price_per_minute=row["price_per_minute"],
        connect_fee=row["connect_fee"],
        first_increment=row["first_increment"],
        next_increment=row["next_increment"],
        min_duration=row["min_duration"],
        rounding=row["rounding"],
        decimals=row["decimals"],
        weekdays=row["weekdays"],
        band_start=row["band_start"],
        band_end=row["band_end"],
        valid_from=row["valid_from"],
        valid_to=row["valid_to"],
    )


def rate_from_snapshot(snapshot: Mapping[str, Any] | str) -> Rate:
    """The :class:`Rate` a CDR was rated with, from its :meth:`Rate.snapshot`."""
    data: Mapping[str, Any] = json.loads(snapshot) if isinstance(snapshot, str) else snapshot
    return Rate(
        id=data["id"],
        rate_table=data["rate_table"],
        prefix=data["prefix"],
        description=data["description"],
        currency=data["currency"],
        price_per_minute=Decimal(data["price_per_minute"]),
        connect_fee=Decimal(data["connect_fee"]),
        first_increment=data["first_increment"],
        next_increment=data["next_increment"],
        min_duration=data["min_duration"],
        rounding=data["rounding"],
        decimals=data["decimals"],
    )


class Rating:
    """The in-memory rate tables: longest-prefix lookup, reloadable as a whole.

    A reload builds new dicts and swaps one reference, so a lookup running meanwhile sees
    either the old tables or the new ones, never a mix.
    """

    def __init__(self, rates: Iterable[Rate] = (), *, zone: tzinfo = UTC) -> None:
        self.zone = zone
        self._tables: dict[str, dict[str, tuple[Rate, ...]]] = {}
        self.replace(rates)

    def replace(self, rates: Iterable[Rate]) -> None:
        """Swap in a new set of rates (all tables)."""
        grouped: dict[str, dict[str, list[Rate]]] = {}
        for rate in rates:
            grouped.setdefault(rate.rate_table, {}).setdefault(rate.prefix, []).append(rate)
        self._tables = {
            table: {
                prefix: tuple(sorted(group, key=lambda r: r._specificity))
                for prefix, group in prefixes.items()
            }
            for table, prefixes in grouped.items()
        }

    async def reload(self, pool: Pool) -> int:
        """Load every rate table from PostgreSQL; returns the number of rates loaded."""
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM rates")
        rates = [rate_from_record(row) for row in rows]
        self.replace(rates)
        return len(rates)

    @classmethod
    async def load(cls, pool: Pool, *, zone: tzinfo = UTC) -> Rating:
        rating = cls(zone=zone)
        await rating.reload(pool)
        return rating

    def lookup(self, number: str, at: datetime, rate_table: str = "default") -> Rate | None:
        """The rate for the normalised ``number`` at ``at`` (aware), or None (unbillable)."""
        table = self._tables.get(rate_table)
        if not table:
            return None
        for length in range(len(number), 0, -1):
            candidates = table.get(number[:length])
            if candidates:
                for rate in candidates:
                    if rate.applies_at(at, self.zone):
                        return rate
        return None

    def rates(self, rate_table: str = "default") -> list[Rate]:
        """All rates of ``rate_table``, by prefix."""
        table = self._tables.get(rate_table, {})
        return [rate for prefix in sorted(table) for rate in table[prefix]]

    @property
    def tables(self) -> list[str]:
        return sorted(self._tables)

    def __len__(self) -> int:
        return sum(len(g) for t in self._tables.values() for g in t.values())
