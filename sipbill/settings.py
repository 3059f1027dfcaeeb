"""The settings schema: one frozen dataclass per TOML section, loaded by :mod:`configschema`.

Every key is documented in ``config/sipbill.example.toml``; a test keeps the two in step.
Secrets (the database URL, the nonce secret) may come from the environment instead of the file:
``SIPBILL_DATABASE_URL`` and ``SIPBILL_AUTH_SECRET`` win over the file, and so does
``SIPBILL_ADVERTISED_HOST`` (a container learns its address at run time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sipbill.configschema import ConfigError, load_section, secret_field
from sipcore.settings import AuthSettings, RegistrarSettings

LogLevel = Literal["debug", "info", "warning", "error"]
TransportName = Literal["udp", "tcp"]


def _host_port(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class ListenSettings:
    transport: TransportName = "udp"
    host: str = "127.0.0.1"
    port: int = 5060

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not 0 < self.port < 65536:
            problems.append(("port", f"must be 1-65535, got {self.port}"))
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            problems.append(("host", f"must be an IP address, got {self.host!r}"))
        return problems


def _default_listen() -> tuple[ListenSettings, ...]:
    return (ListenSettings("udp"), ListenSettings("tcp"))


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Identity of the server and its process-level knobs."""

    domains: tuple[str, ...] = ("localhost",)
    # Other names of a domain: alias -> domain (e.g. a public IP). The listen addresses are
    # aliases of the first domain unless listed in domains themselves.
    aliases: dict[str, str] = field(default_factory=dict)
    realm: str = ""  # digest realm; defaults to the first domain
    data_dir: str = "var"
    log_level: LogLevel = "info"
    log_format: Literal["logfmt", "json"] = "logfmt"
    workers: int = 1
    listen: tuple[ListenSettings, ...] = field(default_factory=_default_listen)
    advertised_host: str = ""  # host written in Via/Record-Route; defaults to the listen host
    user_agent: str = "sipbill"

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.domains:
            problems.append(("domains", "must name at least one domain"))
        if not 1 <= self.workers <= 64:
            problems.append(("workers", f"must be 1-64, got {self.workers}"))
        if not self.listen:
            problems.append(("listen", "must have at least one listener"))
        wildcard = [lst for lst in self.listen if lst.host in ("0.0.0.0", "::")]
        if wildcard and not self.advertised_host:
            problems.append(("advertised_host", "required when listening on a wildcard address "
                             "(0.0.0.0/::): the address written into Via and Record-Route, "
                             "e.g. the server's public IP (or set SIPBILL_ADVERTISED_HOST)"))
        for alias, domain in self.aliases.items():
            if domain not in self.domains:
                problems.append((f"aliases.{alias}", f"{domain!r} is not one of server.domains"))
        return problems

    @property
    def domain_aliases(self) -> dict[str, str]:
        """Aliases including the listen addresses (-> the first domain)."""
        out = {lst.host: self.domains[0] for lst in self.listen if lst.host not in self.domains}
        out.update(self.aliases)
        return out

    @property
    def effective_realm(self) -> str:
        return self.realm or self.domains[0]


@dataclass(frozen=True, slots=True)
class TimerSettings:
    """RFC 3261 §17 timer bases in seconds."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    timer_c: float = 180.0  # proxy INVITE timer, §16.6 step 11

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        for name in ("t1", "t2", "t4"):
            if getattr(self, name) <= 0:
                problems.append((name, "must be positive"))
        if self.t2 < self.t1:
            problems.append(("t2", "must not be smaller than t1"))
        if self.timer_c < 1:
            problems.append(("timer_c", "must be at least 1 second"))
        return problems


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Caps that keep one peer or one message from costing the server more than linear work."""

    max_message_size: int = 65535
    max_tcp_connections: int = 1024
    max_tcp_buffer: int = 262144  # bytes buffered per connection before it is closed
    tcp_idle_timeout: float = 300.0
    max_server_transactions: int = 100000

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not 1024 <= self.max_message_size <= 1048576:
            problems.append(("max_message_size", "must be 1024-1048576 bytes"))
        for name in ("max_tcp_connections", "max_tcp_buffer", "max_server_transactions"):
            if getattr(self, name) < 1:
                problems.append((name, "must be at least 1"))
        if self.tcp_idle_timeout <= 0:
            problems.append(("tcp_idle_timeout", "must be positive"))
        return problems


