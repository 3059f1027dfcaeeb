"""``sipbill account ...`` and ``sipbill rates ...``: the operator's view of the ledger.

Registered by :func:`register_cli`; each command's handler is
``async (args, pool) -> int`` stored as ``db_handler``, and the composition root
(:mod:`sipbill.cli`) connects to the database (embedded or ``database.url``), migrates, and
calls it. ``args.settings`` (the loaded :class:`sipbill.settings.Settings`), when present,
supplies the ``[billing]`` defaults and the default SIP domain. Output is a table for people,
or JSON with ``--json`` (amounts as strings, so no float ever touches money).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from billing.credit import CreditControl
from billing.csvimport import RateImportError, import_rates
from billing.ledger import KEEP, Account, Keep, Ledger, LedgerError
from billing.money import MoneyError, format_amount, minor_units, parse_amount
from billing.payment import VoucherProvider
from billing.rating import Rate, Rating
from billing.settings import BillingSettings

if TYPE_CHECKING:
    from billing.db import Pool

Handler = Callable[[argparse.Namespace, "Pool"], Awaitable[int]]


# -- helpers ------------------------------------------------------------------------------


def _billing_settings(args: argparse.Namespace) -> BillingSettings:
    settings = getattr(args, "settings", None)
    section = getattr(settings, "modules", {}).get("billing") if settings is not None else None
    return section if isinstance(section, BillingSettings) else BillingSettings()


def _default_domain(args: argparse.Namespace) -> str:
    settings = getattr(args, "settings", None)
    domains = getattr(getattr(settings, "server", None), "domains", None)
    return str(domains[0]) if domains else "localhost"


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _print_json(data: Any) -> None:
    print(json.dumps(data, default=_json_default, sort_keys=True))


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _amount(text: str, *, allow_negative: bool = False) -> Decimal:
    try:
        return parse_amount(text, allow_negative=allow_negative)
    except MoneyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _signed_amount(text: str) -> Decimal:
    return _amount(text, allow_negative=True)


def _optional_amount(text: str) -> Decimal | None:
    """For settings that can be cleared: an empty string or "none" means no value."""
    return None if text.strip().lower() in ("", "none") else _amount(text)


def _when(text: str) -> datetime:
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(0), tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _money(amount: Decimal | None, account: Account) -> str:
    return "" if amount is None else format_amount(amount, minor_units(account.currency))


def _fail(message: str) -> int:
    print(f"sipbill: {message}", file=sys.stderr)
    return 1


def _guarded(handler: Handler) -> Handler:
    """Turn the ledger's expected errors into a message and exit status 1."""

    async def run(args: argparse.Namespace, pool: Pool) -> int:
        try:
            return await handler(args, pool)
        except (LedgerError, MoneyError, RateImportError, LookupError) as exc:
            return _fail(str(exc))

    run.__doc__ = handler.__doc__
    return run


# -- account ------------------------------------------------------------------------------


async def _show(ledger: Ledger, account: Account, args: argparse.Namespace) -> int:
    reserved = await ledger.reserved(account.id)
    available = await ledger.available(account.id)
    subscribers = [f"{u}@{d}" for u, d in await ledger.subscribers(account.id)]
    if args.json:
        _print_json({**account.as_dict(), "reserved": reserved, "available": available,
                     "subscribers": subscribers})
        return 0
    rows = [
        ("id", account.id), ("name", account.name), ("currency", account.currency),
        ("balance", _money(account.balance, account)),
        ("reserved", _money(reserved, account)),
        ("available", _money(available, account)),
        ("credit limit", _money(account.credit_limit, account)),
        ("status", account.status + (f" ({account.lock_reason})" if account.locked else "")),
        ("low-balance threshold", _money(account.low_balance_threshold, account)),
        ("auto-recharge", _money(account.auto_recharge_amount, account)),
        ("rate table", account.rate_table),
        ("max simultaneous calls", account.max_concurrent_calls or "default"),
        ("voicemail", account.diversion_uri or ""),
        ("subscribers", ", ".join(subscribers)),
    ]  # fmt: skip
    for label, value in rows:
        print(f"{label + ':':24} {value}")
    return 0


