"""The SQLite docstore of a knowledge base: the source of truth.

File records, chunk rows, the deduplicated texts with their vectors and a ``generation`` counter change in one
transaction, so a crash leaves either the old or the new state. The BM25 index over those texts is a file of its
own, brought up to date from these rows (:mod:`knowledge.lexical_index`); reader connections attach it as
``lexical``. A :class:`Docstore` reads and writes through one connection; inside a read transaction (what
``KnowledgeBase.snapshot`` opens) every read sees the same commit.

Each text row records the generation that added it, and each deleted text leaves a tombstone with the
generation that deleted it: a vector index file written at generation ``g`` is brought to any later
generation by removing the tombstoned ids and adding the texts newer than ``g`` (:meth:`Docstore.changes_since`),
so the index file need not be rewritten at every commit. Tombstones older than the newest index file are
pruned when that file is recorded (``index_generation`` in ``meta``).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FORMAT_VERSION = 1
DB_NAME = "docstore.sqlite"
# A new docstore's page size. A text's row (a chunk of 400-500 characters and its 768-d vector, about 4.3 KB) does
# not fit SQLite's default 4 KiB page and spills into an overflow page of its own; a 32 KiB page holds seven. On the
# 2-core machine (bench/commit.py: 25,920 chunks, checkpoints of 64 files) 45-50 us a chunk with 4 KiB pages, 30-38
# with 32 KiB (16 KiB: 39-45, and a larger file), and the same file size. Set before the first table is made; a
# base made before keeps its pages.
PAGE_SIZE = 32768

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files(
    path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, pages INTEGER NOT NULL,
    chunks INTEGER NOT NULL, encoding TEXT, ingested_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS texts(
    id INTEGER PRIMARY KEY, hash TEXT NOT NULL UNIQUE, text TEXT NOT NULL, vector BLOB NOT NULL,
    gen INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, seq INTEGER NOT NULL, page INTEGER, offset INTEGER NOT NULL,
    heading TEXT NOT NULL, text_id INTEGER NOT NULL, prev_id INTEGER, next_id INTEGER);
CREATE INDEX IF NOT EXISTS chunks_path ON chunks(path);
CREATE INDEX IF NOT EXISTS chunks_text ON chunks(text_id);
-- texts deleted since the newest vector index file: what a reader removes from that file's vectors
CREATE TABLE IF NOT EXISTS removed_texts(id INTEGER NOT NULL, gen INTEGER NOT NULL);
"""

# meta keys that are not manifest fields: counts are computed, not stored
_COUNTED = {"files", "chunks", "vectors"}
INDEX_GENERATION = "index_generation"  # meta key: the generation of the newest vector index file written


