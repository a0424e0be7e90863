"""A knowledge base on disk: SQLite docstore + vector index file + JSON manifest. No pickle anywhere.

The docstore (:mod:`knowledge.docstore`) is the source of truth: every vector is a BLOB in its row, tagged
with the generation that added it, and deleted texts leave tombstones. The vector index
(:mod:`knowledge.vectors`) is a cache of those rows, written as the file of one generation (temp file +
rename) and recorded in the docstore. A single transaction writes it after its commit; a bulk ingest
(:meth:`KnowledgeBase.deferred_index`) writes it at most every so many seconds and once at the end, so a
checkpoint's cost does not grow with the whole base (serialising and fsyncing every vector at every
commit did). Whoever needs the index of a newer generation loads the newest file and applies the rows
added and the tombstones left since (read in the same SQLite transaction); only when no file can be used
is the whole index rebuilt from SQLite. Nothing is unpickled. The manifest is a human-readable copy of the
metadata, written atomically with the index file.

Reads go through :meth:`KnowledgeBase.snapshot`: one SQLite read transaction and the vector index of the
generation it sees, so the vectors a search finds and the chunks it returns belong to the same commit, whatever
writers do meanwhile. Writes go through :meth:`KnowledgeBase.transaction`, one writer at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ZhikuError
from common.files import atomic_write_bytes
from knowledge.docstore import (
    DB_NAME,
    FORMAT_VERSION,
    PAGE_SIZE,
    SCHEMA,
    Docstore,
    FileRecord,
    Manifest,
    NewChunk,
    StoredChunk,
    WalNeedsWriterError,
    connect_writer,
    file_signature,
    migrate,
    open_error,
    reader_mode,
)
from knowledge.lexical_index import LEXICAL_DB, LexicalIndex, connect_for_reading
from knowledge.vectors import FaissKind, VectorIndex, VectorIndexError, VectorIndexKind

__all__ = [
    "DB_NAME",
    "MANIFEST_NAME",
    "FileRecord",
    "Hit",
    "KnowledgeBase",
    "Manifest",
    "NewChunk",
    "Snapshot",
    "StoreError",
    "StoredChunk",
    "Transaction",
]

MANIFEST_NAME = "manifest.json"
PREVIOUS_STORE = "previous-store"  # a migrated base's old index files, until `kb migrate --drop-source`
# The vector index kind of a base, from its manifest (each base records its store: faiss, milvus and where)
KindFor = Callable[[Path, Manifest], VectorIndexKind]
_MAX_READERS = 8  # read connections kept per knowledge base (one per concurrent snapshot)
log = logging.getLogger(__name__)
_INDEX_COST_SHARE = 10  # deferred index writes: at least this many times their own duration apart


class StoreError(ZhikuError, RuntimeError):
    """A knowledge base cannot be opened or written; the message says why and what to do."""


@dataclass(frozen=True)
class Hit:
    chunk: StoredChunk
    score: float  # ranking score, higher is better (cosine similarity for plain vector search)
    similarity: float | None = None  # cosine similarity to the question, when known
    text_id: int = -1  # the deduplicated text (and vector) behind the chunk

    @property
    def relevance(self) -> float:
        """What users see as the score: the cosine similarity where known, else the ranking score."""
        return self.similarity if self.similarity is not None else self.score

    def to_json(self) -> dict[str, Any]:
        c = self.chunk
        return {
            "text": c.text,
            "source": c.source,
            "page": c.page,
            # one meaning of "score" everywhere (CLI, JSON, UI): the cosine similarity to the question
            "score": round(self.relevance, 6),
            "similarity": None if self.similarity is None else round(self.similarity, 6),
            "rank_score": round(self.score, 6),
            "chunk_id": c.id,
            "offset": c.offset,
            "heading": c.heading,
            "prev_id": c.prev_id,
            "next_id": c.next_id,
        }


@dataclass
class Snapshot:
    """One committed generation of a knowledge base: every read here sees that commit only. The vector
    index of that generation is loaded on the first vector search only: row reads (an ingest's file
    records and known hashes, counts) never pay for it."""

    docstore: Docstore
    generation: int
    dim: int
    load_index: Callable[[int, Docstore], VectorIndex] = field(repr=False)
    _index: VectorIndex | None = field(default=None, init=False, repr=False)

    @property
    def index(self) -> VectorIndex:
        if self._index is None:
            self._index = self.load_index(self.generation, self.docstore)
        return self._index

    def vector_search(self, query: np.ndarray, k: int, sources: Sequence[str] = ()) -> list[tuple[int, float]]:
        """(text id, cosine similarity) of the k nearest texts; with ``sources`` (paths or globs), of the texts
        of the files they match: the index's own filter where it has one (Milvus), else exact scores of those
        texts' vectors from the docstore."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise StoreError(f"query vector has {q.shape[0]} dimensions, the knowledge base {self.dim}")
        if k <= 0:
            return []
        if not sources:
            return self.index.search(q, k)
        among = self.docstore.text_ids_of_sources(sources)
        search_among = getattr(self.index, "search_among", None)
        found = search_among(q, k, among) if search_among is not None else None
        if found is not None:
            return list(found)
        return sorted(self.similarities(q, among.tolist()).items(), key=lambda s: (-s[1], s[0]))[:k]

    def lexical_search(self, fts_query: str, k: int, sources: Sequence[str] = ()) -> list[tuple[int, float]]:
        return self.docstore.lexical_search(fts_query, k, sources)

    def similarities(self, query: np.ndarray, text_ids: Sequence[int]) -> dict[int, float]:
        """Cosine similarity of the query to given texts (their vectors are in the docstore)."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        return {i: float(v @ q) for i, v in self.docstore.vectors(list(text_ids)).items()}

    def chunks_by_id(self, ids: Sequence[int]) -> dict[int, StoredChunk]:
        return self.docstore.chunks_by_id(ids)

    def hits_for_texts(self, scored: Sequence[tuple[int, float]], sources: Sequence[str] = ()) -> list[Hit]:
        """Hits (the first chunk holding each text, in a file ``sources`` match if given) in the given order,
        with the given scores."""
        if not scored:
            return []
        first = self.docstore.first_chunk_of_texts([i for i, _ in scored], sources)
        chunks = self.chunks_by_id(list(first.values()))
        return [Hit(chunks[first[i]], s, text_id=i) for i, s in scored if i in first and first[i] in chunks]

    def search(self, query: np.ndarray, k: int, sources: Sequence[str] = ()) -> list[Hit]:
        """Top-k chunks by cosine similarity (in the files ``sources`` match, if given); identical texts count
        once."""
        found = self.vector_search(query, k, sources)
        return [replace(h, similarity=h.score) for h in self.hits_for_texts(found, sources)]


class KnowledgeBase:
    """One knowledge base folder. Open with :meth:`open`; read in :meth:`snapshot`, write in
    :meth:`transaction`. Safe to share between threads."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        kind: VectorIndexKind,
        *,
        writer: sqlite3.Connection | None,
        reader_mode: str,
        name: str | None = None,
        kind_for: KindFor | None = None,
    ) -> None:
        self.root = root
        self.name = name or root.name
        self.manifest = manifest
        self._kind_for = kind_for
        self.kind = kind_for(root, manifest) if kind_for else kind
        self._writer = writer  # None: opened read-only
        self._reader_mode = reader_mode
        db = root / DB_NAME
        # the docstore file this object reads: a base deleted or rebuilt under the same name is another file
        self._identity = self._file_identity(db)
        self._opened_at = self._signature() if reader_mode == "immutable" else None
        self._readers: list[sqlite3.Connection] = []
        self._all_readers: list[sqlite3.Connection] = []
        self._stand_in_readers: set[int] = set()  # readers opened before the BM25 index file existed
        self._readers_lock = threading.Lock()
        self._snapshot_index: tuple[int, VectorIndex] | None = None
        self._snapshot_index_lock = threading.Lock()
        self._index: VectorIndex | None = None  # the writer's working index, at self.manifest.generation
        self._schedule: _IndexSchedule | None = None  # set inside deferred_index(): when to write the index file
        self._lexical: LexicalIndex | None = None  # the writer's side of the BM25 index

    # ----- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: Path,
        *,
        create: Manifest | Callable[[], Manifest] | None = None,
        kind: VectorIndexKind | None = None,
        kind_for: KindFor | None = None,
        gpu: str = "auto",
        readonly: bool = False,
        name: str | None = None,
    ) -> KnowledgeBase:
        """Open a knowledge base; with ``create`` a missing one is created with that manifest (or with what
        the callable returns, called only then: making a manifest may load an embedding model). ``kind_for``
        picks the vector index from the base's own manifest (its store); else ``kind``, else flat FAISS."""
        name = name or root.name
        kind = kind or FaissKind(gpu)
        db = root / DB_NAME
        if not db.exists():
            if create is None:
                raise StoreError(f"knowledge base {name!r} does not exist", "create it with `python -m app ingest`")
            cls._create(root, create() if callable(create) else create, name)
        if readonly:
            return cls._open_reader(root, name, kind, kind_for)
        try:
            conn = connect_writer(db)
        except sqlite3.Error as err:
            raise StoreError(open_error(name, db, err)) from err
        kb: KnowledgeBase | None = None
        try:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(SCHEMA)
                migrate(conn)
                meta = Docstore(conn).meta()
                if not meta and create is not None:  # a kill between the tables and the metadata row
                    made = create() if callable(create) else create
                    with conn:
                        Docstore(conn).set_meta([*made.meta_rows(), ("base_id", uuid.uuid4().hex)])
                    meta = Docstore(conn).meta()
            except sqlite3.Error as err:
                raise StoreError(open_error(name, db, err)) from err
            kb = cls(root, _manifest(name, meta), kind, writer=conn, reader_mode="ro", name=name, kind_for=kind_for)
            try:
                with kb._writer_lock():  # another writer's lock clears temp files: never write beside one
                    kb._reload_if_stale()
                    kb._open_lexical()
                    kb._adopt_index_file()
                    kb._write_manifest()
            except (sqlite3.Error, OSError) as err:  # a read-only folder or a full disk: one clear line
                raise StoreError(
                    f"cannot write to knowledge base {name!r} ({err}); what was saved before is intact",
                    f"free disk space, or give the user running Zhiku write access to {root}, then run the same "
                    "command again",
                ) from err
        except BaseException:
            if kb is not None and kb._lexical is not None:
                kb._lexical.close()
            conn.close()  # a failed open must not leak the connection (a server opens bases all day)
            raise
        return kb

    @classmethod
    def _open_reader(cls, root: Path, name: str, kind: VectorIndexKind, kind_for: KindFor | None) -> KnowledgeBase:
        db = root / DB_NAME
        try:
            mode = reader_mode(db)
            conn, full = connect_for_reading(root, mode)
        except WalNeedsWriterError as err:
            raise _wal_needs_writer(name, root) from err
        except sqlite3.Error as err:
            raise StoreError(open_error(name, db, err)) from err
        try:
            try:
                meta = Docstore(conn).meta()
            except sqlite3.Error as err:
                raise StoreError(open_error(name, db, err)) from err
            kb = cls(root, _manifest(name, meta), kind, writer=None, reader_mode=mode, name=name, kind_for=kind_for)
        except BaseException:
            conn.close()
            raise
        kb._all_readers.append(conn)
        kb._readers.append(conn)
        if not full:
            kb._stand_in_readers.add(id(conn))
        return kb

    @classmethod
    def _create(cls, root: Path, manifest: Manifest, name: str) -> None:
        """Build a new knowledge base in a hidden folder of its own and rename it into place: a process
        killed half way leaves no half-made knowledge base behind, and concurrent creators never share a
        folder (the first rename wins, the others find the base made)."""
        building = root.parent / f".creating-{root.name}-{uuid.uuid4().hex[:12]}"
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            building.mkdir()
        except OSError as err:
            raise StoreError(
                f"cannot create knowledge base {name!r} ({err})",
                f"the user running Zhiku needs write access to {root.parent}",
            ) from err
        try:
            conn = connect_writer(building / DB_NAME)
            try:
                conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # only takes before the file's first write
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(SCHEMA)
                migrate(conn)
                with conn:
                    Docstore(conn).set_meta([*manifest.meta_rows(), ("base_id", uuid.uuid4().hex)])
            finally:
                conn.close()
            atomic_write_bytes(
                building / MANIFEST_NAME, _manifest_json(manifest, {"files": 0, "chunks": 0, "vectors": 0})
            )
            _remove_stale_creations(root)
            if root.exists() and not (root / DB_NAME).exists():
                shutil.rmtree(root, ignore_errors=True)  # an empty or unfinished folder of that name
            with contextlib.suppress(OSError):  # another process created it first: use theirs
                building.rename(root)
        except (sqlite3.Error, OSError) as err:
            raise StoreError(f"cannot create knowledge base {name!r}: {err}", "check the disk and permissions") from err
        finally:
            shutil.rmtree(building, ignore_errors=True)
        if not (root / DB_NAME).exists():
            raise StoreError(f"cannot create knowledge base {name!r}", f"check that {root.parent} is writable")

    # ----- identity and staleness ----------------------------------------------------------------
    @staticmethod
    def _file_identity(db: Path) -> tuple[int, int] | None:
        try:
            st = db.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _signature(self) -> tuple[int, ...]:
        """Changes whenever a writer touches the docstore or the BM25 index (or their write-ahead logs)."""
        lexical = self.root / LEXICAL_DB
        return file_signature(self.root / DB_NAME) + (file_signature(lexical) if lexical.exists() else ())

    def replaced(self) -> bool:
        """Whether the base was deleted, or deleted and made again, since this object opened it (its open
        connections keep reading the old file). A reader that sees this must be reopened."""
        current = self._file_identity(self.root / DB_NAME)
        return current is None or current != self._identity

    def is_stale(self) -> bool:
        """Whether this object can no longer answer with the newest commit by itself: the base was replaced,
        or (for a base opened immutable, which never sees new commits) a writer changed it."""
        if self.replaced():
            return True
        if self._opened_at is not None:
            try:
                return self._signature() != self._opened_at
            except OSError:
                return True
        return False

    def check_compatible(self, model_id: str, dim: int) -> None:
        """Vectors of two models never mix: refuse, and say how to fix it."""
        m = self.manifest
        if m.embedding_model != model_id or m.dim != dim:
            raise StoreError(
                f"knowledge base {self.name!r} was built with embedding model {m.embedding_model} ({m.dim}-d), but "
                f"the configured model is {model_id} ({dim}-d)",
                "set embedding.backend/embedding.model to the knowledge base's model, or rebuild it: "
                f"`python -m app kb delete {self.name}` and ingest again",
            )

    # ----- reading -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """A consistent view of the newest commit, held until the block ends. Keep blocks short: a
        long-lived snapshot keeps the write-ahead log from being merged."""
        conn = self._take_reader()
        try:
            conn.execute("BEGIN")
            docstore = Docstore(conn)
            generation = docstore.generation()  # the first read fixes the transaction's snapshot
            if self._kind_for is not None and docstore.store_location() != self._store_location():
                self._adopt(_manifest(self.name, docstore.meta()))  # migrated to another store meanwhile
            yield Snapshot(docstore, generation, self.manifest.dim, self._index_for)
        except sqlite3.Error as err:
            raise StoreError(open_error(self.name, self.root / DB_NAME, err)) from err
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("COMMIT")
            self._give_back(conn)

    def _take_reader(self) -> sqlite3.Connection:
        with self._readers_lock:
            while self._readers:
                conn = self._readers.pop()
                if id(conn) not in self._stand_in_readers or not (self.root / LEXICAL_DB).exists():
                    return conn
                self._forget_reader(conn)  # a writer has made the BM25 index file since: attach that
        try:
            conn, full = connect_for_reading(self.root, self._reader_mode)
        except WalNeedsWriterError as err:
            raise _wal_needs_writer(self.name, self.root) from err
        except sqlite3.Error as err:
            raise StoreError(open_error(self.name, self.root / DB_NAME, err)) from err
        with self._readers_lock:
            self._all_readers.append(conn)
            if not full:
                self._stand_in_readers.add(id(conn))
        return conn

    def _forget_reader(self, conn: sqlite3.Connection) -> None:
        """Close a reader (the caller holds _readers_lock)."""
        self._all_readers.remove(conn)
        self._stand_in_readers.discard(id(conn))
        conn.close()

    def _give_back(self, conn: sqlite3.Connection) -> None:
        with self._readers_lock:
            if len(self._readers) < _MAX_READERS:
                self._readers.append(conn)
                return
            self._forget_reader(conn)

    def _store_location(self) -> tuple[str, str]:
        return (self.manifest.store, self.manifest.store_uri)

    def _adopt(self, manifest: Manifest) -> None:
        """A newer manifest; a base moved to another store (``kb migrate``) uses that store's index from now on."""
        moved = (manifest.store, manifest.store_uri) != self._store_location()
        self.manifest = manifest
        if moved and self._kind_for is not None:
            with self._snapshot_index_lock:
                self.kind = self._kind_for(self.root, manifest)
                self._snapshot_index = None
            self._index = None

    def _index_for(self, generation: int, docstore: Docstore) -> VectorIndex:
        """The vector index of a committed generation: the cached one, its file, or rebuilt from the
        docstore as the snapshot sees it. Snapshots never share the writer's working index, which holds a
        running transaction's vectors before they are committed."""
        with self._snapshot_index_lock:
            cached = self._snapshot_index
            if cached is not None and cached[0] == generation:
                return cached[1]
            index = self._load_index(generation, docstore, writer=False)
            self._snapshot_index = (generation, index)
            return index

    def _load_index(self, generation: int, docstore: Docstore, *, writer: bool) -> VectorIndex:
        """The index of ``generation`` from the files (brought up to date), or rebuilt from every row."""
        index = self._index_from_files(generation, docstore)
        if index is not None and len(index) == docstore.vector_count():
            return index
        kind = self.kind
        shared = getattr(kind, "shared", False)
        if shared and not writer:
            newer = self._newer_shared_index(generation)
            if newer is not None:
                return newer
            # an index in a server (Milvus) is rebuilt by the writer only, which then records it; a reader searches
            # a private flat copy of the rows meanwhile, so two processes never rebuild one collection at once
            kind = FaissKind("off")
        index = kind.create(self.manifest.dim)  # lost, damaged or unusable: the rows have every vector
        for ids, vecs in docstore.vector_batches():
            index.add(ids, vecs)
        if shared and writer:  # recorded at once: readers stop making private copies, a rollback rebuilds nothing
            index.catch_up(generation, [])  # type: ignore[attr-defined]
            self._persist_index(index)
        return index

    def _newer_shared_index(self, generation: int) -> VectorIndex | None:
        """For a reader whose generation's marker a writer has just replaced by a newer one: the shared index,
        seen at the reader's generation through the newer marker. The newer save may have applied removals the
        reader's commit still had (a search may miss those texts, never show an uncommitted one); far cheaper
        than a private copy of every vector."""
        markers = []
        for path in self.root.glob("index-*"):  # the file names: the reader's transaction predates the record
            found = re.match(r"index-(\d+)\.", path.name)
            if found and path.name == self.kind.file_name(int(found.group(1))):
                markers.append((int(found.group(1)), path))
        for file_generation, path in sorted(markers, reverse=True):
            if file_generation <= generation:
                break
            try:
                index = self.kind.load(path)
            except VectorIndexError:
                continue
            index.catch_up(generation, [])  # type: ignore[attr-defined]
            return index
        return None

    def _index_from_files(self, generation: int, docstore: Docstore) -> VectorIndex | None:
        """The index file of ``generation``, else the newest one recorded before it plus what the docstore
        added and removed since (the crash recovery of a deferred write: rows are appended, never
        unpickled). None when neither file can be read."""
        candidates = [generation]
        recorded = docstore.index_generation()
        if recorded is not None and recorded < generation and docstore.tracks_changes():
            candidates.append(recorded)
        for file_generation in candidates:
            try:
                index = self.kind.load(self.root / self.kind.file_name(file_generation))
            except VectorIndexError:
                continue
            if index.dim != self.manifest.dim:
                continue
            catch_up = getattr(index, "catch_up", None)
            if catch_up is not None:  # a shared index holds every committed row: hide what was removed since
                catch_up(generation, docstore.removals_since(file_generation) if file_generation < generation else [])
            elif file_generation < generation:
                # removals first: an id deleted after the file was written may have been given out again
                index.remove(docstore.removed_since(file_generation))
                for ids, vecs in docstore.vector_batches(since=file_generation):
                    index.add(ids, vecs)
            return index
        return None

    def search(self, query: np.ndarray, k: int, sources: Sequence[str] = ()) -> list[Hit]:
        with self.snapshot() as snap:
            return snap.search(query, k, sources)

    def chunks_by_id(self, ids: Sequence[int]) -> dict[int, StoredChunk]:
        with self.snapshot() as snap:
            return snap.chunks_by_id(ids)

    def lexical_search(self, fts_query: str, k: int) -> list[tuple[int, float]]:
        with self.snapshot() as snap:
            return snap.lexical_search(fts_query, k)

    def file_records(self, paths: Sequence[str]) -> dict[str, FileRecord]:
        """The records of those of ``paths`` the base holds, by path (one snapshot, a query per 500 paths)."""
        with self.snapshot() as snap:
            return snap.docstore.file_records(paths)

    def files(self) -> list[FileRecord]:
        with self.snapshot() as snap:
            return snap.docstore.files()

    def counts(self) -> dict[str, int]:
        with self.snapshot() as snap:
            return snap.docstore.counts()

    def known_hashes(self, hashes: Iterable[str]) -> set[str]:
        with self.snapshot() as snap:
            return snap.docstore.known_hashes(hashes)

    def info(self) -> dict[str, Any]:
        """What ``kb info --json`` prints (without the name), from one snapshot."""
        m = self.manifest
        with self.snapshot() as snap:
            counts, files = snap.docstore.counts(), snap.docstore.files()
            updated = float(snap.docstore.meta().get("updated_at", m.updated_at))
        return {
            **counts,
            "embedding_model": m.embedding_model,
            "dim": m.dim,
            "chunk_size": m.chunk_size,
            "chunk_overlap": m.chunk_overlap,
            "format_version": m.format_version,
            "store": m.store,  # faiss | milvus (store_uri: a Milvus server's, empty for Milvus Lite)
            "store_uri": m.store_uri,
            "updated_at": updated,
            "sources": [
                {"path": f.path, "pages": f.pages, "chunks": f.chunks, "sha256": f.sha256, "encoding": f.encoding}
                for f in files
            ],
        }

    def check(self) -> list[str]:
        """Consistency problems (empty list when healthy): every vector has its chunk and vice versa."""
        with self.snapshot() as snap:
            problems = snap.docstore.problems()
            vectors = snap.docstore.counts()["vectors"]
            index = self._index_from_files(snap.generation, snap.docstore)  # a lost file is rebuilt: no problem
            on_disk = None if index is None else len(index)
        if on_disk is not None and on_disk != vectors:
            problems.append(f"index file (brought up to date) holds {on_disk} vectors, docstore {vectors}")
        return problems

    # ----- writing -------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StoreError(f"knowledge base {self.name!r} was opened read-only", "open it for writing")
        return self._writer

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
        """All changes inside are committed together, then the index file and manifest are written (inside
        :meth:`deferred_index`: only when they are due)."""
        self._conn()
        with self._writer_lock():
            self._reload_if_stale()
            yield from self._transaction()

    @contextlib.contextmanager
    def deferred_index(self, min_interval: float = 30.0) -> Iterator[None]:
        """For bulk writes: commits inside write the index file and manifest only every ``min_interval``
        seconds (and never more than a tenth of the time: the interval grows with the write's cost), and
        once more when the block ends without an error. The rows are the source of truth meanwhile:
        readers bring the older file up to date from them, and so does the next writer after a crash. The
        BM25 index is brought up to date by a thread of its own meanwhile, and is whole when the block ends."""
        previous, self._schedule = self._schedule, _IndexSchedule(min_interval)
        lexical = self._lexical.background() if self._lexical is not None else contextlib.nullcontext()
        try:
            with lexical:
                yield
                if self._writer is not None:  # a read-only base has committed nothing here
                    # while the BM25 thread applies the last commits: the two files do not depend on each other
                    self.save_index()
        finally:
            self._schedule = previous

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[Docstore]:
        """The writer lock, held with the newest commit loaded: maintenance that no commit may interleave with
        (``kb migrate``). Ingests of other processes wait; readers go on."""
        conn = self._conn()
        with self._writer_lock():
            self._reload_if_stale()
            yield Docstore(conn)

    def move_to(
        self, store: str, uri: str, kind: VectorIndexKind, index: VectorIndex, previous: dict[str, Any]
    ) -> None:
        """Inside :meth:`exclusive`: make ``index`` (every row of the current generation, in ``kind``) this base's
        index, in a commit of its own, so that every reader and writer, in any process, switches at the same
        generation. The old store's index files move to ``previous-store/``; ``previous`` (what to drop with
        ``kb migrate --drop-source``) is recorded in the same commit."""
        conn = self._conn()
        generation = self.manifest.generation + 1
        catch_up = getattr(index, "catch_up", None)
        if catch_up is not None:
            catch_up(generation, [])
        current = kind.file_name(generation)
        index.save(self.root / current)  # a kill before the commit below leaves the base on its old store
        old_files = [p for p in self.root.glob("index-*") if p.name != current]
        docstore = Docstore(conn)
        with conn:
            docstore.set_meta(
                [
                    ("generation", str(generation)),
                    ("updated_at", str(time.time())),
                    ("store", store),
                    ("store_uri", uri),
                    ("previous_store", json.dumps(previous)),
                ]
            )
            docstore.record_index(generation)
            docstore.delete_meta("migration")
        kept = self.root / PREVIOUS_STORE
        kept.mkdir(exist_ok=True)
        for old in old_files:
            old.replace(kept / old.name)
        self._adopt(_manifest(self.name, docstore.meta()))
        self._lexical_commit()
        self.kind, self._index = kind, index
        self._write_manifest()

    def save_index(self) -> None:
        """Write the index file (and manifest) of the newest commit, unless the recorded one is of it."""
        conn = self._conn()
        with self._writer_lock():
            try:
                self._reload_if_stale()
                generation = self.manifest.generation
                on_disk = (self.root / self.kind.file_name(generation)).exists()
                if on_disk and Docstore(conn).index_generation() == generation:
                    return
                self._write_index_and_manifest(self._working_index())
            except (sqlite3.Error, OSError) as err:
                raise _save_error(self.name, self.root, err) from err

    def _open_lexical(self) -> None:
        """The writer's BM25 index, brought to the newest commit (under the writer lock). A base from before
        the index had a file of its own gets it, and the old table inside the docstore goes."""
        self._lexical = LexicalIndex(self.root)
        self._lexical.catch_up()
        conn = self._conn()
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'texts_fts'").fetchone():
            with conn:
                conn.execute("DROP TABLE texts_fts")

    def _lexical_commit(self, tx: Transaction | None = None) -> None:
        """Hand the commit just made to the BM25 index. If that fails, the rows are committed all the same: the
        index lags, and the next commit or open brings it up from the rows."""
        if self._lexical is None:
            return
        try:
            if tx is None:
                self._lexical.apply(self.manifest.generation, [], [])
            else:
                self._lexical.apply(self.manifest.generation, tx.lexical_added, tx.lexical_removed)
        except (sqlite3.Error, OSError) as err:
            log.warning("knowledge base %r: the BM25 index lags (%s); the next write brings it up", self.name, err)

    def _adopt_index_file(self) -> None:
        """A base written before index files were recorded: its file of the current generation is the one."""
        docstore = Docstore(self._conn())
        generation = self.manifest.generation
        if docstore.index_generation() is None and (self.root / self.kind.file_name(generation)).exists():
            with self._conn():
                docstore.record_index(generation)

    def _reload_if_stale(self) -> None:
        docstore = Docstore(self._conn())
        if docstore.generation() != self.manifest.generation:  # another process committed since we loaded
            self._adopt(_manifest(self.name, docstore.meta()))
            self._index = None

    def _working_index(self) -> VectorIndex:
        if self._index is None:
            self._index = self._load_index(self.manifest.generation, Docstore(self._conn()), writer=True)
        return self._index

    def _transaction(self) -> Iterator[Transaction]:
        try:
            yield from self._transaction_unguarded()
        except (sqlite3.Error, OSError) as err:  # disk full, read-only folder, ...: one clear line
            raise _save_error(self.name, self.root, err) from err

    def _transaction_unguarded(self) -> Iterator[Transaction]:
        conn = self._conn()
        index = self._working_index()
        tx = Transaction(Docstore(conn), index, self.manifest.generation + 1)
        begin = getattr(index, "begin", None)  # a shared index tags what it adds, and purges a crashed one's rows
        try:
            if begin is not None:
                begin(tx.generation)
            with conn:  # one SQLite transaction: commit on success, roll back on error
                conn.execute("BEGIN IMMEDIATE")
                yield tx
                tx.drop_unused_texts()
                if tx.changed:
                    generation = self.manifest.generation + 1
                    Docstore(conn).set_meta([("generation", str(generation)), ("updated_at", str(time.time()))])
        except BaseException:
            self._index = None  # the working index may hold uncommitted changes: reload it
            raise
        if tx.changed:
            self.manifest = _manifest(self.name, Docstore(conn).meta())
            self._lexical_commit(tx)
            if self._schedule is None or self._schedule.due():
                self._write_index_and_manifest(index)
        elif begin is not None:
            index.catch_up(self.manifest.generation, [])  # type: ignore[attr-defined]  # nothing was committed

    def _write_index_and_manifest(self, index: VectorIndex) -> None:
        started = time.monotonic()
        try:
            self._persist_index(index)  # if this fails, readers bring the older file up to date from SQLite
        finally:
            self._write_manifest()  # the manifest follows the committed docstore either way
            if self._schedule is not None:
                self._schedule.wrote(time.monotonic() - started)

    def _persist_index(self, index: VectorIndex) -> None:
        generation = self.manifest.generation
        current = self.kind.file_name(generation)
        index.save(self.root / current)
        conn = self._conn()
        with conn:  # recorded only once the file is whole; older files are removed only after that
            Docstore(conn).record_index(generation)
        discard = getattr(self.kind, "discard", None)  # a shared store also drops what only older files used
        for old in self.root.glob("index-*"):
            if old.name != current:
                if discard is not None:
                    discard(old, keep=self.root / current)
                else:
                    old.unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        counts = Docstore(self._conn()).counts()
        data = _manifest_json(self.manifest, counts, self.kind.file_name(self.manifest.generation))
        atomic_write_bytes(self.root / MANIFEST_NAME, data)

    def close(self) -> None:
        with self._readers_lock:
            readers, self._all_readers, self._readers = self._all_readers, [], []
        for conn in readers:
            conn.close()
        if self._lexical is not None:
            self._lexical.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _IndexSchedule:
    """When a deferred index write is due: ``min_interval`` seconds after the last one, and at least
    _INDEX_COST_SHARE times as long as that write took (a base large enough to take seconds to write is
    written less often)."""

    min_interval: float
    last: float = field(default_factory=time.monotonic)
    cost: float = 0.0

    def due(self) -> bool:
        return time.monotonic() - self.last >= max(self.min_interval, _INDEX_COST_SHARE * self.cost)

    def wrote(self, seconds: float) -> None:
        self.last, self.cost = time.monotonic(), seconds


def _wal_needs_writer(name: str, root: Path) -> StoreError:
    return StoreError(
        f"knowledge base {name!r} has commits in a write-ahead log ({DB_NAME}-wal or {LEXICAL_DB}-wal) that only a "
        f"process with write access to {root} can read",
        f"open it once as its owner (e.g. `python -m app kb check {name}`), or give this user write access",
    )


def _save_error(name: str, root: Path, err: Exception) -> StoreError:
    return StoreError(
        f"could not save knowledge base {name!r} ({err}); what was saved before is intact",
        f"free disk space, or give the user running Zhiku write access to {root}, then run the same command again",
    )


class Transaction:
    """Changes to one knowledge base, applied by :meth:`KnowledgeBase.transaction`; ``generation`` is the
    one it commits."""

    def __init__(self, docstore: Docstore, index: VectorIndex, generation: int = 0) -> None:
        self._docstore = docstore
        self._index = index
        self.generation = generation
        self.changed = False
        self._maybe_unused: set[int] = set()  # texts whose chunks were removed: dropped at the end if unused
        self.lexical_added: list[tuple[int, str]] = []  # for the BM25 index, after the commit
        self.lexical_removed: list[int] = []

    def remove_file(self, path: str) -> int:
        """Drop a file's chunks; the vectors no other chunk uses go at the end of the transaction. Returns
        the chunks removed."""
        return self._remove_files([path])

    def _remove_files(self, paths: Sequence[str]) -> int:
        self._maybe_unused.update(self._docstore.text_ids_of_files(paths))
        self.changed = True
        return self._docstore.delete_files(paths)

    def drop_unused_texts(self) -> None:
        """Delete the texts (and vectors) that lost their last chunk in this transaction. Only at the end:
        a file rewritten with some paragraphs kept, or a paragraph moving to another file of the same
        batch, reuses the stored text and vector (the caller did not embed them again)."""
        unused = self._docstore.delete_unused_texts(self._maybe_unused, self.generation)
        self._maybe_unused.clear()
        if unused:
            self._index.remove(np.asarray(unused, dtype=np.int64))
            self.lexical_removed += unused

    def put_file(self, record: FileRecord, chunks: Sequence[NewChunk], vectors: dict[str, np.ndarray]) -> int:
        """Store a file's chunks in order (replacing any old version). ``vectors`` holds one vector per text
        hash that the knowledge base does not have yet. Returns the number of new vectors."""
        return self.put_files([(record, chunks)], vectors)[1]

    def put_files(
        self, files: Sequence[tuple[FileRecord, Sequence[NewChunk]]], vectors: dict[str, np.ndarray]
    ) -> tuple[set[str], int]:
        """:meth:`put_file` for several files at once, in a few statements whatever their number. Returns the
        paths the base held a version of, and the number of new vectors."""
        paths = [record.path for record, _ in files]
        if len(set(paths)) < len(paths):
            raise ValueError("a file given twice to put_files: store its versions in separate calls")
        held = set(self._docstore.file_records(paths))
        if held:
            self._remove_files(sorted(held))
        new = self._docstore.insert_files(files, vectors, self.generation)
        if new.ids:
            self._index.add(np.asarray(new.ids, dtype=np.int64), np.vstack(new.vectors))
            self.lexical_added += new.lexical
        self.changed = True
        return held, len(new.ids)


def _manifest(name: str, meta: dict[str, str]) -> Manifest:
    if not meta:
        raise StoreError(
            f"knowledge base {name!r} has no metadata", f"delete it (`python -m app kb delete {name}`) and ingest again"
        )
    manifest = Manifest.from_meta(meta)
    if manifest.format_version != FORMAT_VERSION:
        raise StoreError(
            f"knowledge base {name!r} has format version {manifest.format_version}; this Zhiku reads version "
            f"{FORMAT_VERSION}",
            f"rebuild it: `python -m app kb delete {name}` and ingest again",
        )
    return manifest


def _manifest_json(manifest: Manifest, counts: dict[str, int], index_file: str | None = None) -> bytes:
    data: dict[str, Any] = {**asdict(manifest), **counts}
    if index_file:
        data["index_file"] = index_file
    return json.dumps(data, indent=1, ensure_ascii=False).encode()


def _remove_stale_creations(root: Path) -> None:
    """Hidden folders that killed creators of this base left behind (a live creator renames its folder
    within moments; one older than an hour is dead)."""
    cutoff = time.time() - 3600
    for stale in root.parent.glob(f".creating-{root.name}-*"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
