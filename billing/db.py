"""Typing aliases for asyncpg as billing uses it (PostgreSQL through asyncpg, principle 5).

asyncpg ships without type information; with the ``asyncpg-stubs`` package installed its
pools and connections are generic in the record type, and these aliases pin that to
:class:`asyncpg.Record`. Without the stubs they are ``Any``. They exist for annotations only
(the asyncpg classes are not subscriptable at run time), hence ``TYPE_CHECKING``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import asyncpg

    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]
    Connection: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    Record: TypeAlias = asyncpg.Record
