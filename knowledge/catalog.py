"""Knowledge bases under the data dir: validated names, listing, deletion."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from common.errors import ZhikuError
from knowledge.store import DB_NAME, MANIFEST_NAME

# Letters (any script, so Chinese names work), digits, '_', '-', '.'; no leading dot; at most 64.
_NAME = re.compile(r"^[^\W_][\w.-]{0,63}$")


class InvalidNameError(ZhikuError, ValueError):
    """A knowledge-base name that could escape the data dir or is otherwise unusable."""


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name or name.endswith("."):
        raise InvalidNameError(
            f"invalid knowledge base name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (no path separators)"
        )
    return name


class Catalog:
    """The knowledge bases in ``root`` (``<data_dir>/kb``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        path = self.root / validate_name(name)
        # belt and braces: a knowledge base is a real folder directly in the root. A symbolic link is refused
        # even when it dangles (creating the base would follow it) or points at another base.
        if path.is_symlink():
            raise InvalidNameError(f"knowledge base {name!r} is a symbolic link; remove that link")
        if path.exists() and path.resolve().parent != self.root.resolve():
            raise InvalidNameError(f"knowledge base {name!r} resolves outside the data dir; remove that link")
        return path

    def exists(self, name: str) -> bool:
        return (self.path(name) / DB_NAME).exists()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        # the manifest is written last when a knowledge base is created: without it, it is not one yet;
        # a symbolic link is never one (Catalog.path refuses it)
        return sorted(
            p.name
            for p in self.root.iterdir()
            if _NAME.match(p.name) and not p.is_symlink() and (p / DB_NAME).exists() and (p / MANIFEST_NAME).exists()
        )

    def delete(self, name: str) -> None:
        path = self.path(name)
        if not (path / DB_NAME).exists():
            raise FileNotFoundError(f"knowledge base {name!r} does not exist; `python -m app kb list` shows them")
        # rename first so a half-finished delete never looks like a usable knowledge base
        trash = self.root / f".deleting-{name}"
        shutil.rmtree(trash, ignore_errors=True)
        path.rename(trash)
        shutil.rmtree(trash)
