"""A knowledge base on disk: FAISS index file + SQLite docstore + JSON manifest. No pickle anywhere.

SQLite is the source of truth: file records, chunk rows, the deduplicated texts and their vectors, and a
``generation`` counter all change in one transaction, so a crash leaves either the old or the new state.
The FAISS index is written after the commit as ``index-<generation>.faiss`` (temp file + rename); if a
crash lost it, the index is rebuilt from the vectors in SQLite on the next open. The manifest is a
human-readable copy of the metadata, also written atomically.

FAISS types never leave this module, so another vector store can implement the same methods.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
DB_NAME = "docstore.sqlite"
MANIFEST_NAME = "manifest.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files(
    path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, pages INTEGER NOT NULL,
    chunks INTEGER NOT NULL, encoding TEXT, ingested_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS texts(
    id INTEGER PRIMARY KEY, hash TEXT NOT NULL UNIQUE, text TEXT NOT NULL, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, seq INTEGER NOT NULL, page INTEGER, offset INTEGER NOT NULL,
    heading TEXT NOT NULL, text_id INTEGER NOT NULL, prev_id INTEGER, next_id INTEGER);
CREATE INDEX IF NOT EXISTS chunks_path ON chunks(path);
CREATE INDEX IF NOT EXISTS chunks_text ON chunks(text_id);
-- BM25 index over the same texts (rowid = texts.id), updated in the same transactions: never out of sync
CREATE VIRTUAL TABLE IF NOT EXISTS texts_fts USING fts5(tokens, tokenize = "unicode61 remove_diacritics 0");
"""


class StoreError(RuntimeError):
    """A knowledge base cannot be opened or written; the message says why and what to do."""


@dataclass(frozen=True)
class Manifest:
    embedding_model: str
    dim: int
    chunk_size: int
    chunk_overlap: int
    format_version: int = FORMAT_VERSION
    generation: int = 0
    files: int = 0
    chunks: int = 0
    vectors: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> Manifest:
        return cls(
            embedding_model=meta["embedding_model"],
            dim=int(meta["dim"]),
            chunk_size=int(meta["chunk_size"]),
            chunk_overlap=int(meta["chunk_overlap"]),
            format_version=int(meta["format_version"]),
            generation=int(meta.get("generation", "0")),
            created_at=float(meta.get("created_at", "0")),
            updated_at=float(meta.get("updated_at", "0")),
        )


@dataclass(frozen=True)
class FileRecord:
    path: str
    sha256: str
    size: int
    pages: int
    chunks: int
    encoding: str | None
    ingested_at: float


@dataclass(frozen=True)
class NewChunk:
    """A chunk about to be stored. ``text_hash`` identifies the embedded text for deduplication."""

    text: str
    text_hash: str
    page: int | None
    offset: int
    heading: str = ""
    tokens: str = ""  # space-separated search tokens (knowledge.lexical.fts_document of the embedded text)


@dataclass(frozen=True)
class StoredChunk:
    id: int
    text: str
    source: str
    page: int | None
    offset: int
    heading: str
    prev_id: int | None
    next_id: int | None


