"""What the per-subscriber caches of account state share: their shape and how they stay current.

:class:`billing.balances.BalanceCache` (the balance a phone is shown) and
:class:`billing.diversions.DiversionCache` (where a call to a locked account's subscriber
goes) both keep two maps: subscriber -> account id (None: no account) per domain, and
account id -> the account's cached value. Both stay current by the same notifications on
``billing_account_changed`` (``"<account id>"``, or ``"<account id>\\t<username>\\t<domain>"``
when a subscriber joined or left the account) heard on the process's listening connection
(:class:`sipcore.pglisten.NotifyHub`), and both follow the same rules:

* entries are only stored while that connection listens; losing it empties the cache
  (:meth:`AccountCache.connection_lost`) until a new connection listens again;
* every notification bumps a generation: a read that was in flight when one arrived is used
  but not stored (:meth:`AccountCache.storable` tells);
* at most ``max_entries`` subscribers are held; beyond that the cache starts over.

This class holds the maps, the listening state and the notification handling; the caches add
their reads and what they store per account.
"""

from __future__ import annotations

from typing import Any, Final, Generic, TypeVar

from sipcore.pglisten import NotifyHub, Subscription

CHANNEL: Final = "billing_account_changed"

#: ``users.get(username, ABSENT)``: not cached (None is "cached: no account").
ABSENT: Final[Any] = object()

V = TypeVar("V")


class AccountCache(Generic[V]):
    """Subscriber -> account id, account id -> ``V``, current by ``billing_account_changed``."""

    def __init__(self, *, max_entries: int, stats: tuple[str, ...] = ()) -> None:
        self.max_entries = max_entries
        # domain -> username -> account id (None: no account): a few domains, so no key
        # tuple per subscriber.
        self._entries: dict[str, dict[str, int | None]] = {}
        self._size = 0
        self._accounts: dict[int, V] = {}
        self._generation = 0  # notifications seen; a read spanning one is not stored
        self._listening = False
        self._subscription: Subscription | None = None
        self.stats: dict[str, int] = dict.fromkeys(
            ("hits", "misses", *stats, "invalidations", "listen_lost"), 0)

    @property
    def listening(self) -> bool:
        return self._listening

    def __len__(self) -> int:
        return self._size

    async def attach(self, hub: NotifyHub) -> None:
        """LISTEN on ``hub`` (the process's listening connection): when it is lost the cache
        forgets everything and stores nothing (:meth:`connection_lost`) until a new one
        listens."""
        self._subscription = await hub.subscribe(CHANNEL, self._on_notify,
                                                 lost=self.connection_lost,
                                                 restore=self._listening_again)
        self._listening = True

    async def detach(self) -> None:
        self.connection_lost()
        sub, self._subscription = self._subscription, None
        if sub is not None:
            await sub.cancel()

    async def _listening_again(self) -> None:
        self._listening = True

    def connection_lost(self) -> None:
        """Notifications may be lost from now on: forget everything, store nothing."""
        if self._listening:
            self.stats["listen_lost"] += 1
        self._listening = False
        self._generation += 1
        self._clear()

    def storable(self, generation: int) -> bool:
        """May a read that started at ``generation`` (``self._generation`` then) be stored?"""
        return self._listening and generation == self._generation

    def _account_of(self, username: str, domain: str) -> int | None:
        """The cached account id of a subscriber, None for "no account", :data:`ABSENT` if
        the subscriber is not cached."""
        users = self._entries.get(domain)
        return ABSENT if users is None else users.get(username, ABSENT)

    def _put(self, username: str, domain: str, account_id: int | None) -> None:
        """Cache which account the subscriber belongs to (start over when full)."""
        if self._size >= self.max_entries:
            self._clear()
        users = self._entries.setdefault(domain, {})
        if username not in users:
            self._size += 1
        users[username] = account_id

    def _forget(self, username: str, domain: str) -> None:
        users = self._entries.get(domain)
        if users is not None and users.pop(username, ABSENT) is not ABSENT:
            self._size -= 1

    def _clear(self) -> None:
        self._entries.clear()
        self._accounts.clear()
        self._size = 0

    def _ignores(self, fields: list[str]) -> bool:
        """A notification this cache has no use for (its generation is not bumped)."""
        return False

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        fields = str(payload).split("\t")
        if self._ignores(fields):
            return
        self._generation += 1
        self.stats["invalidations"] += 1
        try:
            account_id = int(fields[0])
        except ValueError:
            self._clear()
            return
        self._accounts.pop(account_id, None)
        if len(fields) == 3:
            self._forget(fields[1], fields[2])
