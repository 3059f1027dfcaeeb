"""Fuzz the parser's C accelerator under AddressSanitizer + UBSan, against the pure-Python path.

Builds ``sipcore/_fastparse.c`` with ``-fsanitize=address,undefined`` (UB is fatal) into a
temporary directory, then runs COUNT mutated messages -- RFC 4475 torture messages, the
INVITE / 200 OK / REGISTER of tests/sipcore/test_fastparse.py and bench/parse.py, and
generated common-shape requests, each put through 1-4 random byte- and line-level mutations
-- through ``parse_message``'s C path, as a datagram and as a stream, a few percent of them
with the size caps (MAX_MESSAGE_SIZE, MAX_LINE_LENGTH, MAX_HEADERS) set near the message's
own size.  For every message the sanitized build accepts, the result is compared with the
pure-Python parser's field by field (the snapshot of tests/sipcore/test_fastparse.py:
fields, every slot, lazy headers, forwarded bytes); messages it declines are the pure path's
alone.  A request it accepts is also answered through ``respond`` and compared with
``build_response``'s Python code, and each message is followed by a mutated Authorization
value through ``auth_params``, compared with ``digest._parse_auth_header``.  Worker
processes run with ``PYTHONMALLOC=malloc`` so that Python objects, too, are in the memory
ASan watches, and collect garbage now and then so a reference-count error shows up as a
use-after-free.

Run (5 minutes per million messages on 2 idle cores, up to 12 under other load)::

    .venv/bin/python bench/fuzz_fastparse.py 1000000            # COUNT messages
    .venv/bin/python bench/fuzz_fastparse.py 20000 --seed 7 --jobs 1
    .venv/bin/python bench/fuzz_fastparse.py 20000 --source /tmp/buggy.c   # another source

It prints one progress line per worker every 100,000 messages, then a summary: messages
run, how many the accelerator accepted, differences from the pure path (each reported with
the message), and sanitizer findings (the report, and the message that was being parsed,
which each worker writes to a file before every C call).  Exit status 0 when there were
none.  Needs gcc (or the compiler Python was built with) with libasan and libubsan.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SANITIZE = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-g",
    "-O1",
]
MAX_REPORTED = 20  # differences printed per worker


# --------------------------------------------------------------------------- build


def build(source: Path, out_dir: Path) -> Path:
    """Compile source as sipcore._fastparse with the sanitizers; the shared object's path."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    target = out_dir / ("_fastparse" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    cmd = [
        *cc,
        *SANITIZE,
        "-shared",
        "-fPIC",
        "-Wall",
        f"-I{sysconfig.get_paths()['include']}",
        f'-DSOURCE_HASH="{digest}"',
        str(source),
        "-o",
        str(target),
    ]
    subprocess.run(cmd, check=True)
    return target


def runtime_library(name: str) -> str:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    path = subprocess.run(
        [cc, f"-print-file-name={name}"], check=True, capture_output=True, text=True
    ).stdout.strip()
    if not os.path.isabs(path):
        raise SystemExit(f"{cc} has no {name}: install the compiler's sanitizer runtime")
    return path


# --------------------------------------------------------------------------- messages


def seeds() -> tuple[list[bytes], list[bytes]]:
    """(common-shape messages, RFC 4475 torture messages)."""
    from bench.parse import INVITE as BENCH_INVITE
    from bench.parse import OK_200 as BENCH_200
    from tests.sipcore.test_fastparse import COMMON
    from tests.sipcore.test_message_props import SEEDS

    return [*COMMON, BENCH_INVITE, BENCH_200], list(SEEDS)


SPICE = [
    b" ", b"\t", b"\r\n", b"\r\n ", b"\r", b"\n", b":", b";", b",", b'"', b"\\", b"<", b">",
    b"@", b"=", b"[", b"]", b"[::1]", b"?", b"%", b"\x00", b"\x7f", b"\x80", b"\xff",
    b"\xc3\xa9", b"0", b"9", b"9999999999", b"4294967296", b"65535", b"65536", b"255", b"256",
    b"z9hG4bK", b";tag", b";tag=", b";tag=x", b";rport", b";rport=1", b";ttl=1", b";maddr",
    b";received", b";branch", b";branch=", b";lr", b"sip:", b"sips:", b"tel:", b"SIP/2.0",
    b"SIP/2.0/UDP ", b"INVITE", b"ACK", b"Via: SIP/2.0/UDP h;branch=z9hG4bKx\r\n",
    b"To: <sip:x@y>\r\n", b"From: <sip:a@b>;tag=1\r\n", b"CSeq: 1 INVITE\r\n",
    b"Max-Forwards: 1\r\n", b"Route: <sip:r;lr>\r\n", b"Route: <sip:a>, <sip:b>\r\n",
    b"l: 3\r\n", b"Content-Length: 0\r\n", b"V: ", b"i: ", b"CALL-ID: ", b"X-Odd-Header: ",
    b'"', b'"Alice" ', b"Bob B ", b"\r\n\r\n", b"x" * 300,
]  # fmt: skip
NUMBERS = [b"0", b"1", b"70", b"255", b"256", b"65535", b"65536", b"999999999",
           b"4294967295", b"4294967296", b"9999999999", b"12345678901"]  # fmt: skip