async def _account_create(args: argparse.Namespace, pool: Pool) -> int:
    """Create an account (and attach subscribers to it)."""
    settings = _billing_settings(args)
    ledger = Ledger(pool)
    account = await ledger.create_account(
        args.name,
        args.currency or settings.default_account.currency,
        initial_balance=args.balance,
        credit_limit=args.credit_limit,
        low_balance_threshold=args.threshold,
        auto_recharge_amount=args.auto_recharge,
        rate_table=args.rate_table or settings.rate_table,
        max_concurrent_calls=args.max_calls,
        diversion_uri=args.diversion_uri,
    )
    for user in args.subscriber or ():
        username, _, domain = user.partition("@")
        await ledger.attach_subscriber(account.id, username, domain or _default_domain(args))
    return await _show(ledger, await ledger.get_account(account.id), args)


async def _account_show(args: argparse.Namespace, pool: Pool) -> int:
    """Show an account: balance, reservations, status, settings, subscribers."""
    ledger = Ledger(pool)
    return await _show(ledger, await ledger.find_account(args.account), args)


async def _account_list(args: argparse.Namespace, pool: Pool) -> int:
    """List all accounts."""
    accounts = await Ledger(pool).list_accounts()
    if args.json:
        _print_json([a.as_dict() for a in accounts])
        return 0
    _print_table(
        ["ID", "NAME", "CUR", "BALANCE", "CREDIT", "STATUS"],
        [(a.id, a.name, a.currency, _money(a.balance, a), _money(a.credit_limit, a),
          a.status + (f" ({a.lock_reason})" if a.locked else "")) for a in accounts],
    )
    return 0


async def _posted(ledger: Ledger, account: Account, entry: Any, args: argparse.Namespace) -> int:
    if args.json:
        _print_json(entry.as_dict())
        return 0
    note = "" if entry.applied else " (already posted with this reference: nothing changed)"
    print(f"{entry.kind} {_money(entry.amount, account)} {account.currency}: balance "
          f"{_money(entry.balance_after, account)}{note}")
    refreshed = await ledger.get_account(account.id)
    if account.locked and not refreshed.locked:
        print("account unlocked")
    return 0


async def _account_topup(args: argparse.Namespace, pool: Pool) -> int:
    """Credit an account (lifts a low-balance lock once back at the threshold)."""
    ledger = Ledger(pool)
    account = await ledger.find_account(args.account)
    entry = await ledger.topup(account.id, args.amount, reason=args.reason,
                               reference=args.reference)
    return await _posted(ledger, account, entry, args)


async def _account_adjust(args: argparse.Namespace, pool: Pool) -> int:
    """Post a signed correction with a mandatory reason."""
    ledger = Ledger(pool)
    account = await ledger.find_account(args.account)
    entry = await ledger.adjust(account.id, args.amount, reason=args.reason,
                                reference=args.reference)
    return await _posted(ledger, account, entry, args)


async def _account_lock(args: argparse.Namespace, pool: Pool) -> int:
    """Lock an account: its outgoing billable calls get 403."""
    ledger = Ledger(pool)
    account = await ledger.lock((await ledger.find_account(args.account)).id, args.reason)
    return await _show(ledger, account, args)


async def _account_unlock(args: argparse.Namespace, pool: Pool) -> int:
    """Unlock an account."""
    ledger = Ledger(pool)
    account = await ledger.unlock((await ledger.find_account(args.account)).id)
    return await _show(ledger, account, args)