@dataclass(frozen=True)
class Hit:
    chunk: StoredChunk
    score: float  # ranking score, higher is better (cosine similarity for plain vector search)
    similarity: float | None = None  # cosine similarity to the question, when known
    text_id: int = -1  # the deduplicated text (and vector) behind the chunk

    def to_json(self) -> dict[str, Any]:
        c = self.chunk
        return {
            "text": c.text,
            "source": c.source,
            "page": c.page,
            "score": round(self.score, 6),
            "similarity": None if self.similarity is None else round(self.similarity, 6),
            "chunk_id": c.id,
            "offset": c.offset,
            "heading": c.heading,
            "prev_id": c.prev_id,
            "next_id": c.next_id,
        }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old or the new file."""
    import secrets

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # mode 0666 here, so the kernel applies the umask (and default ACLs) as for the docstore; mkstemp's
    # fixed 0600 would hide the index of a shared knowledge base from the users who may read its docstore
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _batches(values: Sequence[Any]) -> Iterator[tuple[list[Any], str]]:
    """Slices of at most 500 values, each with its "?,?,..." placeholders: SQLite limits the variables
    one statement may bind."""
    for start in range(0, len(values), 500):
        part = list(values[start : start + 500])
        yield part, ",".join("?" * len(part))


def _sqlite_code(err: sqlite3.Error) -> int | None:
    """The primary SQLite result code of an error (extended codes carry it in their low byte)."""
    code = getattr(err, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


_NO_ACCESS = {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH}


def _open_error(name: str, db: Path, err: sqlite3.Error) -> str:
    """What to tell the user when the docstore cannot be opened: the advice depends on why."""
    code = _sqlite_code(err)
    if code in _NO_ACCESS:
        return (
            f"knowledge base {name!r}: cannot open {db.name} ({err}). The user running Zhiku needs write access "
            f"to the folder {db.parent} (SQLite keeps its journal next to the file); fix that, then run the "
            "same command again."
        )
    if code in {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}:
        return f"knowledge base {name!r} is locked by another process ({err}); run the command again later."
    if code in {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}:
        return (
            f"knowledge base {name!r}: {db.name} is damaged ({err}). Rebuild it: `python -m app kb delete "
            f"{name}` and ingest again."
        )
    return f"knowledge base {name!r}: cannot open {db.name} ({err}); check the disk, then run the command again."


def _file_signature(db: Path) -> tuple[int, ...]:
    """Changes whenever a writer touches the database or its write-ahead log."""
    main = db.stat()
    try:
        wal_size = db.with_name(db.name + "-wal").stat().st_size
    except FileNotFoundError:  # no log, or the last writer just merged and removed it
        wal_size = 0
    return (main.st_ino, main.st_size, main.st_mtime_ns, wal_size)


def _connect_readonly(db: Path, name: str) -> tuple[sqlite3.Connection, tuple[int, ...] | None]:
    """A read-only connection, and for an immutable one the file signature it was opened at.

    In WAL mode even a reader must create the shared-memory file next to the database, which fails in a
    folder this user cannot write to (a shared or mounted knowledge base). There the database is opened as
    immutable, which skips locking and never reads the write-ahead log: only when no log holds commits,
    and the signature lets :meth:`FaissKnowledgeBase.is_stale` notice a writer (the caller then reopens).
    """
    uri = db.resolve().as_uri()  # percent-encodes '?' and '#' in the data dir's path
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn, None
    except sqlite3.OperationalError as err:
        conn.close()
        if _sqlite_code(err) not in _NO_ACCESS or os.access(db.parent, os.W_OK):
            raise
        signature = _file_signature(db)
        if signature[-1]:
            raise StoreError(
                f"knowledge base {name!r} has commits in {db.name}-wal that only a process with write access "
                f"to {db.parent} can read; open it once as its owner (e.g. `python -m app kb check {name}`), or "
                "give this user write access."
            ) from err
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False), signature


def _faiss() -> Any:
    import faiss  # lazily: importing faiss costs time and is not needed to list knowledge bases

    return faiss


class FaissKnowledgeBase:
    """One knowledge base folder. Open with :meth:`open`; write inside :meth:`transaction`."""

    def __init__(
        self,
        root: Path,
        conn: sqlite3.Connection,
        manifest: Manifest,
        gpu: str = "auto",
        immutable_at: tuple[int, ...] | None = None,
    ) -> None:
        self.root = root
        self._conn = conn
        self.manifest = manifest
        self._gpu = gpu
        self._immutable_at = immutable_at  # set when opened immutable: SQLite then cannot see new commits
        self._index: Any = None
        self._search_index: Any = None

    # ----- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: Path,
        *,
        create: Manifest | Callable[[], Manifest] | None = None,
        gpu: str = "auto",
        readonly: bool = False,
        _in_place: bool = False,
        _name: str | None = None,
    ) -> FaissKnowledgeBase:
        """Open a knowledge base; with ``create`` a missing one is created with that manifest (or with what
        the callable returns, called only then: making a manifest may load an embedding model)."""
        name = _name or root.name  # a base being created lives in a hidden folder; messages use its name
        db = root / DB_NAME
        if not db.exists():
            if create is None:
                raise StoreError(f"knowledge base {name!r} does not exist; create it with `ingest`")
            if _in_place:
                root.mkdir(parents=True, exist_ok=True)
            else:
                cls._create(root, create() if callable(create) else create, gpu)
        immutable_at = None
        try:
            if readonly:
                conn, immutable_at = _connect_readonly(db, name)
            else:
                conn = sqlite3.connect(db, check_same_thread=False, timeout=60)
        except sqlite3.Error as err:
            raise StoreError(_open_error(name, db, err)) from err
        try:
            try:
                if not readonly:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=FULL")
                    conn.executescript(_SCHEMA)
                has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'")
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if has_meta.fetchone() else {}
            except sqlite3.Error as err:
                raise StoreError(_open_error(name, db, err)) from err
            if not meta:
                if create is None:
                    raise StoreError(f"knowledge base {name!r} has no metadata; delete it and ingest again")
                made = create() if callable(create) else create
                with conn:
                    conn.executemany(
                        "INSERT INTO meta(key, value) VALUES(?, ?)",
                        [(k, str(v)) for k, v in asdict(made).items() if k not in {"files", "chunks", "vectors"}],
                    )
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            manifest = Manifest.from_meta(meta)
            if manifest.format_version != FORMAT_VERSION:
                raise StoreError(
                    f"knowledge base {name!r} has format version {manifest.format_version}; this Zhiku reads "
                    f"version {FORMAT_VERSION}. Rebuild it: `python -m app kb delete {name}` and ingest again."
                )
            kb = cls(root, conn, manifest, gpu, immutable_at)
            if not readonly:
                try:
                    with kb._writer_lock():  # another writer's lock clears temp files: never write beside one
                        kb._reload_if_stale()
                        kb._backfill_lexical_index()
                        kb._write_manifest()
                except (sqlite3.Error, OSError) as err:  # a read-only folder or a full disk: one clear line
                    raise StoreError(
                        f"cannot write to knowledge base {name!r} ({err}); what was saved before is intact. Free "
                        f"disk space, or give the user running Zhiku write access to {root}, then run the same "
                        "command again."
                    ) from err
        except BaseException:
            conn.close()  # a failed open must not leak the connection (a server opens bases all day)
            raise
        return kb

    @classmethod
    def _create(cls, root: Path, manifest: Manifest, gpu: str) -> None:
        """Build a new knowledge base in a hidden folder and rename it into place: a process killed half
        way leaves no half-made knowledge base behind, only a hidden folder the next creation replaces."""
        import shutil

        building = root.parent / f".creating-{root.name}"
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir()
        except OSError as err:
            raise StoreError(
                f"cannot create knowledge base {root.name!r} ({err}); the user running Zhiku needs write access "
                f"to {root.parent}."
            ) from err
        cls.open(building, create=manifest, gpu=gpu, _in_place=True, _name=root.name).close()
        try:
            if root.exists() and not (root / DB_NAME).exists():
                shutil.rmtree(root)  # an empty or unfinished folder of that name: nothing to keep
            building.rename(root)
        except OSError as err:  # another process created it first, or the folder cannot be changed
            shutil.rmtree(building, ignore_errors=True)
            if not (root / DB_NAME).exists():
                raise StoreError(f"cannot create knowledge base {root.name!r}: {err}") from err

    def _backfill_lexical_index(self) -> None:
        """Knowledge bases written before the BM25 index existed get it on their first writable open."""
        one = self._conn.execute
        if one("SELECT COUNT(*) FROM texts_fts").fetchone()[0] == one("SELECT COUNT(*) FROM texts").fetchone()[0]:
            return
        from knowledge.lexical import fts_document

        rows = one(
            "SELECT t.id, COALESCE((SELECT heading FROM chunks c WHERE c.text_id = t.id LIMIT 1), ''), t.text "
            "FROM texts t WHERE t.id NOT IN (SELECT rowid FROM texts_fts)"
        ).fetchall()
        with self._conn:
            self._conn.executemany(
                "INSERT INTO texts_fts(rowid, tokens) VALUES(?, ?)",
                [(i, fts_document(f"{heading}\n{text}" if heading else text)) for i, heading, text in rows],
            )

    def is_stale(self) -> bool:
        """Whether another process committed a newer generation since this one was opened."""
        if self._immutable_at is not None:  # SQLite would go on serving the old pages: look at the files
            try:
                return _file_signature(self.root / DB_NAME) != self._immutable_at
            except OSError:
                return True
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return row is not None and int(row[0]) != self.manifest.generation

    def check_compatible(self, model_id: str, dim: int) -> None:
        """Vectors of two models never mix: refuse, and say how to fix it."""
        m = self.manifest
        if m.embedding_model != model_id or m.dim != dim:
            raise StoreError(
                f"knowledge base {self.root.name!r} was built with embedding model {m.embedding_model} "
                f"({m.dim}-d), but the configured model is {model_id} ({dim}-d). Set embedding.backend/"
                f"embedding.model to the knowledge base's model, or rebuild it: "
                f"`python -m app kb delete {self.root.name}` and ingest again."
            )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> FaissKnowledgeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- reading -------------------------------------------------------------------------------
    def file_record(self, path: str) -> FileRecord | None:
        row = self._conn.execute(
            "SELECT path, sha256, size, pages, chunks, encoding, ingested_at FROM files WHERE path = ?",
            (path,),
        ).fetchone()
        return FileRecord(*row) if row else None

    def files(self) -> list[FileRecord]:
        rows = self._conn.execute(
            "SELECT path, sha256, size, pages, chunks, encoding, ingested_at FROM files ORDER BY path"
        ).fetchall()
        return [FileRecord(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        one = self._conn.execute
        return {
            "files": one("SELECT COUNT(*) FROM files").fetchone()[0],
            "chunks": one("SELECT COUNT(*) FROM chunks").fetchone()[0],
            "vectors": one("SELECT COUNT(*) FROM texts").fetchone()[0],
        }

    def known_hashes(self, hashes: Iterable[str]) -> set[str]:
        found: set[str] = set()
        for part, marks in _batches(list(set(hashes))):
            found.update(r[0] for r in self._conn.execute(f"SELECT hash FROM texts WHERE hash IN ({marks})", part))
        return found

    def chunks_by_id(self, ids: Sequence[int]) -> dict[int, StoredChunk]:
        out: dict[int, StoredChunk] = {}
        for part, marks in _batches(ids):
            for row in self._conn.execute(
                "SELECT c.id, t.text, c.path, c.page, c.offset, c.heading, c.prev_id, c.next_id "
                f"FROM chunks c JOIN texts t ON t.id = c.text_id WHERE c.id IN ({marks})",
                part,
            ):
                out[row[0]] = StoredChunk(*row)
        return out

    def _first_chunk_of_texts(self, text_ids: Sequence[int]) -> dict[int, int]:
        """text id -> the first chunk that holds it (identical chunks share one text and one vector)."""
        marks = ",".join("?" * len(text_ids))
        rows = self._conn.execute(
            f"SELECT text_id, MIN(id) FROM chunks WHERE text_id IN ({marks}) GROUP BY text_id", list(text_ids)
        ).fetchall()
        return dict(rows)

    # ----- the vector index ----------------------------------------------------------------------
    def _index_path(self, generation: int) -> Path:
        return self.root / f"index-{generation}.faiss"

    def _load_index(self) -> Any:
        if self._index is not None:
            return self._index
        faiss = _faiss()
        path = self._index_path(self.manifest.generation)
        expected = self._conn.execute("SELECT COUNT(*) FROM texts").fetchone()[0]
        index = None
        if path.exists():
            with contextlib.suppress(RuntimeError):  # a damaged file is rebuilt below
                index = faiss.read_index(str(path))
            if index is not None and (index.ntotal != expected or index.d != self.manifest.dim):
                index = None
        if index is None:  # lost or stale (crash between commit and index write): rebuild from SQLite
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.manifest.dim))
            for ids, vecs in self._vector_batches():
                index.add_with_ids(vecs, ids)
        self._index = index
        self._search_index = None
        return index

    def _vector_batches(self, batch: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cur = self._conn.execute("SELECT id, vector FROM texts ORDER BY id")
        while rows := cur.fetchmany(batch):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            yield ids, vecs

    def _searcher(self) -> Any:
        if self._search_index is None:
            index = self._load_index()
            faiss = _faiss()
            gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
            if self._gpu == "on" and gpus == 0:
                raise StoreError("store.gpu is 'on' but faiss sees no GPU; install faiss-gpu or set store.gpu: auto")
            if self._gpu != "off" and gpus > 0 and index.ntotal > 0:
                index = faiss.index_cpu_to_all_gpus(index)
            self._search_index = index
        return self._search_index

    def vector_search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(text id, cosine similarity) of the k nearest texts."""
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.manifest.dim:
            raise StoreError(f"query vector has {q.shape[1]} dimensions, the knowledge base {self.manifest.dim}")
        index = self._searcher()
        if index.ntotal == 0 or k <= 0:
            return []
        scores, ids = index.search(q, min(k, index.ntotal))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def lexical_search(self, fts_query: str, k: int) -> list[tuple[int, float]]:
        """(text id, BM25 score, higher is better) of the k best texts for an FTS5 query."""
        if not fts_query or k <= 0:
            return []
        rows = self._conn.execute(
            "SELECT rowid, -bm25(texts_fts) FROM texts_fts WHERE texts_fts MATCH ? ORDER BY bm25(texts_fts) LIMIT ?",
            (fts_query, k),
        ).fetchall()
        return [(int(r[0]), float(r[1])) for r in rows]

    def similarities(self, query: np.ndarray, text_ids: Sequence[int]) -> dict[int, float]:
        """Cosine similarity of the query to given texts (their vectors are in the docstore)."""
        if not text_ids:
            return {}
        marks = ",".join("?" * len(text_ids))
        rows = self._conn.execute(f"SELECT id, vector FROM texts WHERE id IN ({marks})", list(text_ids)).fetchall()
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        return {int(i): float(np.frombuffer(v, dtype=np.float32) @ q) for i, v in rows}

    def hits_for_texts(self, scored: Sequence[tuple[int, float]]) -> list[Hit]:
        """Hits (the first chunk holding each text) in the given order, with the given scores."""
        if not scored:
            return []
        first = self._first_chunk_of_texts([i for i, _ in scored])
        chunks = self.chunks_by_id(list(first.values()))
        return [Hit(chunks[first[i]], s, text_id=i) for i, s in scored if i in first and first[i] in chunks]

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        """Top-k chunks by cosine similarity; identical texts count once."""
        return [replace(h, similarity=h.score) for h in self.hits_for_texts(self.vector_search(query, k))]

    # ----- writing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """One writer at a time per knowledge base, from the SQLite commit to the index file on disk.

        Holding it, no other process is writing a temp file here, so stale ones (a writer killed while
        writing the index or manifest) can be removed safely.
        """
        import fcntl

        with (self.root / "write.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
            for stale in self.root.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
            yield

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """All changes inside are committed together, then the index file and manifest are written."""
        with self._writer_lock():
            self._reload_if_stale()
            yield from self._transaction()

    def _reload_if_stale(self) -> None:
        if self.is_stale():  # another process committed since we loaded: start from its state
            self.manifest = Manifest.from_meta(dict(self._conn.execute("SELECT key, value FROM meta").fetchall()))
            self._index = self._search_index = None

    def _transaction(self) -> Iterator[Transaction]:
        try:
            yield from self._transaction_unguarded()
        except (sqlite3.Error, OSError) as err:  # disk full, read-only folder, ...: one clear line
            raise StoreError(
                f"could not save knowledge base {self.root.name!r} ({err}); what was saved before is intact. "
                f"Free disk space, or give the user running Zhiku write access to {self.root}, then run the same "
                "command again."
            ) from err

    def _transaction_unguarded(self) -> Iterator[Transaction]:
        index = self._load_index()
        tx = Transaction(self, index)
        try:
            with self._conn:  # one SQLite transaction: commit on success, roll back on error
                self._conn.execute("BEGIN IMMEDIATE")
                yield tx
                tx.drop_unused_texts()
                if tx.changed:
                    generation = self.manifest.generation + 1
                    now = time.time()
                    self._conn.executemany(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)",
                        [("generation", str(generation)), ("updated_at", str(now))],
                    )
        except BaseException:
            self._index = None  # the in-memory index may hold uncommitted changes: reload it
            self._search_index = None
            raise
        if tx.changed:
            self.manifest = Manifest.from_meta(dict(self._conn.execute("SELECT key, value FROM meta").fetchall()))
            self._search_index = None
            try:
                self._persist_index(index)  # if this fails, the next open rebuilds the index from SQLite
            finally:
                self._write_manifest()  # the manifest follows the committed docstore either way

    def _persist_index(self, index: Any) -> None:
        faiss = _faiss()
        data = faiss.serialize_index(index).tobytes()
        atomic_write_bytes(self._index_path(self.manifest.generation), data)
        for old in self.root.glob("index-*.faiss"):
            if old.name != self._index_path(self.manifest.generation).name:
                old.unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        data = {
            **asdict(self.manifest),
            **self.counts(),
            "index_file": self._index_path(self.manifest.generation).name,
        }
        atomic_write_bytes(self.root / MANIFEST_NAME, json.dumps(data, indent=1, ensure_ascii=False).encode())

    def check(self) -> list[str]:
        """Consistency problems (empty list when healthy): every vector has its chunk and vice versa."""
        problems: list[str] = []
        one = self._conn.execute
        orphan_chunks = one("SELECT COUNT(*) FROM chunks WHERE text_id NOT IN (SELECT id FROM texts)").fetchone()[0]
        orphan_texts = one("SELECT COUNT(*) FROM texts WHERE id NOT IN (SELECT text_id FROM chunks)").fetchone()[0]
        bad_counts = one(
            "SELECT COUNT(*) FROM files f WHERE chunks != (SELECT COUNT(*) FROM chunks c WHERE c.path = f.path)"
        ).fetchone()[0]
        stray = one("SELECT COUNT(*) FROM chunks WHERE path NOT IN (SELECT path FROM files)").fetchone()[0]
        if orphan_chunks:
            problems.append(f"{orphan_chunks} chunks have no vector")
        if orphan_texts:
            problems.append(f"{orphan_texts} vectors have no chunk")
        if bad_counts:
            problems.append(f"{bad_counts} files record a wrong chunk count")
        if stray:
            problems.append(f"{stray} chunks belong to no file")
        fts = one("SELECT COUNT(*) FROM texts_fts").fetchone()[0]
        if fts != self.counts()["vectors"]:
            problems.append(f"BM25 index holds {fts} texts, docstore {self.counts()['vectors']}")
        index = self._load_index()
        if index.ntotal != self.counts()["vectors"]:
            problems.append(f"index holds {index.ntotal} vectors, docstore {self.counts()['vectors']}")
        return problems


class Transaction:
    """Changes to one knowledge base, applied by :meth:`FaissKnowledgeBase.transaction`."""

    def __init__(self, kb: FaissKnowledgeBase, index: Any) -> None:
        self._kb = kb
        self._conn = kb._conn
        self._index = index
        self.changed = False
        self._maybe_unused: set[int] = set()  # texts whose chunks were removed: dropped at the end if unused

    def remove_file(self, path: str) -> int:
        """Drop a file's chunks; the vectors no other chunk uses go at the end of the transaction. Returns
        the chunks removed."""
        self._maybe_unused.update(
            r[0] for r in self._conn.execute("SELECT DISTINCT text_id FROM chunks WHERE path = ?", (path,))
        )
        removed = self._conn.execute("DELETE FROM chunks WHERE path = ?", (path,)).rowcount
        self._conn.execute("DELETE FROM files WHERE path = ?", (path,))
        self.changed = True
        return removed

    def drop_unused_texts(self) -> None:
        """Delete the texts (and vectors) that lost their last chunk in this transaction. Only at the end:
        a file rewritten with some paragraphs kept, or a paragraph moving to another file of the same
        batch, reuses the stored text and vector (the caller did not embed them again)."""
        candidates = sorted(self._maybe_unused)
        self._maybe_unused.clear()
        unused: list[int] = []
        for part, marks in _batches(candidates):
            unused += [
                r[0]
                for r in self._conn.execute(
                    f"SELECT id FROM texts WHERE id IN ({marks}) AND id NOT IN (SELECT text_id FROM chunks)", part
                )
            ]
        for part, marks in _batches(unused):
            self._conn.execute(f"DELETE FROM texts WHERE id IN ({marks})", part)
            self._conn.execute(f"DELETE FROM texts_fts WHERE rowid IN ({marks})", part)
        if unused:
            self._index.remove_ids(np.asarray(unused, dtype=np.int64))

    def put_file(
        self,
        record: FileRecord,
        chunks: Sequence[NewChunk],
        vectors: dict[str, np.ndarray],
    ) -> int:
        """Store a file's chunks in order (replacing any old version). ``vectors`` holds one vector per text
        hash that the knowledge base does not have yet. Returns the number of new vectors."""
        self.remove_file(record.path)
        self._conn.execute(
            "INSERT INTO files(path, sha256, size, pages, chunks, encoding, ingested_at) VALUES(?,?,?,?,?,?,?)",
            (
                record.path,
                record.sha256,
                record.size,
                record.pages,
                len(chunks),
                record.encoding,
                record.ingested_at,
            ),
        )
        text_ids: dict[str, int] = {}
        new_ids: list[int] = []
        new_vecs: list[np.ndarray] = []
        for c in chunks:
            if c.text_hash in text_ids:
                continue
            row = self._conn.execute("SELECT id FROM texts WHERE hash = ?", (c.text_hash,)).fetchone()
            if row is None:
                if c.text_hash not in vectors:  # a caller bug, or texts another writer removed meanwhile
                    raise KeyError(f"no vector for the new text {c.text_hash} of {record.path}")
                vec = np.ascontiguousarray(vectors[c.text_hash], dtype=np.float32)
                cur = self._conn.execute(
                    "INSERT INTO texts(hash, text, vector) VALUES(?, ?, ?)",
                    (c.text_hash, c.text, vec.tobytes()),
                )
                assert cur.lastrowid is not None
                self._conn.execute("INSERT INTO texts_fts(rowid, tokens) VALUES(?, ?)", (cur.lastrowid, c.tokens))
                text_ids[c.text_hash] = cur.lastrowid
                new_ids.append(cur.lastrowid)
                new_vecs.append(vec)
            else:
                text_ids[c.text_hash] = row[0]
        chunk_ids: list[int] = []
        for seq, c in enumerate(chunks):
            cur = self._conn.execute(
                "INSERT INTO chunks(path, seq, page, offset, heading, text_id) VALUES(?,?,?,?,?,?)",
                (record.path, seq, c.page, c.offset, c.heading, text_ids[c.text_hash]),
            )
            assert cur.lastrowid is not None
            chunk_ids.append(cur.lastrowid)
        # neighbours within the file, so retrieval can widen a hit without re-reading the document
        self._conn.executemany(
            "UPDATE chunks SET prev_id = ?, next_id = ? WHERE id = ?",
            [
                (chunk_ids[i - 1] if i else None, chunk_ids[i + 1] if i + 1 < len(chunk_ids) else None, cid)
                for i, cid in enumerate(chunk_ids)
            ],
        )
        if new_ids:
            self._index.add_with_ids(np.vstack(new_vecs), np.asarray(new_ids, dtype=np.int64))
        self.changed = True
        return len(new_ids)
