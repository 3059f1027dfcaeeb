"""Clients for the control socket (:mod:`sipbill.control`): one for asyncio, one blocking.

Both send ``{id, method, params}`` frames and return the reply's ``result`` or raise
:class:`~sipbill.control.ControlError` with the reply's code and message, so callers handle
"unknown AOR" (404) the same way whichever client they use::

    async with AsyncControlClient("/run/sipbill/sipbill.ctl") as ctl:
        bindings, calls = await asyncio.gather(ctl.call("ul.dump"), ctl.call("calls.active"))

    with ControlClient("/run/sipbill/sipbill.ctl") as ctl:
        ctl.call("account.topup", account="alice", amount=Decimal("10.00"))

The async client pipelines: concurrent calls share one connection, each reply is matched to its
call by id, in whatever order the server answers. The blocking client does one call at a time
(a lock serialises threads) and suits scripts, the CLI and threaded web frameworks.

Arguments go through :func:`~sipbill.control.to_wire` first, so a Decimal or a datetime can be
passed as is (it travels as text and the server converts it back for a parameter of that type).
``call(method, *args, **params)`` sends positional or named parameters (not both);
``request(method, params, timeout=...)`` takes them as one list or mapping, and a per-call
timeout. Neither client retries: a call whose connection was lost raises
:class:`ControlConnectionError` (the server may or may not have run it), and the next call
connects afresh.

Errors: ``OSError`` subclasses when connecting fails (``FileNotFoundError`` no socket,
``ConnectionRefusedError`` nobody listening, ``PermissionError``), ``TimeoutError`` for the
connect and call timeouts, :class:`ControlConnectionError` when the connection drops or the
server sends something that is not a reply, :class:`ControlError` for error replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from sipbill.control import (
    FRAME_HEADER,
    ControlError,
    FrameDecoder,
    FrameTooLargeError,
    decode_body,
    encode_frame,
    to_wire,
)

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "AsyncControlClient",
    "ControlClient",
    "ControlConnectionError",
    "ControlError",
]

DEFAULT_CONNECT_TIMEOUT = 5.0
# Longer than the server's default request timeout (30 s), so a slow method normally ends with
# the server's own timeout error rather than the client giving up without knowing.
DEFAULT_CALL_TIMEOUT = 60.0
MAX_RESPONSE_FRAME = 64 << 20

Params = Mapping[str, Any] | Sequence[Any] | None


class ControlConnectionError(ConnectionError):
    """The control connection was lost, or the server sent something that is not a reply."""


class _Default(enum.Enum):
    TOKEN = 0


_DEFAULT = _Default.TOKEN


def _request_frame(req_id: int, method: str, params: Params) -> bytes:
    request: dict[str, Any] = {"id": req_id, "method": method}
    if params is not None:
        if isinstance(params, str | bytes) or not isinstance(params, Mapping | Sequence):
            raise TypeError("params must be a mapping or a sequence")
        request["params"] = to_wire(params)
    return encode_frame(request)


def _params(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Params:
    if args and kwargs:
        raise TypeError("pass parameters by position or by name, not both")
    if args:
        return list(args)
    return kwargs or None


def _reply_error(message: dict[str, Any]) -> ControlError | None:
    """The ControlError an error reply carries, None for a result; raises if it is neither."""
    if "error" not in message:
        if "result" not in message:
            raise ControlConnectionError("malformed reply: neither result nor error")
        return None
    error = message["error"]
    if (
        not isinstance(error, dict)
        or not isinstance(error.get("code"), int)
        or not isinstance(error.get("message"), str)
    ):
        raise ControlConnectionError("malformed error reply")
    return ControlError(error["code"], error["message"])


class _Pipe:
    """One async connection: the writer, the calls awaiting replies, the reply reader task."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.reader_task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self.failure is None and not self.writer.is_closing()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(self.failure)
        self.pending.clear()
        self.writer.close()


