"""Ingest as a pipeline: parsing, embedding and committing overlap; errors stay with their file; the vector
index file is written on a timer, and readers bring an older one up to date from the docstore's rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.documents import Document

import knowledge.ingest as ingest_module
from app.container import Zhiku
from knowledge.docstore import Docstore, FileRecord, NewChunk
from knowledge.ingest import text_hash
from knowledge.store import KnowledgeBase
from plugins.hookspecs import RegisterLoader, hookimpl
from tests.conftest import HashingEmbedder
from tests.helpers import make_corpus
from tests.test_store import manifest, put

EMB = HashingEmbedder()
WAIT_S = 30.0  # far above what any step here takes; a hang fails instead of stalling


def write_docs(folder: Path, n: int, paragraphs: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        path = folder / f"f{i:02d}.txt"
        text = "\n\n".join(f"第{i}号文件第{j}段：长江是中国最长的河流，全长约六千三百公里。" for j in range(paragraphs))
        path.write_text(text, encoding="utf-8")
        files.append(path)
    return files


def ingest(app: Zhiku, *paths: Path, kb: str = "t", prune: bool = False) -> Any:
    with app.open_kb(kb, create=True) as store:
        return app.ingestor(store).run(list(paths), prune=prune, progress=False)


def no_pipeline_threads_left() -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t.name.startswith("ingest-")]:
            return True
        time.sleep(0.05)
    return False


class GatedEmbedder(HashingEmbedder):
    """Blocks its first call until ``release`` is set, and tells when each call starts."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started: list[list[str]] = []
        self.call_started = threading.Event()

    def embed_documents(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        self.started.append(list(texts))
        self.call_started.set()
        if len(self.started) == 1:
            assert self.release.wait(WAIT_S), "the test never released the embedder"
        return super().embed_documents(texts, progress)


def use_embedder(app: Zhiku, monkeypatch: pytest.MonkeyPatch, embedder: HashingEmbedder) -> None:
    """Make ``embedder`` the one every knowledge base of ``app`` embeds with."""
    monkeypatch.setattr(app.embedders, "configured", lambda: embedder)
    monkeypatch.setattr(app.embedders, "for_model", lambda model_id: embedder)


class RecordingEmbedder(HashingEmbedder):
    """Records how many texts each embedding call got; ``second_call`` is set when the second call starts."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.second_call = threading.Event()

    def embed_documents(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        self.sizes.append(len(texts))
        if len(self.sizes) >= 2:
            self.second_call.set()
        return super().embed_documents(texts, progress)


def test_parsers_go_on_while_the_embedder_is_busy(app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first embedding call is held; the files after it are parsed meanwhile (in-process parsing: the
    loader runs in the caller's thread, so it counts them), and everything is stored once it is released."""

    embedder = GatedEmbedder()
    use_embedder(app, monkeypatch, embedder)
    app.settings.ingest.commit_every = 2
    write_docs(tmp_path / "docs", 6)
    parsed: list[str] = []
    real_parse = ingest_module.parse_file

    def counting_parse(path: str, *args: Any) -> Any:
        parsed.append(path)
        return real_parse(path, *args)

    monkeypatch.setattr(ingest_module, "parse_file", counting_parse)
    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.append(ingest(app, tmp_path / "docs")))
    runner.start()
    try:
        assert embedder.call_started.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while len(parsed) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(parsed) == 6, "parsing stopped while the embedder was busy"
        assert len(embedder.started) == 1
    finally:
        embedder.release.set()
        runner.join(WAIT_S)
    [report] = result
    assert (report.failures, report.count("added")) == ([], 6)
    assert no_pipeline_threads_left()


