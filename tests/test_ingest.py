"""Bulk, incremental ingestion end to end (hashing embedder: fast and deterministic)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document

from app.container import Zhiku
from plugins.hookspecs import RegisterLoader, hookimpl
from tests.conftest import DATA
from tests.helpers import make_corpus


def ingest(app: Zhiku, *paths: Path, prune: bool = False, kb: str = "t"):
    with app.open_kb(kb, create=True) as store:
        report = app.ingestor(store).run(list(paths), prune=prune, progress=False)
        return report, store.counts(), {f.path: f for f in store.files()}


def test_every_encoding_and_pdf_ingest_and_a_rerun_adds_nothing(app: Zhiku, tmp_path: Path) -> None:
    files = make_corpus(tmp_path / "docs")
    report, counts, stored = ingest(app, tmp_path / "docs")
    assert report.failures == []
    assert report.count("added") == len(files)
    assert counts["files"] == len(files) and counts["chunks"] > len(files)
    assert stored[str(files["pdf"].resolve())].pages == 2
    assert stored[str(files["gb18030"].resolve())].encoding == "gb18030"
    with app.open_kb("t") as store:
        hits = app.retriever(store).search("晉太元中武陵人", 1)
        assert hits[0].chunk.source == str(files["big5"].resolve())
        pdf_hit = app.retriever(store).search("黄河是中国第二长河", 1)[0].chunk
        assert (Path(pdf_hit.source).name, pdf_hit.page) == ("report.pdf", 2)

    again, counts2, _ = ingest(app, tmp_path / "docs")
    assert again.count("unchanged") == len(files)
    assert again.chunks_added == 0 and again.new_vectors == 0
    assert counts2 == counts


def test_changed_file_replaces_its_chunks_and_prune_removes_deleted(app: Zhiku, tmp_path: Path) -> None:
    files = make_corpus(tmp_path / "docs")
    ingest(app, tmp_path / "docs")
    files["utf-8"].write_text("全新的内容：珠穆朗玛峰是世界最高峰。\n", encoding="utf-8")
    files["big5"].unlink()
    report, _, stored = ingest(app, tmp_path / "docs")
    assert report.count("updated") == 1
    assert str(files["big5"].resolve()) in stored  # without --prune a vanished file stays
    report, _counts, stored = ingest(app, tmp_path / "docs", prune=True)
    assert report.count("removed") == 1 and str(files["big5"].resolve()) not in stored
    with app.open_kb("t") as store:
        assert store.check() == []
        texts = [h.chunk.text for h in app.retriever(store).search("珠穆朗玛峰", 20)]
        assert any("珠穆朗玛峰" in t for t in texts)
        assert not any("天生三桥（utf-8）" in t for t in texts)


def test_bad_files_each_get_one_line_and_never_stop_the_run(app: Zhiku, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(DATA / "bad", docs / "bad")
    make_corpus(docs / "good")
    report, _counts, stored = ingest(app, docs)
    failed = {Path(f.path).name: f.reason for f in report.failures}
    bad_names = {p.name for p in (DATA / "bad").iterdir()} - {"名字 带 空格的 文件.txt", "README.md"}
    assert set(failed) == bad_names
    for name, reason in failed.items():
        assert name in reason and "\n" not in reason and len(reason) < 300
    assert any(Path(p).name == "名字 带 空格的 文件.txt" for p in stored)
    assert report.count("added") == 6 + 1


def test_parallel_parsing_gives_the_same_knowledge_base(app: Zhiku, tmp_path: Path) -> None:
    make_corpus(tmp_path / "docs")
    _, serial, serial_files = ingest(app, tmp_path / "docs", kb="serial")
    app.settings.ingest.workers = 2
    report, parallel, parallel_files = ingest(app, tmp_path / "docs", kb="parallel")
    assert report.failures == []
    assert parallel == serial
    assert {p: f.chunks for p, f in parallel_files.items()} == {p: f.chunks for p, f in serial_files.items()}


def test_unchanged_texts_are_not_embedded_twice(app: Zhiku, tmp_path: Path) -> None:
    files = make_corpus(tmp_path / "docs")
    ingest(app, tmp_path / "docs")
    embedder = app.embedder()
    calls = embedder.calls  # type: ignore[attr-defined]
    copy = tmp_path / "docs" / "copy-of-utf8.txt"
    copy.write_bytes(files["utf-8"].read_bytes())
    report, _, _ = ingest(app, tmp_path / "docs")
    assert report.count("added") == 1 and report.new_vectors == 0
    assert embedder.calls == calls  # type: ignore[attr-defined]


def test_edits_and_moves_reuse_the_vectors_of_unchanged_paragraphs(app: Zhiku, tmp_path: Path) -> None:
    """Editing one paragraph of a file, or moving paragraphs to another file in the same run, keeps the stored
    vectors of the text that did not change (both once ended the ingest with a KeyError)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    # one paragraph per chunk (chunk_size 120): about 100 characters each
    sentence = "长江是中国最长的河流，流经十一个省级行政区，全长约六千三百公里。"
    paragraphs = [f"第{i}段：" + sentence * 3 for i in range(6)]
    a, b = docs / "a.txt", docs / "b.txt"
    a.write_text("\n\n".join(paragraphs), encoding="utf-8")
    b.write_text("黄河是中国第二长河。", encoding="utf-8")
    _, first, _ = ingest(app, docs)
    assert first["chunks"] == 7

    a.write_text("\n\n".join([*paragraphs[:-1], "改写过的最后一段：珠穆朗玛峰是世界最高峰。"]), encoding="utf-8")
    edited, counts, _ = ingest(app, docs)
    assert (edited.failures, edited.count("updated"), edited.new_vectors) == ([], 1, 1)
    assert counts["vectors"] == first["vectors"]  # the old last paragraph's vector is gone, the new one in

    embedder = app.embedder()
    calls = embedder.calls  # type: ignore[attr-defined]
    a.write_text("\n\n".join(paragraphs[3:5]), encoding="utf-8")
    b.write_text("\n\n".join(paragraphs[:3]), encoding="utf-8")  # and b's own text is gone
    moved, counts, stored = ingest(app, docs)
    assert (moved.failures, moved.count("updated"), moved.new_vectors) == ([], 2, 0)
    assert embedder.calls == calls  # type: ignore[attr-defined]
    assert counts == {"files": 2, "chunks": 5, "vectors": 5}
    assert (stored[str(a.resolve())].chunks, stored[str(b.resolve())].chunks) == (2, 3)
    with app.open_kb("t") as store:
        assert store.check() == []
        hit = app.retriever(store).search(paragraphs[0], 1)[0].chunk
        assert (hit.text, hit.source) == (paragraphs[0], str(b.resolve()))


