"""The BM25 index in its own file (knowledge/lexical_index.py): it follows every commit, off the committing thread
during an ingest, and whatever happens between the two commits, the rows bring it back."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from knowledge.docstore import DB_NAME
from knowledge.ingest import text_hash
from knowledge.lexical import fts_document, fts_query
from knowledge.lexical_index import LEXICAL_DB, LexicalIndex
from knowledge.store import FileRecord, KnowledgeBase, Manifest, NewChunk
from tests.conftest import HashingEmbedder

EMB = HashingEmbedder()
YANGTZE = "长江是中国最长的河流。"
YELLOW = "黄河是中国第二长河。"


def manifest() -> Manifest:
    return Manifest(embedding_model=EMB.model_id, dim=EMB.dim, chunk_size=500, chunk_overlap=50)


def put(kb: KnowledgeBase, path: str, texts: list[str]) -> None:
    chunks = [NewChunk(t, text_hash(t), page=1, offset=i, tokens=fts_document(t)) for i, t in enumerate(texts)]
    with kb.transaction() as tx:
        tx.put_file(
            FileRecord(path, "sha-" + path, 1, 1, 0, "utf-8", time.time()),
            chunks,
            {c.text_hash: EMB._one(c.text) for c in chunks},
        )


def remove(kb: KnowledgeBase, path: str) -> None:
    with kb.transaction() as tx:
        tx.remove_file(path)


def found(kb: KnowledgeBase, word: str) -> set[str]:
    """The chunks BM25 finds for ``word``."""
    with kb.snapshot() as snap:
        return {h.chunk.text for h in snap.hits_for_texts(snap.lexical_search(fts_query(word), 10))}


def lexical_generation(root: Path) -> int:
    conn = sqlite3.connect(root / LEXICAL_DB)
    try:
        return int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def kb(tmp_path: Path) -> KnowledgeBase:
    return KnowledgeBase.open(tmp_path / "kb", create=manifest())


def fail_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(LexicalIndex, "_apply", broken)


def fail_automerge(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: LexicalIndex, segments: int) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(LexicalIndex, "_set_automerge", broken)


def test_the_index_follows_every_commit(kb: KnowledgeBase, tmp_path: Path) -> None:
    put(kb, "/a.txt", [YANGTZE])
    put(kb, "/b.txt", [YELLOW])
    assert found(kb, "长江") == {YANGTZE} and found(kb, "黄河") == {YELLOW}
    remove(kb, "/a.txt")
    assert found(kb, "长江") == set() and found(kb, "黄河") == {YELLOW}
    assert lexical_generation(tmp_path / "kb") == kb.manifest.generation
    assert kb.check() == []


def test_a_bulk_write_indexes_on_a_thread_of_its_own_and_is_whole_when_it_ends(
    kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    apply = LexicalIndex._apply

    def recording(self: LexicalIndex, *args: object) -> None:
        threads.append(threading.current_thread().name)
        apply(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(LexicalIndex, "_apply", recording)
    with kb.deferred_index():
        put(kb, "/a.txt", [YANGTZE])
        put(kb, "/b.txt", [YELLOW])
    assert threads == ["lexical-index", "lexical-index"]  # not the committing thread
    assert found(kb, "长江") == {YANGTZE} and found(kb, "黄河") == {YELLOW}
    assert kb.check() == []
    put(kb, "/c.txt", ["珠江流经广州。"])
    assert threads[-1] == threading.current_thread().name  # a single write indexes at once


def automerge(root: Path) -> int:
    """FTS5's automerge setting in the base's BM25 index (never set: FTS5's default, 4)."""
    conn = sqlite3.connect(root / LEXICAL_DB)
    try:
        row = conn.execute("SELECT v FROM texts_fts_config WHERE k = 'automerge'").fetchone()
        return 4 if row is None else int(row[0])
    finally:
        conn.close()


def test_a_bulk_write_leaves_merging_to_the_end_and_puts_it_back(kb: KnowledgeBase, tmp_path: Path) -> None:
    assert automerge(tmp_path / "kb") == 4
    with kb.deferred_index():
        put(kb, "/a.txt", [YANGTZE])
        during = automerge(tmp_path / "kb")
        put(kb, "/b.txt", [YELLOW])
    assert (during, automerge(tmp_path / "kb")) == (0, 4)
    assert found(kb, "长江") == {YANGTZE} and found(kb, "黄河") == {YELLOW}


@pytest.mark.parametrize("setting", ["written", "unwritable"])
def test_a_bulk_write_that_was_killed_leaves_merging_off_until_the_next_writer_opens(
    kb: KnowledgeBase,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    setting: str,
) -> None:
    put(kb, "/a.txt", [YANGTZE])
    conn = sqlite3.connect(tmp_path / "kb" / LEXICAL_DB)
    with conn:  # as a killed ingest leaves it
        conn.execute("INSERT INTO texts_fts(texts_fts, rank) VALUES('automerge', 0)")
    conn.close()
    kb.close()
    if setting == "unwritable":  # a setting for speed only: the base opens all the same
        fail_automerge(monkeypatch)
    with caplog.at_level(logging.WARNING):
        kb = KnowledgeBase.open(tmp_path / "kb")
    assert automerge(tmp_path / "kb") == (4 if setting == "written" else 0)
    assert ("could not set automerge" in caplog.text) == (setting == "unwritable")
    assert found(kb, "长江") == {YANGTZE}
    kb.close()


def test_a_bulk_write_whose_merge_setting_cannot_be_written_goes_on(
    kb: KnowledgeBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fail_automerge(monkeypatch)
    with caplog.at_level(logging.WARNING), kb.deferred_index():
        put(kb, "/a.txt", [YANGTZE])
    assert caplog.text.count("could not set automerge") == 2  # off at the start, back at the end
    assert found(kb, "长江") == {YANGTZE} and kb.check() == []


@pytest.mark.parametrize("then", ["next write", "reopen"])
def test_a_failed_index_update_loses_nothing_and_is_caught_up(
    kb: KnowledgeBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, then: str
) -> None:
    put(kb, "/a.txt", [YANGTZE])
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        fail_updates(m)
        put(kb, "/b.txt", [YELLOW])  # committed all the same
    assert "BM25 index" in caplog.text
    assert found(kb, "黄河") == set()  # lags: not a problem, and vector search has it
    assert kb.search(EMB.embed_query(YELLOW), 1)[0].chunk.text == YELLOW
    assert kb.check() == []
    if then == "next write":
        put(kb, "/c.txt", ["珠江流经广州。"])
        assert found(kb, "珠江") == {"珠江流经广州。"}
    else:
        kb.close()
        kb = KnowledgeBase.open(tmp_path / "kb")
    assert found(kb, "黄河") == {YELLOW} and found(kb, "长江") == {YANGTZE}
    assert lexical_generation(tmp_path / "kb") == kb.manifest.generation
    assert kb.check() == []
    kb.close()


def test_an_id_given_again_while_the_index_lagged_is_not_found_by_its_old_words(
    kb: KnowledgeBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(kb, "/a.txt", [YANGTZE])
    with monkeypatch.context() as m:
        fail_updates(m)
        remove(kb, "/a.txt")
        put(kb, "/b.txt", [YELLOW])  # takes the id the Yangtze text had
    kb.close()
    with KnowledgeBase.open(tmp_path / "kb") as again:
        assert found(again, "长江") == set()
        assert found(again, "黄河") == {YELLOW}
        assert again.check() == []


def test_an_immutable_reader_notices_a_writer_that_changed_only_the_index(
    kb: KnowledgeBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader opened immutable (a folder it cannot write to) never sees changes by itself: a writer that
    only brought the index up to date must make it stale too, or it would read a file changing under it."""
    from knowledge.vectors import FaissKind

    root = tmp_path / "kb"
    with monkeypatch.context() as m:
        fail_updates(m)
        put(kb, "/a.txt", [YANGTZE])
    kb.close()
    reader = KnowledgeBase(root, kb.manifest, FaissKind("off"), writer=None, reader_mode="immutable")
    assert not reader.is_stale()
    docstore = (root / DB_NAME).stat().st_mtime_ns
    KnowledgeBase.open(root).close()  # catches the index up
    assert (root / DB_NAME).stat().st_mtime_ns == docstore  # the docstore itself did not change
    assert reader.is_stale()
    reader.close()


def test_a_damaged_count_is_a_problem(kb: KnowledgeBase, tmp_path: Path) -> None:
    put(kb, "/a.txt", [YANGTZE, YELLOW])
    conn = sqlite3.connect(tmp_path / "kb" / LEXICAL_DB)
    with conn:
        conn.execute("DELETE FROM texts_fts WHERE rowid = (SELECT MIN(rowid) FROM texts_fts)")
    conn.close()
    assert kb.check() == ["BM25 index holds 1 texts, docstore 2"]


def _as_before_the_index_file(root: Path, *, keep_index: bool) -> None:
    """Make the base look as an older version left it: the BM25 table inside the docstore (or none at all)."""
    lexical = sqlite3.connect(root / LEXICAL_DB)
    rows = lexical.execute("SELECT rowid, tokens FROM texts_fts").fetchall()
    lexical.close()
    for suffix in ("", "-wal", "-shm"):
        (root / (LEXICAL_DB + suffix)).unlink(missing_ok=True)
    if keep_index:
        conn = sqlite3.connect(root / DB_NAME)
        with conn:
            conn.execute(
                'CREATE VIRTUAL TABLE texts_fts USING fts5(tokens, tokenize = "unicode61 remove_diacritics 0")'
            )
            conn.executemany("INSERT INTO texts_fts(rowid, tokens) VALUES(?, ?)", rows)
        conn.close()


def test_a_base_from_before_the_index_file_moves_its_index_there_without_tokenising_again(
    kb: KnowledgeBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "kb"
    put(kb, "/a.txt", [YANGTZE, YELLOW])
    kb.close()
    _as_before_the_index_file(root, keep_index=True)
    reader = KnowledgeBase.open(root, readonly=True)  # before any writer: reads the table inside the docstore
    assert found(reader, "长江") == {YANGTZE}

    def no_jieba(text: str) -> str:
        raise AssertionError("tokenised again")

    monkeypatch.setattr("knowledge.lexical.fts_document", no_jieba)
    with KnowledgeBase.open(root) as writer:
        assert (root / LEXICAL_DB).exists()
        assert found(writer, "黄河") == {YELLOW}
        assert writer.check() == []
    conn = sqlite3.connect(root / DB_NAME)
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'texts_fts'").fetchone()[0] == 0
    conn.close()
    assert found(reader, "长江") == {YANGTZE}  # the reader opened before now reads the file
    reader.close()


def test_a_base_without_any_bm25_index_gets_one_on_open(kb: KnowledgeBase, tmp_path: Path) -> None:
    root = tmp_path / "kb"
    put(kb, "/a.txt", [YANGTZE, YELLOW])
    kb.close()
    _as_before_the_index_file(root, keep_index=False)
    with KnowledgeBase.open(root, readonly=True) as reader:
        assert found(reader, "长江") == set()  # nothing to search yet, and no error
    with KnowledgeBase.open(root) as writer:
        assert found(writer, "长江") == {YANGTZE} and found(writer, "黄河") == {YELLOW}
        assert writer.check() == []


def test_two_writers_taking_turns_keep_one_index(kb: KnowledgeBase, tmp_path: Path) -> None:
    other = KnowledgeBase.open(tmp_path / "kb")
    put(kb, "/a.txt", [YANGTZE])
    put(other, "/b.txt", [YELLOW])
    remove(kb, "/a.txt")  # this writer's index has not seen the other's commit: it catches up first
    put(other, "/c.txt", ["珠江流经广州。"])
    assert found(kb, "长江") == set()
    assert found(other, "黄河") == {YELLOW} and found(kb, "珠江") == {"珠江流经广州。"}
    assert kb.check() == [] and other.check() == []
    other.close()
