"""The ``sipbill`` command: ``serve``, ``check-config``, ``migrate``, ``subscriber``, ``ctl``, and
the sub-commands modules add (``account``, ``rates`` ...).

Commands that need the database connect the same way the server does: ``database.url`` /
``SIPBILL_DATABASE_URL`` when set, otherwise the embedded PostgreSQL in the data directory (if a
server is running on it, pgserver attaches to that instance instead of starting a second one).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from sipbill.configschema import ConfigError
from sipbill.db import EmbeddedPostgres, create_pool, migrate
from sipbill.logsetup import setup_logging
from sipbill.modules import register_module_cli, register_module_settings
from sipbill.settings import Settings, load_settings
from sipcore.subscribers import SubscriberError, SubscriberStore

DEFAULT_CONFIG = "config/sipbill.toml"

DbHandler = Callable[[argparse.Namespace, asyncpg.Pool], Awaitable[int]]


def _load(args: argparse.Namespace) -> Settings:
    register_module_settings()
    return load_settings(args.config)


async def _with_pool(settings: Settings, fn: Callable[[asyncpg.Pool], Awaitable[int]]) -> int:
    embedded: EmbeddedPostgres | None = None
    dsn = settings.database.url
    if not dsn:
        embedded = EmbeddedPostgres(settings.data_path / "pg")
        dsn = await asyncio.to_thread(embedded.start)
    try:
        pool = await create_pool(dsn, min_size=1, max_size=2,
                                 command_timeout=settings.database.command_timeout)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            return await fn(pool)
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


class _WorkerTag(logging.Filter):
    """Appends ``worker=N`` to every log line of a worker process."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.suffix = f" worker={index}"

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.msg.endswith(self.suffix):
            record.msg += self.suffix
        return True


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = _load(args)
    setup_logging(settings.server.log_level, settings.server.log_format)
    from sipbill.app import WorkerSpec, serve
    from sipbill.supervisor import supervise, worker_from_env

    worker = worker_from_env()
    if worker is not None:
        # One of the supervisor's workers (sipbill.supervisor).
        index, run_dir = worker
        for handler in logging.getLogger().handlers:
            handler.addFilter(_WorkerTag(index))
        return serve(settings, WorkerSpec(index, settings.server.workers, run_dir))
    if settings.server.workers > 1:
        return supervise(settings, args.config)
    return serve(settings)


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    print(f"{settings.source}: OK")
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    settings = _load(args)
    setup_logging("warning")

    async def run(pool: asyncpg.Pool) -> int:
        async with pool.acquire() as conn:
            applied = await migrate(conn)
        print("\n".join(applied) if applied else "database is up to date")
        return 0

    return asyncio.run(_with_pool(settings, run))


def _read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return str(args.password)
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise SubscriberError("passwords differ")
    return first


def _split_user(settings: Settings, user: str) -> tuple[str, str]:
    name, _, domain = user.partition("@")
    return name, domain or settings.server.domains[0]


async def _subscriber(args: argparse.Namespace, pool: asyncpg.Pool, settings: Settings) -> int:
    store = SubscriberStore(pool)
    if args.action == "list":
        subs = await store.list(args.domain)
        if args.json:
            print(json.dumps([{"username": s.username, "domain": s.domain,
                               "created_at": s.created_at.isoformat() if s.created_at else None}
                              for s in subs]))
        else:
            for s in subs:
                print(f"{s.username}@{s.domain}")
        return 0
    username, domain = _split_user(settings, args.user)
    if args.action == "add":
        await store.add(username, domain, _read_password(args))
        print(f"added {username}@{domain}")
    elif args.action == "passwd":
        await store.set_password(username, domain, _read_password(args))
        print(f"password changed for {username}@{domain}")
    elif args.action == "del":
        await store.delete(username, domain)
        print(f"deleted {username}@{domain}")
    return 0


def _cmd_subscriber(args: argparse.Namespace) -> int:
    settings = _load(args)
    setup_logging("warning")
    return asyncio.run(_with_pool(settings, lambda pool: _subscriber(args, pool, settings)))


def _cmd_module_db(args: argparse.Namespace) -> int:
    settings = _load(args)
    setup_logging("warning")
    handler: DbHandler = args.db_handler
    args.settings = settings
    return asyncio.run(_with_pool(settings, lambda pool: handler(args, pool)))


def _cmd_ctl(args: argparse.Namespace) -> int:
    from sipbill.ctlcli import run_ctl

    default_socket = ""
    try:
        default_socket = str(_load(args).control_socket_path)
    except ConfigError:
        default_socket = "var/sipbill.ctl"
    return run_ctl(list(args.rest), default_socket=default_socket)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipbill", description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                        help=f"TOML config file (default {DEFAULT_CONFIG})")
    # --config is accepted before or after the sub-command (`sipbill serve --config X`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help="TOML config file")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    original_add = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("parents", [common])
        return original_add(name, **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("serve", help="run the SIP server in the foreground")
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("check-config", help="validate the config file and exit")
    p.set_defaults(func=_cmd_check_config)
    p = sub.add_parser("migrate", help="apply pending database migrations")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("subscriber", help="manage subscribers (SIP users)")
    ssub = p.add_subparsers(dest="action", required=True)
    for action, help_text in (("add", "add a subscriber"), ("passwd", "change a password")):
        a = ssub.add_parser(action, help=help_text, parents=[common])
        a.add_argument("user", help="USER or USER@DOMAIN (default domain: first server.domains)")
        a.add_argument("--password", help="the password (else prompted, or --password-stdin)")
        a.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    a = ssub.add_parser("del", help="delete a subscriber", parents=[common])
    a.add_argument("user")
    a = ssub.add_parser("list", help="list subscribers", parents=[common])
    a.add_argument("--domain")
    a.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_subscriber)

    p = sub.add_parser("ctl", help="call a method on the running server's control socket",
                       add_help=False)
    p.add_argument("rest", nargs="*")
    p.set_defaults(func=_cmd_ctl)

    for module_parser in register_module_cli(sub):
        module_parser.set_defaults(func=_cmd_module_db)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "ctl" in argv:
        # Everything after `ctl` belongs to the control client, options included.
        i = argv.index("ctl")
        rest = argv[i + 1:]
        head = argv[:i]
        # `--config FILE` may follow `ctl` as with every other sub-command.
        while len(rest) >= 2 and rest[0] in ("--config", "-c"):
            head += rest[:2]
            rest = rest[2:]
        args = parser.parse_args([*head, "ctl"])
        args.rest = rest
    else:
        args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"sipbill: config error: {exc}", file=sys.stderr)
        return 2
    except SubscriberError as exc:
        print(f"sipbill: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `sipbill ctl ul.dump | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
