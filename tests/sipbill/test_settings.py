"""Settings: typed validation naming the dotted key, and the example file documents every key."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path

import pytest

from sipbill.configschema import ConfigError
from sipbill.modules import register_module_settings
from sipbill.settings import MODULE_SECTIONS, Settings, load_settings, parse_settings

CONFIG = Path(__file__).resolve().parents[2] / "config"


def _keys(cls: type, prefix: str) -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("modules", "source"):
            continue
        tp = hints[f.name]
        args = typing.get_args(tp)
        inner = args[0] if typing.get_origin(tp) is tuple and args else tp
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(inner):
            out += _keys(inner, key)  # type: ignore[arg-type]
        else:
            out.append(key)
    return out


def test_example_documents_every_key() -> None:
    register_module_settings()
    text = (CONFIG / "sipbill.example.toml").read_text()
    # Uncomment commented-out example tables so their keys count as documented.
    keys = _keys(Settings, "")
    for name, cls in MODULE_SECTIONS.items():
        keys += _keys(cls, name)
    missing = []
    for key in keys:
        leaf = key.rsplit(".", 1)[-1]
        if not re.search(rf"^#?\s*{re.escape(leaf)}\s*=", text, re.M):
            missing.append(key)
    assert not missing, f"undocumented keys in sipbill.example.toml: {missing}"


def test_example_and_demo_load() -> None:
    register_module_settings()
    for name in ("sipbill.example.toml", "demo.toml"):
        s = load_settings(CONFIG / name)
        assert s.server.domains


@pytest.mark.parametrize(
    ("doc", "key", "words"),
    [
        ({"server": {"workers": 0}}, "server.workers", "1-64"),
        ({"server": {"log_level": "loud"}}, "server.log_level", "one of"),
        ({"server": {"listen": [{"transport": "udp", "host": "example.com"}]}},
         "server.listen[0].host", "IP address"),
        ({"sip": {"timers": {"t2": 0.1}}}, "sip.timers.t2", "t1"),
        ({"sip": {"limits": {"max_message_size": "big"}}}, "sip.limits.max_message_size",
         "integer"),
        ({"database": {"url": "mysql://x"}}, "database.url", "postgresql"),
        ({"database": {"pool_min": 1, "pool_max": 1}}, "database.pool_max", "listens"),
        ({"database": {"pool_min": 3, "pool_max": 2}}, "database.pool_min", "pool_max"),
        ({"http": {"listen": "nowhere"}}, "http.listen", "HOST:PORT"),
        ({"proxy": {"gateways": [{"name": "g", "host": "127.0.0.1", "prefixes": ["4x"]}]}},
         "proxy.gateways[0].prefixes[0]", "digits"),
        ({"registrar": {"min_expires": 0}}, "registrar.min_expires", "at least 1"),
        ({"registrar": {"max_expires": 30}}, "registrar.max_expires", "min_expires"),
        ({"registrar": {"default_expires": 9000}}, "registrar.default_expires", "between"),
        ({"registrar": {"max_contacts": 0}}, "registrar.max_contacts", "at least 1"),
        ({"presence": {"default_expires": 10}}, "presence.default_expires", "between"),
        ({"presence": {"max_per_watcher": 0}}, "presence.max_per_watcher", "at least 1"),
        ({"auth": {"algorithms": ["SHA-512"]}}, "auth.algorithms", "subset"),
        ({"nonsense": {}}, "nonsense", "unknown section"),
        ({"server": {"domain": "x"}}, "server.domain", "unknown setting"),
    ],
)
def test_bad_values_name_the_key(doc: dict[str, object], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(doc)
    assert info.value.key == key
    assert words in info.value.message


def test_env_database_url_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPBILL_DATABASE_URL", "postgresql://u@h/db")
    s = parse_settings(tomllib.loads('[database]\nurl = "postgresql://file@h/db"\n'))
    assert s.database.url == "postgresql://u@h/db"


def test_settings_are_frozen() -> None:
    s = parse_settings({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.server.workers = 2  # type: ignore[misc]


def test_wildcard_listen_needs_an_advertised_host(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {"server": {"listen": [{"transport": "udp", "host": "0.0.0.0", "port": 5060}]}}
    with pytest.raises(ConfigError) as info:
        parse_settings(doc)
    assert info.value.key == "server.advertised_host"
    monkeypatch.setenv("SIPBILL_ADVERTISED_HOST", "192.0.2.10")
    assert parse_settings(doc).server.advertised_host == "192.0.2.10"


def test_docker_config_loads_with_the_container_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    register_module_settings()
    monkeypatch.setenv("SIPBILL_ADVERTISED_HOST", "192.0.2.10")
    s = load_settings(CONFIG / "docker.toml")
    assert s.server.data_dir == "/var/lib/sipbill" and s.http.listen == "0.0.0.0:8080"
