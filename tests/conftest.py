"""Shared fixtures: one real PostgreSQL per test session, a fresh database per test module.

The server is the embedded one (pgserver) unless ``SIPBILL_TEST_DATABASE_URL`` names a real
PostgreSQL; either way each test module gets its own freshly created database with every
migration applied by the same migrator ``sipbill serve`` uses. Nothing is mocked.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from sipbill.db import EmbeddedPostgres, migrate

if TYPE_CHECKING:
    from tests.pjsua import UserAgents


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    env = os.environ.get("SIPBILL_TEST_DATABASE_URL")
    if env:
        yield env
        return
    root = Path(tempfile.mkdtemp(prefix="sipbill-test-pg-"))
    embedded = EmbeddedPostgres(root / "pgdata")
    dsn = embedded.start()
    try:
        yield dsn
    finally:
        embedded.stop()
        shutil.rmtree(root, ignore_errors=True)


def dsn_for_database(server_dsn: str, dbname: str) -> str:
    parts = urlsplit(server_dsn)
    return urlunsplit(parts._replace(path="/" + dbname))


async def create_test_database(server_dsn: str, label: str) -> str:
    dbname = "t_" + re.sub(r"[^a-z0-9_]", "_", label.lower())[-40:] + "_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        await conn.close()
    dsn = dsn_for_database(server_dsn, dbname)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return dsn


async def drop_test_database(server_dsn: str, dsn: str) -> None:
    dbname = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def db_dsn(pg_server_dsn: str, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """DSN of a fresh, fully migrated database for this test module."""
    dsn = await create_test_database(pg_server_dsn, request.module.__name__.rsplit(".", 1)[-1])
    try:
        yield dsn
    finally:
        await drop_test_database(pg_server_dsn, dsn)


@pytest.fixture(scope="module")
async def db_pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=8)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(scope="session")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserAgents]:
    """The process's one pjsua2 endpoint, shared by every test module with phones (pjsua2
    allows one ``Endpoint`` per process); destroyed after every phone is gone. Imported here,
    not at the top, so sessions without phone tests never load PJSIP."""
    from tests.pjsua import UserAgents

    log = tmp_path_factory.mktemp("pjsua") / "pjsua.log"
    yield from UserAgents.session(log)
