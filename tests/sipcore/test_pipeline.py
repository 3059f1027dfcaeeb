"""The request pipeline: stage order, method filters, and the synchronous walk.

``Pipeline.start`` runs handlers in the caller's stack frame for as long as they answer with a
plain bool and hands back a coroutine only from the first one that must wait; the proxy core
creates a task for that coroutine alone.  These tests pin down that both halves of a walk
see the same order and the same error handling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sipcore.message import Request, build_request, parse_message
from sipcore.pipeline import Later, Pipeline, RequestContext, Stage
from sipcore.transaction import ServerTxKey
from sipcore.transport_types import Peer


def _ctx(method: str = "OPTIONS") -> tuple[RequestContext, list[int]]:
    raw = build_request(method, "sip:bob@example.com", [
        ("Via", "SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-pipe"),
        ("From", "<sip:alice@example.com>;tag=a"),
        ("To", "<sip:bob@example.com>"),
        ("Call-ID", "pipe@test"),
        ("CSeq", f"1 {method}"),
    ])
    req = parse_message(raw)
    assert isinstance(req, Request)
    answers: list[int] = []

    def replier(ctx: RequestContext, status: int, *_: object) -> None:
        answers.append(status)

    key = ServerTxKey("z9hG4bK-pipe", "10.0.0.7", 5060, method)
    return RequestContext(req, Peer("UDP", "10.0.0.7", 5060), key, replier), answers


def _stage(seen: list[str], name: str, answer: int = 0) -> Callable[[RequestContext], bool]:
    def handler(ctx: RequestContext) -> bool:
        seen.append(name)
        return ctx.reply(answer) if answer else False
    return handler


def test_synchronous_handlers_finish_without_a_coroutine() -> None:
    pipeline = Pipeline()
    seen: list[str] = []
    pipeline.add(Stage.RELAY, _stage(seen, "relay", 200))
    pipeline.add(Stage.REQINIT, _stage(seen, "reqinit"))
    pipeline.add(Stage.AUTH, _stage(seen, "auth-register"), methods={"REGISTER"})
    ctx, answers = _ctx()
    assert pipeline.start(ctx) is None
    assert seen == ["reqinit", "relay"]
    assert answers == [200]


async def test_walk_continues_after_the_first_awaiting_handler() -> None:
    pipeline = Pipeline()
    seen: list[str] = []

    async def lookup(ctx: RequestContext) -> bool:
        await asyncio.sleep(0)
        seen.append("auth")
        return False

    pipeline.add(Stage.REQINIT, _stage(seen, "reqinit"))
    pipeline.add(Stage.AUTH, lookup)
    pipeline.add(Stage.LOCATION, _stage(seen, "location"))
    pipeline.add(Stage.RELAY, _stage(seen, "relay", 404))
    ctx, answers = _ctx()
    rest = pipeline.start(ctx)
    assert rest is not None
    assert seen == ["reqinit"] and answers == []
    await rest
    assert seen == ["reqinit", "auth", "location", "relay"]
    assert answers == [404]


@pytest.mark.parametrize("awaiting", [False, True])
async def test_a_failing_handler_is_answered_500_on_either_side(awaiting: bool) -> None:
    pipeline = Pipeline()

    def boom(ctx: RequestContext) -> bool | Awaitable[bool]:
        raise RuntimeError("handler bug")

    async def waits(ctx: RequestContext) -> bool:
        await asyncio.sleep(0)
        return False

    if awaiting:
        pipeline.add(Stage.AUTH, waits)
    pipeline.add(Stage.RELAY, boom)
    ctx, answers = _ctx()
    rest = pipeline.start(ctx)
    assert (rest is not None) is awaiting
    if rest is not None:
        await rest
    assert answers == [500]
    assert pipeline.errors == 1


async def test_a_walk_nobody_answers_gets_500() -> None:
    pipeline = Pipeline()
    pipeline.add(Stage.REQINIT, lambda ctx: False)
    ctx, answers = _ctx()
    await pipeline.run(ctx)
    assert answers == [500]


def test_a_later_hands_its_verdict_to_its_consumer_whichever_comes_first() -> None:
    heard: list[tuple[bool, BaseException | None]] = []
    early = Later()
    early.then(lambda done, error: heard.append((done, error)))
    assert heard == [] and not early.settled
    early.resolve(True)
    late = Later()
    boom = RuntimeError("x")
    late.fail(boom)
    late.then(lambda done, error: heard.append((done, error)))
    assert heard == [(True, None), (False, boom)]
    with pytest.raises(RuntimeError, match="settled once"):
        early.resolve(False)
    with pytest.raises(RuntimeError, match="one consumer"):
        early.then(lambda done, error: None)


async def test_a_later_can_be_awaited() -> None:
    verdict = Later()
    asyncio.get_running_loop().call_soon(verdict.resolve, True)
    assert await verdict is True
    failed = Later()
    failed.fail(ValueError("no"))
    with pytest.raises(ValueError, match="no"):
        await failed


@pytest.mark.parametrize("done", [False, True])
def test_the_walk_goes_on_from_a_later_without_a_task(done: bool) -> None:
    # No event loop runs here: the walk goes on inside the callback that settles the Later.
    pipeline = Pipeline()
    seen: list[str] = []
    verdicts: list[Later] = []

    def deferred(ctx: RequestContext) -> Later:
        seen.append("registrar")
        verdicts.append(Later())
        return verdicts[-1]

    pipeline.add(Stage.REQINIT, _stage(seen, "reqinit"))
    pipeline.add(Stage.REGISTRAR, deferred)
    pipeline.add(Stage.RELAY, _stage(seen, "relay", 404))
    ctx, answers = _ctx()
    walk = pipeline.start(ctx)
    assert isinstance(walk, Later) and not walk.settled
    ended: list[bool] = []
    walk.then(lambda finished, error: ended.append(finished))
    assert seen == ["reqinit", "registrar"] and ended == []
    if done:
        ctx.reply(200)
    verdicts[0].resolve(done)
    assert ended == [True]
    assert seen == (["reqinit", "registrar"] if done else ["reqinit", "registrar", "relay"])
    assert answers == ([200] if done else [404])


async def test_after_a_later_an_awaiting_handler_still_finishes_the_walk() -> None:
    pipeline = Pipeline()
    verdict = Later()

    async def lookup(ctx: RequestContext) -> bool:
        await asyncio.sleep(0)
        return ctx.reply(480)

    pipeline.add(Stage.REGISTRAR, lambda ctx: verdict)
    pipeline.add(Stage.LOCATION, lookup)
    ctx, answers = _ctx()
    walk = pipeline.start(ctx)
    assert isinstance(walk, Later)
    verdict.resolve(False)
    assert not walk.settled  # the lookup waits in a task
    assert await walk is True
    assert answers == [480]


def test_a_later_that_fails_is_answered_500() -> None:
    pipeline = Pipeline()
    verdict = Later()
    pipeline.add(Stage.REGISTRAR, lambda ctx: verdict)
    pipeline.add(Stage.RELAY, lambda ctx: ctx.reply(404))
    ctx, answers = _ctx()
    walk = pipeline.start(ctx)
    assert isinstance(walk, Later)
    verdict.fail(RuntimeError("handler bug, later"))
    assert walk.settled and answers == [500] and pipeline.errors == 1
