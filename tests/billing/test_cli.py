"""``sipbill account`` / ``sipbill rates``: handlers run against a real database; the output
is what an operator reads (tables) or a script parses (--json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import asyncpg
import pytest

from billing.cli import register_cli

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "rates.example.csv"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sipbill")
    register_cli(p.add_subparsers(dest="command", required=True))
    return p


async def run(pool: asyncpg.Pool, *argv: str) -> int:
    args = parser().parse_args(argv)
    status: int = await args.db_handler(args, pool)
    return status


async def test_account_lifecycle(db_pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run(db_pool, "account", "create", "alice", "--balance", "10.00",
                     "--subscriber", "1001@example.com", "--json") == 0
    created = json.loads(capsys.readouterr().out)
    assert created["balance"] == "10.00" and created["subscribers"] == ["1001@example.com"]
    assert created["available"] == "10.00" and created["status"] == "active"

    assert await run(db_pool, "account", "topup", "alice", "2.50", "--reference", "pay-1") == 0
    assert "balance 12.50" in capsys.readouterr().out
    assert await run(db_pool, "account", "topup", "alice", "2.50", "--reference", "pay-1") == 0
    assert "nothing changed" in capsys.readouterr().out
    assert await run(db_pool, "account", "adjust", "1001@example.com", "-0.50",
                     "--reason", "goodwill reversal") == 0
    assert "balance 12.00" in capsys.readouterr().out

    assert await run(db_pool, "account", "lock", "alice", "--reason", "fraud review") == 0
    assert "locked (fraud review)" in capsys.readouterr().out
    assert await run(db_pool, "account", "unlock", "alice", "--json") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "active"

    assert await run(db_pool, "account", "set", "alice", "--threshold", "5", "--auto-recharge",
                     "10", "--diversion-uri", "sip:vm@example.com", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["low_balance_threshold"] == "5" and shown["diversion_uri"] == "sip:vm@example.com"
    assert await run(db_pool, "account", "set", "alice", "--threshold", "none", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["low_balance_threshold"] is None and shown["auto_recharge_amount"] == "10"

    assert await run(db_pool, "account", "create", "bob", "--currency", "JPY",
                     "--balance", "500") == 0
    capsys.readouterr()
    assert await run(db_pool, "account", "attach", "bob", "1002") == 0
    assert capsys.readouterr().out.strip().startswith("1002@localhost -> account")
    assert await run(db_pool, "account", "list") == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["ID", "NAME", "CUR", "BALANCE", "CREDIT", "STATUS"]
    assert listing[1].split()[1:5] == ["alice", "EUR", "12.00", "0.00"]
    assert listing[2].split()[1:4] == ["bob", "JPY", "500"]

    assert await run(db_pool, "account", "voucher", "alice", "20.00", "--reference", "V1") == 0
    assert "stored value of account" in capsys.readouterr().out

    assert await run(db_pool, "account", "statement", "alice") == 0
    out = capsys.readouterr().out
    assert "Opening balance: 0.00" in out and "Closing balance: 12.00" in out
    assert "goodwill reversal" in out
    assert await run(db_pool, "account", "statement", "alice", "--json",
                     "--from", "2000-01-01") == 0
    statement = json.loads(capsys.readouterr().out)
    assert [e["amount"] for e in statement["entries"]] == ["10.00", "2.50", "-0.50"]


async def test_errors_are_messages_not_tracebacks(
    db_pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run(db_pool, "account", "show", "nobody") == 1
    assert "no account 'nobody'" in capsys.readouterr().err
    assert await run(db_pool, "account", "create", "eve", "--currency", "XYZ") == 1
    assert "unknown currency" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["account", "topup", "eve", "abc"])
    assert "not a number: 'abc'" in capsys.readouterr().err


async def test_rates_import_and_list(
    db_pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert await run(db_pool, "rates", "import", str(EXAMPLE)) == 0
    assert "4 rates imported into table 'default'" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("prefix,price_per_minute\n33,0.05\n34,abc\n", encoding="utf-8")
    assert await run(db_pool, "rates", "import", str(bad)) == 1
    err = capsys.readouterr().err
    assert f"{bad}: line 3, price_per_minute: not a number: 'abc'" in err
    assert "nothing imported" in err
    assert await run(db_pool, "rates", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["1", "44", "49", "4930"]
    assert await run(db_pool, "rates", "list", "--prefix", "49", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["prefix"], r["price_per_minute"], r["connect_fee"]) for r in listed] == [
        ("49", "0.1000", "0.0500"), ("4930", "0.0400", "0")
    ]


def test_the_composition_root_finds_the_commands() -> None:
    from sipbill.cli import build_parser

    args = build_parser().parse_args(["account", "topup", "alice", "1.00", "--json"])
    assert callable(args.db_handler) and args.json
    args = build_parser().parse_args(["rates", "import", "x.csv", "--append"])
    assert args.append and callable(args.db_handler)


async def test_unbillable_attempts_are_listed_and_rerated(
    db_pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seed 001: a call to a new number range is refused and recorded; the operator sees it,
    adds the range, and re-rates the recorded attempts."""
    from datetime import UTC, datetime
    from decimal import Decimal

    from billing.credit import CreditControl
    from billing.ledger import Ledger
    from billing.rating import Rating
    from billing.settings import BillingSettings

    ledger = Ledger(db_pool)
    account = await ledger.create_account("unbillable-cli", "EUR",
                                          initial_balance=Decimal("5.00"))
    await ledger.attach_subscriber(account.id, "u-unb", "example.com")
    credit = CreditControl(db_pool, await Rating.load(db_pool), BillingSettings(),
                           node_name="cli-test")
    refused = await credit.authorize("unb-1", ("u-unb", "example.com"), "+88212345678",
                                     datetime(2026, 11, 21, 12, 0, tzinfo=UTC))
    assert refused.reason == "unbillable"

    assert await run(db_pool, "rates", "unbillable", "--json") == 0
    pending = json.loads(capsys.readouterr().out)
    assert [(r["call_id"], r["destination"]) for r in pending] == [("unb-1", "88212345678")]

    async with db_pool.acquire() as conn:
        await conn.execute("INSERT INTO rates (prefix, description, currency, price_per_minute) "
                           "VALUES ('882', 'International networks', 'EUR', 1.20)")
    assert await run(db_pool, "rates", "rerate") == 0
    out = capsys.readouterr().out
    assert "unb-1  88212345678 -> 882" in out and "1 attempt(s) rated" in out
    assert await run(db_pool, "rates", "unbillable", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert await run(db_pool, "rates", "unbillable", "--all") == 0
    assert "882" in capsys.readouterr().out