TOKEN = b"abcXYZ019-.!%*_+`'~"


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(11)
        pos = rng.randint(0, len(buf))
        if op == 10:
            op = 5  # numbers twice as often: every limit the parsers check is numeric
        if op <= 1:
            buf[pos:pos] = rng.choice(SPICE)
        elif op == 2:
            del buf[pos : pos + rng.randint(1, 12)]
        elif op == 3 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 4 and buf:  # flip the case of a letter (header names, methods, params)
            i = min(pos, len(buf) - 1)
            buf[i : i + 1] = bytes(buf[i : i + 1]).swapcase()
        elif op == 5:  # a number replaced by an edge value
            digits = [i for i in range(len(buf)) if 48 <= buf[i] <= 57]
            if digits:
                i = rng.choice(digits)
                j = i
                while j < len(buf) and 48 <= buf[j] <= 57:
                    j += 1
                buf[i:j] = rng.choice(NUMBERS)
        else:  # line-level: duplicate, drop, swap, or insert a token run
            head_end = buf.find(b"\r\n\r\n")
            lines = bytes(buf[: max(head_end, 0)]).split(b"\r\n")
            rest = bytes(buf[max(head_end, 0) :])
            if len(lines) > 2:
                i, j = rng.randrange(1, len(lines)), rng.randrange(1, len(lines))
                if op == 6:
                    lines.insert(j, lines[i])
                elif op == 7:
                    del lines[i]
                elif op == 8:
                    lines[i], lines[j] = lines[j], lines[i]
                else:
                    k = rng.randint(0, len(lines[i]))
                    run = bytes(rng.choice(TOKEN) for _ in range(rng.randint(1, 8)))
                    lines[i] = lines[i][:k] + run + lines[i][k:]
                buf = bytearray(b"\r\n".join(lines) + rest)
    return bytes(buf)


def message(rng: random.Random, common: list[bytes], torture: list[bytes]) -> bytes:
    pool = common if rng.random() < 0.75 or not torture else torture
    data = rng.choice(pool)
    if rng.random() < 0.1:
        data = rng.choice([b"", b"\r\n", b"\r\n\r\n"]) + data
    return mutate(data, rng) if rng.random() < 0.95 else data


