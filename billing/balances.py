"""The balance each subscriber is shown, kept in memory and current by LISTEN/NOTIFY.

A phone's REGISTER 200 OK (and the HTTP balance page) shows the subscriber's balance less the
reservations of its account's calls in progress (:meth:`billing.ledger.Ledger.display_balance`).
Reading that costs a query per REGISTER, which was the largest single cost of a REGISTER; phones
refresh far more often than balances change, so the figure is cached here per subscriber.

The figure belongs to the account, so the cache holds two maps: subscriber -> account id (or
None: no account) and account id -> shown balance, one object shared by the account's
subscribers. Memory per registered phone is a target of its own (issue 3): this costs a dict
entry per subscriber plus one balance per account, some 300 bytes for a phone with an account
of its own, half of what a balance per subscriber and a reverse index of key tuples in a set
per account cost.

Staying current: migration 0005 makes every change to an account's balance or currency, to its
reservations, or to which account a subscriber belongs to, send ``NOTIFY billing_account_changed``
with the account id from the changing transaction. The cache listens and forgets that account's
balance (a change of which account a subscriber belongs to also names the subscriber, whose
entry is forgotten too); the next read queries again. Three rules keep a stale figure from
being served:

* an entry is only stored while the LISTEN connection is up (the process's one listening
  connection, :class:`sipcore.pglisten.NotifyHub`, which also hears rate, location and
  subscriber changes); losing it empties the cache, and reads go to the database until a new
  connection listens again;
* a query that was in flight when *any* notification arrived is used but not stored (the
  change may have committed between its snapshot and the notification);
* a notification is delivered after its transaction commits, so a read after the commit of a
  change on another node can, for the moment the notification takes on the wire, still see
  the old figure: the same lag as reading from a replica, and it is display only (credit
  control locks the account row and never reads this cache).

Subscribers without an account are cached as such too (a deployment may bill only some of its
subscribers, and those phones refresh as often as the others): the notification of a change
to ``account_subscribers`` names the subscriber as well, which drops that entry.

The cache holds at most ``max_entries`` subscribers; beyond that it starts
over (cheaper than an LRU on the hot path, and the misses of one event-loop turn are refilled
with one query).
"""

from __future__ import annotations

from typing import Literal

from billing.accountcache import ABSENT, AccountCache
from billing.ledger import DisplayBalance, Ledger
from sipcore.missreads import MissReads
from sipcore.subscribers import MISS, Miss


class BalanceCache(AccountCache[DisplayBalance]):
    """Shown balances by ``(username, domain)``; see the module docstring. The account id
    object in the subscriber map is the one of the account's balance."""

    def __init__(self, ledger: Ledger, *, max_entries: int = 100_000) -> None:
        super().__init__(max_entries=max_entries, stats=("reads",))
        self.ledger = ledger
        self._currencies: dict[str, str] = {}  # one string per currency
        self._misses: MissReads[tuple[str, str], DisplayBalance] = MissReads(self._read)

    def peek(self, username: str, domain: str) -> DisplayBalance | Literal[Miss.MISS] | None:
        """The shown balance if the cache holds it (None: the subscriber has no account),
        else :data:`MISS`; no await, so a REGISTER whose figure is cached needs no task."""
        account_id = self._account_of(username, domain)
        if account_id is None:
            self.stats["hits"] += 1
            return None
        if account_id is not ABSENT:
            cached = self._accounts.get(account_id)
            if cached is not None:
                self.stats["hits"] += 1
                return cached
        return MISS

    async def display_balance(self, username: str, domain: str) -> DisplayBalance | None:
        """The subscriber's shown balance (None without an account). Database errors of a
        miss propagate, as from :meth:`Ledger.display_balance`.  The misses of one turn of
        the event loop (phones registering together after an outage or a restart) are read
        with one query (:class:`sipcore.missreads.MissReads`)."""
        hit = self.peek(username, domain)
        if hit is not MISS:
            return hit
        self.stats["misses"] += 1
        return await self._misses.get((username, domain))

    async def _read(
        self, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], DisplayBalance | None]:
        generation = self._generation
        found = await self.ledger.display_balances(keys)
        self.stats["reads"] += 1
        if not self.storable(generation):
            return dict(found)
        return {key: self._store(key[0], key[1], found.get(key)) for key in keys}

    def _store(self, username: str, domain: str,
               shown: DisplayBalance | None) -> DisplayBalance | None:
        if self._size >= self.max_entries:
            self._clear()  # before the balance goes in (_put would clear it with the rest)
        if shown is None:
            self._put(username, domain, None)
            return None
        held = self._accounts.get(shown.account_id)
        if held == shown:
            shown = held  # another subscriber of the account read it
        else:
            currency = self._currencies.setdefault(shown.currency, shown.currency)
            if currency is not shown.currency:
                shown = DisplayBalance(shown.account_id, currency, shown.amount)
            self._accounts[shown.account_id] = shown
        self._put(username, domain, shown.account_id)
        return shown
