"""The promises of a knowledge base that hold whichever vector store holds its index (FAISS files in the
base's folder, or Milvus Lite in process): one suite, run over both. Then ``kb migrate`` between them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from knowledge import migrate as migrate_module
from knowledge.ingest import text_hash
from knowledge.lexical import fts_document
from knowledge.migrate import drop_source, migrate
from knowledge.milvus import MilvusError, MilvusIndex, MilvusKind
from knowledge.retrieval import fts_query
from knowledge.store import PREVIOUS_STORE, FileRecord, KnowledgeBase, Manifest, NewChunk, StoreError
from knowledge.stores import MilvusSettings, VectorStores
from knowledge.vectors import FaissKind
from tests.conftest import HashingEmbedder

EMB = HashingEmbedder()
STORES = ["faiss", "milvus"]  # milvus: Milvus Lite, in process


def chunks_of(texts: list[str]) -> tuple[list[NewChunk], dict[str, np.ndarray]]:
    chunks = [NewChunk(t, text_hash(t), page=1, offset=i * 10, tokens=fts_document(t)) for i, t in enumerate(texts)]
    return chunks, {c.text_hash: EMB._one(c.text) for c in chunks}


def record(path: str) -> FileRecord:
    return FileRecord(path, "sha-" + path, 1, 1, 0, "utf-8", time.time())


def put(kb: KnowledgeBase, path: str, texts: list[str]) -> None:
    chunks, vectors = chunks_of(texts)
    with kb.transaction() as tx:
        tx.put_file(record(path), chunks, vectors)


def top(kb: KnowledgeBase, text: str, k: int = 5) -> list[str]:
    return [h.chunk.text for h in kb.search(EMB.embed_query(text), k)]


def ranking(kb: KnowledgeBase, text: str, k: int = 5) -> tuple[list[float], set[str]]:
    """The top-k scores, and the texts that score above the k-th (which of several tied texts makes the cut is
    the engine's choice)."""
    hits = kb.search(EMB.embed_query(text), k)
    scores = [round(h.score, 4) for h in hits]
    return scores, {h.chunk.text for h in hits if round(h.score, 4) > scores[-1]}


class Opener:
    """Opens the base of one test the way the app does: each base's index kind comes from its manifest."""

    def __init__(self, root: Path, store: str) -> None:
        self.root, self.store = root, store
        self.stores = VectorStores(FaissKind("off"), MilvusSettings())

    def __call__(self, **kwargs: object) -> KnowledgeBase:
        create = Manifest(EMB.model_id, EMB.dim, 120, 20, store=self.store)
        return KnowledgeBase.open(self.root, create=create, kind_for=self.stores, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=STORES)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    opener = Opener(tmp_path / "kb", request.param)
    yield opener
    opener.stores.close()


def test_the_base_records_its_store_and_answers_after_a_reopen(opener: Opener) -> None:
    with opener() as kb:
        put(kb, "/a.txt", ["甲段落讲苹果。", "乙段落讲香蕉。"])
        assert kb.manifest.store == opener.store and kb.kind.name == opener.store
    with opener(readonly=True) as again:
        assert again.manifest.store == opener.store
        assert top(again, "乙段落讲香蕉。", 1) == ["乙段落讲香蕉。"]
        assert again.check() == []


def test_replaced_and_removed_files_are_never_found_again(opener: Opener) -> None:
    with opener() as kb:
        put(kb, "/a.txt", ["旧的第一段。", "共享的一段。"])
        put(kb, "/b.txt", ["共享的一段。", "乙文件独有。"])
        put(kb, "/a.txt", ["新的第一段。"])  # replaces a.txt: its old paragraph goes, the shared one stays
        with kb.transaction() as tx:
            tx.remove_file("/b.txt")
        for reader in (kb, opener(readonly=True)):
            assert set(top(reader, "旧的第一段。", 10)) == {"新的第一段。"}
            assert reader.counts()["vectors"] == 1 and reader.check() == []


def test_a_failed_transaction_changes_nothing_and_its_vectors_never_appear(opener: Opener) -> None:
    with opener() as kb:
        put(kb, "/a.txt", ["保留的段落。"])
        chunks, vectors = chunks_of(["失败事务的段落。"])
        with pytest.raises(RuntimeError), kb.transaction() as tx:
            tx.remove_file("/a.txt")
            tx.put_file(record("/b.txt"), chunks, vectors)
            tx.drop_unused_texts()  # a.txt's vector leaves the index, as at the end of every transaction
            raise RuntimeError("disk full, say")  # ... and then the commit fails
        assert top(kb, "保留的段落。") == ["保留的段落。"]
        with kb.snapshot() as snap:  # searched in its own store, not in a copy made because the index lost rows
            assert isinstance(snap.index, MilvusIndex) == (opener.store == "milvus")
        put(kb, "/c.txt", ["下一个事务。"])  # commits the generation the failed one would have had
        assert set(top(kb, "失败事务的段落。", 10)) == {"保留的段落。", "下一个事务。"}
        assert kb.check() == []


def test_a_snapshot_sees_one_commit_whatever_the_writer_does_meanwhile(opener: Opener) -> None:
    with opener() as kb, opener(readonly=True) as reader:
        put(kb, "/a.txt", ["第一代的段落。"])
        with reader.snapshot() as before:
            chunks, vectors = chunks_of(["第二代的段落。"])
            with kb.transaction() as tx:
                tx.put_file(record("/b.txt"), chunks, vectors)
                with reader.snapshot() as during:  # the writer has added, not committed
                    assert [h.chunk.text for h in during.search(EMB.embed_query("第二代"), 5)] == ["第一代的段落。"]
            # a snapshot taken before the commit searches that commit's vectors only
            assert [h.chunk.text for h in before.search(EMB.embed_query("第二代"), 5)] == ["第一代的段落。"]
        assert set(top(reader, "第二代的段落。")) == {"第一代的段落。", "第二代的段落。"}


def test_a_search_begun_before_a_save_reads_the_store_not_a_private_copy(opener: Opener) -> None:
    with opener() as kb, opener(readonly=True) as reader:
        put(kb, "/a.txt", ["第一代的段落。"])
        with reader.snapshot() as before:
            put(kb, "/b.txt", ["第二代的段落。"])  # commits, saves, and removes the index file of the snapshot
            assert [h.chunk.text for h in before.search(EMB.embed_query("第二代"), 5)] == ["第一代的段落。"]
            # Milvus: seen at the snapshot's generation through the newer marker (FAISS rebuilds from its rows)
            assert isinstance(before.index, MilvusIndex) == (opener.store == "milvus")


CRASH = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, os.getcwd())
    from tests.test_store_backends import Opener, chunks_of, put, record
    from pathlib import Path
    opener = Opener(Path(sys.argv[1]), sys.argv[2])
    kb = opener()
    if sys.argv[3] == "in-transaction":
        chunks, vectors = chunks_of(["未提交的段落。"])
        with kb.transaction() as tx:
            tx.remove_file("/a.txt")
            tx.put_file(record("/b.txt"), chunks, vectors)
            os._exit(9)  # killed after the vectors went into the index, before the commit
    with kb.deferred_index(min_interval=1e9):  # committed, the index never written
        with kb.transaction() as tx:
            tx.remove_file("/a.txt")
        put(kb, "/c.txt", ["提交后崩溃的段落。"])
        os._exit(9)
    """
)


@pytest.mark.parametrize("when", ["in-transaction", "after-commit"])
def test_a_writer_killed_loses_nothing_committed_and_shows_nothing_uncommitted(opener: Opener, when: str) -> None:
    with opener() as kb:
        put(kb, "/a.txt", ["甲文件的段落。"])
    opener.stores.close()  # Milvus Lite serves one process at a time: let the child have it
    killed = subprocess.run(
        [sys.executable, "-c", CRASH, str(opener.root), opener.store, when], cwd=Path(__file__).parent.parent
    )
    assert killed.returncode == 9
    expected = {"甲文件的段落。"} if when == "in-transaction" else {"提交后崩溃的段落。"}
    with opener(readonly=True) as reader:
        assert set(top(reader, "段落", 10)) == expected
    with opener() as kb:
        put(kb, "/d.txt", ["之后的段落。"])
        assert set(top(kb, "段落", 10)) == expected | {"之后的段落。"}
        assert kb.check() == []


def test_a_lost_index_is_rebuilt_from_the_docstore(opener: Opener) -> None:
    with opener() as kb:
        put(kb, "/a.txt", ["甲段落。", "乙段落。"])
    for f in opener.root.glob("index-*"):
        f.write_bytes(b"garbage")  # a damaged marker, a damaged FAISS file
    with opener(readonly=True) as reader:
        assert top(reader, "乙段落。", 1) == ["乙段落。"]  # a reader searches the rows meanwhile
    with opener() as kb:
        put(kb, "/b.txt", ["丙段落。"])
        assert kb.check() == []
        assert top(kb, "乙段落。", 1) == ["乙段落。"]


# ----- kb migrate --------------------------------------------------------------------------------------
# distinct characters per text: the hashing embedder gives no two of them the same score (ties may swap)
TEXTS = ["".join(chr(0x4E00 + (i * 131 + j * 17) % 5000) for j in range(10 + i % 7)) + "。" for i in range(60)]


def filled(opener: Opener) -> KnowledgeBase:
    kb = opener()
    for n in range(0, len(TEXTS), 10):
        put(kb, f"/f{n}.txt", TEXTS[n : n + 10])
    with kb.transaction() as tx:
        tx.remove_file("/f50.txt")  # a removal the old index may still hold as a tombstone
    return kb


@pytest.mark.parametrize("source", ["faiss", "milvus"])
def test_a_migrated_base_answers_the_same_and_switches_every_reader(tmp_path: Path, source: str) -> None:
    target = "milvus" if source == "faiss" else "faiss"
    opener = Opener(tmp_path / "kb", source)
    with filled(opener) as kb, opener(readonly=True) as reader:
        queries = TEXTS[::3]
        before = [ranking(reader, q) for q in queries]
        report = migrate(kb, opener.stores, target)
        assert report.switched and report.vectors == 50 and report.checked > 0
        assert kb.manifest.store == target
        assert [ranking(reader, q) for q in queries] == before  # the open reader moved with it
        assert reader.kind.name == target
        put(kb, "/new.txt", ["迁移后新加的段落。"])
        assert top(reader, "迁移后新加的段落。", 1) == ["迁移后新加的段落。"]
    with opener(readonly=True) as again:  # another process opening it later
        assert again.manifest.store == target and again.check() == []
    assert (opener.root / PREVIOUS_STORE).is_dir()  # the old copy stays until --drop-source
    with opener() as kb:
        assert migrate(kb, opener.stores, target).switched is False
        assert drop_source(kb, opener.stores)
        assert not (opener.root / PREVIOUS_STORE).exists()
        assert json.loads((opener.root / "manifest.json").read_text())["store"] == target


@pytest.mark.parametrize("cut", ["after three batches", "inside the first batch"])
def test_an_interrupted_migration_goes_on_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    opener = Opener(tmp_path / "kb", "faiss")
    monkeypatch.setattr(migrate_module, "_BATCH", 8)
    seen: list[int] = []
    save_state = migrate_module._save_state
    saves: list[object] = []

    def stop_half_way(done: int, total: int) -> None:
        seen.append(done)
        if done >= 24:
            raise KeyboardInterrupt

    def killed_before_recording_batch_one(docstore: object, state: dict[str, object]) -> None:
        saves.append(state)
        if state.get("after") is not None:  # batch 1 is in Milvus, its progress not yet recorded
            raise KeyboardInterrupt
        save_state(docstore, state)  # type: ignore[arg-type]

    with filled(opener) as kb:
        with pytest.raises(KeyboardInterrupt):
            if cut == "inside the first batch":
                monkeypatch.setattr(migrate_module, "_save_state", killed_before_recording_batch_one)
                migrate(kb, opener.stores, "milvus")
            else:
                migrate(kb, opener.stores, "milvus", progress=stop_half_way)
        monkeypatch.setattr(migrate_module, "_save_state", save_state)
        assert kb.manifest.store == "faiss" and top(kb, TEXTS[3], 1) == [TEXTS[3]]  # still on its old store
        report = migrate(kb, opener.stores, "milvus", progress=lambda done, total: seen.append(done))
        assert report.switched and report.copied == (50 - 24 if cut == "after three batches" else 50)
        assert seen[-1] == 50 and report.checked > 0  # the copy's count check passed: no row twice
        assert kb.check() == [] and top(kb, TEXTS[47], 1) == [TEXTS[47]]


def test_a_milvus_uri_that_is_neither_empty_nor_a_servers_is_refused(tmp_path: Path) -> None:
    with filled(Opener(tmp_path / "kb", "faiss")) as kb, pytest.raises(MilvusError, match="http://host:19530"):
        migrate(kb, Opener(tmp_path / "kb", "faiss").stores, "milvus", "localhost:19530")
    assert not list(tmp_path.glob("kb/localhost*")) and kb.manifest.store == "faiss"


def test_a_base_in_an_unknown_store_is_refused_naming_the_stores_known_here(tmp_path: Path) -> None:
    opener = Opener(tmp_path / "kb", "faiss")
    opener().close()
    with opener() as kb, kb.exclusive() as docstore, docstore.conn:
        docstore.set_meta([("store", "qdrant")])
    with pytest.raises(StoreError, match=r"'qdrant', which this Zhiku does not know.*known here: faiss, milvus"):
        opener()


def test_a_source_filter_searches_only_the_files_it_matches(opener: Opener) -> None:
    """Vectors and passages from the matching files only, in the store's own filter (Milvus) or exactly."""
    with opener() as kb:
        put(kb, "/docs/laws/a.txt", ["法律条文讲合同。", "共享的段落。"])
        put(kb, "/docs/news/b.txt", ["新闻报道讲合同。", "共享的段落。"])
        query = EMB.embed_query("讲合同")
        everywhere = {h.chunk.source for h in kb.search(query, 10)}
        assert everywhere == {"/docs/laws/a.txt", "/docs/news/b.txt"}
        laws = kb.search(query, 10, sources=["*/laws/*"])
        assert {h.chunk.text for h in laws} == {"法律条文讲合同。", "共享的段落。"}
        assert {h.chunk.source for h in laws} == {"/docs/laws/a.txt"}  # the shared text, as a chunk of a.txt
        assert [h.score for h in laws] == sorted((h.score for h in laws), reverse=True)
        assert kb.search(query, 10, sources=["/docs/news/b.txt", "*/nothing/*"])[0].chunk.text == "新闻报道讲合同。"
        assert kb.search(query, 10, sources=["*/nothing/*"]) == []
        with kb.snapshot() as snap:
            assert [t for t, _ in snap.lexical_search(fts_query("合同"), 10, ["*/news/*"])] == [
                t for t, _ in snap.vector_search(query, 1, ["/docs/news/b.txt"])
            ]