async def _account_set(args: argparse.Namespace, pool: Pool) -> int:
    """Change account settings (only the options given)."""
    ledger = Ledger(pool)
    account = await ledger.find_account(args.account)

    # Options not given are KEEP (their default), so only the given ones change.
    updated = await ledger.update_account(
        account.id,
        credit_limit=args.credit_limit,
        low_balance_threshold=args.threshold,
        auto_recharge_amount=args.auto_recharge,
        rate_table=args.rate_table,
        max_concurrent_calls=args.max_calls,
        diversion_uri=(args.diversion_uri if isinstance(args.diversion_uri, Keep)
                       else (args.diversion_uri or None)),
    )
    return await _show(ledger, updated, args)


async def _account_attach(args: argparse.Namespace, pool: Pool) -> int:
    """Make an account pay for a subscriber's calls."""
    ledger = Ledger(pool)
    account = await ledger.find_account(args.account)
    username, _, domain = args.user.partition("@")
    domain = domain or _default_domain(args)
    await ledger.attach_subscriber(account.id, username, domain, move=args.move)
    if args.json:
        _print_json({"account_id": account.id, "username": username, "domain": domain})
    else:
        print(f"{username}@{domain} -> account {account.id} ({account.name})")
    return 0


async def _account_voucher(args: argparse.Namespace, pool: Pool) -> int:
    """Register stored value (a voucher) that auto-recharges draw on."""
    ledger = Ledger(pool)
    account = await ledger.find_account(args.account)
    stored = await VoucherProvider(pool).register(account.id, args.amount,
                                                  reference=args.reference)
    if args.json:
        _print_json({"account_id": account.id, "stored_value": stored})
    else:
        print(f"stored value of account {account.id}: {_money(stored, account)} "
              f"{account.currency}")
    return 0


async def _account_statement(args: argparse.Namespace, pool: Pool) -> int:
    """Journal and calls of a period (default: the last 30 days)."""
    ledger = Ledger(pool)
    account = await ledger.find_account(args.account)
    end = args.to or datetime.now(UTC)
    start = args.from_ or end - timedelta(days=30)
    st = await ledger.statement(account.id, start, end)
    if args.json:
        _print_json({
            "account": st.account.as_dict(), "start": st.start, "end": st.end,
            "opening_balance": st.opening_balance, "closing_balance": st.closing_balance,
            "entries": [e.as_dict() for e in st.entries], "cdrs": st.cdrs,
        })  # fmt: skip
        return 0
    print(f"Statement of account {account.id} ({account.name}), {account.currency}, "
          f"{start.isoformat(timespec='seconds')} to {end.isoformat(timespec='seconds')}")
    print(f"Opening balance: {_money(st.opening_balance, account)}")
    _print_table(
        ["DATE", "KIND", "AMOUNT", "BALANCE", "REASON", "REFERENCE"],
        [(e.created_at.isoformat(timespec="seconds"), e.kind, _money(e.amount, account),
          _money(e.balance_after, account), e.reason, e.reference or "") for e in st.entries],
    )
    print(f"Closing balance: {_money(st.closing_balance, account)}")
    if st.cdrs:
        print()
        _print_table(
            ["START", "CALLER", "CALLEE", "STATUS", "SECONDS", "COST", "REASON"],
            [(c["start_at"].isoformat(timespec="seconds"),
              f"{c['caller_username']}@{c['caller_domain']}", c["callee"], c["status"],
              c["billed_duration"] if c["billed_duration"] is not None else "",
              _money(c["cost"], account), c["disconnect_reason"] or "") for c in st.cdrs],
        )
    return 0


# -- rates --------------------------------------------------------------------------------


async def _rates_import(args: argparse.Namespace, pool: Pool) -> int:
    """Import a rate table from CSV: all rows or none."""
    settings = _billing_settings(args)
    try:
        report = await import_rates(
            pool, args.csv, rate_table=args.table or settings.rate_table,
            currency=args.currency or settings.currency, zone=settings.zone,
            replace=not args.append,
        )
    except OSError as exc:
        return _fail(f"cannot read {args.csv}: {exc.strerror}")
    except RateImportError as exc:
        for error in exc.errors:
            print(f"{args.csv}: {error}", file=sys.stderr)
        return _fail(f"{len(exc.errors)} bad row(s): nothing imported")
    if args.json:
        _print_json(asdict(report))
    else:
        verb = "appended to" if args.append else "imported into"
        print(f"{report.imported} rates {verb} table {report.rate_table!r}"
              + (f" (replacing {report.replaced})" if report.replaced else ""))
    return 0


