"""The control socket: length-prefixed msgpack RPC on a Unix stream socket, and its method registry.

Operators (``sipbill ctl``) and web apps drive a running server through this socket, in the way
Kamailio's jsonrpcs/kamcmd do. It is not SIP, so there is no RFC; the request/response shape and
the error codes follow JSON-RPC 2.0 (https://www.jsonrpc.org/specification, section 5.1), carried
in msgpack (https://github.com/msgpack/msgpack/blob/master/spec.md) instead of JSON.

Wire format
-----------
Every frame, both ways, is a 4-byte big-endian body length followed by one msgpack map::

    request   {"id": 7, "method": "ul.lookup", "params": {"aor": "alice@example.com"}}
    request   {"id": 8, "method": "ul.lookup", "params": ["alice@example.com"]}
    response  {"id": 7, "result": [...]}
    response  {"id": 8, "error": {"code": -32601, "message": "no method named 'ul.lokup'"}}

``id`` is an integer or a string chosen by the client and echoed in the response; ``params`` is
a map (named) or a list (positional, in the handler's parameter order) and may be omitted.
Error codes: :data:`PARSE_ERROR`, :data:`INVALID_REQUEST`, :data:`METHOD_NOT_FOUND`,
:data:`INVALID_PARAMS`, :data:`INTERNAL_ERROR` as in JSON-RPC; the server-defined range -32000..
-32099 for :data:`REQUEST_TIMEOUT`, :data:`FRAME_TOO_LARGE`, :data:`RESULT_TOO_LARGE` and
:data:`TOO_MANY_CONNECTIONS`; anything else is an application error a handler raised as
:class:`ControlError` (404 "not found" by convention). An error that cannot be tied to a request
(unparseable frame, oversize frame, connection refused for load) carries ``"id": None``.

Theory of operation
-------------------
One :class:`_Connection` protocol object per accepted connection owns a :class:`FrameDecoder`.
``data_received`` feeds it and then takes complete frames off it while the connection has room:

* Each frame is decoded and validated synchronously (msgpack, shape, method lookup, parameters
  checked against the handler's signature). A bad frame is answered at once with an error and
  costs nothing more; framing is still intact, so the connection goes on.
* A valid request becomes one task that awaits the handler under the per-request timeout and
  writes its response when it finishes. Responses therefore go out in completion order, not
  request order; the client matches them by ``id``.
* Three things stop the connection taking further frames off its buffer, and pause reading from
  the socket so the kernel pushes back on the client: ``max_in_flight`` requests running, the
  transport's write buffer above its high-water mark (the client is not reading its answers), or
  a shutdown. Each is lifted by the event that ends it (a task finishing, ``resume_writing``).
* Writes never wait. A response is handed to the transport; if the client has left more than
  ``max_write_buffer`` bytes unread when the next response is due, the connection is aborted,
  since waiting for it would hold memory (and, with ``await drain()``, a task) for a client
  that may never read.
* A length prefix above ``max_frame_size`` cannot be skipped safely without reading the whole
  body, and framing is lost if it is not: the connection gets an error reply and is closed.
* The idle timer closes a connection that has had no request in flight and sent nothing for
  ``idle_timeout`` seconds. End-of-file from the client (half-close) lets in-flight requests
  finish and be answered before the connection closes.

The server keeps at most ``max_connections`` connections; one more is answered with
:data:`TOO_MANY_CONNECTIONS` and closed. Start-up refuses to steal the path from a live server
(a connect to it succeeds) but replaces a stale socket file left by a dead one; the socket is
created ``0660`` in a directory created ``0750`` if missing, so access is by group membership.

Methods
-------
:class:`MethodRegistry` maps ``module.method`` names to async handlers with typed keyword
parameters. Each module registers its own methods through a ``register_methods(registry, ...)``
function; :func:`register_system_methods` is that function for the built-in ``system.*`` methods
and is the pattern to copy. Parameters are validated against the handler's annotations before
the handler runs (see :meth:`MethodSpec.bind`), and every result goes through :func:`to_wire`.
"""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import datetime as dt
import enum
import functools
import inspect
import ipaddress
import keyword
import logging
import os
import re
import reprlib
import socket
import stat
import struct
import time
import types
import typing
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path, PurePath
from typing import Any, Literal, NoReturn, Self, Union, get_args, get_origin

import msgpack

log = logging.getLogger(__name__)

# JSON-RPC 2.0 section 5.1 codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Server-defined codes (JSON-RPC reserves -32000..-32099 for these).
REQUEST_TIMEOUT = -32000
FRAME_TOO_LARGE = -32001
RESULT_TOO_LARGE = -32002
TOO_MANY_CONNECTIONS = -32003  # also sent to a connection arriving while the server shuts down
# Conventional application code for "no such thing" (an AOR, an account, a call).
NOT_FOUND = 404

FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_SIZE = 1 << 20  # default cap on a request body

CLOSE_GRACE = 5.0  # seconds a closing connection may take to read its last replies

SOCKET_MODE = 0o660
DIRECTORY_MODE = 0o750

# ``module.method``; a few core methods (``stats``) are a bare word, like kamcmd's.
_METHOD_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
_REQUEST_KEYS = frozenset({"id", "method", "params"})
_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60


class ControlError(Exception):
    """An error reply: raised by handlers for application errors, and by clients on error replies.

    ``code`` is one of this module's constants or an application code (e.g. :data:`NOT_FOUND`);
    ``message`` is shown to the operator as is, so it must not contain secrets.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (code {self.code})"


class ControlSocketError(RuntimeError):
    """The control socket cannot be created: a live server owns the path, or it is not a socket."""


class FrameTooLargeError(ValueError):
    """A frame's length prefix is above the cap; the stream cannot be resynchronised."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


# --------------------------------------------------------------------------------------------
# Framing (sans-IO, shared with the clients)


def encode_frame(payload: Any) -> bytes:
    """One frame: the msgpack encoding of ``payload`` behind its 4-byte big-endian length."""
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    return FRAME_HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Any:
    """Decode one frame body; raises ``ValueError`` (or another msgpack error) when malformed.

    Map keys must be strings, so decoded maps are always valid keyword arguments.
    """
    return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)