def test_the_chunks_awaiting_their_commit_are_bounded_and_a_checkpoint_that_would_not_fit_closes_early(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for 5 chunks, checkpoints of 100 files: the run does not wait for a checkpoint that cannot fill (it
    closes early, and commits make room), and never holds more than 5 chunks, but for a larger file alone."""
    monkeypatch.setattr(ingest_module, "_MAX_IN_FLIGHT", 5)
    app.settings.ingest.commit_every = 100
    write_docs(tmp_path / "docs", 12)  # a chunk each
    write_docs(tmp_path / "docs" / "big", 1, paragraphs=60)
    held: list[int] = []
    reserve = ingest_module._Pipeline._reserve

    def watching(self: Any, chunks: int) -> None:
        reserve(self, chunks)
        held.append(self.in_flight)

    monkeypatch.setattr(ingest_module._Pipeline, "_reserve", watching)
    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.append(ingest(app, tmp_path / "docs")), daemon=True)
    runner.start()
    runner.join(WAIT_S)
    assert result, "the ingest waited for room that never came"
    [report] = result
    assert (report.failures, report.count("added")) == ([], 13)
    big = next(o.chunks for o in report.outcomes if "big" in o.path)
    assert big > 5
    assert all(n <= 5 or n == big for n in held), held
    assert len(held) == 13
    assert no_pipeline_threads_left()


def test_the_embedder_goes_on_while_a_checkpoint_is_written(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit of the first checkpoint is held in its transaction until the embedder has been called for
    the next one: embedding never waits for a checkpoint's SQLite writes."""
    import knowledge.store as store

    embedder = RecordingEmbedder()
    use_embedder(app, monkeypatch, embedder)
    app.settings.ingest.commit_every = 1
    write_docs(tmp_path / "docs", 3)
    real_put = store.Transaction.put_files
    overlapped: list[bool] = []

    def slow_put(self: Any, *args: Any, **kwargs: Any) -> tuple[set[str], int]:
        if not overlapped:
            overlapped.append(embedder.second_call.wait(WAIT_S))
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(store.Transaction, "put_files", slow_put)
    # one embedding call per file (grouping would otherwise embed all three at once, before any commit, when
    # the files are queued before the embedder looks: it takes what is queued, up to _GROUP_MAX_TEXTS)
    monkeypatch.setattr(ingest_module, "_GROUP_MIN_TEXTS", 1)
    monkeypatch.setattr(ingest_module, "_GROUP_MAX_TEXTS", 1)
    monkeypatch.setattr(ingest_module, "_GROUP_LINGER_S", 0.0)
    report = ingest(app, tmp_path / "docs")
    assert overlapped == [True], "the embedder waited for the commit"
    assert (report.failures, report.count("added")) == ([], 3)


def test_a_run_freezes_its_start_objects_and_hands_the_interpreter_lock_over_quickly_until_it_ends(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import sys

    class TuningRecordingEmbedder(HashingEmbedder):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[int, float]] = []

        def embed_documents(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
            self.seen.append((gc.get_freeze_count(), sys.getswitchinterval()))
            return super().embed_documents(texts, progress)

    embedder = TuningRecordingEmbedder()
    use_embedder(app, monkeypatch, embedder)
    write_docs(tmp_path / "docs", 3)
    before, interval = gc.get_freeze_count(), sys.getswitchinterval()
    assert interval > ingest_module._SWITCH_INTERVAL_S  # Python's default, 5 ms
    report = ingest(app, tmp_path / "docs")
    assert (report.failures, report.count("added")) == ([], 3)
    assert embedder.seen and min(frozen for frozen, _ in embedder.seen) > before
    assert {switch for _, switch in embedder.seen} == {ingest_module._SWITCH_INTERVAL_S}
    assert (gc.get_freeze_count(), sys.getswitchinterval()) == (before, interval) and before == 0


def test_parsing_alone_is_tuned_as_a_run_is_until_it_ends(app: Zhiku, tmp_path: Path) -> None:
    """Parse-only is what a run's rate is measured against: the same collector and switch interval."""
    import gc
    import sys

    files = write_docs(tmp_path / "docs", 3)
    before, interval = gc.get_freeze_count(), sys.getswitchinterval()
    with app.open_kb("t", create=True) as kb:
        seen = [
            (type(result).__name__, gc.get_freeze_count() > before, sys.getswitchinterval())
            for result in app.ingestor(kb).parse(files)
        ]
    assert seen == [("ParsedFile", True, ingest_module._SWITCH_INTERVAL_S)] * 3
    assert (gc.get_freeze_count(), sys.getswitchinterval()) == (before, interval)


def test_overlapping_runs_keep_the_process_tuned_until_the_last_one_ends() -> None:
    """Runs in one process share the collector's frozen set and the switch interval: the first to end leaves
    them to the other."""
    import gc
    import sys

    interval = sys.getswitchinterval()
    first, second = ingest_module._process_tuned_for_ingest(), ingest_module._process_tuned_for_ingest()
    first.__enter__()
    second.__enter__()
    try:
        first.__exit__(None, None, None)
        assert (gc.get_freeze_count() > 0, sys.getswitchinterval()) == (True, ingest_module._SWITCH_INTERVAL_S)
    finally:  # a failure must not leave this test process tuned for the tests after it
        second.__exit__(None, None, None)
    assert (gc.get_freeze_count(), sys.getswitchinterval()) == (0, interval)


def test_rows_of_different_widths_are_refused_not_shifted_into_other_columns(tmp_path: Path) -> None:
    import sqlite3

    from knowledge.docstore import insert_rows

    conn = sqlite3.connect(tmp_path / "t.db")
    conn.execute("CREATE TABLE t(a, b)")
    with pytest.raises(ValueError, match="same number of values"):
        insert_rows(conn, "INSERT INTO t(a, b)", [(1, 2), (3,), (4, 5, 6)])
    insert_rows(conn, "INSERT INTO t(a, b)", [(i, -i) for i in range(1200)])  # 3 statements of up to 499 rows
    assert conn.execute("SELECT COUNT(*), SUM(a + b), MAX(a) FROM t").fetchone() == (1200, 0, 1199)


def test_small_checkpoints_are_embedded_together_and_committed_one_by_one(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An embedding call has a fixed cost, so the embedder takes the texts of several checkpoints at once;
    each checkpoint is still its own transaction, in order."""
    import knowledge.store as store

    embedder = RecordingEmbedder()
    use_embedder(app, monkeypatch, embedder)
    monkeypatch.setattr(ingest_module, "_GROUP_LINGER_S", 5.0)  # however slowly the files come
    app.settings.ingest.commit_every = 1
    write_docs(tmp_path / "docs", 4)
    transactions: list[int] = []
    real_transaction = store.KnowledgeBase.transaction

    def counting(self: Any) -> Any:
        transactions.append(1)
        return real_transaction(self)

    monkeypatch.setattr(store.KnowledgeBase, "transaction", counting)
    report = ingest(app, tmp_path / "docs")
    assert (report.failures, report.count("added")) == ([], 4)
    assert len(embedder.sizes) == 1, embedder.sizes  # four files of a few texts each: one call
    assert len(transactions) == 4  # one checkpoint per file, as configured


class PretokenisingEmbedder(HashingEmbedder):
    """Tokenises ahead (a Pretokenising embedder, as the GPU fast path is): records which thread tokenised how
    many texts, and how many texts each embedding call found tokenised."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenised: list[tuple[str, int]] = []  # (thread name, texts)
        self.ready: list[tuple[int, int]] = []  # per embedding call: (texts, of them tokenised ahead)

    def tokenise_documents(self, texts: Sequence[str]) -> list[Any] | None:
        self.tokenised.append((threading.current_thread().name, len(texts)))
        return [("tokens of", t) for t in texts]

    def embed_tokenised(
        self, texts: Sequence[str], tokens: Mapping[str, Any], progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        assert all(tokens[t] == ("tokens of", t) for t in tokens), "tokens handed to another text's call"
        self.ready.append((len(texts), sum(t in tokens for t in texts)))
        return self.embed_documents(texts, progress)


class FailingEmbedder(HashingEmbedder):
    """Fails on any batch holding a text with the marker, like a model that chokes on one input."""

    def embed_documents(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        if any("坏段落" in t for t in texts):
            raise RuntimeError("CUDA error: device-side assert triggered\nmore detail on a second line")
        return super().embed_documents(texts, progress)


class FailingPretokenisingEmbedder(PretokenisingEmbedder, FailingEmbedder):
    """The same failure, its texts tokenised ahead."""


def test_texts_are_tokenised_ahead_in_a_thread_of_their_own_and_the_embedder_takes_those_tokens(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedder = PretokenisingEmbedder()
    use_embedder(app, monkeypatch, embedder)
    app.settings.ingest.commit_every = 2
    write_docs(tmp_path / "docs", 6, paragraphs=3)
    report = ingest(app, tmp_path / "docs")
    assert (report.failures, report.count("added")) == ([], 6)
    assert {name for name, n in embedder.tokenised if n} == {"ingest-tokenise"}
    with app.open_kb("t") as kb:
        texts = kb.counts()["vectors"]
        assert texts == report.chunks_added >= 6 and kb.check() == []
    assert sum(n for _, n in embedder.tokenised) == texts  # each once
    assert sum(n for n, _ in embedder.ready) == embedder.calls == texts
    assert all(n == ahead for n, ahead in embedder.ready)  # every text came tokenised
    assert "tokenise" in report.stages
    assert no_pipeline_threads_left()


@pytest.mark.parametrize("how", ["cannot", "fails", "miscounts"])
def test_an_embedder_that_cannot_or_fails_to_tokenise_ahead_tokenises_in_its_calls(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """None for no texts: it is asked that once, and the run starts no tokenise thread. An error (or a result
    per text missing): those texts are tokenised by their embedding call, and after a few such calls the run
    stops asking."""
    embedder = PretokenisingEmbedder()
    asked: list[int] = []

    def tokenise(texts: Sequence[str]) -> list[Any] | None:
        asked.append(len(texts))
        if how == "cannot":
            return None
        if how == "fails" and texts:
            raise ValueError("a text the tokenizer chokes on")
        return [("tokens of", t) for t in texts[1:]]  # miscounts: one result short

    monkeypatch.setattr(embedder, "tokenise_documents", tokenise)
    use_embedder(app, monkeypatch, embedder)
    app.settings.ingest.commit_every = 1
    monkeypatch.setattr(ingest_module, "_TOKENISE_TEXTS", 1)  # a call per file, were they all asked
    write_docs(tmp_path / "docs", 6)
    report = ingest(app, tmp_path / "docs")
    assert (report.failures, report.count("added"), embedder.calls) == ([], 6, 6)
    # the question with no texts, then (fails, miscounts) three failing calls of the six files' texts
    assert asked == ([0] if how == "cannot" else [0, 1, 1, 1])
    assert embedder.ready == []  # nothing came tokenised: embed_documents embedded every text
    assert ("tokenise" in report.stages) is (how != "cannot")
    warned = [r.getMessage() for r in caplog.records if "tokenising texts ahead" in r.getMessage()]
    assert len(warned) == (0 if how == "cannot" else 3)


def test_a_rerun_tokenises_ahead_only_the_texts_the_base_lacks(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedder = PretokenisingEmbedder()
    use_embedder(app, monkeypatch, embedder)
    docs = tmp_path / "docs"
    docs.mkdir()
    paragraphs = [f"第{j}段。" + "长江是中国最长的河流，全长约六千三百公里。" * 12 for j in range(4)]
    (docs / "long.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    first = ingest(app, docs)
    stored = embedder.calls
    assert first.count("added") == 1 and stored >= 4  # a text per paragraph at least
    embedder.tokenised.clear()
    embedder.calls = 0
    (docs / "long.txt").write_text("\n\n".join([*paragraphs[:-1], "最后一段改了。"]), encoding="utf-8")
    again = ingest(app, docs)
    assert again.count("updated") == 1
    # the texts it still shares with its stored version were neither tokenised nor embedded again
    assert 0 < embedder.calls < stored
    assert sum(n for _, n in embedder.tokenised) == embedder.calls


@pytest.mark.parametrize("failing", [FailingEmbedder, FailingPretokenisingEmbedder], ids=["plain", "tokenised-ahead"])
def test_a_file_the_embedder_fails_on_fails_alone_with_its_name(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: type[HashingEmbedder]
) -> None:
    embedder = failing()
    use_embedder(app, monkeypatch, embedder)
    app.settings.ingest.commit_every = 3
    docs = tmp_path / "docs"
    write_docs(docs, 4)
    bad = docs / "坏文件.txt"
    bad.write_text("这是一个坏段落，模型处理不了。", encoding="utf-8")
    report = ingest(app, docs)
    if isinstance(embedder, PretokenisingEmbedder):  # the good files' texts came tokenised, also file by file
        assert embedder.ready and all(n == ahead for n, ahead in embedder.ready)
    [failure] = report.failures
    assert failure.path == str(bad.resolve())
    assert failure.reason.startswith("坏文件.txt: the embedding model failed on this file (RuntimeError: CUDA")
    assert "\n" not in failure.reason
    assert report.count("added") == 4
    with app.open_kb("t") as kb:
        assert kb.counts()["files"] == 4 and kb.check() == []

    # a stored file that now fails loses its old version, as when it fails to parse
    bad.write_text("一个好段落。", encoding="utf-8")
    assert ingest(app, docs).count("added") == 1
    bad.write_text("又一个坏段落。", encoding="utf-8")
    again = ingest(app, docs)
    [failure] = again.failures
    assert failure.reason.endswith("its old version was removed from the knowledge base")
    with app.open_kb("t") as kb:
        assert str(bad.resolve()) not in {f.path for f in kb.files()} and kb.check() == []


@pytest.mark.parametrize("kind", [HashingEmbedder, PretokenisingEmbedder], ids=["plain", "tokenised-ahead"])
def test_a_commit_error_stops_every_stage_and_is_raised(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: type[HashingEmbedder]
) -> None:
    import sqlite3

    import knowledge.store as store
    from knowledge.store import StoreError

    use_embedder(app, monkeypatch, kind())
    app.settings.ingest.commit_every = 2
    write_docs(tmp_path / "docs", 8)
    real_put = store.Transaction.put_files
    calls = 0

    def fail_second_checkpoint(self: Any, *args: Any, **kwargs: Any) -> tuple[set[str], int]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(store.Transaction, "put_files", fail_second_checkpoint)
    with pytest.raises(
        StoreError, match=r"database or disk is full, while storing 2 files \(f0[23]\.txt, f0[23]\.txt\)"
    ):
        ingest(app, tmp_path / "docs")
    monkeypatch.undo()
    assert no_pipeline_threads_left()
    with app.open_kb("t", readonly=True) as kb:
        assert kb.counts()["files"] == 2 and kb.check() == []  # the first checkpoint, and nothing of the second
    report = ingest(app, tmp_path / "docs")
    assert (report.failures, report.count("added"), report.count("unchanged")) == ([], 6, 2)


def interrupting_loader(path: Path) -> list[Document]:
    raise KeyboardInterrupt  # Ctrl-C while this file is parsed


class InterruptPlugin:
    @hookimpl
    def register_loaders(self, register: RegisterLoader) -> None:
        register(".stop", interrupting_loader)


@pytest.mark.parametrize("kind", [HashingEmbedder, PretokenisingEmbedder], ids=["plain", "tokenised-ahead"])
def test_ctrl_c_keeps_what_was_committed_and_a_rerun_converges(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: type[HashingEmbedder]
) -> None:
    use_embedder(app, monkeypatch, kind())
    app.plugins.register(InterruptPlugin())
    app.settings.ingest.commit_every = 2
    docs = tmp_path / "docs"
    write_docs(docs, 5)
    (docs / "f02x.stop").write_text("x", encoding="utf-8")  # parsed after f00-f02 (sorted by name)
    with pytest.raises(KeyboardInterrupt):
        ingest(app, docs)
    assert no_pipeline_threads_left()
    with app.open_kb("t", readonly=True) as kb:
        assert kb.check() == []
        interrupted = {Path(f.path).name for f in kb.files()}
    assert interrupted <= {"f00.txt", "f01.txt", "f02.txt"}
    (docs / "f02x.stop").unlink()
    report = ingest(app, docs)
    assert report.failures == [] and report.count("added") + report.count("unchanged") == 5
    with app.open_kb("t", readonly=True) as kb:
        assert kb.check() == [] and kb.counts()["files"] == 5


def test_a_bulk_ingest_writes_the_index_file_once_not_per_checkpoint(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import knowledge.vectors as vectors

    saves: list[str] = []
    real_save = vectors.FaissIndex.save

    def counting_save(self: Any, path: Path) -> None:
        saves.append(path.name)
        real_save(self, path)

    monkeypatch.setattr(vectors.FaissIndex, "save", counting_save)
    app.settings.ingest.commit_every = 1
    write_docs(tmp_path / "docs", 6)
    report = ingest(app, tmp_path / "docs")
    assert report.count("added") == 6
    with app.open_kb("t", readonly=True) as kb:
        generation = kb.manifest.generation
        assert kb.check() == []
    assert generation == 6 and saves == [f"index-{generation}.faiss"]  # six commits, one write at the end
    assert sorted(p.name for p in (app.settings.data_dir / "kb" / "t").glob("index-*")) == saves


# ----- the store: an index file behind the docstore ----------------------------------------------------
class _Crash(Exception):
    pass


def test_readers_bring_an_older_index_file_up_to_date_from_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits in a deferred block, then a crash before the index file is written again: the file on disk
    is two generations old. Readers (and check) add the newer rows and drop the tombstoned ones, including a
    text id that was deleted and given out again; nothing is rebuilt from scratch, nothing unpickled."""
    import pickle

    kb = KnowledgeBase.open(tmp_path / "kb", create=manifest())
    put(kb, "/a.txt", ["长江是中国最长的河流。", "黄河是中国第二长河。", "珠穆朗玛峰是世界最高峰。"])  # ids 1-3
    written = kb.manifest.generation
    with pytest.raises(_Crash), kb.deferred_index(min_interval=3600):
        put(kb, "/a.txt", ["长江是中国最长的河流。", "黄河是中国第二长河。"])  # text 3 deleted: a tombstone
        put(kb, "/b.txt", ["泰山位于山东省中部，是五岳之首。"])  # gets id 3 again
        raise _Crash
    kb.close()
    root = tmp_path / "kb"
    assert [p.name for p in root.glob("index-*")] == [f"index-{written}.faiss"]

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used on a load path")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    rebuilt: list[bool] = []
    real_batches = Docstore.vector_batches

    def recording(self: Docstore, batch: int = 4096, *, since: int | None = None) -> Any:
        rebuilt.append(since is None)
        return real_batches(self, batch, since=since)

    monkeypatch.setattr(Docstore, "vector_batches", recording)
    with KnowledgeBase.open(root, readonly=True) as reader:
        assert reader.manifest.generation == written + 2
        hits = reader.search(EMB.embed_query("泰山位于山东省中部，是五岳之首。"), 5)
        assert [h.chunk.source for h in hits][:1] == ["/b.txt"]
        assert "珠穆朗玛峰是世界最高峰。" not in [h.chunk.text for h in hits]
        assert len(hits) == 3 and reader.check() == []
    assert rebuilt and not any(rebuilt), "the index was rebuilt from every row instead of brought up to date"

    with KnowledgeBase.open(root) as writer:  # the next writer catches up the same way, and writes at the end
        with writer.deferred_index():
            put(writer, "/c.txt", ["西湖在杭州城西。"])
        assert [p.name for p in root.glob("index-*")] == [f"index-{writer.manifest.generation}.faiss"]
        assert writer.check() == []
        assert writer._conn().execute("SELECT COUNT(*) FROM removed_texts").fetchone() == (0,)  # pruned


def test_a_base_from_before_generations_were_tracked_is_read_and_migrated(tmp_path: Path) -> None:
    import sqlite3

    root = tmp_path / "kb"
    with KnowledgeBase.open(root, create=manifest()) as kb:
        put(kb, "/a.txt", ["长江是中国最长的河流。", "黄河是中国第二长河。"])
    conn = sqlite3.connect(root / "docstore.sqlite")
    with conn:  # as the previous version wrote it
        conn.execute("DROP INDEX texts_gen")
        conn.execute("ALTER TABLE texts DROP COLUMN gen")
        conn.execute("DROP TABLE removed_texts")
        conn.execute("DELETE FROM meta WHERE key = 'index_generation'")
    conn.close()
    with KnowledgeBase.open(root, readonly=True) as reader:
        assert reader.search(EMB.embed_query("黄河"), 1)[0].chunk.text == "黄河是中国第二长河。"
        assert reader.check() == []
    with KnowledgeBase.open(root) as kb:
        with kb.deferred_index():
            put(kb, "/a.txt", ["长江是中国最长的河流。"])
            put(kb, "/b.txt", ["泰山是五岳之首。"])
        assert kb.check() == [] and kb.counts() == {"files": 2, "chunks": 2, "vectors": 2}
        assert kb.search(EMB.embed_query("泰山是五岳之首。"), 1)[0].chunk.source == "/b.txt"


def test_files_are_stored_with_many_rows_to_a_statement(tmp_path: Path) -> None:
    """Each statement SQLite steps hands the interpreter lock over (a whole switch interval per step beside a
    busy thread), so a checkpoint's rows go in many to a statement, whatever the number of files. Neighbours
    are linked in the same insert, and texts shared between files of one call are stored once."""
    shared = "各文件共有的一段：长江是中国最长的河流。"
    files = {
        f"/{name}.txt": [f"{name}第{i}段：长江流经{i}个省份。" for i in range(300)]
        + [shared, f"{name}第0段：长江流经0个省份。"]
        for name in ("a", "b", "c")
    }
    with KnowledgeBase.open(tmp_path / "kb", create=manifest()) as kb:
        conn = kb._conn()
        statements: list[str] = []
        batch = [
            (
                FileRecord(path, "x", 1, 1, 0, None, 0.0),
                [NewChunk(t, text_hash(t), page=1, offset=i) for i, t in enumerate(texts)],
            )
            for path, texts in files.items()
        ]
        vectors = {c.text_hash: EMB._one(c.text) for _, chunks in batch for c in chunks}
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.set_trace_callback(statements.append)  # every statement SQLite runs, once per executemany row
            new_ids = Docstore(conn).insert_files(batch, vectors, 1).ids
            conn.set_trace_callback(None)
        assert len(new_ids) == 3 * 300 + 1
        total = len(files) + len(new_ids) + sum(len(texts) for texts in files.values())
        assert len(statements) <= 5 + total // 100, statements[:20]  # executemany: one per row
        for path, texts in files.items():
            rows = conn.execute(
                "SELECT c.id, c.prev_id, c.next_id, t.text FROM chunks c JOIN texts t ON t.id = c.text_id "
                "WHERE path = ? ORDER BY seq",
                (path,),
            ).fetchall()
            assert [r[3] for r in rows] == texts
            assert all(r[1] == (rows[i - 1][0] if i else None) for i, r in enumerate(rows))
            assert all(r[2] == (rows[i + 1][0] if i + 1 < len(rows) else None) for i, r in enumerate(rows))


def test_the_parallel_pipeline_stores_what_a_serial_run_stores(app: Zhiku, tmp_path: Path) -> None:
    """Two parser processes, checkpoints of one file, texts shared across files and checkpoints: the same
    base as a single in-process run, and every shared text embedded once."""
    docs = tmp_path / "docs"
    make_corpus(docs)
    shared = "同一段落在许多文件里出现：长江是中国最长的河流。"
    for i in range(6):
        (docs / f"shared{i}.txt").write_text(f"{shared}\n\n第{i}个文件自己的段落。", encoding="utf-8")
    serial = ingest(app, docs, kb="serial")
    embedder = app.embedder()
    before = embedder.calls  # type: ignore[attr-defined]
    app.settings.ingest.workers = 2
    app.settings.ingest.commit_every = 1
    parallel = ingest(app, docs, kb="parallel")
    assert embedder.calls - before == parallel.new_vectors  # type: ignore[attr-defined]
    assert (parallel.failures, parallel.new_vectors) == ([], serial.new_vectors)
    with app.open_kb("serial") as a, app.open_kb("parallel") as b:
        assert a.counts() == b.counts() and b.check() == []
        assert {f.path: f.chunks for f in a.files()} == {f.path: f.chunks for f in b.files()}


def test_files_are_hashed_as_they_are_parsed_not_all_before_the_first_parse(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parsers start on the first file while the rest are still to be hashed: the last file's hashing
    waits here until a parse has begun, which would never happen if every file were hashed first."""
    files = write_docs(tmp_path / "docs", 4)
    parse_began = threading.Event()
    read_state, parse_file = ingest_module.read_state, ingest_module.parse_file

    def hashing(path: Path, max_bytes: int | None = None) -> Any:
        if Path(path).name == files[-1].name:
            assert parse_began.wait(WAIT_S), "every file was hashed before the first parse"
        return read_state(path, max_bytes)

    def parsing(path: str, *args: Any) -> Any:
        parse_began.set()
        return parse_file(path, *args)

    monkeypatch.setattr(ingest_module, "read_state", hashing)
    monkeypatch.setattr(ingest_module, "parse_file", parsing)  # one parser: in this process
    report = ingest(app, tmp_path / "docs")
    assert (report.count("added"), report.failures) == (4, [])
    assert no_pipeline_threads_left()


def test_an_error_while_hashing_stops_the_run_and_leaves_no_thread(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file's own problem (unreadable, too big) fails that file; anything else is raised, as from any stage."""
    write_docs(tmp_path / "docs", 3)

    def broken(path: Path, max_bytes: int | None = None) -> Any:
        raise RuntimeError("the hash went wrong")

    monkeypatch.setattr(ingest_module, "read_state", broken)
    with pytest.raises(RuntimeError, match="the hash went wrong"):
        ingest(app, tmp_path / "docs")
    assert no_pipeline_threads_left()


def test_the_report_keeps_each_embedding_call_and_commit_but_no_event_per_file(app: Zhiku, tmp_path: Path) -> None:
    write_docs(tmp_path / "docs", 6)
    app.settings.ingest.commit_every = 2
    report = ingest(app, tmp_path / "docs")
    stages = [stage for stage, _, _ in report.events]
    assert stages.count("commit") >= 3 and "embed" in stages and stages.count("parse") == 1
    assert stages[-1] == "index" and all(start <= end for _, start, end in report.events)
    assert report.stages["hash"] > 0 and not {"hash", "send_wait"} & set(stages)  # timed, but no event per file


def test_a_rerun_looks_stored_versions_up_in_blocks_and_handles_each_kind_of_file(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of two files: unchanged, changed, and a file that now fails its hashing (over the size limit) with a
    stored version, which goes, spread over block boundaries."""
    files = write_docs(tmp_path / "docs", 6)
    assert ingest(app, tmp_path / "docs").count("added") == 6
    monkeypatch.setattr(ingest_module, "_HASH_BLOCK", 2)
    files[1].write_text("第一号文件改了：黄河是中国第二长的河流。", encoding="utf-8")
    files[4].write_text("太大了。" * 400, encoding="utf-8")  # 4,800 bytes
    app.settings.ingest.max_file_mb = 2000 / 2**20
    report = ingest(app, tmp_path / "docs")
    outcomes = {Path(o.path).name: o.status for o in report.outcomes}
    assert outcomes == {
        "f00.txt": "unchanged",
        "f01.txt": "updated",
        "f02.txt": "unchanged",
        "f03.txt": "unchanged",
        "f04.txt": "failed",
        "f05.txt": "unchanged",
    }
    [failure] = report.failures
    assert "over ingest.max_file_mb" in failure.reason and failure.reason.endswith(ingest_module._OLD_VERSION_REMOVED)
    with app.open_kb("t", readonly=True) as kb:
        assert sorted(Path(f.path).name for f in kb.files()) == ["f00.txt", "f01.txt", "f02.txt", "f03.txt", "f05.txt"]
        assert kb.check() == []


def test_a_run_stopped_while_files_wait_hashed_leaves_no_thread(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the first parse, while the hashing thread waits for room to hand over the fourth file (two
    fit): the run ends, and so does that thread."""
    files = write_docs(tmp_path / "docs", 8)
    monkeypatch.setattr(ingest_module, "_HASHED_AHEAD", 2)
    fourth_hashed = threading.Event()
    read_state = ingest_module.read_state

    def hashing(path: Path, max_bytes: int | None = None) -> Any:
        state = read_state(path, max_bytes)
        if Path(path).name == files[3].name:
            fourth_hashed.set()
        return state

    def interrupted(path: str, *args: Any) -> Any:
        assert fourth_hashed.wait(WAIT_S)
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_module, "read_state", hashing)
    monkeypatch.setattr(ingest_module, "parse_file", interrupted)  # one parser: in this process
    with pytest.raises(KeyboardInterrupt):
        ingest(app, tmp_path / "docs")
    assert no_pipeline_threads_left()


def test_a_rerun_with_one_changed_file_among_many_parses_it_without_starting_parsers(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parser processes are started for the files that changed, found by hashing, not for every file found:
    none for one file, and never more than there are files to parse."""
    files = write_docs(tmp_path / "docs", 6)
    app.settings.ingest.workers = 4
    started: list[int] = []
    run_in_workers = ingest_module.run_in_workers

    def counting(func: Any, items: Any, *, workers: int, **kwargs: Any) -> Any:
        started.append(workers)
        return run_in_workers(func, items, workers=workers, **kwargs)

    monkeypatch.setattr(ingest_module, "run_in_workers", counting)
    assert ingest(app, tmp_path / "docs").count("added") == 6
    assert started == [4]
    files[2].write_text("第二号文件改了：黄河是中国第二长的河流。", encoding="utf-8")
    report = ingest(app, tmp_path / "docs")
    assert (report.count("updated"), report.count("unchanged")) == (1, 5)
    assert started == [4]  # parsed in this process
    for f in files[:3]:
        f.write_text(f"{f.name}又改了：珠江是中国南方的大河。", encoding="utf-8")
    report = ingest(app, tmp_path / "docs")
    assert (report.count("updated"), report.count("unchanged"), report.failures) == (3, 3, [])
    assert started == [4, 3]


def test_parser_processes_leave_a_quarter_of_the_cores_to_the_ingesting_process() -> None:
    from knowledge.ingest import default_workers

    assert [default_workers(n) for n in (1, 2, 3, 4, 8, 16, 64)] == [1, 2, 3, 3, 6, 12, 48]


def test_the_tokenizers_thread_pool_leaves_a_quarter_of_the_cores_unless_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import common.threads

    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.setattr(common.threads.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(common.threads, "CGROUP_CPU_MAX", tmp_path / "absent")
    common.threads.limit_tokenizer_threads()
    assert os.environ["RAYON_NUM_THREADS"] == "12"
    monkeypatch.setenv("RAYON_NUM_THREADS", "3")  # the user's choice stands
    common.threads.limit_tokenizer_threads()
    assert os.environ["RAYON_NUM_THREADS"] == "3"


@pytest.mark.parametrize(("cpu_max", "cores"), [("max 100000", 16), ("400000 100000", 4), ("150000 100000", 2)])
def test_a_containers_cpu_quota_caps_the_cores_a_pool_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str, cores: int
) -> None:
    import common.threads

    monkeypatch.setattr(common.threads.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    monkeypatch.setattr(common.threads, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert common.threads.usable_cores() == cores
