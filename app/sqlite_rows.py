"""One SQLite transaction per call, for the app's small stores (conversations, ingest jobs)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import ZhikuError


@contextmanager
def transaction(path: Path, schema: str, error: type[ZhikuError], damaged_fix: str) -> Iterator[sqlite3.Connection]:
    """A connection to ``path`` (created with ``schema`` if new) inside one write transaction, committed when
    the block ends and rolled back if it raises. Opened in autocommit mode with the transaction begun by
    hand (``BEGIN IMMEDIATE``): the legacy mode begins one only at the first write, so a read-then-write
    could interleave with another writer. SQLite's errors become ``error`` with what to do."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    except (OSError, sqlite3.Error) as err:
        raise error(
            f"cannot open {path} ({err})", f"give the user running Zhiku write access to {path.parent}"
        ) from err
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(schema)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as err:
        raise error(f"{path.name}: {err}", damaged_fix) from err
    finally:
        conn.close()
