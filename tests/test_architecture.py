"""The arrows of the architecture: app/ wires everything; knowledge/ and llms/ never import app/ or each
other; plugins/ imports neither; common/ (the bottom package both may use) imports none of them. Checked on
the source, so a stray import fails CI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

FORBIDDEN = {
    "common": {"app", "knowledge", "llms", "plugins"},
    "knowledge": {"app", "llms"},
    "llms": {"app", "knowledge"},
    "plugins": {"app", "knowledge", "llms"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_the_right_way(package: str) -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in (REPO / package).rglob("*.py")
        if imported_packages(path) & FORBIDDEN[package]
    }
    assert offenders == {}


def test_only_app_settings_reads_the_config() -> None:
    readers = [
        str(p.relative_to(REPO))
        for pkg in ("app", "common", "knowledge", "llms", "plugins")
        for p in (REPO / pkg).rglob("*.py")
        if imported_packages(p) & {"yaml", "pydantic_settings"}
    ]
    assert readers == ["app/settings.py"]
