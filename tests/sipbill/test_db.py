"""The migrator against a real PostgreSQL: applies in order, records, never re-applies."""

from __future__ import annotations

import asyncpg

from sipbill.db import discover_migrations, migrate


async def test_migrations_recorded_and_not_reapplied(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        recorded = await conn.fetch(
            "SELECT package, version, name FROM schema_migrations"
            " ORDER BY applied_at, package, version"
        )
        expected = [(m.package, m.version, m.name) for m in discover_migrations()]
        assert [(r["package"], r["version"], r["name"]) for r in recorded] == expected
        # A second run (a restart) applies nothing and leaves the record unchanged.
        assert await migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(expected)
    finally:
        await conn.close()


async def test_migration_order_follows_package_order() -> None:
    migs = discover_migrations()
    order = ["sipcore", "billing", "msilo", "presence", "clicktodial"]
    ranks = [order.index(m.package) for m in migs]
    assert ranks == sorted(ranks)
    for pkg in set(m.package for m in migs):
        versions = [m.version for m in migs if m.package == pkg]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