def _band(rate: Rate) -> str:
    if rate.band_start == 0 and rate.band_end == 1440:
        return ""
    return (f"{rate.band_start // 60:02d}:{rate.band_start % 60:02d}-"
            f"{rate.band_end // 60:02d}:{rate.band_end % 60:02d}")


async def _rates_list(args: argparse.Namespace, pool: Pool) -> int:
    """List a rate table (optionally only prefixes starting with --prefix)."""
    settings = _billing_settings(args)
    rating = await Rating.load(pool, zone=settings.zone)
    rates = [r for r in rating.rates(args.table or settings.rate_table)
             if r.prefix.startswith(args.prefix or "")]
    if args.json:
        _print_json([{**r.snapshot(), "weekdays": r.weekdays, "band_start": r.band_start,
                      "band_end": r.band_end, "valid_from": r.valid_from,
                      "valid_to": r.valid_to} for r in rates])
        return 0
    _print_table(
        ["PREFIX", "DESCRIPTION", "PER MIN", "FEE", "INCR", "MIN", "ROUND", "CUR", "DAYS", "BAND",
         "VALID"],
        [(r.prefix, r.description, r.price_per_minute, r.connect_fee,
          f"{r.first_increment}/{r.next_increment}", r.min_duration or "",
          f"{r.rounding}/{r.cost_decimals}", r.currency,
          "" if r.weekdays == 0b1111111 else f"{r.weekdays:07b}"[::-1], _band(r),
          f"{r.valid_from.date() if r.valid_from else ''}.."
          f"{r.valid_to.date() if r.valid_to else ''}" if r.valid_from or r.valid_to else "")
         for r in rates],
    )
    return 0


async def _rates_unbillable(args: argparse.Namespace, pool: Pool) -> int:
    """List calls refused for lack of a rate (the ranges to add)."""
    credit = CreditControl(pool, await Rating.load(pool), _billing_settings(args))
    rows = await credit.unbillable_attempts(pending_only=not args.all, limit=args.limit)
    if args.json:
        _print_json(rows)
        return 0
    _print_table(["ATTEMPTED", "CALLER", "DESTINATION", "REASON", "RERATED AS"],
                 [(r["attempted_at"], r["caller"], r["destination"] or r["callee"],
                   r["reason"], r["prefix"] or "") for r in rows])
    return 0


async def _rates_rerate(args: argparse.Namespace, pool: Pool) -> int:
    """Rate recorded unbillable attempts against the current rates (after adding ranges)."""
    settings = _billing_settings(args)
    credit = CreditControl(pool, await Rating.load(pool, zone=settings.zone), settings)
    matched = await credit.rerate_unbillable(reload=False)
    if args.json:
        _print_json([{"call_id": c, "destination": d, "prefix": p} for c, d, p in matched])
    else:
        for call_id, destination, prefix in matched:
            print(f"{call_id}  {destination} -> {prefix}")
        print(f"{len(matched)} attempt(s) rated")
    return 0