@dataclass(frozen=True, slots=True)
class SipSettings:
    timers: TimerSettings = field(default_factory=TimerSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """An outbound gateway for numbers (longest prefix wins, failover in file order)."""

    name: str
    host: str  # an IP address: no DNS lookups on the call path
    port: int = 5060
    transport: TransportName = "udp"
    prefixes: tuple[str, ...] = ("",)
    strip: int = 0
    prepend: str = ""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            problems.append(("host", f"must be an IP address, got {self.host!r}"))
        if not 0 < self.port < 65536:
            problems.append(("port", f"must be 1-65535, got {self.port}"))
        for i, prefix in enumerate(self.prefixes):
            if prefix and not prefix.isdigit():
                problems.append((f"prefixes[{i}]", f"must be digits, got {prefix!r}"))
        if self.strip < 0:
            problems.append(("strip", "must not be negative"))
        return problems


@dataclass(frozen=True, slots=True)
class ProxySection:
    record_route: bool = True
    # Dialled numbers starting with this (or "+") are international: "0049..." -> "49...".
    international_prefix: str = "00"
    gateways: tuple[GatewaySettings, ...] = ()


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: str = secret_field()  # empty: start the embedded PostgreSQL under data_dir/pg
    pool_min: int = 2
    pool_max: int = 10
    command_timeout: float = 5.0

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.url and not self.url.startswith(("postgres://", "postgresql://")):
            problems.append(("url", "must be a postgresql:// URL"))
        if self.pool_max < 2:
            problems.append(("pool_max", "must be at least 2: one connection of the pool "
                             "listens for changes (NOTIFY), the others run queries"))
        elif not 1 <= self.pool_min <= self.pool_max:
            problems.append(("pool_min", "must be between 1 and pool_max"))
        return problems


@dataclass(frozen=True, slots=True)
class HttpSettings:
    enabled: bool = True
    listen: str = "127.0.0.1:8080"

    def validate(self) -> list[tuple[str, str]]:
        if _host_port(self.listen) is None:
            return [("listen", f"must be HOST:PORT, got {self.listen!r}")]
        return []

    @property
    def host_port(self) -> tuple[str, int]:
        hp = _host_port(self.listen)
        assert hp is not None  # validated
        return hp


@dataclass(frozen=True, slots=True)
class ControlSettings:
    enabled: bool = True
    socket: str = ""  # empty: <data_dir>/sipbill.ctl


@dataclass(frozen=True, slots=True)
class SeedSubscriber:
    username: str
    password: str = secret_field()
    domain: str = ""  # empty: the first of server.domains


@dataclass(frozen=True, slots=True)
class SeedSettings:
    """Demo data created at start-up when missing; existing rows are never overwritten."""

    subscribers: tuple[SeedSubscriber, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    sip: SipSettings = field(default_factory=SipSettings)
    proxy: ProxySection = field(default_factory=ProxySection)
    registrar: RegistrarSettings = field(default_factory=RegistrarSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    control: ControlSettings = field(default_factory=ControlSettings)
    seed: SeedSettings = field(default_factory=SeedSettings)
    # Section per module, keyed by the module's name; filled by :func:`load_settings`.
    modules: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def control_socket_path(self) -> Path:
        return Path(self.control.socket) if self.control.socket else self.data_path / "sipbill.ctl"


# Module sections: name -> dataclass. The composition root registers modules here before
# loading, so adding a module never edits this schema.
MODULE_SECTIONS: dict[str, type[Any]] = {}

_CORE_SECTIONS = {f.name for f in dataclasses.fields(Settings)} - {"modules", "source"}


def parse_settings(data: dict[str, Any], source: str = "") -> Settings:
    """Validate a parsed TOML document into :class:`Settings` (plus environment overrides)."""
    core: dict[str, Any] = {}
    modules: dict[str, Any] = {}
    for key, value in data.items():
        if key in _CORE_SECTIONS:
            core[key] = value
        elif key in MODULE_SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(key, "expected a table")
            modules[key] = load_section(MODULE_SECTIONS[key], value, key)
        else:
            known = ", ".join(sorted(_CORE_SECTIONS | set(MODULE_SECTIONS)))
            raise ConfigError(key, f"unknown section (known: {known})")
    for name, cls in MODULE_SECTIONS.items():
        modules.setdefault(name, load_section(cls, {}, name))
    env_host = os.environ.get("SIPBILL_ADVERTISED_HOST")
    if env_host:
        server = dict(core.get("server", {}))
        server["advertised_host"] = env_host
        core["server"] = server
    env_db = os.environ.get("SIPBILL_DATABASE_URL")
    if env_db:
        db = dict(core.get("database", {}))
        db["url"] = env_db
        core["database"] = db
    settings = load_section(Settings, core)
    return dataclasses.replace(settings, modules=modules, source=source)


def load_settings(path: str | Path) -> Settings:
    """Read and validate the TOML file at ``path``; relative data_dir is relative to the CWD."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{p}: invalid TOML: {exc}") from exc
    return parse_settings(data, source=str(p))


def auth_secret(settings: Settings) -> bytes:
    """The nonce MAC secret: ``SIPBILL_AUTH_SECRET`` or a random key kept in the data dir.

    Keeping it on disk means nonces issued before a restart still verify after it, and all
    worker processes of one node share it.
    """
    env = os.environ.get("SIPBILL_AUTH_SECRET")
    if env:
        return env.encode()
    path = settings.data_path / "auth.secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(32).hex().encode()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    with contextlib.suppress(FileExistsError):
        os.link(tmp, path)  # atomic: a racing worker's secret wins once, both read the same
    tmp.unlink(missing_ok=True)
    return path.read_bytes()
