"""The few coroutines of the compiled request path, kept out of the modules mypyc compiles.

mypyc 2.4.1 mishandles an exception that a compiled coroutine catches while another compiled
coroutine awaits it: the process crashes (``sipcore/__init__.py`` has the story).  So the
compiled modules (:data:`sipcore.COMPILED`) define no coroutine.  Where the auth stage, the
registrar, the pipeline and the proxy core have to wait, they hand what they wait for and what
to do with it to one of these small helpers, which CPython runs as ordinary coroutines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

__all__ = ["apply", "cancel_and_wait", "finish", "recover", "resume", "run", "wait_for_all"]

T = TypeVar("T")
R = TypeVar("R")


async def run(start: Callable[[], Awaitable[Any] | None]) -> None:
    """Call ``start()`` when awaited, then await what it returned, if anything."""
    rest = start()
    if rest is not None:
        await rest


async def apply(awaitable: Awaitable[T], then: Callable[[T], R]) -> R:
    """``then(await awaitable)``."""
    return then(await awaitable)


async def recover(awaitable: Awaitable[T], then: Callable[[T], R],
                  errors: tuple[type[Exception], ...], otherwise: Callable[[Exception], R]) -> R:
    """``then(await awaitable)``, or ``otherwise(exc)`` when it raises one of ``errors``."""
    try:
        value = await awaitable
    except errors as exc:
        return otherwise(exc)
    return then(value)


async def resume(pending: Awaitable[T], then: Callable[[T], Awaitable[Any] | None],
                 failed: Callable[[], None]) -> None:
    """Await ``pending``, then what ``then(result)`` returns, if anything.  ``failed()`` is
    called (inside the ``except``, so it can log the traceback) when ``pending`` raises."""
    try:
        value = await pending
    except Exception:
        failed()
        return
    rest = then(value)
    if rest is not None:
        await rest


async def finish(awaitable: Awaitable[Any], then: Callable[[], object],
                 tasks: set[asyncio.Task[None]]) -> None:
    """Await ``awaitable``, call ``then()``; at the end, either way, take the running task
    out of ``tasks`` (cheaper than a done callback, which costs a loop callback per task)."""
    try:
        await awaitable
        then()
    finally:
        task = asyncio.current_task()
        if task is not None:
            tasks.discard(task)


async def wait_for_all(tasks: Collection[asyncio.Future[Any]]) -> None:
    """Wait until every one of ``tasks`` is done, whatever its outcome (a set that tasks
    leave as they end, and new ones may join: until it is empty)."""
    while tasks:
        await asyncio.gather(*list(tasks), return_exceptions=True)


async def cancel_and_wait(tasks: Collection[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` (a snapshot of them) and wait until each is done."""
    snapshot = list(tasks)
    for task in snapshot:
        task.cancel()
    if snapshot:
        await asyncio.gather(*snapshot, return_exceptions=True)
