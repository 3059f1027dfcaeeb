"""The control socket against a real server on a real Unix socket: framing, errors, limits,
flow control, the socket file's life cycle, both clients and the ``sipbill ctl`` command.

The flow-control scenarios also run under uvloop (what ``sipbill serve`` uses), since write
buffering and reading pauses are the transport's business and the two loops implement them
separately.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgpack
import pytest
import uvloop

from sipbill.configschema import secret_field
from sipbill.control import (
    FRAME_HEADER,
    FRAME_TOO_LARGE,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    PARSE_ERROR,
    REQUEST_TIMEOUT,
    RESULT_TOO_LARGE,
    TOO_MANY_CONNECTIONS,
    ControlError,
    ControlLimits,
    ControlServer,
    ControlSocketError,
    FrameDecoder,
    FrameTooLargeError,
    MethodRegistry,
    encode_frame,
    to_wire,
)
from sipbill.ctlcli import parse_call_args, parse_value, run_ctl
from sipbill.ctlclient import AsyncControlClient, ControlClient, ControlConnectionError
from tests.support import eventually

# --------------------------------------------------------------------------------------------
# A module's methods, registered the way every module registers its own


@dataclasses.dataclass
class Probe:
    """What the demo methods saw: concurrency, to check the in-flight cap."""

    running: int = 0
    peak: int = 0


@dataclasses.dataclass(frozen=True)
class Row:
    aor: str
    balance: Decimal
    since: dt.datetime
    password: str = secret_field()


def register_demo_methods(registry: MethodRegistry, probe: Probe) -> None:
    async def add(a: int, b: int = 0) -> int:
        return a + b

    async def sleep(seconds: float, tag: str = "") -> str:
        await asyncio.sleep(seconds)
        return tag

    async def track(seconds: float) -> int:
        probe.running += 1
        probe.peak = max(probe.peak, probe.running)
        try:
            await asyncio.sleep(seconds)
        finally:
            probe.running -= 1
        return probe.peak

    async def fail() -> None:
        raise RuntimeError("database password is hunter2")

    async def cancelled_inside() -> None:
        helper = asyncio.ensure_future(asyncio.sleep(10))
        helper.cancel()
        await helper  # raises CancelledError although nobody cancelled the request

    async def find(key: str) -> str:
        raise ControlError(NOT_FOUND, f"no entry {key!r}")

    async def blob(size: int) -> bytes:
        return b"x" * size

    async def rows() -> list[Row]:
        since = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
        return [
            Row("alice@example.com", Decimal("10.50"), since, "pw"),
            Row("bob@example.com", Decimal("-0.0100"), since),
        ]

    async def topup(account: str, amount: Decimal, note: str | None = None) -> dict[str, Any]:
        return {"account": account, "amount": amount, "note": note}

    registry.register("demo.add", add, help="a + b", params_doc={"a": "first", "b": "second"})
    registry.register("demo.sleep", sleep, help="Sleep, then return TAG.")
    registry.register("demo.track", track, help="Sleep and report peak concurrency.")
    registry.register("demo.fail", fail, help="Raise.")
    registry.register("demo.find", find, help="Never finds.")
    registry.register("demo.cancelled_inside", cancelled_inside, help="Awaits a cancelled task.")
    registry.register("demo.blob", blob, help="SIZE bytes.")
    registry.register("demo.rows", rows, help="Two rows.")
    registry.register("demo.topup", topup, help="Echo a top-up.")


def make_registry(probe: Probe | None = None) -> MethodRegistry:
    registry = MethodRegistry()
    register_demo_methods(registry, probe or Probe())
    return registry


# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Not tmp_path: AF_UNIX paths are limited to ~107 bytes and pytest's can be longer.
    path = Path(tempfile.mkdtemp(prefix="ctl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def serving(
    sock_dir: Path, limits: ControlLimits | None = None, probe: Probe | None = None
) -> AsyncIterator[tuple[ControlServer, str]]:
    server = ControlServer(make_registry(probe), sock_dir / "ctl.sock", limits=limits)
    await server.start()
    try:
        yield server, str(server.path)
    finally:
        await server.close()


class RawConn:
    """Frames by hand, to send what a well-behaved client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: str) -> RawConn:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    def send(self, obj: Any) -> None:
        self.writer.write(encode_frame(obj))

    def send_body(self, body: bytes) -> None:
        self.writer.write(FRAME_HEADER.pack(len(body)) + body)

    async def recv(self, timeout: float = 3.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            (size,) = FRAME_HEADER.unpack(await self.reader.readexactly(FRAME_HEADER.size))
            reply: dict[str, Any] = msgpack.unpackb(await self.reader.readexactly(size))
            return reply

    async def call(self, req_id: int | str, method: str, params: Any = None) -> dict[str, Any]:
        self.send({"id": req_id, "method": method, "params": params})
        return await self.recv()

    async def closed_by_server(self, timeout: float = 3.0) -> bool:
        async with asyncio.timeout(timeout):
            try:
                return await self.reader.read() == b""
            except ConnectionResetError:
                return True

    def close(self) -> None:
        self.writer.close()


def error_code(reply: dict[str, Any]) -> int:
    code: int = reply["error"]["code"]
    return code


class LogEvents(logging.Handler):
    """The control server's log lines, under either event loop (caplog is per test phase)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> LogEvents:
        logging.getLogger("sipbill.control").addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        logging.getLogger("sipbill.control").removeHandler(self)



# --------------------------------------------------------------------------------------------
# Scenarios (run on the default loop by pytest-asyncio, and under uvloop further down)


async def scenario_named_and_positional(sock_dir: Path) -> None:
    async with serving(sock_dir) as (_server, path):
        conn = await RawConn.open(path)
        assert await conn.call(1, "demo.add", {"a": 2, "b": 3}) == {"id": 1, "result": 5}
        assert await conn.call(2, "demo.add", [2, 3]) == {"id": 2, "result": 5}
        assert await conn.call("s", "demo.add", [2]) == {"id": "s", "result": 2}
        conn.send({"id": 3, "method": "system.ping"})  # params may be left out
        assert await conn.recv() == {"id": 3, "result": "pong"}
        conn.close()


async def scenario_out_of_order(sock_dir: Path) -> None:
    async with serving(sock_dir) as (_server, path):
        conn = await RawConn.open(path)
        conn.send({"id": 1, "method": "demo.sleep", "params": {"seconds": 0.3, "tag": "slow"}})
        conn.send({"id": 2, "method": "demo.sleep", "params": {"seconds": 0.0, "tag": "fast"}})
        conn.send({"id": 3, "method": "demo.add", "params": [1, 1]})
        first, second, third = await conn.recv(), await conn.recv(), await conn.recv()
        assert {first["id"], second["id"]} == {2, 3}
        assert third == {"id": 1, "result": "slow"}
        conn.close()


async def scenario_bad_frames(sock_dir: Path) -> None:
    async with serving(sock_dir) as (server, path):
        other = await RawConn.open(path)
        conn = await RawConn.open(path)
        conn.send_body(b"\xc1")  # a byte msgpack never uses
        assert await conn.recv() == {
            "id": None, "error": {"code": PARSE_ERROR, "message": "malformed msgpack"}
        }
        conn.send_body(msgpack.packb({"id": 1}) + b"\x00")  # trailing garbage
        assert error_code(await conn.recv()) == PARSE_ERROR
        conn.send_body(b"")
        assert error_code(await conn.recv()) == PARSE_ERROR
        conn.send([1, "system.ping"])  # not a map
        reply = await conn.recv()
        assert reply["id"] is None and error_code(reply) == PARSE_ERROR
        conn.send({1: 2})  # map keys must be strings
        assert error_code(await conn.recv()) == PARSE_ERROR
        conn.send({"id": 1, "method": "system.ping", b"x": 1, "y": 2})
        reply = await conn.recv()
        assert error_code(reply) == INVALID_REQUEST and "unknown request key" in str(reply)
        for bad_id in (1.5, True, [1], None):
            conn.send({"id": bad_id, "method": "system.ping"})
            reply = await conn.recv()
            assert reply["id"] is None and error_code(reply) == INVALID_REQUEST
        conn.send({"id": 4})
        assert await conn.recv() == {
            "id": 4, "error": {"code": INVALID_REQUEST, "message": "missing method"}
        }
        conn.send({"id": 5, "method": "system.ping", "parms": []})
        assert error_code(await conn.recv()) == INVALID_REQUEST
        conn.send({"id": 6, "method": "system.ping", "params": "x"})
        assert error_code(await conn.recv()) == INVALID_REQUEST
        reply = await conn.call(7, "ul.nonexistent")
        assert reply["id"] == 7 and error_code(reply) == METHOD_NOT_FOUND
        assert "ul.nonexistent" in reply["error"]["message"]
        for params, needle in (
            ({"a": 1, "c": 2}, "no parameter 'c'"),
            ({"b": 2}, "missing parameter 'a'"),
            ({"a": "one"}, "parameter 'a': expected an integer"),
            ({"a": True}, "parameter 'a': expected an integer"),
            ([1, 2, 3], "at most 2 positional"),
        ):
            reply = await conn.call(8, "demo.add", params)
            assert error_code(reply) == INVALID_PARAMS, params
            assert needle in reply["error"]["message"]
        # Framing survived all of it: the same connection still works, and so does the other.
        assert await conn.call(9, "demo.add", [40, 2]) == {"id": 9, "result": 42}
        assert await other.call(1, "system.ping") == {"id": 1, "result": "pong"}
        assert server.connection_count == 2
        conn.close()
        other.close()


async def scenario_oversize_frame(sock_dir: Path) -> None:
    limits = ControlLimits(max_frame_size=64 << 10)
    async with serving(sock_dir, limits) as (server, path):
        other = await RawConn.open(path)
        conn = await RawConn.open(path)
        conn.writer.write(FRAME_HEADER.pack(2 << 20) + b"\x81" * 100)
        reply = await conn.recv()
        assert reply["id"] is None and error_code(reply) == FRAME_TOO_LARGE
        assert "2097152" in reply["error"]["message"]
        assert await conn.closed_by_server()
        assert await other.call(1, "system.ping") == {"id": 1, "result": "pong"}
        await eventually(lambda: server.connection_count == 1)
        # The async client reports it as the error of the call that was too big.
        async with AsyncControlClient(path) as client:
            with pytest.raises(ControlError) as info:
                await client.call("system.ping", "x" * (100 << 10))
            assert info.value.code == FRAME_TOO_LARGE
        other.close()


async def scenario_slow_client(sock_dir: Path) -> None:
    limits = ControlLimits(max_in_flight=16, write_high_water=64 << 10, max_write_buffer=256 << 10)
    with LogEvents() as events:
        async with serving(sock_dir, limits) as (server, path):
            await _slow_client(server, path)
    assert any("event=control_client_too_slow" in m for m in events.messages)


async def _slow_client(server: ControlServer, path: str) -> None:
    """Another client is served promptly while the one that never reads is dropped."""
    good = await RawConn.open(path)
    assert await good.call(0, "system.ping") == {"id": 0, "result": "pong"}
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(path)
    # 64 requests for 64 KiB each, and never a byte read back: ~4 MiB of replies.
    slow.sendall(b"".join(
        encode_frame({"id": i, "method": "demo.blob", "params": [64 << 10]}) for i in range(64)
    ))
    started = time.monotonic()
    for i in range(1, 30):
        assert await good.call(i, "system.ping") == {"id": i, "result": "pong"}
    assert time.monotonic() - started < 2.0
    await eventually(lambda: server.connection_count == 1)
    assert await good.call(99, "demo.add", [1, 2]) == {"id": 99, "result": 3}
    slow.close()
    good.close()


async def scenario_idle_timeout(sock_dir: Path) -> None:
    limits = ControlLimits(idle_timeout=0.3)
    async with serving(sock_dir, limits) as (server, path):
        conn = await RawConn.open(path)
        # A request running longer than the idle timeout keeps the connection open...
        reply = await conn.call(1, "demo.sleep", {"seconds": 0.6, "tag": "done"})
        assert reply == {"id": 1, "result": "done"}
        # ...and once nothing is in flight and nothing arrives, the server hangs up.
        started = time.monotonic()
        assert await conn.closed_by_server(timeout=2.0)
        assert 0.2 < time.monotonic() - started < 1.5
        await eventually(lambda: server.connection_count == 0)


async def scenario_half_close(sock_dir: Path) -> None:
    async with serving(sock_dir) as (_server, path):
        conn = await RawConn.open(path)
        conn.send({"id": 1, "method": "demo.sleep", "params": [0.2, "late"]})
        conn.send({"id": 2, "method": "demo.add", "params": [1, 2]})
        conn.writer.write_eof()  # like `printf ... | socat - UNIX:ctl.sock`
        replies = {r["id"]: r for r in [await conn.recv(), await conn.recv()]}
        assert replies == {1: {"id": 1, "result": "late"}, 2: {"id": 2, "result": 3}}
        assert await conn.closed_by_server()


SCENARIOS = [
    scenario_named_and_positional,
    scenario_out_of_order,
    scenario_bad_frames,
    scenario_oversize_frame,
    scenario_slow_client,
    scenario_idle_timeout,
    scenario_half_close,
]


async def test_named_and_positional_params(sock_dir: Path) -> None:
    await scenario_named_and_positional(sock_dir)


async def test_pipelined_requests_answered_out_of_order(sock_dir: Path) -> None:
    await scenario_out_of_order(sock_dir)


async def test_bad_frames_get_errors_and_the_connection_goes_on(sock_dir: Path) -> None:
    await scenario_bad_frames(sock_dir)


async def test_oversize_frame_gets_error_and_close_others_unaffected(sock_dir: Path) -> None:
    await scenario_oversize_frame(sock_dir)


async def test_client_that_never_reads_is_dropped_without_stalling_others(sock_dir: Path) -> None:
    await scenario_slow_client(sock_dir)


async def test_idle_timeout_closes_but_not_while_a_request_runs(sock_dir: Path) -> None:
    await scenario_idle_timeout(sock_dir)


async def test_half_closed_client_gets_its_answers(sock_dir: Path) -> None:
    await scenario_half_close(sock_dir)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__.removeprefix("scenario_"))
def test_scenarios_under_uvloop(
    scenario: Callable[[Path], Awaitable[None]], sock_dir: Path
) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(sock_dir), 20))


# --------------------------------------------------------------------------------------------
# Errors from handlers, timeouts, caps


async def test_handler_exception_is_internal_error_logged_and_server_goes_on(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(sock_dir) as (_server, path):
        conn = await RawConn.open(path)
        with caplog.at_level(logging.ERROR, logger="sipbill.control"):
            reply = await conn.call(1, "demo.fail")
        assert reply == {"id": 1, "error": {"code": INTERNAL_ERROR, "message": "internal error"}}
        [record] = [r for r in caplog.records if "control_handler_failed" in r.getMessage()]
        assert record.exc_info is not None and "hunter2" in str(record.exc_info[1])
        assert "method=demo.fail" in record.getMessage()
        assert await conn.call(2, "demo.add", [1, 1]) == {"id": 2, "result": 2}
        reply = await conn.call(3, "demo.cancelled_inside")
        assert reply == {"id": 3, "error": {"code": INTERNAL_ERROR, "message": "internal error"}}
        assert await conn.call(4, "system.ping") == {"id": 4, "result": "pong"}
        conn.close()


async def test_application_errors_and_result_caps(sock_dir: Path) -> None:
    limits = ControlLimits(request_timeout=0.2, max_response_size=1000)
    async with serving(sock_dir, limits) as (_server, path):
        conn = await RawConn.open(path)
        assert await conn.call(1, "demo.find", ["k"]) == {
            "id": 1, "error": {"code": NOT_FOUND, "message": "no entry 'k'"}
        }
        reply = await conn.call(2, "demo.sleep", [5])
        assert error_code(reply) == REQUEST_TIMEOUT and "0.2s" in reply["error"]["message"]
        assert error_code(await conn.call(3, "demo.blob", [2000])) == RESULT_TOO_LARGE
        assert await conn.call(4, "demo.blob", [10]) == {"id": 4, "result": b"x" * 10}
        reply = await conn.call(5, "system.help", ["no.such"])
        assert error_code(reply) == NOT_FOUND
        conn.close()


async def test_duplicate_id_in_flight_is_refused(sock_dir: Path) -> None:
    async with serving(sock_dir) as (_server, path):
        conn = await RawConn.open(path)
        conn.send({"id": 1, "method": "demo.sleep", "params": [0.2]})
        conn.send({"id": 1, "method": "demo.add", "params": [1]})
        reply = await conn.recv()
        assert reply["id"] == 1 and error_code(reply) == INVALID_REQUEST
        assert await conn.recv() == {"id": 1, "result": ""}
        conn.close()


async def test_in_flight_cap_per_connection(sock_dir: Path) -> None:
    probe = Probe()
    async with serving(sock_dir, ControlLimits(max_in_flight=2), probe) as (_server, path):
        conn = await RawConn.open(path)
        for i in range(6):
            conn.send({"id": i, "method": "demo.track", "params": [0.1]})
        replies = [await conn.recv() for _ in range(6)]
        assert sorted(r["id"] for r in replies) == list(range(6))
        assert probe.peak == 2
        conn.close()


async def test_connection_cap(sock_dir: Path) -> None:
    async with serving(sock_dir, ControlLimits(max_connections=2)) as (server, path):
        first, second = await RawConn.open(path), await RawConn.open(path)
        assert (await first.call(1, "system.ping"))["result"] == "pong"
        assert (await second.call(1, "system.ping"))["result"] == "pong"
        third = await RawConn.open(path)
        reply = await third.recv()
        assert reply["id"] is None and error_code(reply) == TOO_MANY_CONNECTIONS
        assert await third.closed_by_server()
        first.close()
        await eventually(lambda: server.connection_count == 1)
        fourth = await RawConn.open(path)
        assert (await fourth.call(1, "system.ping"))["result"] == "pong"
        second.close()
        fourth.close()


async def test_request_observer_sees_every_answer(sock_dir: Path) -> None:
    seen: list[tuple[str, int | None]] = []
    server = ControlServer(
        make_registry(), sock_dir / "ctl.sock",
        on_request=lambda method, code, seconds: seen.append((method, code)),
    )
    async with server:
        conn = await RawConn.open(str(server.path))
        await conn.call(1, "demo.add", [1])
        await conn.call(2, "demo.find", ["x"])
        await conn.call(3, "no.such.method")
        conn.send_body(b"\xc1")
        await conn.recv()
        conn.writer.write(FRAME_HEADER.pack(2 << 20))
        await conn.recv()
        conn.close()
    # Unknown names are reported as "" so a metrics label cannot be blown up by clients.
    assert seen == [
        ("demo.add", None), ("demo.find", NOT_FOUND), ("", METHOD_NOT_FOUND), ("", PARSE_ERROR),
        ("", FRAME_TOO_LARGE),
    ]


# --------------------------------------------------------------------------------------------
# The socket file


async def test_socket_and_directory_modes_and_unlink_on_close(sock_dir: Path) -> None:
    path = sock_dir / "run" / "sipbill" / "ctl.sock"
    server = ControlServer(make_registry(), path)
    await server.start()
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750
    finally:
        await server.close()
    assert not path.exists()


async def test_stale_socket_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "ctl.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a server that died without unlinking
    dead.close()
    assert path.exists()
    async with ControlServer(make_registry(), path):
        conn = await RawConn.open(str(path))
        assert (await conn.call(1, "system.ping"))["result"] == "pong"
        conn.close()


async def test_live_socket_is_refused_and_left_alone(sock_dir: Path) -> None:
    async with serving(sock_dir) as (_server, path):
        with pytest.raises(ControlSocketError, match="already listening"):
            await ControlServer(make_registry(), path).start()
        conn = await RawConn.open(path)
        assert (await conn.call(1, "system.ping"))["result"] == "pong"
        conn.close()


async def test_a_file_that_is_not_a_socket_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "ctl.sock"
    path.write_text("keep me")
    with pytest.raises(ControlSocketError, match="not a socket"):
        await ControlServer(make_registry(), path).start()
    assert path.read_text() == "keep me"


async def test_close_leaves_a_successors_socket(sock_dir: Path) -> None:
    path = sock_dir / "ctl.sock"
    first = ControlServer(make_registry(), path)
    await first.start()
    os.unlink(path)  # e.g. an operator removed it, and a second server started meanwhile
    async with ControlServer(make_registry(), path):
        await first.close()
        assert path.exists()


# --------------------------------------------------------------------------------------------
# Clients


async def test_async_client_pipelines_over_one_connection(sock_dir: Path) -> None:
    async with serving(sock_dir) as (server, path), AsyncControlClient(path) as client:
        started = time.monotonic()
        results = await asyncio.gather(
            client.call("demo.sleep", seconds=0.3, tag="slow"),
            *(client.call("demo.add", i, 1) for i in range(5)),
            client.request("demo.sleep", [0.3, "slow2"]),
        )
        assert results == ["slow", 1, 2, 3, 4, 5, "slow2"]
        assert time.monotonic() - started < 0.55  # concurrent, not one after another
        assert server.connection_count == 1
        result = await client.call(
            "demo.topup", account="alice", amount=Decimal("12345678901234567.89")
        )
        assert result == {"account": "alice", "amount": "12345678901234567.89", "note": None}
        with pytest.raises(ControlError) as info:
            await client.call("demo.find", "x")
        assert (info.value.code, info.value.message) == (NOT_FOUND, "no entry 'x'")
        with pytest.raises(TypeError):
            await client.call("demo.add", 1, b=2)


async def test_async_client_timeout_and_lost_connection(sock_dir: Path) -> None:
    async with serving(sock_dir) as (_server, path):
        client = AsyncControlClient(path, call_timeout=0.1)
        with pytest.raises(TimeoutError):
            await client.call("demo.sleep", 0.3)
        # The late reply is ignored; the connection is still good.
        assert await client.request("demo.sleep", [0.3, "ok"], timeout=2) == "ok"
        pending = asyncio.ensure_future(client.request("demo.sleep", [5], timeout=None))
        await asyncio.sleep(0.05)
    with pytest.raises(ControlConnectionError):
        await pending
    async with serving(sock_dir) as (_server, path):
        assert await client.call("system.ping") == "pong"  # connects afresh
        await client.close()
    with pytest.raises(FileNotFoundError):
        await AsyncControlClient(sock_dir / "nothing.sock").connect()


async def test_sync_client(sock_dir: Path) -> None:
    async with serving(sock_dir) as (_server, path):

        def use_sync_client() -> None:
            with ControlClient(path) as client:
                assert client.call("demo.add", a=1, b=2) == 3
                assert client.call("demo.add", 5) == 5
                assert client.request("demo.add", {"a": 7}) == 7
                with pytest.raises(ControlError) as info:
                    client.call("no.such")
                assert info.value.code == METHOD_NOT_FOUND
                assert client.call("system.ping") == "pong"  # an error reply keeps the connection
                with pytest.raises(TimeoutError):
                    client.request("demo.sleep", [1.0], timeout=0.1)
                assert not client.connected  # a half-read reply is not trusted...
                assert client.call("demo.sleep", 0.0, "again") == "again"  # ...reconnected
                rows = client.call("demo.rows")
                assert rows[0]["balance"] == "10.50" and rows[0]["password"] == "***"

        await asyncio.to_thread(use_sync_client)

    def unreachable() -> None:
        with pytest.raises(FileNotFoundError):
            ControlClient(path).call("system.ping")

    await asyncio.to_thread(unreachable)


# --------------------------------------------------------------------------------------------
# sipbill ctl


async def ctl(path: str, *argv: str) -> int:
    return await asyncio.to_thread(run_ctl, list(argv), default_socket=path)


async def test_ctl_table_mapping_and_json(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(sock_dir) as (_server, path):
        assert await ctl(path, "demo.rows") == 0
        assert capsys.readouterr().out == (
            "aor                balance  since                      password\n"
            "-----------------  -------  -------------------------  --------\n"
            "alice@example.com  10.50    2024-05-01T12:00:00+00:00  ***\n"
            "bob@example.com    -0.0100  2024-05-01T12:00:00+00:00\n"
        )
        assert await ctl(path, "--json", "demo.rows") == 0
        assert json.loads(capsys.readouterr().out)[1] == {
            "aor": "bob@example.com", "balance": "-0.0100",
            "since": "2024-05-01T12:00:00+00:00", "password": "",
        }
        # Options may follow the method; named values are typed by guessing, then by the server.
        assert await ctl(path, "demo.topup", "account=1001", "amount=10.50", "--json") == 0
        assert json.loads(capsys.readouterr().out) == {
            "account": "1001", "amount": "10.5", "note": None
        }
        assert await ctl(path, "demo.topup", "0049301234", "7", "note:=\"a b\"") == 2
        assert "not both" in capsys.readouterr().err
        assert await ctl(path, "demo.topup", "0049301234", "7") == 0
        assert capsys.readouterr().out == "account  0049301234\namount   7\nnote     -\n"
        assert await ctl(path, "system.list_methods", "system") == 0
        assert capsys.readouterr().out == "system.help\nsystem.list_methods\nsystem.ping\n"
        assert await ctl(path, "demo.add", "-5", "2") == 0
        assert capsys.readouterr().out == "-3\n"
        assert await ctl(path, "system.help", "demo.add") == 0
        out = capsys.readouterr().out
        assert "signature  demo.add(a: int, b: int = 0) -> int" in out
        assert "params:" in out and "first" in out


async def test_ctl_errors(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with serving(sock_dir) as (_server, path):
        assert await ctl(path, "no.such") == 1
        captured = capsys.readouterr()
        assert captured.out == "" and f"error {METHOD_NOT_FOUND}: no method" in captured.err
        assert await ctl(path, "--json", "demo.add", "a=x") == 1
        assert json.loads(capsys.readouterr().err)["error"]["code"] == INVALID_PARAMS
        assert await ctl(path, "demo.add", "a:={bad") == 2
        assert "JSON" in capsys.readouterr().err
        assert await ctl(path, "--timeout", "0.1", "demo.sleep", "2") == 3
        assert "within 0.1s" in capsys.readouterr().err
    assert await ctl(path, "system.ping") == 3
    assert "no control socket" in capsys.readouterr().err
    assert await ctl(path, "--socket", str(sock_dir), "system.ping") == 3
    capsys.readouterr()
    assert await ctl(path) == 2  # METHOD is required
    assert "METHOD" in capsys.readouterr().err
    assert await ctl(path, "--help") == 0
    assert "key=value" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42), ("-7", -7), ("0", 0), ("007", "007"), ("+4930", "+4930"), ("1.50", 1.5),
        ("1e3", 1000.0), ("12345678901234567.89", "12345678901234567.89"), ("1e400", "1e400"),
        ("true", True), ("False", False), ("null", None), ("alice", "alice"), ("", ""),
        ("sip:a@b;transport=tcp", "sip:a@b;transport=tcp"), ("nan", "nan"),
    ],
)
def test_parse_value(text: str, value: Any) -> None:
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_parse_call_args() -> None:
    assert parse_call_args([]) is None
    assert parse_call_args(["a", "2"]) == ["a", 2]
    assert parse_call_args(["a=1", "b:=[1, {\"c\": null}]", "c=x=y"]) == {
        "a": 1, "b": [1, {"c": None}], "c": "x=y"
    }
    assert parse_call_args(["sip:bob@x;lr=on"]) == ["sip:bob@x;lr=on"]


# --------------------------------------------------------------------------------------------
# Registry, parameter checks and results (no socket)


class Colour(enum.Enum):
    RED = "red"


class Point(NamedTuple):
    x: int
    y: int


def test_to_wire() -> None:
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert to_wire(
        {
            "money": Decimal("1E+2"),
            "when": when,
            "day": when.date(),
            "span": dt.timedelta(seconds=90),
            "tuple": (1, (2, 3)),
            "set": frozenset({1}),
            "point": Point(1, 2),
            "colour": Colour.RED,
            "path": Path("/x"),
            3: "int key",
            "huge": 1 << 70,
            "raw": bytearray(b"ab"),
        }
    ) == {
        "money": "100",
        "when": "2024-01-02T03:04:05+00:00",
        "day": "2024-01-02",
        "span": 90.0,
        "tuple": [1, [2, 3]],
        "set": [1],
        "point": {"x": 1, "y": 2},
        "colour": "red",
        "path": "/x",
        "3": "int key",
        "huge": str(1 << 70),
        "raw": b"ab",
    }
    assert to_wire(Row("a", Decimal("0.10"), when, "s3cret"))["password"] == "***"
    with pytest.raises(TypeError, match="object"):
        to_wire(object())


def test_frame_decoder_splits_and_caps() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    data = encode_frame("a") + encode_frame([1, 2])
    for i in range(len(data)):  # byte by byte
        decoder.feed(data[i : i + 1])
    assert decoder.next_frame() == msgpack.packb("a")
    assert decoder.next_frame() == msgpack.packb([1, 2])
    assert decoder.next_frame() is None and decoder.buffered == 0
    decoder.feed(FRAME_HEADER.pack(11))
    with pytest.raises(FrameTooLargeError):
        decoder.next_frame()


async def _noop() -> None:
    return None


def test_register_refuses_what_does_not_fit() -> None:
    registry = MethodRegistry()
    # A bare lower-case word ("stats") is allowed for core methods, like kamcmd's.
    for bad_name in ("Ping", "System.ping", "ul.Dump", "ul..dump", "system.ping", "ul."):
        with pytest.raises(ValueError):
            registry.register(bad_name, _noop, help="")

    def not_async() -> None:
        return None

    async def star(*args: int) -> None:
        return None

    async def kw(**kwargs: int) -> None:
        return None

    async def pos_only(a: int, /) -> None:
        return None

    async def odd_type(a: complex) -> None:
        return None

    async def int_keys(a: dict[int, str]) -> None:
        return None

    for handler in (not_async, star, kw, pos_only, odd_type, int_keys):
        with pytest.raises(TypeError):
            registry.register("t.h", handler, help="")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown parameters"):
        registry.register("t.h", _noop, help="", params_doc={"nope": ""})
    assert "t.h" not in registry


def test_bind_converts_and_names_the_bad_parameter() -> None:
    registry = MethodRegistry()

    async def h(
        amount: Decimal,
        when: dt.datetime | None = None,
        ids: list[int] | None = None,
        mode: Literal["a", "b"] = "a",
        colour: Colour = Colour.RED,
        label: str | int = "",
        opts: dict[str, float] | None = None,
        ratio: float = 1.0,
    ) -> None:
        return None

    spec = registry.register("t.h", h, help="  Help\n  text.  ")
    assert spec.help == "Help\ntext."
    assert spec.bind(["10.50"]) == {"amount": Decimal("10.50")}
    assert spec.bind([10.5])["amount"] == Decimal("10.5")
    assert spec.bind([3])["amount"] == Decimal(3)
    bound = spec.bind({
        "amount": "1", "when": "2024-01-02T03:04:05+00:00", "ids": [1, 2], "mode": "b",
        "colour": "red", "label": 7, "opts": {"x": 1}, "ratio": 2,
    })
    assert bound["when"] == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert bound["ids"] == [1, 2] and bound["colour"] is Colour.RED
    assert bound["label"] == 7 and type(bound["label"]) is int  # exact member wins over lenient
    assert bound["opts"] == {"x": 1.0} and bound["ratio"] == 2.0
    for params, needle in (
        (["NaN"], "'amount': expected a finite decimal"),
        (["ten"], "'amount': expected a decimal number"),
        ({"amount": 1, "ids": [1, "x"]}, "'ids[1]': expected an integer"),
        ({"amount": 1, "mode": "c"}, "'mode': expected one of 'a', 'b'"),
        ({"amount": 1, "when": "yesterday"}, "'when': expected an ISO 8601"),
        ({"amount": 1, "opts": {"x": "y"}}, "'opts.x': expected a number"),
        ({"amount": 1, "label": 1.5}, "'label': expected str or int"),
        ({"amount": 1, "ratio": None}, "'ratio': expected a number"),
    ):
        with pytest.raises(ControlError) as info:
            spec.bind(params)
        assert info.value.code == INVALID_PARAMS
        assert needle in info.value.message, (params, info.value.message)


async def test_system_methods() -> None:
    registry = make_registry()
    list_methods = registry.get("system.list_methods")
    help_ = registry.get("system.help")
    assert list_methods is not None and help_ is not None
    assert await list_methods.handler() == sorted(registry.names())
    assert await list_methods.handler(module="demo.") == registry.names("demo")
    assert registry.names("dem") == []
    described = await help_.handler(name="demo.topup")
    assert described["signature"] == (
        "demo.topup(account: str, amount: Decimal, note: str | None = None) -> dict[str, Any]"
    )
    assert [p["name"] for p in described["params"]] == ["account", "amount", "note"]
    assert len(registry) == len(registry.names())


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        ControlLimits(max_in_flight=0)
    with pytest.raises(ValueError):
        ControlLimits(idle_timeout=0)
    with pytest.raises(ValueError):
        ControlLimits(write_high_water=10, max_write_buffer=5)


def test_python_keyword_parameters_use_the_plain_word_on_the_wire() -> None:
    registry = MethodRegistry()

    async def dial(from_: str, to: str) -> str:
        return f"{from_}->{to}"

    spec = registry.register("c2d.call", dial, help="", params_doc={"from": "caller"})
    assert [p.name for p in spec.params] == ["from", "to"]
    assert spec.bind({"from": "1001", "to": "1002"}) == {"from_": "1001", "to": "1002"}
    assert spec.bind(["1001", "1002"]) == {"from_": "1001", "to": "1002"}
    with pytest.raises(ControlError):
        spec.bind({"from_": "1001", "to": "1002"})  # the Python spelling is not the wire name
    assert spec.describe()["params"][0]["name"] == "from"
