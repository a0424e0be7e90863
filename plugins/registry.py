"""The plugin manager and the registries that plugins fill.

Nothing here runs at import time: callers build a manager with :func:`build_plugin_manager`, passing the
built-in plugin modules, so ``plugins`` never imports ``knowledge`` or ``llms``.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Generic, TypeVar

import pluggy

from common.errors import ZhikuError
from plugins import hookspecs

T = TypeVar("T")


class UnknownNameError(ZhikuError, KeyError):
    """A name in the config that no plugin registered."""

    def __str__(self) -> str:  # KeyError quotes its argument; ZhikuError's message is plain
        return ZhikuError.__str__(self)


class Registry(Generic[T]):
    """Name -> factory, filled by plugin hooks. One instance per application, never module-global."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice; uninstall one of the plugins")
        self._items[name] = item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s are: {known}. "
                f"Fix the name in config.yml or install the plugin that provides it."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


def build_plugin_manager(builtins: Iterable[ModuleType] = (), *, entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the built-in plugin modules and, optionally, installed entry-point plugins."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for module in builtins:
        pm.register(module)
    if entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm
