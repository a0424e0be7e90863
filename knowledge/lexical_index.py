"""The BM25 index of a knowledge base: an SQLite FTS5 table in a file of its own, ``lexical.sqlite``.

It is derived data, kept out of the docstore so that FTS5's indexing (about 40 % of an ingest checkpoint's
commit) runs beside the commits instead of inside them. The docstore stays the source of truth; this file
records the docstore generation it reflects (``meta.generation``): every text of that generation is indexed
under its id, and no other.

- A writer brings it up to date after each of its own commits, from the texts that commit added and removed
  (:meth:`LexicalIndex.apply`); during a bulk ingest in a thread of its own (:meth:`LexicalIndex.background`),
  drained before the ingest returns.
- Whenever it lags otherwise (a crash between the two commits, another process's commit, a base made before
  this file existed) the next writer brings it up from the docstore's rows (:meth:`LexicalIndex.catch_up`).
  Both decide inside the index's own write transaction, so two writing processes never apply a change twice.
- Readers attach it to their docstore connections as ``lexical`` (:func:`attach_for_reading`). While it lags,
  a search misses the newest texts, and may return a text deleted meanwhile, which finds no chunk and is
  dropped.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from knowledge.docstore import (
    DB_NAME,
    WalNeedsWriterError,
    batches,
    connect_reader,
    connect_writer,
    file_signature,
    insert_rows,
    reader_uri,
)

LEXICAL_DB = "lexical.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- rowid = the docstore's texts.id; tokens = knowledge.lexical.fts_document of the heading and text
CREATE VIRTUAL TABLE IF NOT EXISTS texts_fts USING fts5(tokens, tokenize = "unicode61 remove_diacritics 0");
"""
FTS_TABLE = "lexical.texts_fts"  # how docstore queries name the table on an attached connection
# FTS5's automerge: merge this many segments of a level into one of the next as commits add more (its default).
# A bulk ingest sets 0: each commit only adds its segment, and FTS5 still merges a level at 16 (crisismerge)
_AUTOMERGE = 4
_MEMORY_SCHEMA = SCHEMA.replace("IF NOT EXISTS ", "IF NOT EXISTS lexical.")

log = logging.getLogger(__name__)


def attach_for_reading(conn: sqlite3.Connection, root: Path, mode: str) -> bool:
    """Attach the base's BM25 index to a reader's docstore connection as ``lexical``, opened as the docstore
    was (``mode``: "ro" or "immutable"; immutable, it must have no commits waiting in its write-ahead log, as
    the docstore: else WalNeedsWriterError).

    Returns False when a stand-in was attached instead: a base that no writer has opened since this file
    existed keeps the table inside the docstore; a base with neither gets an empty one (BM25 finds nothing)."""
    path = root / LEXICAL_DB
    if path.exists():
        if mode == "immutable" and file_signature(path)[-1]:
            raise WalNeedsWriterError()
        conn.execute("ATTACH DATABASE ? AS lexical", (reader_uri(path, mode),))
        return True
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'texts_fts'").fetchone():
        conn.execute("ATTACH DATABASE ? AS lexical", (reader_uri(root / DB_NAME, mode),))
    else:
        conn.execute("ATTACH DATABASE ':memory:' AS lexical")
        conn.executescript(_MEMORY_SCHEMA)
    return False


def connect_for_reading(root: Path, mode: str) -> tuple[sqlite3.Connection, bool]:
    """A reader's connection to the base's docstore with its BM25 index attached (:func:`attach_for_reading`,
    whose answer comes second); closed again if the attach fails."""
    conn = connect_reader(root / DB_NAME, mode)
    try:
        return conn, attach_for_reading(conn, root, mode)
    except BaseException:
        conn.close()
        raise


_Change = tuple[int, list[tuple[int, str]], list[int]]  # generation, (id, tokens) added, ids removed


