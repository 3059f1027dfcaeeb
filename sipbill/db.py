"""Database access: the embedded PostgreSQL, the connection pool and the migrator.

``database.url`` (or ``SIPBILL_DATABASE_URL``) points at a real server in production. Without
it, :class:`EmbeddedPostgres` runs a private PostgreSQL (the ``pgserver`` wheel) in
``<data_dir>/pg`` and stops it when the process that started it exits.

Migrations are plain SQL files owned by each package (``<package>/migrations/NNNN_name.sql``),
applied in the fixed package order of :data:`MIGRATION_PACKAGES` and then by number, each in
its own transaction, and recorded in ``schema_migrations`` so they are never re-applied. An
advisory lock serialises nodes that start at the same time against one database.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from asyncpg.connection import LoggedQuery

from sipcore.latency import LatencyHistogram

if TYPE_CHECKING:
    from asyncpg import Record
    from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger("sipbill.db")

if TYPE_CHECKING:
    #: A plain connection or one borrowed from a pool; both run queries the same way.
    Conn = asyncpg.Connection[Record] | PoolConnectionProxy[Record]

# Order matters: later packages may reference earlier packages' tables.
MIGRATION_PACKAGES: tuple[str, ...] = ("sipcore", "billing", "msilo", "presence", "clicktodial")

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_ADVISORY_LOCK_KEY = 0x5195B111  # "sipbill", arbitrary but fixed


class EmbeddedPostgres:
    """A private PostgreSQL server under ``data_dir`` (pgserver), for demos and tests."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()
        self._server: Any = None

    def start(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs complains about XDG_RUNTIME_DIR
            from pgserver import get_server  # type: ignore[attr-defined]

        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        uri: str = self._server.get_uri()
        log.info("event=embedded_postgres_started pgdata=%s", self.pgdata)
        return uri

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            log.info("event=embedded_postgres_stopped pgdata=%s", self.pgdata)


@dataclass(frozen=True, slots=True)
class Migration:
    package: str
    version: int
    name: str
    sql: str


def discover_migrations(packages: tuple[str, ...] = MIGRATION_PACKAGES) -> list[Migration]:
    """All migrations shipped with ``packages``, in the order they must be applied."""
    found: list[Migration] = []
    for package in packages:
        try:
            root = importlib.resources.files(package) / "migrations"
        except ModuleNotFoundError:
            continue
        if not root.is_dir():
            continue
        entries = sorted(
            (e for e in root.iterdir() if _MIGRATION_NAME.match(e.name)), key=lambda e: e.name
        )
        seen: set[int] = set()
        for entry in entries:
            m = _MIGRATION_NAME.match(entry.name)
            assert m is not None
            version = int(m.group(1))
            if version in seen:
                raise RuntimeError(f"{package}: two migrations numbered {version:04d}")
            seen.add(version)
            found.append(Migration(package, version, entry.name, entry.read_text("utf-8")))
    return found


async def migrate(
    conn: Conn, packages: tuple[str, ...] = MIGRATION_PACKAGES
) -> list[str]:
    """Apply pending migrations; returns the names applied. Safe to call from several nodes."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                package    text        NOT NULL,
                version    integer     NOT NULL,
                name       text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (package, version)
            )
            """
        )
        rows = await conn.fetch("SELECT package, version FROM schema_migrations")
        done = {(r["package"], r["version"]) for r in rows}
        for mig in discover_migrations(packages):
            if (mig.package, mig.version) in done:
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (package, version, name) VALUES ($1, $2, $3)",
                    mig.package,
                    mig.version,
                    mig.name,
                )
            applied_now.append(f"{mig.package}/{mig.name}")
            log.info("event=migration_applied package=%s name=%s", mig.package, mig.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK_KEY)
    return applied_now


async def _light_reset(conn: Conn) -> None:
    """Pool release without asyncpg's default ``RESET ALL; UNLISTEN *; ...`` round trip.

    Our queries never change session state (no SET, no session advisory locks on pooled
    connections, LISTEN only on connections held for good), so the default reset only costs a
    round trip on every release: on the REGISTER path that was ~7 % of the CPU. An
    unfinished transaction (an exception in the middle of one) is still rolled back.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _statement_kind(query: str) -> str:
    word = query.lstrip(" \t\r\n(").split(None, 1)[0].upper() if query.strip() else ""
    return word if word in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH") else "other"


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10,
                      command_timeout: float = 5.0,
                      latency: LatencyHistogram | None = None) -> asyncpg.Pool:
    """A connection pool; with ``latency``, every query's duration is recorded in it by
    statement kind (asyncpg's query logger), for the database latency histogram."""

    async def init(conn: Conn) -> None:
        if latency is not None:
            def log_query(q: LoggedQuery) -> None:
                latency.observe(_statement_kind(q.query), q.elapsed)

            conn.add_query_logger(log_query)

    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout,
        reset=_light_reset, init=init,
    )
    assert pool is not None
    return pool
