"""Cache misses read together: one query for the misses of one turn of the event loop.

The caches on the REGISTER path (``sipcore.subscribers``, ``billing.balances``) answer from
memory; a miss asks the database.  After a restart or an outage thousands of phones miss at
once (a registration storm), and a query per miss queued them behind each other for pool
connections next to the location flushes.  :class:`MissReads` joins them: every key asked for
before the reading task's first step (which runs after the callbacks already queued) is read
by one call of the owner's ``read``, in chunks of ``batch``; a key asked for again while it is
being read waits for that read.  The owner's ``read`` decides what to cache (its rule for reads
overtaken by a change notification stays its own); an error of a read fails every lookup that
waited for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

__all__ = ["MissReads"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class MissReads(Generic[K, V]):
    """Joins lookups of missing keys into reads of many (see the module docstring)."""

    def __init__(self, read: Callable[[list[K]], Awaitable[Mapping[K, V | None]]], *,
                 batch: int = 500) -> None:
        if batch < 1:
            raise ValueError("batch must be positive")
        self.read = read
        self.batch = batch
        self.reads = 0  # calls of read
        self.keys_read = 0
        self._waiting: dict[K, asyncio.Future[V | None]] = {}
        self._next: list[K] = []  # keys for the task that has not started yet
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V | None:
        """``read``'s answer for ``key`` (None when it has none)."""
        waiter = self._waiting.get(key)
        if waiter is None:
            loop = asyncio.get_running_loop()
            waiter = self._waiting[key] = loop.create_future()
            self._next.append(key)
            if len(self._next) == 1:
                task = loop.create_task(self._run())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(waiter)

    async def drain(self) -> None:
        """Wait for the reads in progress (shutdown)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _run(self) -> None:
        keys, self._next = self._next, []
        chunks = [keys[i:i + self.batch] for i in range(0, len(keys), self.batch)]
        await asyncio.gather(*(self._read(chunk) for chunk in chunks))

    async def _read(self, keys: list[K]) -> None:
        try:
            found = await self.read(keys)
        except BaseException as exc:
            for key in keys:
                waiter = self._waiting.pop(key)
                if waiter.done():
                    continue
                if isinstance(exc, Exception):
                    waiter.set_exception(exc)
                    waiter.exception()  # retrieved: a waiter that was cancelled never asks
                else:
                    waiter.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        self.reads += 1
        self.keys_read += len(keys)
        for key in keys:
            waiter = self._waiting.pop(key)
            if not waiter.done():
                waiter.set_result(found.get(key))