def test_texts_another_writer_removed_meanwhile_are_embedded_at_the_commit(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run decides what to embed before it takes the writer lock; if another process removed one of
    those stored texts in between, the commit embeds it instead of failing."""
    from knowledge.store import KnowledgeBase

    paragraph = "泰山位于山东省泰安市，是五岳之首，海拔约一千五百米。"
    (tmp_path / "docs").mkdir()
    (tmp_path / "more").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(paragraph, encoding="utf-8")
    (tmp_path / "more" / "b.txt").write_text(paragraph, encoding="utf-8")
    ingest(app, tmp_path / "docs")
    real_transaction = KnowledgeBase.transaction

    def another_writer_first(self: KnowledgeBase) -> Any:
        monkeypatch.setattr(KnowledgeBase, "transaction", real_transaction)
        with KnowledgeBase.open(self.root) as other, other.transaction() as tx:
            tx.remove_file(str((tmp_path / "docs" / "a.txt").resolve()))  # its text was the only copy
        return real_transaction(self)

    monkeypatch.setattr(KnowledgeBase, "transaction", another_writer_first)
    report, counts, _ = ingest(app, tmp_path / "more")
    assert (report.failures, report.count("added"), report.new_vectors) == ([], 1, 1)  # embedded again
    assert counts == {"files": 1, "chunks": 1, "vectors": 1}
    with app.open_kb("t") as store:
        assert store.check() == []


def test_missing_path_is_reported(app: Zhiku, tmp_path: Path) -> None:
    report, _, _ = ingest(app, tmp_path / "nowhere")
    assert [f.reason for f in report.failures] == [f"{tmp_path / 'nowhere'}: no such file or folder"]


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "..", ".hidden", "a\\b", "x\x00y", ""])
def test_knowledge_base_names_cannot_escape(app: Zhiku, name: str) -> None:
    from knowledge.catalog import InvalidNameError

    with pytest.raises(InvalidNameError):
        app.open_kb(name, create=True)


def slow_loader(path: Path) -> list[Document]:
    time.sleep(60)  # a parser stuck on a hostile file
    return []


def crashing_loader(path: Path) -> list[Document]:
    os._exit(3)  # a native parser fault takes its whole process down


class HostilePlugin:
    @hookimpl
    def register_loaders(self, register: RegisterLoader) -> None:
        register(".slow", slow_loader)
        register(".crash", crashing_loader)


def test_a_stuck_or_crashing_parser_fails_only_its_file(app: Zhiku, tmp_path: Path) -> None:
    app.plugins.register(HostilePlugin())
    app.settings.ingest.workers = 2
    app.settings.ingest.max_file_seconds = 3
    docs = tmp_path / "docs"
    make_corpus(docs)
    (docs / "stuck.slow").write_text("x", encoding="utf-8")
    (docs / "boom.crash").write_text("x", encoding="utf-8")
    started = time.monotonic()
    report, _, stored = ingest(app, docs)
    assert time.monotonic() - started < 40
    reasons = {Path(f.path).name: f.reason for f in report.failures}
    assert set(reasons) == {"stuck.slow", "boom.crash"}
    assert "longer than 3 s (ingest.max_file_seconds)" in reasons["stuck.slow"]
    assert "parser crashed" in reasons["boom.crash"]
    assert report.count("added") == 6 and len(stored) == 6