class FrameDecoder:
    """Splits a byte stream into frame bodies; never buffers more than one frame plus a read."""

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self._max = max_frame_size

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete body, or None until more data arrives.

        Raises :class:`FrameTooLargeError` as soon as an oversize length prefix is seen, before
        its body is buffered.
        """
        if len(self._buffer) < FRAME_HEADER.size:
            return None
        (size,) = FRAME_HEADER.unpack_from(self._buffer)
        if size > self._max:
            raise FrameTooLargeError(size, self._max)
        end = FRAME_HEADER.size + size
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[FRAME_HEADER.size : end])
        del self._buffer[:end]
        return body

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# --------------------------------------------------------------------------------------------
# Results on the wire

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1


def to_wire(obj: Any) -> Any:
    """``obj`` as plain msgpack-serialisable data (the server applies this to every result).

    Decimal -> str in fixed-point notation (money must not pass through float); datetime, date
    and time -> ISO 8601 str; timedelta -> seconds (float); Enum -> its value; dataclass and
    NamedTuple -> dict (dataclass fields marked ``secret`` in their metadata, as
    :func:`sipbill.configschema.secret_field` does, become ``"***"``); other tuples, lists, sets
    -> list; mappings -> dict with str keys; paths, UUIDs and IP addresses -> str; integers outside
    msgpack's 64-bit range -> str. Anything else raises ``TypeError``.
    """
    if isinstance(obj, enum.Enum):
        return to_wire(obj.value)
    if obj is None or isinstance(obj, bool | str | bytes | float):
        return obj
    if isinstance(obj, int):
        return obj if _INT64_MIN <= obj <= _UINT64_MAX else str(obj)
    if isinstance(obj, Decimal):
        return format(obj, "f") if obj.is_finite() else str(obj)
    if isinstance(obj, dt.date | dt.time):  # datetime is a date
        return obj.isoformat()
    if isinstance(obj, dt.timedelta):
        return obj.total_seconds()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("secret"):
                out[f.name] = "***" if value else to_wire(value)
            else:
                out[f.name] = to_wire(value)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return {str(k): to_wire(v) for k, v in obj._asdict().items()}
    if isinstance(obj, Mapping):
        return {_wire_key(k): to_wire(v) for k, v in obj.items()}
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    if isinstance(obj, Sequence | collections.abc.Set):
        return [to_wire(v) for v in obj]
    if isinstance(
        obj, PurePath | uuid.UUID | ipaddress.IPv4Address | ipaddress.IPv6Address
        | ipaddress.IPv4Network | ipaddress.IPv6Network
    ):
        return str(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} over the control socket")


def _wire_key(key: Any) -> str:
    # Keys become strings so every result is also valid JSON for `sipbill ctl --json`.
    wire = to_wire(key)
    return wire if isinstance(wire, str) else str(wire)


# --------------------------------------------------------------------------------------------
# Parameter validation

# A converter checks one incoming value against an annotation and returns the value to pass
# (e.g. a Decimal for a str or int). ``lenient`` allows the one lossy-looking coercion, int ->
# str, which exists because `sipbill ctl ul.lookup 1001` guesses that 1001 is a number; a CLI
# only turns digits without a leading zero or sign into an int, so the text is recovered exactly.
_Converter = Callable[[Any, str, bool], Any]


def _mismatch(path: str, expected: str, value: Any) -> NoReturn:
    raise ControlError(
        INVALID_PARAMS, f"parameter {path!r}: expected {expected}, got {_short.repr(value)}"
    )


def _type_text(tp: Any) -> str:
    if tp is inspect.Parameter.empty or tp is Any:
        return "Any"
    if tp is type(None) or tp is None:
        return "None"
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_text(a) for a in get_args(tp))
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in get_args(tp)) + "]"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[" + ", ".join(_type_text(a) for a in get_args(tp)) + "]"
    return str(tp).replace("typing.", "")


def _build_converter(tp: Any) -> _Converter:
    """The converter for annotation ``tp``; ``TypeError`` for annotations the wire cannot carry."""
    if tp is inspect.Parameter.empty or tp is Any or tp is object:
        return lambda value, path, lenient: value
    if tp is None or tp is type(None):

        def none(value: Any, path: str, lenient: bool) -> Any:
            if value is not None:
                _mismatch(path, "null", value)
            return None

        return none
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if optional and len(rest) == 1:
            # X | None: defer to X, whose message names the bad item ("ids[1]: ...").
            inner = _build_converter(rest[0])
            return lambda value, path, lenient: (
                None if value is None else inner(value, path, lenient)
            )
        members = [_build_converter(a) for a in args]
        expected = " or ".join(_type_text(a) for a in args)

        def union(value: Any, path: str, lenient: bool) -> Any:
            # Exact matches first, so `int | str` keeps an int and `str | int` does too.
            for strict in (True, False):
                if strict is False and not lenient:
                    break
                for member in members:
                    try:
                        return member(value, path, not strict)
                    except ControlError:
                        continue
            _mismatch(path, expected, value)

        return union
    if origin is Literal:
        allowed = args

        def literal(value: Any, path: str, lenient: bool) -> Any:
            for a in allowed:
                if type(a) is type(value) and a == value:
                    return a
                if lenient and isinstance(a, str) and _is_int(value) and str(value) == a:
                    return a
            _mismatch(path, "one of " + ", ".join(repr(a) for a in allowed), value)

        return literal
    if tp is bool:

        def boolean(value: Any, path: str, lenient: bool) -> Any:
            if not isinstance(value, bool):
                _mismatch(path, "true or false", value)
            return value

        return boolean
    if tp is int:

        def integer(value: Any, path: str, lenient: bool) -> Any:
            if not _is_int(value):
                _mismatch(path, "an integer", value)
            return value

        return integer
    if tp is float:

        def number(value: Any, path: str, lenient: bool) -> Any:
            if not (_is_int(value) or isinstance(value, float)):
                _mismatch(path, "a number", value)
            return float(value)

        return number
    if tp is str:

        def string(value: Any, path: str, lenient: bool) -> Any:
            if isinstance(value, str):
                return value
            if lenient and _is_int(value):
                return str(value)
            _mismatch(path, "a string", value)

        return string
    if tp is bytes:

        def binary(value: Any, path: str, lenient: bool) -> Any:
            if not isinstance(value, bytes):
                _mismatch(path, "binary data", value)
            return value

        return binary
    if tp is Decimal:
        return _convert_decimal
    if tp is dt.datetime:
        return _convert_datetime
    if tp is dt.date:
        return _convert_date
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        enum_type = tp
        values = ", ".join(repr(m.value) for m in enum_type)

        def enumeration(value: Any, path: str, lenient: bool) -> Any:
            for member in enum_type:
                if type(member.value) is type(value) and member.value == value:
                    return member
            _mismatch(path, f"one of {values}", value)

        return enumeration
    if tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        container = tuple if (tp is tuple or origin is tuple) else list
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"unsupported parameter type {_type_text(tp)} (use tuple[X, ...])")
        item = _build_converter(args[0] if args else Any)

        def sequence(value: Any, path: str, lenient: bool) -> Any:
            if not isinstance(value, list):
                _mismatch(path, "a list", value)
            return container(item(v, f"{path}[{i}]", lenient) for i, v in enumerate(value))

        return sequence
    if tp is dict or origin in (dict, collections.abc.Mapping):
        if args and args[0] is not str:
            raise TypeError(f"unsupported parameter type {_type_text(tp)} (map keys are str)")
        item = _build_converter(args[1] if args else Any)

        def mapping(value: Any, path: str, lenient: bool) -> Any:
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                _mismatch(path, "a map with string keys", value)
            return {k: item(v, f"{path}.{k}", lenient) for k, v in value.items()}

        return mapping
    raise TypeError(f"unsupported parameter type {_type_text(tp)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _convert_decimal(value: Any, path: str, lenient: bool) -> Any:
    # msgpack has no decimal type: a decimal arrives as text (exact), an int, or a float, which is
    # taken at its shortest repr ("10.5", never 10.4999...). Non-finite values are refused
    # because every Decimal parameter is an amount or a rate.
    if _is_int(value):
        return Decimal(value)
    if isinstance(value, float):
        text = repr(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        _mismatch(path, "a decimal number", value)
    try:
        result = Decimal(text)
    except InvalidOperation:
        _mismatch(path, "a decimal number", value)
    if not result.is_finite():
        _mismatch(path, "a finite decimal number", value)
    return result


def _convert_datetime(value: Any, path: str, lenient: bool) -> Any:
    if isinstance(value, msgpack.Timestamp):
        return value.to_datetime()
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            pass
    _mismatch(path, "an ISO 8601 date-time", value)


def _convert_date(value: Any, path: str, lenient: bool) -> Any:
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    _mismatch(path, "an ISO 8601 date (YYYY-MM-DD)", value)


# --------------------------------------------------------------------------------------------
# The registry

Handler = Callable[..., Awaitable[Any]]


@dataclasses.dataclass(frozen=True, slots=True)
class ParamSpec:
    """One parameter of a method, as validated on the wire and shown by ``system.help``."""

    name: str  # on the wire
    type_text: str
    required: bool
    default: Any
    doc: str
    convert: _Converter = dataclasses.field(repr=False, compare=False)
    arg: str = ""  # the handler's keyword, when it differs (``from_`` for wire ``from``)


@dataclasses.dataclass(frozen=True, slots=True)
class MethodSpec:
    """A registered method: its handler, help text and parameter checks."""

    name: str
    handler: Handler = dataclasses.field(repr=False)
    help: str
    params: tuple[ParamSpec, ...]
    returns: str

    @property
    def signature(self) -> str:
        """``ul.lookup(aor: str, limit: int = 10) -> list``."""
        parts = []
        for p in self.params:
            text = f"{p.name}: {p.type_text}"
            if not p.required:
                text += f" = {p.default!r}"
            parts.append(text)
        sig = f"{self.name}({', '.join(parts)})"
        return f"{sig} -> {self.returns}" if self.returns else sig

    def bind(self, params: Any) -> dict[str, Any]:
        """Keyword arguments for the handler from wire ``params`` (a map, a list or None).

        Raises :class:`ControlError` with :data:`INVALID_PARAMS` naming the first unknown,
        missing or mistyped parameter, or :data:`INVALID_REQUEST` when ``params`` is neither a
        map nor a list.
        """
        if params is None:
            given: dict[str, Any] = {}
        elif isinstance(params, list):
            if len(params) > len(self.params):
                raise ControlError(
                    INVALID_PARAMS,
                    f"{self.name} takes at most {len(self.params)} positional parameters"
                    f" ({len(params)} given)",
                )
            given = {p.name: v for p, v in zip(self.params, params, strict=False)}
        elif isinstance(params, dict):
            given = params
            known = {p.name for p in self.params}
            for key in given:
                if key not in known:
                    expected = ", ".join(p.name for p in self.params) or "none"
                    raise ControlError(
                        INVALID_PARAMS,
                        f"{self.name} has no parameter {_short.repr(key)} (parameters: {expected})",
                    )
        else:
            raise ControlError(INVALID_REQUEST, "params must be a map or a list")
        kwargs: dict[str, Any] = {}
        for p in self.params:
            if p.name in given:
                kwargs[p.arg or p.name] = p.convert(given[p.name], p.name, True)
            elif p.required:
                raise ControlError(INVALID_PARAMS, f"{self.name}: missing parameter {p.name!r}")
        return kwargs

    def describe(self) -> dict[str, Any]:
        """What ``system.help`` returns."""
        return {
            "name": self.name,
            "signature": self.signature,
            "help": self.help,
            "params": [
                {
                    "name": p.name,
                    "type": p.type_text,
                    "required": p.required,
                    "default": None if p.required else repr(p.default),
                    "doc": p.doc,
                }
                for p in self.params
            ],
        }


class MethodRegistry:
    """Control-socket methods by name; ``system.*`` is registered on construction."""

    def __init__(self) -> None:
        self._methods: dict[str, MethodSpec] = {}
        register_system_methods(self)

    def register(
        self,
        name: str,
        handler: Handler,
        *,
        help: str,
        params_doc: Mapping[str, str] | None = None,
    ) -> MethodSpec:
        """Register ``handler`` as ``name`` (``module.method``, lower case).

        The handler is an async function whose parameters are all annotated with types the
        wire can carry (bool, int, float, str, bytes, Decimal, datetime, date, Enum, Literal,
        list/tuple/dict of those, unions and None); they may be passed by name or in order, so
        positional-only, ``*args`` and ``**kwargs`` parameters are refused. Raises ``ValueError``
        for a bad or duplicate name and ``TypeError`` for a handler that does not fit, so a
        mistake fails at start-up rather than on the first call.
        """
        if not _METHOD_NAME.match(name):
            raise ValueError(f"method name {name!r} is not 'module.method' or 'word' in lower case")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"handler for {name!r} must be an async function")
        try:
            sig = inspect.signature(handler, eval_str=True)
        except NameError as exc:
            raise TypeError(f"handler for {name!r}: cannot resolve an annotation: {exc}") from exc
        docs = dict(params_doc or {})
        params: list[ParamSpec] = []
        for p in sig.parameters.values():
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                raise TypeError(
                    f"handler for {name!r}: parameter {p.name!r} must be passable by name"
                )
            try:
                convert = _build_converter(p.annotation)
            except TypeError as exc:
                raise TypeError(f"handler for {name!r}, parameter {p.name!r}: {exc}") from exc
            # A handler spells a Python keyword with a trailing underscore (PEP 8): the wire
            # name is the word itself, so `click2dial.call {from, to}` reaches `from_`.
            wire = p.name[:-1] if p.name.endswith("_") and keyword.iskeyword(p.name[:-1]) \
                else p.name
            params.append(
                ParamSpec(
                    name=wire,
                    arg=p.name,
                    type_text=_type_text(p.annotation),
                    required=p.default is p.empty,
                    default=None if p.default is p.empty else p.default,
                    doc=docs.pop(wire, docs.pop(p.name, "")),
                    convert=convert,
                )
            )
        if docs:
            raise TypeError(f"params_doc for {name!r} names unknown parameters: {sorted(docs)}")
        returns = "" if sig.return_annotation is sig.empty else _type_text(sig.return_annotation)
        spec = MethodSpec(name, handler, inspect.cleandoc(help).strip(), tuple(params), returns)
        self._methods[name] = spec
        return spec

    def get(self, name: str) -> MethodSpec | None:
        return self._methods.get(name)

    def names(self, module: str | None = None) -> list[str]:
        """Sorted method names, all or those of one module (``"ul"`` or ``"ul."``)."""
        if not module:
            return sorted(self._methods)
        prefix = module.rstrip(".") + "."
        return sorted(n for n in self._methods if n.startswith(prefix))

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __len__(self) -> int:
        return len(self._methods)


def register_system_methods(registry: MethodRegistry) -> None:
    """The built-in ``system.*`` methods; each module has a function like this one.

    A module's version takes the registry plus the services its methods need (no globals), and
    its handlers are closures over them::

        def register_methods(registry: MethodRegistry, location: LocationService) -> None:
            async def lookup(aor: str) -> list[Binding]:
                ...
            registry.register("ul.lookup", lookup, help="Bindings of one AOR.",
                              params_doc={"aor": "address of record, user@domain"})
    """

    async def list_methods(module: str | None = None) -> list[str]:
        return registry.names(module)

    async def help_(name: str) -> dict[str, Any]:
        spec = registry.get(name)
        if spec is None:
            raise ControlError(NOT_FOUND, f"no method named {name!r}")
        return spec.describe()

    async def ping() -> str:
        return "pong"

    registry.register(
        "system.list_methods",
        list_methods,
        help="Names of all methods, sorted; with MODULE only that module's (e.g. 'ul').",
        params_doc={"module": "module prefix to filter by"},
    )
    registry.register(
        "system.help",
        help_,
        help="Signature, parameters and help text of one method.",
        params_doc={"name": "method name, e.g. 'ul.lookup'"},
    )
    registry.register("system.ping", ping, help="Answers 'pong'; a liveness check.")


# --------------------------------------------------------------------------------------------
# The server


@dataclasses.dataclass(frozen=True, slots=True)
class ControlLimits:
    """Caps that keep one client from costing the server more than its share."""

    max_frame_size: int = MAX_FRAME_SIZE  # request body; an oversize prefix closes the connection
    max_response_size: int = 16 << 20  # result body; a bigger result is an error reply instead
    max_connections: int = 64
    max_in_flight: int = 16  # requests running per connection; more wait in the socket
    idle_timeout: float = 300.0  # seconds with nothing in flight and nothing received
    request_timeout: float = 30.0  # seconds a handler may run
    write_high_water: int = 256 << 10  # unread reply bytes at which new requests are not taken
    max_write_buffer: int = 4 << 20  # unread reply bytes at which the client is dropped

    def __post_init__(self) -> None:
        for name in ("max_frame_size", "max_response_size", "max_connections", "max_in_flight",
                     "write_high_water", "max_write_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"ControlLimits.{name} must be at least 1")
        for name in ("idle_timeout", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ControlLimits.{name} must be positive")
        if self.write_high_water > self.max_write_buffer:
            raise ValueError("ControlLimits.write_high_water must not exceed max_write_buffer")


RequestObserver = Callable[[str, int | None, float], None]
"""Called once per answered request with (method, error code or None, seconds taken).

