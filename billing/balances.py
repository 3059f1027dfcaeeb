"""The balance each subscriber is shown, kept in memory and current by LISTEN/NOTIFY.

A phone's REGISTER 200 OK (and the HTTP balance page) shows the subscriber's balance less the
reservations of its account's calls in progress (:meth:`billing.ledger.Ledger.display_balance`).
Reading that costs a query per REGISTER, which was the largest single cost of a REGISTER; phones
refresh far more often than balances change, so the figure is cached here per subscriber.

Staying current: migration 0005 makes every change to an account's balance or currency, to its
reservations, or to which account a subscriber belongs to, send ``NOTIFY billing_account_changed``
with the account id from the changing transaction. The cache listens and forgets that account's
subscribers; the next read queries again. Three rules keep a stale figure from being served:

* an entry is only stored while the LISTEN connection is up (the billing service's one
  listening connection, which also hears rate changes); losing it empties the cache, and
  reads go to the database until a new connection listens again;
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
over (cheaper than an LRU on the hot path, and a refill is one query per phone).
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from billing.ledger import DisplayBalance, Ledger

CHANNEL: Final = "billing_account_changed"

_ABSENT: Final[Any] = object()

Listener: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"


class BalanceCache:
    """Shown balances by ``(username, domain)``; see the module docstring."""

    def __init__(self, ledger: Ledger, *, max_entries: int = 100_000) -> None:
        self.ledger = ledger
        self.max_entries = max_entries
        # domain -> username -> shown: a few domains, so no key tuple per subscriber (memory
        # per registered phone is a target of its own).
        self._entries: dict[str, dict[str, DisplayBalance | None]] = {}
        self._size = 0
        self._by_account: dict[int, set[tuple[str, str]]] = {}
        self._generation = 0  # notifications seen; a read spanning one is not stored
        self._listening = False
        self.stats: dict[str, int] = {"hits": 0, "misses": 0, "invalidations": 0,
                                      "listen_lost": 0}

    @property
    def listening(self) -> bool:
        return self._listening

    def __len__(self) -> int:
        return self._size

    async def attach(self, conn: Listener) -> None:
        """LISTEN on ``conn`` (the owner's listening connection; the owner calls
        :meth:`connection_lost` when it is lost and attaches a new one)."""
        await conn.add_listener(CHANNEL, self._on_notify)
        self._listening = True

    async def detach(self, conn: Listener) -> None:
        self.connection_lost()
        await conn.remove_listener(CHANNEL, self._on_notify)

    def connection_lost(self) -> None:
        """Notifications may be lost from now on: forget everything, store nothing."""
        if self._listening:
            self.stats["listen_lost"] += 1
        self._listening = False
        self._generation += 1
        self._clear()

    async def display_balance(self, username: str, domain: str) -> DisplayBalance | None:
        """The subscriber's shown balance (None without an account). Database errors of a
        miss propagate, as from :meth:`Ledger.display_balance`."""
        users = self._entries.get(domain)
        if users is not None and username in users:
            self.stats["hits"] += 1
            return users[username]
        self.stats["misses"] += 1
        generation = self._generation
        shown = await self.ledger.display_balance(username, domain)
        if self._listening and generation == self._generation:
            if self._size >= self.max_entries:
                self._clear()
            users = self._entries.setdefault(domain, {})
            if username not in users:
                self._size += 1
            users[username] = shown
            if shown is not None:
                self._by_account.setdefault(shown.account_id, set()).add((username, domain))
        return shown

    def _forget(self, username: str, domain: str) -> None:
        users = self._entries.get(domain)
        if users is not None and users.pop(username, _ABSENT) is not _ABSENT:
            self._size -= 1

    def _clear(self) -> None:
        self._entries.clear()
        self._by_account.clear()
        self._size = 0

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._generation += 1
        self.stats["invalidations"] += 1
        # "<account id>" or, for a subscriber moved, "<account id>\t<username>\t<domain>".
        fields = str(payload).split("\t")
        try:
            account_id = int(fields[0])
        except ValueError:
            self._clear()
            return
        for username, domain in self._by_account.pop(account_id, ()):
            self._forget(username, domain)
        if len(fields) == 3:
            self._forget(fields[1], fields[2])
