"""What a registration refresh costs PostgreSQL: backend CPU, time and WAL per refreshed row.

Not a test.  Starts an embedded PostgreSQL in a temporary directory (or uses ``--dsn``), and
for each variant creates a database with sipbill's migrations, fills ``location`` with
``--rows`` bindings and then refreshes ``--users`` of them ``--rounds`` times through the
location service's own flush statement (``sipcore.location._FLUSH_SQL``), ``--batch`` per
statement as a busy flush carries them.  A refresh rewrites expiry, CSeq and time received.

Variants:

``hot``    the schema as migrated: no index on a column a refresh changes, fillfactor 75, so
           PostgreSQL updates the row in place (a heap-only tuple: no index entries, and the
           old version is pruned from its page without a VACUUM);
``index``  the schema before migration 0003: an index on ``expires_at``, fillfactor 100, so
           every refresh adds entries to both indexes and leaves a dead tuple.

Run: ``.venv/bin/python bench/location_writes.py`` (about a minute).  Measured 2026-12-07 on
the 2-core machine, defaults (100,000 rows, 1,000 users x 20 rounds, 10 per statement), two
runs of two alternations: ``hot`` 32.5-34.0 us backend CPU and 202 bytes of WAL per refresh,
``index`` 37.5-40.5 us and 403-412 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipbill.db import EmbeddedPostgres, migrate
from sipcore.location import _FLUSH_SQL


def backend_cpu(pid: int) -> float:
    """CPU seconds of a PostgreSQL backend (it must run on this machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def row(i: int, now: float, cseq: int) -> list[Any]:
    """One binding in ``_FLUSH_SQL``'s column order (``sipcore.location._row_values``)."""
    return [f"sip:u{i}@example.com", f"sip:u{i}@192.0.2.1:5060", "UDP", "192.0.2.1", 5060,
            now + 3600, 1.0, f"reg-{i}", cseq, "", "bench", None, None, now]


def flush_document(rows: list[list[Any]]) -> str:
    return json.dumps([rows, [], [], [], []])


async def measure(dsn: str, variant: str, args: argparse.Namespace) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        if variant == "index":
            await conn.execute("CREATE INDEX location_expires_at ON location (expires_at);"
                               "ALTER TABLE location SET (fillfactor = 100)")
        now = time.time()
        for start in range(0, args.rows, 5000):
            await conn.fetch(_FLUSH_SQL, flush_document(
                [row(i, now, 1) for i in range(start, min(start + 5000, args.rows))]))
        await conn.execute("VACUUM ANALYZE location")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        lsn0 = await conn.fetchval("SELECT pg_current_wal_lsn()")
        cpu0, wall0 = backend_cpu(pid), time.perf_counter()
        done = 0
        for r in range(args.rounds):
            for start in range(0, args.users, args.batch):
                batch = [row(i, now + r + 1, r + 2)
                         for i in range(start, min(start + args.batch, args.users))]
                await conn.fetch(_FLUSH_SQL, flush_document(batch))
                done += len(batch)
        cpu1, wall1 = backend_cpu(pid), time.perf_counter()
        wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", lsn0)
        sizes = await conn.fetchrow("SELECT pg_relation_size('location') AS heap,"
                                    " pg_indexes_size('location') AS indexes")
    finally:
        await conn.close()
    return (f"{variant:6s} {done:,} refreshes: backend CPU {1e6 * (cpu1 - cpu0) / done:.1f} us,"
            f" wall {1e6 * (wall1 - wall0) / done:.1f} us, WAL {float(wal) / done:.0f} bytes"
            f" per refresh; table {sizes['heap'] / 2**20:.1f} MiB,"
            f" indexes {sizes['indexes'] / 2**20:.1f} MiB")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", help="PostgreSQL on this machine (default: embedded)")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--alternations", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="location-writes-"))
    embedded = None
    try:
        dsn = args.dsn
        if dsn is None:
            embedded = EmbeddedPostgres(tmp / "pg")
            dsn = embedded.start()
        admin = await asyncpg.connect(dsn)
        try:
            for k in range(args.alternations):
                for variant in ("hot", "index"):
                    db = f"location_writes_{variant}_{k}_{os.getpid()}"
                    await admin.execute(f'CREATE DATABASE "{db}"')
                    try:
                        parts = dsn.split("?", 1)
                        db_dsn = parts[0].rsplit("/", 1)[0] + "/" + db + (
                            "?" + parts[1] if len(parts) > 1 else "")
                        print(await measure(db_dsn, variant, args), flush=True)
                    finally:
                        await admin.execute(f'DROP DATABASE "{db}"')
        finally:
            await admin.close()
    finally:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