def _sources_clause(sources: Sequence[str]) -> tuple[str, list[str]]:
    """An SQL condition on chunks.path: it equals or GLOB-matches one of ``sources`` (none: no condition)."""
    if not sources:
        return "", []
    return " AND (" + " OR ".join("path GLOB ?" for _ in sources) + ")", list(sources)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a docstore made by an older version up to :data:`SCHEMA` (idempotent; after SCHEMA ran).

    Texts stored before generations were tracked get generation 0: the index file of their time holds
    them, and a reader that cannot bring a file up to date rebuilds from the rows anyway.
    """
    columns = {r[1] for r in conn.execute("PRAGMA table_info(texts)")}
    with conn:
        if "gen" not in columns:
            conn.execute("ALTER TABLE texts ADD COLUMN gen INTEGER NOT NULL DEFAULT 0")
        conn.execute("CREATE INDEX IF NOT EXISTS texts_gen ON texts(gen)")


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
    store: str = "faiss"  # the vector store that holds this base's index: faiss | milvus
    store_uri: str = ""  # milvus: a server's URI; empty: Milvus Lite in the base's folder
    base_id: str = ""  # set when the base is created; names its collections in a shared store

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
            store=meta.get("store", "faiss"),  # bases made before Milvus was a choice are FAISS ones
            store_uri=meta.get("store_uri", ""),
            base_id=meta.get("base_id", ""),
        )

    def meta_rows(self) -> list[tuple[str, str]]:
        return [(k, str(v)) for k, v in asdict(self).items() if k not in _COUNTED and (k != "base_id" or v)]


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


class Inserted(NamedTuple):
    """The texts a file added: ids, vectors (for the vector index), (id, search tokens) for the BM25 index."""

    ids: list[int]
    vectors: list[np.ndarray]
    lexical: list[tuple[int, str]]


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


def batches(values: Sequence[Any]) -> Iterator[tuple[list[Any], str]]:
    """Slices of at most 500 values, each with its "?,?,..." placeholders: SQLite limits the variables
    one statement may bind."""
    for start in range(0, len(values), 500):
        part = list(values[start : start + 500])
        yield part, ",".join("?" * len(part))


# a FileRecord's columns, in its order
_SELECT_FILES = "SELECT path, sha256, size, pages, chunks, encoding, ingested_at FROM files"

# the fewest variables a statement may bind in any SQLite build (the default before 3.32)
_MAX_VARIABLES = 999


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]]) -> None:
    """``head`` (``INSERT INTO t(a, b)``) with ``rows``, as many rows to a statement as SQLite binds.

    Not ``executemany``: it steps SQLite once per row, and every step hands the interpreter lock to the other
    threads and then waits to take it back. Beside a busy thread that wait is a whole switch interval (5 ms)
    per row: on the 2-core machine, 14,000 rows of 768-d vectors took 120 s beside one busy Python thread, and
    0.6 s alone; about 1 s this way. In an ingest the commit and BM25 threads run beside the parsers' reader and
    the embedder.
    """
    if not rows:
        return
    width = len(rows[0])
    if not width or any(len(row) != width for row in rows):  # flattened, they would shift into other columns
        raise ValueError(f"rows for {head!r} must all have the same number of values, at least one")
    per = max(_MAX_VARIABLES // width, 1)
    one = f"({','.join('?' * width)})"
    for start in range(0, len(rows), per):
        part = rows[start : start + per]
        conn.execute(f"{head} VALUES {','.join([one] * len(part))}", [v for row in part for v in row])


# ----- connections ---------------------------------------------------------------------------------
def sqlite_code(err: sqlite3.Error) -> int | None:
    """The primary SQLite result code of an error (extended codes carry it in their low byte)."""
    code = getattr(err, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


NO_ACCESS = {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH}


def open_error(name: str, db: Path, err: sqlite3.Error) -> str:
    """What to tell the user when the docstore cannot be opened: the advice depends on why."""
    code = sqlite_code(err)
    if code in NO_ACCESS:
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


def file_signature(db: Path) -> tuple[int, ...]:
    """Changes whenever a writer touches the database or its write-ahead log."""
    main = db.stat()
    try:
        wal_size = db.with_name(db.name + "-wal").stat().st_size
    except FileNotFoundError:  # no log, or the last writer just merged and removed it
        wal_size = 0
    return (main.st_ino, main.st_size, main.st_mtime_ns, wal_size)


class WalNeedsWriterError(Exception):
    """A read-only folder whose docstore has commits only a writer can merge (see :func:`reader_mode`)."""


def reader_mode(db: Path) -> str:
    """``"ro"`` normally; ``"immutable"`` where this user cannot write the folder.

    In WAL mode even a reader must create the shared-memory file next to the database, which fails in a
    folder this user cannot write to (a shared or mounted knowledge base). There the database is opened as
    immutable, which skips locking and never reads the write-ahead log: only when no log holds commits
    (else WalNeedsWriterError); the file signature then tells when a writer changed it.
    """
    conn = connect_reader(db, "ro")
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return "ro"
    except sqlite3.OperationalError as err:
        if sqlite_code(err) not in NO_ACCESS or os.access(db.parent, os.W_OK):
            raise
        if file_signature(db)[-1]:
            raise WalNeedsWriterError() from err
        return "immutable"
    finally:
        conn.close()


def reader_uri(db: Path, mode: str) -> str:
    """The URI that opens ``db`` for reading in ``mode`` ("ro" or "immutable", see :func:`reader_mode`)."""
    uri = db.resolve().as_uri()  # percent-encodes '?' and '#' in the data dir's path
    return f"{uri}?{'mode=ro' if mode == 'ro' else 'immutable=1'}"


def connect_reader(db: Path, mode: str) -> sqlite3.Connection:
    # isolation_level=None: transactions are begun explicitly (snapshots)
    return sqlite3.connect(reader_uri(db, mode), uri=True, check_same_thread=False, isolation_level=None)


def connect_writer(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, check_same_thread=False, timeout=60)


# ----- reading and writing rows -------------------------------------------------------------------
class Docstore:
    """Rows of one knowledge base over one SQLite connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # ----- reading -------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        has_meta = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'")
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall()) if has_meta.fetchone() else {}

    def generation(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def file_records(self, paths: Sequence[str]) -> dict[str, FileRecord]:
        """The records of those of ``paths`` the base holds, by path."""
        found: dict[str, FileRecord] = {}
        for part, marks in batches(paths):
            rows = self.conn.execute(f"{_SELECT_FILES} WHERE path IN ({marks})", part)
            found.update((r[0], FileRecord(*r)) for r in rows)
        return found

    def files(self) -> list[FileRecord]:
        rows = self.conn.execute(f"{_SELECT_FILES} ORDER BY path").fetchall()
        return [FileRecord(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        one = self.conn.execute
        return {
            "files": one("SELECT COUNT(*) FROM files").fetchone()[0],
            "chunks": one("SELECT COUNT(*) FROM chunks").fetchone()[0],
            "vectors": one("SELECT COUNT(*) FROM texts").fetchone()[0],
        }

    def known_hashes(self, hashes: Iterable[str]) -> set[str]:
        found: set[str] = set()
        for part, marks in batches(list(set(hashes))):
            found.update(r[0] for r in self.conn.execute(f"SELECT hash FROM texts WHERE hash IN ({marks})", part))
        return found

    def chunks_by_id(self, ids: Sequence[int]) -> dict[int, StoredChunk]:
        out: dict[int, StoredChunk] = {}
        for part, marks in batches(ids):
            for row in self.conn.execute(
                "SELECT c.id, t.text, c.path, c.page, c.offset, c.heading, c.prev_id, c.next_id "
                f"FROM chunks c JOIN texts t ON t.id = c.text_id WHERE c.id IN ({marks})",
                part,
            ):
                out[row[0]] = StoredChunk(*row)
        return out

    def first_chunk_of_texts(self, text_ids: Sequence[int], sources: Sequence[str] = ()) -> dict[int, int]:
        """text id -> the first chunk that holds it (identical chunks share one text and one vector); with
        ``sources``, the first in a file they match."""
        where, args = _sources_clause(sources)
        out: dict[int, int] = {}
        for part, marks in batches(text_ids):
            out.update(
                self.conn.execute(
                    f"SELECT text_id, MIN(id) FROM chunks WHERE text_id IN ({marks}){where} GROUP BY text_id",
                    [*part, *args],
                ).fetchall()
            )
        return out

    def text_ids_of_sources(self, sources: Sequence[str]) -> np.ndarray:
        """The texts of the files whose stored path matches one of ``sources`` (a path or a glob: ``*`` ``?``
        ``[...]``, e.g. ``*/laws/*`` or ``*.pdf``)."""
        where, args = _sources_clause(sources)
        rows = self.conn.execute(f"SELECT DISTINCT text_id FROM chunks WHERE 1{where}", args).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def lexical_search(self, fts_query: str, k: int, sources: Sequence[str] = ()) -> list[tuple[int, float]]:
        """(text id, BM25 score, higher is better) of the k best texts for an FTS5 query (with ``sources``:
        among the texts of the files they match)."""
        if not fts_query or k <= 0:
            return []
        where, args = _sources_clause(sources)
        among = f" AND rowid IN (SELECT text_id FROM chunks WHERE 1{where})" if sources else ""
        rows = self.conn.execute(
            f"SELECT rowid, -bm25(texts_fts) FROM lexical.texts_fts WHERE texts_fts MATCH ?{among} "
            "ORDER BY bm25(texts_fts) LIMIT ?",
            (fts_query, *args, k),
        ).fetchall()
        return [(int(r[0]), float(r[1])) for r in rows]

    def vectors(self, text_ids: Sequence[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for part, marks in batches(text_ids):
            for i, v in self.conn.execute(f"SELECT id, vector FROM texts WHERE id IN ({marks})", part):
                out[int(i)] = np.frombuffer(v, dtype=np.float32)
        return out

    def vector_batches(
        self, batch: int = 4096, *, since: int | None = None, after_id: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of every text, of those added after generation ``since``, or of those with an id
        above ``after_id`` (in id order: a copy that stopped half way goes on from its last id)."""
        if after_id is not None:
            cur = self.conn.execute("SELECT id, vector FROM texts WHERE id > ? ORDER BY id", (after_id,))
        elif since is None:
            cur = self.conn.execute("SELECT id, vector FROM texts ORDER BY id")
        else:
            cur = self.conn.execute("SELECT id, vector FROM texts WHERE gen > ? ORDER BY id", (since,))
        while rows := cur.fetchmany(batch):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            yield ids, vecs

    def vector_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM texts").fetchone()[0])

    def store_location(self) -> tuple[str, str]:
        """(store, store_uri) as committed: a reader notices a base migrated to another store."""
        rows = dict(self.conn.execute("SELECT key, value FROM meta WHERE key IN ('store', 'store_uri')").fetchall())
        return (rows.get("store", "faiss"), rows.get("store_uri", ""))

    def index_generation(self) -> int | None:
        """The generation of the newest vector index file recorded, if any."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (INDEX_GENERATION,)).fetchone()
        return int(row[0]) if row else None

    def tracks_changes(self) -> bool:
        """Whether texts carry their generation (a docstore not yet migrated, read read-only, does not)."""
        columns = {r[1] for r in self.conn.execute("PRAGMA table_info(texts)")}
        has_tombstones = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'removed_texts'"
        ).fetchone()
        return "gen" in columns and has_tombstones is not None

    def removals_since(self, generation: int) -> list[tuple[int, int]]:
        """(text id, generation that removed it) of the texts deleted after ``generation``."""
        rows = self.conn.execute("SELECT DISTINCT id, gen FROM removed_texts WHERE gen > ?", (generation,))
        return [(int(i), int(g)) for i, g in rows]

    def removed_since(self, generation: int) -> np.ndarray:
        """Ids of the texts deleted after ``generation`` (some may have been added again since)."""
        rows = self.conn.execute("SELECT DISTINCT id FROM removed_texts WHERE gen > ?", (generation,)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def problems(self) -> list[str]:
        """Row-level consistency problems: every vector has its chunk and vice versa, counts match."""
        one = self.conn.execute
        checks = [
            ("SELECT COUNT(*) FROM chunks WHERE text_id NOT IN (SELECT id FROM texts)", "chunks have no vector"),
            ("SELECT COUNT(*) FROM texts WHERE id NOT IN (SELECT text_id FROM chunks)", "vectors have no chunk"),
            (
                "SELECT COUNT(*) FROM files f WHERE chunks != (SELECT COUNT(*) FROM chunks c WHERE c.path = f.path)",
                "files record a wrong chunk count",
            ),
            ("SELECT COUNT(*) FROM chunks WHERE path NOT IN (SELECT path FROM files)", "chunks belong to no file"),
        ]
        problems = [f"{n} {what}" for sql, what in checks if (n := one(sql).fetchone()[0])]
        lexical = one("SELECT value FROM lexical.meta WHERE key = 'generation'").fetchone()
        if lexical is not None and int(lexical[0]) == self.generation():  # a lagging one is caught up, not wrong
            fts, vectors = one("SELECT COUNT(*) FROM lexical.texts_fts").fetchone()[0], self.counts()["vectors"]
            if fts != vectors:
                problems.append(f"BM25 index holds {fts} texts, docstore {vectors}")
        return problems

    # ----- writing (inside the caller's transaction) --------------------------------------------
    def text_ids_of_files(self, paths: Sequence[str]) -> set[int]:
        ids: set[int] = set()
        for part, marks in batches(paths):
            ids.update(r[0] for r in self.conn.execute(f"SELECT text_id FROM chunks WHERE path IN ({marks})", part))
        return ids

    def delete_files(self, paths: Sequence[str]) -> int:
        """Delete files' records and chunks; returns the chunks removed."""
        removed = 0
        for part, marks in batches(paths):
            removed += int(self.conn.execute(f"DELETE FROM chunks WHERE path IN ({marks})", part).rowcount)
            self.conn.execute(f"DELETE FROM files WHERE path IN ({marks})", part)
        return removed

    def delete_unused_texts(self, candidates: Iterable[int], generation: int = 0) -> list[int]:
        """Delete those of the given texts that no chunk uses any more, leaving a tombstone of
        ``generation`` for each (for readers of an older index file); returns their ids."""
        unused: list[int] = []
        for part, marks in batches(sorted(set(candidates))):
            unused += [
                r[0]
                for r in self.conn.execute(
                    f"SELECT id FROM texts WHERE id IN ({marks}) AND id NOT IN (SELECT text_id FROM chunks)", part
                )
            ]
        for part, marks in batches(unused):
            self.conn.execute(f"DELETE FROM texts WHERE id IN ({marks})", part)
        insert_rows(self.conn, "INSERT INTO removed_texts(id, gen)", [(i, generation) for i in unused])
        return unused

    def text_ids_by_hash(self, hashes: Iterable[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for part, marks in batches(list(set(hashes))):
            found.update(self.conn.execute(f"SELECT hash, id FROM texts WHERE hash IN ({marks})", part).fetchall())
        return found

    def _next_id(self, table: str) -> int:
        return int(self.conn.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {table}").fetchone()[0])

    def insert_files(
        self,
        files: Sequence[tuple[FileRecord, Sequence[NewChunk]]],
        vectors: dict[str, np.ndarray],
        generation: int = 0,
    ) -> Inserted:
        """Store files' records and chunks in order (none of the paths may be stored already); texts the base
        does not have yet are added with their vector from ``vectors`` (by text hash), marked as added in
        ``generation``. Returns the new texts' ids, vectors and search tokens.

        Ids are given here (the writer holds the lock, so MAX(id) + 1 is free), which lets every table take
        the rows of all the files in a few statements (:func:`insert_rows`), and the neighbour links go in with
        the chunks: the statements do not grow with the files or their chunks.
        """
        insert_rows(
            self.conn,
            "INSERT INTO files(path, sha256, size, pages, chunks, encoding, ingested_at)",
            [(r.path, r.sha256, r.size, r.pages, len(chunks), r.encoding, r.ingested_at) for r, chunks in files],
        )
        text_ids = self.text_ids_by_hash(c.text_hash for _, chunks in files for c in chunks)
        next_text = self._next_id("texts")
        new_ids: list[int] = []
        new_vecs: list[np.ndarray] = []
        text_rows: list[tuple[int, str, str, bytes, int]] = []
        lexical: list[tuple[int, str]] = []
        for record, chunks in files:
            for c in chunks:
                if c.text_hash in text_ids:
                    continue
                if c.text_hash not in vectors:  # a caller bug, or texts another writer removed meanwhile
                    raise KeyError(f"no vector for the new text {c.text_hash} of {record.path}")
                vec = np.ascontiguousarray(vectors[c.text_hash], dtype=np.float32)
                text_id = next_text + len(new_ids)
                text_rows.append((text_id, c.text_hash, c.text, vec.tobytes(), generation))
                lexical.append((text_id, c.tokens))
                text_ids[c.text_hash] = text_id
                new_ids.append(text_id)
                new_vecs.append(vec)
        insert_rows(self.conn, "INSERT INTO texts(id, hash, text, vector, gen)", text_rows)
        chunk_rows: list[tuple[Any, ...]] = []
        first = self._next_id("chunks")
        for record, chunks in files:
            last = first + len(chunks) - 1
            # neighbours within the file, so retrieval can widen a hit without re-reading the document
            chunk_rows += [
                (
                    first + seq,
                    record.path,
                    seq,
                    c.page,
                    c.offset,
                    c.heading,
                    text_ids[c.text_hash],
                    first + seq - 1 if seq else None,
                    first + seq + 1 if first + seq < last else None,
                )
                for seq, c in enumerate(chunks)
            ]
            first = last + 1
        insert_rows(
            self.conn, "INSERT INTO chunks(id, path, seq, page, offset, heading, text_id, prev_id, next_id)", chunk_rows
        )
        return Inserted(new_ids, new_vecs, lexical)

    def record_index(self, generation: int) -> None:
        """The vector index file of ``generation`` is on disk: readers start from it, and the tombstones it
        already reflects are no longer needed (a reader of an older file has its own read transaction)."""
        self.set_meta([(INDEX_GENERATION, str(generation))])
        self.conn.execute("DELETE FROM removed_texts WHERE gen <= ?", (generation,))

    def delete_meta(self, key: str) -> None:
        self.conn.execute("DELETE FROM meta WHERE key = ?", (key,))

    def sample_text_ids(self, n: int, seed: int = 0) -> list[int]:
        """Up to ``n`` text ids spread over the whole base (every k-th by id; reproducible)."""
        total = self.vector_count()
        step = max(total // max(n, 1), 1)
        rows = self.conn.execute(
            "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS r FROM texts) WHERE (r + ?) % ? = 0 LIMIT ?",
            (seed, step, n),
        )
        return [int(r[0]) for r in rows]

    def set_meta(self, rows: Iterable[tuple[str, str]]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", list(rows))