# -- registration -------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``account`` and ``rates`` commands to the ``sipbill`` parser."""
    # Options accepted after the sub-command too, like the composition root's own commands.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help="TOML config file")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    def leaf(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
             handler: Handler) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=(handler.__doc__ or "").strip().rstrip("."),
                              parents=[common])
        p.set_defaults(db_handler=_guarded(handler))
        return p

    account = subparsers.add_parser("account", help="prepaid accounts: balance, top-ups, locks")
    acc = account.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = leaf(acc, "create", _account_create)
    p.add_argument("name")
    p.add_argument("--currency", help="ISO 4217 code (default: billing.default_account)")
    p.add_argument("--balance", type=_amount, default=Decimal(0), help="initial balance")
    p.add_argument("--credit-limit", type=_amount, default=Decimal(0),
                   help="how far below zero the balance may go (postpaid)")
    p.add_argument("--threshold", type=_amount, help="low-balance threshold")
    p.add_argument("--auto-recharge", type=_amount, help="auto-recharge amount")
    p.add_argument("--rate-table", help="rate table (default: billing.rate_table)")
    p.add_argument("--max-calls", type=int, default=0, help="simultaneous calls (0: default)")
    p.add_argument("--diversion-uri", help="voicemail URI while the account is locked")
    p.add_argument("--subscriber", action="append", metavar="USER[@DOMAIN]",
                   help="attach a subscriber (repeatable)")

    p = leaf(acc, "show", _account_show)
    p.add_argument("account", help="account id, name or USER@DOMAIN")
    leaf(acc, "list", _account_list)

    p = leaf(acc, "topup", _account_topup)
    p.add_argument("account")
    p.add_argument("amount", type=_amount)
    p.add_argument("--reason", default="top-up")
    p.add_argument("--reference", help="payment reference: the same one is never posted twice")

    p = leaf(acc, "adjust", _account_adjust)
    p.add_argument("account")
    p.add_argument("amount", type=_signed_amount, help="signed amount, e.g. -1.50")
    p.add_argument("--reason", required=True)
    p.add_argument("--reference")

    p = leaf(acc, "lock", _account_lock)
    p.add_argument("account")
    p.add_argument("--reason", default="manual")
    p = leaf(acc, "unlock", _account_unlock)
    p.add_argument("account")

    p = leaf(acc, "set", _account_set)
    p.add_argument("account")
    p.add_argument("--credit-limit", type=_amount, default=KEEP)
    p.add_argument("--threshold", type=_optional_amount, default=KEEP,
                   help="low-balance threshold ('none' to remove)")
    p.add_argument("--auto-recharge", type=_optional_amount, default=KEEP,
                   help="auto-recharge amount ('none' to remove)")
    p.add_argument("--rate-table", default=KEEP)
    p.add_argument("--max-calls", type=int, default=KEEP)
    p.add_argument("--diversion-uri", default=KEEP, help="voicemail URI ('' to remove)")

    p = leaf(acc, "statement", _account_statement)
    p.add_argument("account")
    p.add_argument("--from", dest="from_", type=_when, help="start (ISO date/time, inclusive)")
    p.add_argument("--to", type=_when, help="end (ISO date/time, exclusive; default now)")

    p = leaf(acc, "attach", _account_attach)
    p.add_argument("account")
    p.add_argument("user", metavar="USER[@DOMAIN]")
    p.add_argument("--move", action="store_true", help="move it from its current account")

    p = leaf(acc, "voucher", _account_voucher)
    p.add_argument("account")
    p.add_argument("amount", type=_amount)
    p.add_argument("--reference", help="voucher code: each is redeemed once")

    rates = subparsers.add_parser(
        "rates", help="rate tables: import from CSV, list, unbillable attempts, re-rate")
    rsub = rates.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = leaf(rsub, "import", _rates_import)
    p.add_argument("csv", help="CSV file (see config/rates.example.csv)")
    p.add_argument("--table", help="rate table (default: billing.rate_table)")
    p.add_argument("--currency", help="currency of rows without one (default: billing.currency)")
    p.add_argument("--append", action="store_true",
                   help="add to the table instead of replacing it")
    p = leaf(rsub, "list", _rates_list)
    p.add_argument("--table")
    p.add_argument("--prefix", help="only prefixes starting with this")
    p = leaf(rsub, "unbillable", _rates_unbillable)
    p.add_argument("--all", action="store_true", help="also attempts already re-rated")
    p.add_argument("--limit", type=int, default=100)
    leaf(rsub, "rerate", _rates_rerate)