@pytest.fixture
def milvus_server(tmp_path: Path) -> Iterator[str]:
    """A Milvus endpoint on 127.0.0.1: Milvus Lite's gRPC server, which pymilvus reaches as it reaches a Milvus
    server (``store.uri: http://...``), so the server-only code (AUTOINDEX, collections kept and dropped on the
    server) runs too."""
    from milvus_lite.server_manager import server_manager_instance

    folder = str(tmp_path / "server.db")
    uri = server_manager_instance.start_and_get_uri(folder)
    assert uri and uri.startswith("http://127.0.0.1:")
    yield uri
    server_manager_instance.release_server(folder)


def test_a_base_on_a_milvus_server_keeps_its_collections_there_until_dropped(
    tmp_path: Path, milvus_server: str
) -> None:
    opener = Opener(tmp_path / "kb", "milvus")
    with KnowledgeBase.open(
        opener.root,
        create=Manifest(EMB.model_id, EMB.dim, 120, 20, store="milvus", store_uri=milvus_server),
        kind_for=opener.stores,
    ) as kb:
        put(kb, "/a.txt", ["服务器上的段落。", "另一段。"])
        put(kb, "/a.txt", ["改过的段落。"])  # a second marker: the first one's file goes, its collection stays
        server = kb.kind
        assert isinstance(server, MilvusKind) and not server.lite and server.index_type == "AUTOINDEX"
        assert not list(opener.root.glob("milvus-*.db"))  # nothing of Milvus in the base's folder but markers
        assert [p.name for p in opener.root.glob("index-*")] == ["index-2.milvus.json"]
        (collection,) = server.collections()
        assert top(kb, "改过的段落。", 1) == ["改过的段落。"]
        migrate(kb, opener.stores, "faiss")
        assert server.collections() == [collection]  # the old copy stays on the server until --drop-source
        assert drop_source(kb, opener.stores) == [f"{PREVIOUS_STORE}/", f"collection {collection}"]
        assert server.collections() == []
        assert top(kb, "改过的段落。", 1) == ["改过的段落。"]
        migrate(kb, opener.stores, "milvus", milvus_server)
        assert len(server.collections()) == 1
        manifest = kb.manifest
    opener.stores.forget(opener.root, manifest, drop=True)  # what `kb delete` does first
    assert server.collections() == []