class AsyncControlClient:
    """Pipelining asyncio client; connects on first use (or explicitly with :meth:`connect`)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
        max_frame_size: int = MAX_RESPONSE_FRAME,
    ) -> None:
        self.path = Path(path)
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self._max_frame_size = max_frame_size
        self._ids = itertools.count(1)
        self._pipe: _Pipe | None = None
        self._connect_lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._pipe is not None and self._pipe.alive

    async def connect(self) -> None:
        """Open the connection unless one is open."""
        await self._ensure_pipe()

    async def call(self, method: str, /, *args: Any, **params: Any) -> Any:
        """Call ``method`` with positional ``args`` or named ``params``; return its result."""
        return await self.request(method, _params(args, params))

    async def request(
        self, method: str, params: Params = None, *, timeout: float | _Default | None = _DEFAULT
    ) -> Any:
        """Call ``method`` with a list or mapping of parameters.

        ``timeout`` overrides the client's ``call_timeout`` for this call (None: no limit).
        """
        limit = self.call_timeout if timeout is _DEFAULT else timeout
        async with asyncio.timeout(limit):
            pipe = await self._ensure_pipe()
            req_id = next(self._ids)
            frame = _request_frame(req_id, method, params)
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            pipe.pending[req_id] = fut
            try:
                pipe.writer.write(frame)
                await pipe.writer.drain()
                return await fut
            except OSError as exc:
                if isinstance(exc, ControlConnectionError):
                    raise
                raise ControlConnectionError(f"control connection lost: {exc}") from exc
            finally:
                pipe.pending.pop(req_id, None)

    async def close(self) -> None:
        """Close the connection; calls still waiting raise :class:`ControlConnectionError`."""
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        pipe.fail(ControlConnectionError("control client closed"))
        if pipe.reader_task is not None:
            pipe.reader_task.cancel()
            # wait() rather than awaiting the task: its CancelledError is not ours to raise.
            await asyncio.wait([pipe.reader_task])
        with contextlib.suppress(OSError):  # the server may have gone first; that is fine
            await pipe.writer.wait_closed()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _ensure_pipe(self) -> _Pipe:
        async with self._connect_lock:
            if self._pipe is not None and self._pipe.alive:
                return self._pipe
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            pipe = _Pipe(writer)
            pipe.reader_task = asyncio.get_running_loop().create_task(
                self._read_replies(reader, pipe)
            )
            self._pipe = pipe
            return pipe

    async def _read_replies(self, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        failure: BaseException = ControlConnectionError("control connection closed by the server")
        try:
            while True:
                header = await reader.readexactly(FRAME_HEADER.size)
                (size,) = FRAME_HEADER.unpack(header)
                if size > self._max_frame_size:
                    failure = ControlConnectionError(
                        str(FrameTooLargeError(size, self._max_frame_size))
                    )
                    break
                body = await reader.readexactly(size)
                try:
                    message = decode_body(body)
                except Exception:
                    failure = ControlConnectionError("malformed reply from the server")
                    break
                problem = self._dispatch(message, pipe)
                if problem is not None:
                    failure = problem
                    break
        except asyncio.IncompleteReadError:
            pass
        except OSError as exc:
            failure = ControlConnectionError(f"control connection lost: {exc}")
        except asyncio.CancelledError:
            pipe.fail(ControlConnectionError("control client closed"))
            raise
        pipe.fail(failure)

    @staticmethod
    def _dispatch(message: Any, pipe: _Pipe) -> BaseException | None:
        """Resolve the call a reply answers; returns an exception when the connection is done."""
        if not isinstance(message, dict):
            return ControlConnectionError("malformed reply: not a map")
        try:
            error = _reply_error(message)
        except ControlConnectionError as exc:
            return exc
        req_id = message.get("id")
        if req_id is None:
            # An error tied to no request (too many connections, a frame we sent was too big):
            # the server closes the connection after it, and it is the answer to every call.
            return error or ControlConnectionError("reply without an id")
        fut = pipe.pending.pop(req_id, None) if isinstance(req_id, int) else None
        if fut is None or fut.done():
            return None  # the call timed out and went away; its late reply is not an error
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(message["result"])
        return None


class ControlClient:
    """Blocking client, one call at a time; connects on first use. Thread-safe."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
        max_frame_size: int = MAX_RESPONSE_FRAME,
    ) -> None:
        self.path = Path(path)
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self._max_frame_size = max_frame_size
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder(max_frame_size)
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        """Open the connection unless one is open."""
        with self._lock:
            self._ensure_sock()

    def call(self, method: str, /, *args: Any, **params: Any) -> Any:
        """Call ``method`` with positional ``args`` or named ``params``; return its result."""
        return self.request(method, _params(args, params))

    def request(
        self, method: str, params: Params = None, *, timeout: float | _Default | None = _DEFAULT
    ) -> Any:
        """Call ``method`` with a list or mapping of parameters.

        ``timeout`` overrides the client's ``call_timeout`` for this call (None: no limit).
        """
        limit = self.call_timeout if timeout is _DEFAULT else timeout
        with self._lock:
            req_id = next(self._ids)
            frame = _request_frame(req_id, method, params)
            deadline = None if limit is None else time.monotonic() + limit
            sock = self._ensure_sock()
            try:
                sock.settimeout(_remaining(deadline))
                sock.sendall(frame)
                while True:
                    message = self._read_message(sock, deadline)
                    error = _reply_error(message)
                    reply_id = message.get("id")
                    if reply_id is None:
                        # An error tied to no request; the server closes the connection after it.
                        self._drop()
                        raise error or ControlConnectionError("reply without an id")
                    if reply_id != req_id:
                        continue  # cannot happen with one call at a time; skip, do not guess
                    if error is not None:
                        raise error
                    return message["result"]
            except ControlError:
                raise
            except BaseException as exc:
                # After a timeout or a lost connection a reply may be half read: start afresh.
                self._drop()
                if isinstance(exc, OSError) and not isinstance(
                    exc, TimeoutError | ControlConnectionError
                ):
                    raise ControlConnectionError(f"control connection lost: {exc}") from exc
                raise

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ensure_sock(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(str(self.path))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._decoder = FrameDecoder(self._max_frame_size)
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read_message(self, sock: socket.socket, deadline: float | None) -> dict[str, Any]:
        while True:
            try:
                body = self._decoder.next_frame()
            except FrameTooLargeError as exc:
                raise ControlConnectionError(str(exc)) from None
            if body is not None:
                break
            sock.settimeout(_remaining(deadline))
            data = sock.recv(1 << 16)
            if not data:
                raise ControlConnectionError("control connection closed by the server")
            self._decoder.feed(data)
        try:
            message = decode_body(body)
        except Exception:
            raise ControlConnectionError("malformed reply from the server") from None
        if not isinstance(message, dict):
            raise ControlConnectionError("malformed reply: not a map")
        return message


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("control call timed out")
    return left
