"""The service modules and what each plugs into the composition root.

ARCHITECTURE.md principle 4: billing, msilo, presence and clicktodial are modules. A module
package may provide

- ``<module>.settings.SECTION`` and ``<module>.settings.SETTINGS``: its TOML section name and
  frozen settings dataclass (validated like the core sections);
- ``<module>.cli.register_cli(subparsers)``: its ``sipbill`` sub-commands; database commands
  set ``db_handler`` (``async (args, pool) -> int``) and get a migrated pool;
- ``<module>.service.setup(ctx)``: its runtime wiring (pipeline handlers, event listeners,
  control-socket methods, metrics), called by :mod:`sipbill.app` with the shared context.

Nothing here imports a module that is not installed or does not provide the hook.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sipbill.settings import MODULE_SECTIONS

if TYPE_CHECKING:
    from sipbill.app import AppContext

MODULES: tuple[str, ...] = ("billing", "msilo", "presence", "clicktodial")


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def register_module_settings() -> None:
    for module in MODULES:
        mod = _optional(f"{module}.settings")
        if mod is not None and hasattr(mod, "SETTINGS"):
            MODULE_SECTIONS[getattr(mod, "SECTION", module)] = mod.SETTINGS


def register_module_cli(subparsers: Any) -> list[argparse.ArgumentParser]:
    """Let each module add its sub-commands; returns the top-level parsers they added."""
    added: list[argparse.ArgumentParser] = []
    for module in MODULES:
        mod = _optional(f"{module}.cli")
        if mod is None or not hasattr(mod, "register_cli"):
            continue
        before = set(subparsers.choices)
        mod.register_cli(subparsers)
        added.extend(p for name, p in subparsers.choices.items() if name not in before)
    return added


async def setup_modules(ctx: AppContext) -> list[str]:
    """Run each module's ``service.setup(ctx)``; returns the names of the modules started.

    A module whose settings section says ``enabled = false`` is skipped. ``setup`` may add
    pipeline handlers, subscribe to events, register control methods (``ctx.methods``), add
    HTTP routes (``ctx.http``, before the server starts) and append ``ctx.shutdown_hooks``.
    """
    started: list[str] = []
    for module in MODULES:
        mod = _optional(f"{module}.service")
        if mod is None or not hasattr(mod, "setup"):
            continue
        section = ctx.settings.modules.get(module)
        if section is not None and not getattr(section, "enabled", True):
            continue
        await mod.setup(ctx)
        started.append(module)
    return started