class LexicalIndex:
    """The writer's side of ``lexical.sqlite``. Thread-safe: one change at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._conn = connect_writer(root / LEXICAL_DB)
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Change | None] | None = None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # derived data: a commit lost to a power cut is caught up from the docstore
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)
            self._conn.execute("ATTACH DATABASE ? AS doc", (reader_uri(root / DB_NAME, "ro"),))
            if self._automerge() != _AUTOMERGE:  # a bulk ingest that never ended (killed) left it off
                self._try_set_automerge(_AUTOMERGE)
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    # ----- reading ---------------------------------------------------------------------------------
    def generation(self) -> int:
        """The docstore generation this index reflects; -1 for a new file."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else -1

    # ----- bringing it up to date --------------------------------------------------------------
    def apply(self, generation: int, added: Sequence[tuple[int, str]], removed: Sequence[int]) -> None:
        """The docstore committed ``generation``, which added texts (id, tokens) and removed others. In
        :meth:`background` this is queued; else done now."""
        if self._queue is not None:
            self._queue.put((generation, list(added), list(removed)))
            return
        self._apply(generation, added, removed)

    def catch_up(self) -> None:
        """Bring the index to the docstore's newest commit from its rows (nothing to do when it is there)."""
        with self._lock, self._write() as conn:
            self._catch_up(conn)

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """Inside, :meth:`apply` hands changes to a thread of its own; the block's end waits for them. One
        that fails leaves the index lagging, with a warning: the rows are committed, and the next commit or
        open brings it up from them."""
        if self._queue is not None:  # already inside one
            yield
            return
        # no merging while the commits come. This thread (FTS5, ~60 us a text) is often the last to finish an
        # ingest, and merging is ~15 % of its CPU: 26 k texts took a median 1.22 CPU s instead of 1.41 (2-core
        # machine); 15 ingests of 26 k chunks on the H200 box, each paired with one that merged, ended a median
        # 0.13 s sooner, sooner in 11. The segments left are merged as later commits write
        self._try_set_automerge(0)
        changes: queue.Queue[_Change | None] = queue.Queue()
        self._queue = changes
        thread = threading.Thread(target=self._drain, args=(changes,), name="lexical-index", daemon=True)
        thread.start()
        try:
            yield
        finally:
            changes.put(None)
            thread.join()
            self._queue = None
            self._try_set_automerge(_AUTOMERGE)

    def _automerge(self) -> int:
        row = self._conn.execute("SELECT v FROM texts_fts_config WHERE k = 'automerge'").fetchone()
        return _AUTOMERGE if row is None else int(row[0])  # no row: FTS5's default

    def _set_automerge(self, segments: int) -> None:
        with self._lock, self._conn:
            self._conn.execute("INSERT INTO texts_fts(texts_fts, rank) VALUES('automerge', ?)", (segments,))

    def _try_set_automerge(self, segments: int) -> None:
        """A setting for speed only: a failure to write it is logged, and the ingest (or the open) goes on."""
        try:
            self._set_automerge(segments)
        except (sqlite3.Error, OSError) as err:
            log.warning("the BM25 index of %s: could not set automerge to %d (%s)", self.root.name, segments, err)

    def _drain(self, changes: queue.Queue[_Change | None]) -> None:
        warned = False
        while (change := changes.get()) is not None:
            try:
                self._apply(*change)  # after a failure, this catches up from the rows
            except (sqlite3.Error, OSError) as err:
                if not warned:
                    log.warning("the BM25 index of %s lags (%s); the next write brings it up", self.root.name, err)
                warned = True

    def _apply(self, generation: int, added: Sequence[tuple[int, str]], removed: Sequence[int]) -> None:
        with self._lock, self._write() as conn:
            current = self.generation()
            if generation <= current:
                return  # another writer brought it here already
            if current != generation - 1:  # a commit it has not seen: take this one from the rows too
                self._catch_up(conn)
                return
            for part, marks in batches(list(removed)):
                conn.execute(f"DELETE FROM texts_fts WHERE rowid IN ({marks})", part)
            insert_rows(conn, "INSERT INTO texts_fts(rowid, tokens)", added)
            _set_generation(conn, generation)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        with conn:
            conn.execute("BEGIN IMMEDIATE")  # the generation read below is the one this transaction changes
            yield conn

    def _catch_up(self, conn: sqlite3.Connection) -> None:
        target = int(conn.execute("SELECT value FROM doc.meta WHERE key = 'generation'").fetchone()[0])
        current = self.generation()
        if current == target:
            return
        if current < 0 or current > target:  # a new file, or one ahead of its docstore (a restored backup)
            conn.execute("DELETE FROM texts_fts")
            if conn.execute("SELECT 1 FROM doc.sqlite_master WHERE name = 'texts_fts'").fetchone():
                # a base from before this file: its index, written in the rows' own transactions, moves here
                # without tokenising again
                conn.execute("INSERT INTO texts_fts(rowid, tokens) SELECT rowid, tokens FROM doc.texts_fts")
        else:  # texts deleted since, and ids given again since: their rows go
            conn.execute("DELETE FROM texts_fts WHERE rowid NOT IN (SELECT id FROM doc.texts)")
            newer = [r[0] for r in conn.execute("SELECT id FROM doc.texts WHERE gen > ?", (current,))]
            for part, marks in batches(newer):
                conn.execute(f"DELETE FROM texts_fts WHERE rowid IN ({marks})", part)
        # then every text it lacks (all of them in a new file)
        missing = conn.execute(
            "SELECT t.id, COALESCE((SELECT heading FROM doc.chunks c WHERE c.text_id = t.id LIMIT 1), ''), t.text "
            "FROM doc.texts t WHERE t.id NOT IN (SELECT rowid FROM texts_fts)"
        ).fetchall()
        if missing:
            from knowledge.lexical import fts_document  # jieba: only when there is something to tokenise

            log.info("bringing the BM25 index of %s up to date: %d texts", self.root.name, len(missing))
            insert_rows(
                conn,
                "INSERT INTO texts_fts(rowid, tokens)",
                [(i, fts_document(f"{heading}\n{text}" if heading else text)) for i, heading, text in missing],
            )
        _set_generation(conn, target)


def _set_generation(conn: sqlite3.Connection, generation: int) -> None:
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('generation', ?)", (str(generation),))