The method is ``""`` when the request named no registered method, so a metrics label built from
it has bounded cardinality whatever clients send.
"""


def _error_frame(req_id: Any, code: int, message: str) -> bytes:
    return encode_frame({"id": req_id, "error": {"code": code, "message": message}})


def _peer_credentials(transport: asyncio.BaseTransport) -> str:
    # SO_PEERCRED (Linux) names the process on the other end; logged so an operator can tell
    # who connected. Best effort: other platforms and wrapped sockets simply log nothing.
    sock = transport.get_extra_info("socket")
    peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is None or peercred is None:
        return ""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except (OSError, AttributeError, struct.error):
        return ""
    return f" pid={pid} uid={uid} gid={gid}"


class _Connection(asyncio.Protocol):
    """One client connection; see the module docstring's theory of operation."""

    def __init__(self, server: ControlServer, conn_id: int) -> None:
        self._server = server
        self._limits = server.limits
        self._registry = server.registry
        self._id = conn_id
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder(self._limits.max_frame_size)
        self._in_flight: dict[int | str, asyncio.Task[None]] = {}
        self._reading = True
        self._write_paused = False
        self._eof = False
        self._closing = False
        self._lost = False
        self._last_activity = self._loop.time()
        self._idle_handle: asyncio.TimerHandle | None = None
        self._peer = ""

    # -- asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport, hence a cast.
        transport = typing.cast(asyncio.Transport, transport)
        self._transport = transport
        self._peer = _peer_credentials(transport)
        transport.set_write_buffer_limits(high=self._limits.write_high_water)
        refusal = self._server._admit(self)
        if refusal:
            log.warning("event=control_connection_refused reason=%s limit=%d%s",
                        refusal.replace(" ", "_"), self._limits.max_connections, self._peer)
            self._closing = True
            transport.write(_error_frame(None, TOO_MANY_CONNECTIONS, refusal))
            transport.close()
            return
        log.debug("event=control_connected conn=%d%s", self._id, self._peer)
        self._idle_handle = self._loop.call_later(self._limits.idle_timeout, self._on_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._lost = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        for task in self._in_flight.values():
            task.cancel()
        self._server._forget(self)
        log.debug("event=control_disconnected conn=%d", self._id)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_activity = self._loop.time()
        self._decoder.feed(data)
        self._process()

    def eof_received(self) -> bool:
        # The client has finished sending; answer what it sent, then close. True keeps the
        # transport open for those answers (Unix stream sockets support half-close).
        self._eof = True
        self._process()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._process()

    # -- frame handling

    def _process(self) -> None:
        """Take complete frames off the buffer while there is room, then adjust reading."""
        drained = False
        while (
            not self._closing
            and not self._write_paused
            and len(self._in_flight) < self._limits.max_in_flight
        ):
            try:
                body = self._decoder.next_frame()
            except FrameTooLargeError as exc:
                log.warning("event=control_frame_too_large conn=%d size=%d limit=%d",
                            self._id, exc.size, exc.limit)
                self._write(_error_frame(None, FRAME_TOO_LARGE, str(exc)))
                self._server._observe("", FRAME_TOO_LARGE, 0.0)
                self._close()
                return
            if body is None:
                drained = True
                break
            try:
                self._handle_frame(body)
            except Exception:
                # A bug in validation must cost one reply, not the connection (asyncio would
                # close a transport whose callback raised).
                log.exception("event=control_frame_failed conn=%d", self._id)
                self._write(_error_frame(None, INTERNAL_ERROR, "internal error"))
        if self._closing:
            return
        if self._eof and drained and not self._in_flight:
            self._close()
            return
        self._update_reading()

    def _update_reading(self) -> None:
        if self._transport is None or self._closing or self._eof:
            return
        want = not self._write_paused and len(self._in_flight) < self._limits.max_in_flight
        if want and not self._reading:
            self._transport.resume_reading()
        elif not want and self._reading:
            self._transport.pause_reading()
        self._reading = want

    def _handle_frame(self, body: bytes) -> None:
        started = time.monotonic()
        try:
            request = decode_body(body)
        except Exception:  # msgpack raises several types for malformed input; all mean the same
            self._reply_error(None, PARSE_ERROR, "malformed msgpack", "", started)
            return
        if not isinstance(request, dict):
            self._reply_error(None, PARSE_ERROR, "request is not a map", "", started)
            return
        raw_id = request.get("id")
        if isinstance(raw_id, bool) or not isinstance(raw_id, int | str):
            self._reply_error(
                None, INVALID_REQUEST, "request id must be an integer or a string", "", started
            )
            return
        req_id: int | str = raw_id
        unknown = set(request) - _REQUEST_KEYS
        if unknown:
            message = "unknown request key " + min(_short.repr(k) for k in unknown)
            self._reply_error(req_id, INVALID_REQUEST, message, "", started)
            return
        if req_id in self._in_flight:
            message = f"request id {req_id!r} is already in flight on this connection"
            self._reply_error(req_id, INVALID_REQUEST, message, "", started)
            return
        method = request.get("method")
        if not isinstance(method, str) or not method:
            self._reply_error(req_id, INVALID_REQUEST, "missing method", "", started)
            return
        spec = self._registry.get(method)
        if spec is None:
            message = f"no method named {_short.repr(method)}"
            self._reply_error(req_id, METHOD_NOT_FOUND, message, "", started)
            return
        try:
            kwargs = spec.bind(request.get("params"))
        except ControlError as exc:
            self._reply_error(req_id, exc.code, exc.message, spec.name, started)
            return
        task = self._loop.create_task(self._run(req_id, spec, kwargs, started))
        self._in_flight[req_id] = task
        task.add_done_callback(functools.partial(self._request_done, req_id))

    async def _run(
        self, req_id: int | str, spec: MethodSpec, kwargs: dict[str, Any], started: float
    ) -> None:
        code: int | None = None
        timeout = asyncio.timeout(self._limits.request_timeout)
        try:
            try:
                async with timeout:
                    result = await spec.handler(**kwargs)
            except TimeoutError:
                if not timeout.expired():
                    raise  # the handler's own timeout, not ours: an internal error
                raise ControlError(
                    REQUEST_TIMEOUT,
                    f"{spec.name} did not finish within {self._limits.request_timeout:g}s",
                ) from None
            frame = encode_frame({"id": req_id, "result": to_wire(result)})
            size = len(frame) - FRAME_HEADER.size
            if size > self._limits.max_response_size:
                raise ControlError(
                    RESULT_TOO_LARGE,
                    f"result of {size} bytes exceeds the {self._limits.max_response_size}-byte"
                    " limit",
                )
        except ControlError as exc:
            code = exc.code
            frame = _error_frame(req_id, exc.code, exc.message)
        except (Exception, asyncio.CancelledError) as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and (task is None or task.cancelling()):
                raise  # we are being cancelled (connection lost, shutdown): nobody to answer
            # A bug in a handler must not take the socket down, nor leave the client waiting
            # (a CancelledError from a task the handler awaited is such a bug). The traceback
            # goes to the log; the client gets a generic message, as the exception text could
            # hold anything.
            log.exception("event=control_handler_failed conn=%d method=%s id=%r%s",
                          self._id, spec.name, req_id, self._peer)
            code = INTERNAL_ERROR
            frame = _error_frame(req_id, INTERNAL_ERROR, "internal error")
        self._write(frame)
        self._server._observe(spec.name, code, time.monotonic() - started)

    def _request_done(self, req_id: int | str, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(req_id, None)
        self._last_activity = self._loop.time()
        if not self._closing:
            self._process()

    def _reply_error(
        self, req_id: Any, code: int, message: str, method: str, started: float
    ) -> None:
        log.debug("event=control_bad_request conn=%d code=%d message=%r", self._id, code, message)
        self._write(_error_frame(req_id, code, message))
        self._server._observe(method, code, time.monotonic() - started)

    # -- output and teardown

    def _write(self, frame: bytes) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        backlog = transport.get_write_buffer_size()
        if backlog > self._limits.max_write_buffer:
            log.warning("event=control_client_too_slow conn=%d unread_bytes=%d limit=%d%s",
                        self._id, backlog, self._limits.max_write_buffer, self._peer)
            self._abort()
            return
        transport.write(frame)

    def _on_idle(self) -> None:
        self._idle_handle = None
        if self._closing:
            return
        remaining = self._last_activity + self._limits.idle_timeout - self._loop.time()
        if self._in_flight or remaining > 0:
            delay = self._limits.idle_timeout if self._in_flight else remaining
            self._idle_handle = self._loop.call_later(delay, self._on_idle)
            return
        log.info("event=control_idle_timeout conn=%d timeout=%g", self._id,
                 self._limits.idle_timeout)
        self._close()

    def _close(self) -> None:
        """Close after flushing what is written; abort if the client does not take it in time.

        ``transport.close()`` waits for the write buffer to drain, which a client that never
        reads would make forever; the grace timer bounds that.
        """
        self._closing = True
        for task in self._in_flight.values():
            task.cancel()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if transport.get_write_buffer_size():
            grace = min(CLOSE_GRACE, self._limits.idle_timeout)
            self._loop.call_later(grace, self._abort)

    def _abort(self) -> None:
        self._closing = True
        for task in self._in_flight.values():
            task.cancel()
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def shutdown(self) -> None:
        """Server shutdown: drop in-flight work, flush what is already written if we can."""
        if self._transport is not None and self._transport.get_write_buffer_size():
            self._abort()
        else:
            self._close()


class ControlServer:
    """The control socket server: ``await start()``, later ``await close()`` (or ``async with``).

    ``path`` is the socket file; its directory is created (mode 0750) if missing. ``on_request``
    is the hook for metrics (see :data:`RequestObserver`).
    """

    def __init__(
        self,
        registry: MethodRegistry,
        path: str | os.PathLike[str],
        *,
        limits: ControlLimits | None = None,
        on_request: RequestObserver | None = None,
    ) -> None:
        self.registry = registry
        self.path = Path(path)
        self.limits = limits or ControlLimits()
        self._on_request = on_request
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._all_closed: asyncio.Event | None = None
        self._next_conn_id = 0
        self._inode: tuple[int, int] | None = None

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Create the socket and start accepting; :class:`ControlSocketError` if we cannot."""
        if self._server is not None:
            raise RuntimeError("control server already started")
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
            os.chmod(parent, DIRECTORY_MODE)  # mkdir's mode is filtered by the umask
        _clear_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            try:
                sock.bind(str(self.path))
            except OSError as exc:
                raise ControlSocketError(
                    f"cannot create control socket {self.path}: {exc.strerror or exc}"
                ) from exc
            bound = True
            # chmod after bind: bind creates the file with the umask's mode, and the directory
            # (0750) keeps others out during the moment in between.
            os.chmod(self.path, SOCKET_MODE)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(min(self.limits.max_connections, socket.SOMAXCONN))
            sock.setblocking(False)
            self._all_closed = asyncio.Event()
            self._all_closed.set()
            self._server = await asyncio.get_running_loop().create_unix_server(
                self._make_connection, sock=sock
            )
        except BaseException:
            sock.close()
            if bound:
                self._unlink_own_socket()
            raise
        log.info("event=control_listening path=%s", self.path)

    async def close(self) -> None:
        """Stop accepting, end every connection (in-flight requests are cancelled), unlink."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._connections):
            conn.shutdown()
        if self._all_closed is not None:
            try:
                async with asyncio.timeout(5.0):
                    await self._all_closed.wait()
            except TimeoutError:
                log.warning("event=control_close_timeout connections=%d", len(self._connections))
        await server.wait_closed()
        self._unlink_own_socket()
        log.info("event=control_closed path=%s", self.path)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- used by _Connection

    def _make_connection(self) -> _Connection:
        self._next_conn_id += 1
        return _Connection(self, self._next_conn_id)

    def _admit(self, conn: _Connection) -> str:
        """Why ``conn`` may not be served, or "" to serve it."""
        if self._server is None:
            return "server shutting down"
        if len(self._connections) >= self.limits.max_connections:
            return "too many connections"
        self._connections.add(conn)
        if self._all_closed is not None:
            self._all_closed.clear()
        return ""

    def _forget(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    def _observe(self, method: str, code: int | None, seconds: float) -> None:
        if self._on_request is None:
            return
        try:
            self._on_request(method, code, seconds)
        except Exception:
            log.exception("event=control_observer_failed method=%s", method)

    def _unlink_own_socket(self) -> None:
        # Only remove the file if it is still the one we bound: a server started after us on
        # the same path (after we were presumed dead) must keep its socket.
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse a live one or a file that is no socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)
        log.info("event=control_stale_socket_removed path=%s", path)
        return
    except FileNotFoundError:
        return
    except TimeoutError as exc:
        # A full accept backlog makes connect() wait: somebody is listening.
        raise ControlSocketError(f"another server is listening on {path} (busy)") from exc
    except OSError as exc:
        raise ControlSocketError(f"cannot check existing socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise ControlSocketError(f"another server is already listening on {path}")