# --------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    import gc

    import sipcore.message as message_module
    from sipcore.headers import _NAME_CACHE
    from tests.sipcore.test_fastparse import PJSIP_AUTH, SIPP_AUTH, _path_result, _python_auth

    spec = importlib.util.spec_from_file_location("sipcore._fastparse", args.module)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = message_module._install_accelerator(module)
    message_module._fast_parse = parse
    limits = ("MAX_MESSAGE_SIZE", "MAX_LINE_LENGTH", "MAX_HEADERS")
    defaults = {name: getattr(message_module, name) for name in limits}

    common, torture = seeds()
    auth_seeds = [SIPP_AUTH.encode(), PJSIP_AUTH.encode()]
    rng = random.Random(f"{args.seed}/{args.worker}")
    crash_fd = os.open(args.crash_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    accepted = differences = 0
    started = time.monotonic()
    for n in range(args.count):
        data = message(rng, common, torture)
        capped = rng.random() < 0.05
        if capped:
            head = data.split(b"\r\n\r\n", 1)[0]
            edges = {
                "MAX_MESSAGE_SIZE": len(data),
                "MAX_LINE_LENGTH": max(map(len, head.split(b"\r\n"))),
                "MAX_HEADERS": head.count(b"\r\n"),
            }
            for name in limits:
                setattr(message_module, name, max(0, edges[name] + rng.randint(-3, 3)))
        os.ftruncate(crash_fd, 0)
        os.pwrite(crash_fd, data, 0)
        for stream in (False, True):
            msg = parse(
                data,
                stream,
                message_module.MAX_LINE_LENGTH,
                message_module.MAX_HEADERS,
                message_module.MAX_MESSAGE_SIZE,
                _NAME_CACHE,
            )
            if msg is None:
                continue
            accepted += 1
            if isinstance(msg, message_module.Request):
                # build_response through respond(), against the Python code.
                status = rng.choice((100, 180, 200, 401))
                to_tag = rng.choice((None, "t"))
                extra = [("Server", "x"), ("l", "1")]
                fast_resp = module.respond(msg, status, "Reason", to_tag, extra, b"")
                if fast_resp is not None:
                    saved = message_module._fast_respond
                    message_module._fast_respond = None
                    try:
                        slow_resp = message_module.build_response(
                            msg, status, "Reason", to_tag=to_tag, headers=extra)
                    finally:
                        message_module._fast_respond = saved
                    if fast_resp != slow_resp:
                        differences += 1
                        if differences <= MAX_REPORTED:
                            record = {"respond": data.decode("latin-1"), "status": status}
                            print("DIFF " + json.dumps(record), flush=True)
            del msg
            fast = _path_result(data, stream, accelerated=True)
            slow = _path_result(data, stream, accelerated=False)
            if fast != slow:
                differences += 1
                if differences <= MAX_REPORTED:
                    record = {"data": data.decode("latin-1"), "stream": stream}
                    print("DIFF " + json.dumps(record), flush=True)
        if capped:
            for name in limits:
                setattr(message_module, name, defaults[name])
        # An Authorization value through auth_params, against digest._parse_auth_header.
        value = mutate(rng.choice(auth_seeds), rng).decode("latin-1")
        os.ftruncate(crash_fd, 0)
        os.pwrite(crash_fd, value.encode("utf-8", "surrogatepass"), 0)
        fast_auth = module.auth_params(value)
        if fast_auth is not None:
            accepted += 1
            if fast_auth != _python_auth(value):
                differences += 1
                if differences <= MAX_REPORTED:
                    print("DIFF " + json.dumps({"authorization": value}), flush=True)
        if n % 5000 == 4999:
            gc.collect()
        if n % 100_000 == 99_999:
            rate = (n + 1) / (time.monotonic() - started)
            print(f"PROGRESS worker {args.worker}: {n + 1} ({rate:.0f}/s)", flush=True)
    totals = {"messages": args.count, "accepted": accepted, "differences": differences}
    print("DONE " + json.dumps(totals), flush=True)


# --------------------------------------------------------------------------- driver


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int, help="messages to run (over all workers)")
    parser.add_argument("--seed", default="0", help="random seed (default 0)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--source", type=Path, default=ROOT / "sipcore" / "_fastparse.c")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--module", help=argparse.SUPPRESS)
    parser.add_argument("--crash-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args)
        return 0

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz_fastparse.") as tmp:
        module = build(args.source.resolve(), Path(tmp))
        env = dict(
            os.environ,
            LD_PRELOAD=" ".join(
                [runtime_library("libasan.so"), os.environ.get("LD_PRELOAD", "")]
            ).strip(),
            ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86:"
            "allocator_may_return_null=1:detect_stack_use_after_return=1",
            UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87",
            PYTHONMALLOC="malloc",
            SIPBILL_PURE_PYTHON="1",  # the worker installs the sanitized build itself
            PYTHONPATH=str(ROOT),
        )
        jobs = max(1, min(args.jobs, args.count))
        procs = []
        for k in range(jobs):
            count = args.count // jobs + (1 if k < args.count % jobs else 0)
            crash_file = Path(tmp) / f"input.{k}"
            cmd = [sys.executable, __file__, str(count), "--seed", args.seed, "--worker", str(k)]
            cmd += ["--module", str(module), "--crash-file", str(crash_file)]
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            procs.append((k, proc, crash_file))
        totals = {"messages": 0, "accepted": 0, "differences": 0}
        findings = 0
        for k, proc, crash_file in procs:
            assert proc.stdout is not None and proc.stderr is not None
            done = None
            for line in proc.stdout:
                if line.startswith("DONE "):
                    done = json.loads(line[5:])
                elif line.startswith("DIFF "):
                    record: dict[str, Any] = json.loads(line[5:])
                    data = record["data"].encode("latin-1")
                    print(f"worker {k}: DIFFERENCE (stream={record['stream']}): {data!r}")
                else:
                    print(line, end="", flush=True)
            stderr = proc.stderr.read()
            code = proc.wait()
            if done is not None:
                for key in totals:
                    totals[key] += done[key]
            if code != 0 or done is None:
                findings += 1
                data = crash_file.read_bytes() if crash_file.exists() else b""
                print(f"worker {k}: exit status {code}; the message being parsed: {data!r}")
                print(stderr[-6000:])
            elif "runtime error" in stderr or "Sanitizer" in stderr:
                findings += 1
                print(f"worker {k}: sanitizer output:\n{stderr[-6000:]}")
    elapsed = time.monotonic() - started
    print(
        f"{totals['messages']:,} messages in {elapsed:.0f} s ({jobs} workers, seed "
        f"{args.seed}): {totals['accepted']:,} parses accepted by the accelerator "
        f"(datagram + stream), {totals['differences']} differences from the pure path, "
        f"{findings} sanitizer findings / crashed workers"
    )
    return 1 if findings or totals["differences"] else 0


if __name__ == "__main__":
    sys.exit(main())
