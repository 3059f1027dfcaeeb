"""``sipbill ctl``: call one control-socket method and print its result for people or for jq.

::

    sipbill ctl [--socket PATH] [--json] [--timeout SECONDS] METHOD [ARGS...]

    sipbill ctl system.list_methods
    sipbill ctl system.help ul.lookup
    sipbill ctl ul.lookup alice@example.com              # positional
    sipbill ctl account.topup account=alice amount=10.50 # named
    sipbill ctl subscriber.add username=bob tags:='["vip"]'   # raw JSON value

An argument ``key=value`` is a named parameter and ``key:=JSON`` a named parameter given as JSON;
anything else is positional (a method takes one kind or the other, so they cannot be mixed).
Values are guessed: ``true``/``false``/``null``, integers written without a sign or leading zero
(so ``+4930123`` and ``0049...`` stay text), decimals that a float holds exactly; everything else
is a string. The server checks each value against the method's parameter types; a ``str``
parameter takes such an integer back as its text, and a ``Decimal`` one takes the text of a
number a float would round (so amounts are never rounded on the way).

Output: a list of maps is a table (columns are the keys), a map is ``key  value`` lines, a list
of plain values one per line, anything else as text; ``--json`` prints the result as JSON.
Exit status: 0 on success, 1 when the server answers with an error (printed to stderr), 2 for
a usage error, 3 when the server cannot be reached or does not answer in time.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, TextIO

import msgpack

from sipbill.control import ControlError
from sipbill.ctlclient import DEFAULT_CALL_TIMEOUT, ControlClient, ControlConnectionError

EXIT_OK = 0
EXIT_ERROR_REPLY = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_NAMED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(:=|=)(.*)$", re.DOTALL)
_INT = re.compile(r"^-?(0|[1-9][0-9]*)$")
_FLOAT = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?$")


class UsageError(ValueError):
    """The command line cannot be turned into a call."""


def parse_value(text: str) -> Any:
    """The value a bare command-line word stands for (see the module docstring)."""
    lowered = text.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    if lowered == "null":
        return None
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        number = float(text)
        # Only when the float is the number written: 0.1 is fine (repr gives "0.1" back), but
        # 12345678901234567.89 is not and goes as text, which Decimal parameters accept.
        if math.isfinite(number) and Decimal(repr(number)) == Decimal(text):
            return number
    return text


def parse_call_args(args: Sequence[str]) -> dict[str, Any] | list[Any] | None:
    """Named parameters (a dict), positional ones (a list), or None for no arguments."""
    named: dict[str, Any] = {}
    positional: list[Any] = []
    for arg in args:
        m = _NAMED.match(arg)
        if m is None:
            positional.append(parse_value(arg))
            continue
        key, op, raw = m.groups()
        if key in named:
            raise UsageError(f"parameter {key!r} given twice")
        if op == ":=":
            try:
                named[key] = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{key}:= needs a JSON value: {exc}") from None
        else:
            named[key] = parse_value(raw)
    if named and positional:
        raise UsageError("use either key=value arguments or positional ones, not both")
    if named:
        return named
    return positional or None


# --------------------------------------------------------------------------------------------
# Output


def _text(value: Any) -> str:
    """One value on one line."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value.replace("\n", "\\n")
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=_json_default, separators=(",", ":"))
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_table(rows: Sequence[dict[str, Any]], indent: str = "") -> str:
    """Rows of maps as an aligned table; columns are the keys in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    cells = [[_text(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    # Numbers line up on the right, like a spreadsheet, when a column holds nothing else.
    numeric = [
        all(_is_number(row.get(c)) or row.get(c) is None for row in rows)
        and any(_is_number(row.get(c)) for row in rows)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return (indent + "  ".join(parts)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def format_mapping(mapping: dict[str, Any], indent: str = "") -> str:
    """``key  value`` lines; nested maps and lists of maps are indented under their key."""
    if not mapping:
        return indent + "(empty)"
    width = max(len(str(k)) for k in mapping)
    out: list[str] = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.append(f"{indent}{key}:")
            out.append(format_mapping(value, indent + "  "))
        elif _is_rows(value):
            out.append(f"{indent}{key}:")
            out.append(format_table(value, indent + "  "))
        elif isinstance(value, list):
            shown = ", ".join(_text(v) for v in value) if value else "(none)"
            out.append(f"{indent}{str(key).ljust(width)}  {shown}")
        else:
            out.append(f"{indent}{str(key).ljust(width)}  {_text(value)}".rstrip())
    return "\n".join(out)


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def format_result(result: Any) -> str:
    """The human rendering of a result (see the module docstring); "" for None."""
    if result is None:
        return ""
    if _is_rows(result):
        return format_table(result)
    if isinstance(result, list):
        return "\n".join(_text(v) for v in result) if result else "(none)"
    if isinstance(result, dict):
        return format_mapping(result)
    if isinstance(result, str):
        return result
    return _text(result)


def _json_default(value: Any) -> Any:
    # What msgpack can carry and JSON cannot.
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, msgpack.Timestamp):
        return value.to_datetime().isoformat()
    return repr(value)


def format_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=_json_default)


# --------------------------------------------------------------------------------------------
# The command


def _parser(default_socket: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sipbill ctl",
        description="Call a method on the running server's control socket.",
        epilog="ARGS: key=value (named), key:=JSON (named, raw JSON) or bare values "
        "(positional). 'sipbill ctl system.list_methods' lists the methods, "
        "'sipbill ctl system.help METHOD' explains one.",
    )
    parser.add_argument(
        "--socket", default=default_socket, metavar="PATH",
        help=f"control socket path (default {default_socket})",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_CALL_TIMEOUT, metavar="SECONDS",
        help=f"give up after this long (default {DEFAULT_CALL_TIMEOUT:g})",
    )
    parser.add_argument("method", metavar="METHOD", help="method name, e.g. ul.dump")
    parser.add_argument("args", nargs="*", metavar="ARGS", help="parameters")
    return parser


def run_ctl(
    argv: list[str],
    default_socket: str,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``sipbill ctl`` with ``argv`` (the words after ``ctl``); returns the exit status.

    ``default_socket`` is the path used without ``--socket`` (the CLI takes it from the
    config). Output goes to ``stdout``/``stderr`` (default: the process's, looked up at call
    time so test capture works).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = _parser(default_socket)
    try:
        args = parser.parse_intermixed_args(argv)
    except SystemExit as exc:  # argparse has printed the usage or the help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        params = parse_call_args(args.args)
    except UsageError as exc:
        print(f"sipbill ctl: {exc}", file=err)
        return EXIT_USAGE
    if args.timeout <= 0:
        print("sipbill ctl: --timeout must be positive", file=err)
        return EXIT_USAGE

    path = args.socket
    client = ControlClient(path, connect_timeout=min(args.timeout, 5.0), call_timeout=args.timeout)
    try:
        result = client.request(args.method, params)
    except ControlError as exc:
        if args.json:
            print(format_json({"error": {"code": exc.code, "message": exc.message}}), file=err)
        else:
            print(f"sipbill ctl: error {exc.code}: {exc.message}", file=err)
        return EXIT_ERROR_REPLY
    except FileNotFoundError:
        print(f"sipbill ctl: no control socket at {path}; is the server running? "
              "(see --socket and control.socket)", file=err)
        return EXIT_UNREACHABLE
    except ConnectionRefusedError:
        print(f"sipbill ctl: nothing is listening on {path}; is the server running?", file=err)
        return EXIT_UNREACHABLE
    except PermissionError:
        print(f"sipbill ctl: permission denied on {path}; run as the service user or a member "
              "of its group", file=err)
        return EXIT_UNREACHABLE
    except TimeoutError:
        print(f"sipbill ctl: no answer from {path} within {args.timeout:g}s", file=err)
        return EXIT_UNREACHABLE
    except (ControlConnectionError, OSError) as exc:
        print(f"sipbill ctl: connection to {path} failed: {exc}", file=err)
        return EXIT_UNREACHABLE
    finally:
        client.close()

    text = format_json(result) if args.json else format_result(result)
    if text:
        print(text, file=out)
    return EXIT_OK
