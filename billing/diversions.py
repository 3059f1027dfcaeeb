"""Where calls *to* a subscriber go, kept in memory and current by LISTEN/NOTIFY.

A call to a local subscriber whose account is locked is diverted to voicemail (RFC 5806
``Diversion``; :mod:`billing.service`). Asking the database for the callee's account on every
call between subscribers was a query per call, on calls that are otherwise free and need no
query at all; accounts are locked rarely, so the answer is cached here.

Like :class:`billing.balances.BalanceCache` the cache holds two maps: subscriber -> account
id (None: no account) per domain, and account id -> its voicemail while it is locked (the
account's own ``diversion_uri``, ``""`` for "the configured one") or None while it is active.
Staying current: every change to an account's lock or voicemail URI (migration 0006), and to
which account a subscriber belongs (migration 0005), sends ``NOTIFY billing_account_changed``;
the notification drops the account's entry, and for a subscriber moved also the subscriber's.
The plain balance notifications on the same channel (every reservation and charge) are
ignored, so a callee who also makes paid calls stays cached.
The same three rules as for the balances keep a stale answer from being stored:

* entries are only stored while the LISTEN connection is up; losing it empties the cache;
* a query that was in flight when *any* notification arrived is used but not stored;
* a change committed on another node reaches this one with its notification: for that
  moment a call may still ring the locked callee's phones (or go to a voicemail the account
  no longer uses). No money depends on it: calls between subscribers are free, and credit
  control of billable calls never reads this cache.

At most ``max_entries`` subscribers are held; beyond that the cache starts over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

from billing.accountcache import ABSENT, AccountCache
from sipcore.subscribers import MISS, Miss

if TYPE_CHECKING:
    from billing.db import Pool

_QUERY: Final = (
    "SELECT a.id, a.status = 'locked' AS locked, a.diversion_uri "
    "FROM account_subscribers s JOIN accounts a ON a.id = s.account_id "
    "WHERE s.username = $1 AND s.domain = $2"
)


class DiversionCache(AccountCache[str | None]):
    """The voicemail of each callee's locked account by ``(username, domain)``; see the
    module docstring. ``default_uri`` is the configured voicemail for locked accounts
    without one of their own ("" or None: such calls are not diverted). Per account it
    holds the voicemail while the account is locked (``""``: the default) and None while
    it is active."""

    def __init__(self, pool: Pool, default_uri: str | None, *,
                 max_entries: int = 100_000) -> None:
        super().__init__(max_entries=max_entries)
        self._pool = pool
        self.default_uri = default_uri or None

    def peek(self, username: str, domain: str) -> str | Literal[Miss.MISS] | None:
        """Where a call to the subscriber goes instead (None: to its phones) if that is
        cached, else :data:`MISS`. No await, so a call between subscribers whose callee was
        seen before costs the pipeline no task."""
        account_id = self._account_of(username, domain)
        if account_id is ABSENT:
            return MISS
        if account_id is None:
            self.stats["hits"] += 1
            return None
        state = self._accounts.get(account_id, ABSENT)
        if state is ABSENT:
            return MISS
        self.stats["hits"] += 1
        return self._target(state)

    async def lookup(self, username: str, domain: str) -> str | None:
        """:meth:`peek`, asking the database on a miss (its errors propagate)."""
        cached = self.peek(username, domain)
        if cached is not MISS:
            return cached
        self.stats["misses"] += 1
        generation = self._generation
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_QUERY, username, domain)
        state: str | None = None
        if row is not None and row["locked"]:
            state = row["diversion_uri"] or ""
        if self.storable(generation):
            self._put(username, domain, None if row is None else row["id"])
            if row is not None:
                self._accounts[row["id"]] = state
        return self._target(state)

    def _target(self, state: str | None) -> str | None:
        if state is None:
            return None
        return state or self.default_uri

    def _ignores(self, fields: list[str]) -> bool:
        # "<account id>": a balance changed (nothing to do here); "<account id>\trouting":
        # its lock or voicemail changed; "<account id>\t<username>\t<domain>": a subscriber
        # joined or left the account.
        return len(fields) == 1 and fields[0].isdigit()
