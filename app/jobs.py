"""Background ingests of uploaded files, with per-file progress kept in SQLite so that a reload, another tab
or a later visit sees them (``<data_dir>/jobs.sqlite3``).

A job copies its files at once (the request's temp files do not outlive it), then ingests them in a thread
of its own through :class:`app.services.IngestService`, the service the CLI uses; one job runs at a time per
process, the others wait their turn. Each file's outcome is written when the ingest reports it. A job that a
server stop cut short is marked ``interrupted`` at the next start: the knowledge base itself is crash-safe
(an ingest commits whole files), so running it again picks up what is missing.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.services import IngestService
from app.sqlite_rows import transaction
from common.errors import ZhikuError
from knowledge.ingest import FileOutcome

log = logging.getLogger(__name__)

FILE_NAME = "jobs.sqlite3"
State = Literal["queued", "running", "done", "failed", "interrupted"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    kb TEXT NOT NULL,
    state TEXT NOT NULL,
    files TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, started);
"""


class JobError(ZhikuError, ValueError):
    """A job that cannot be started or found."""


class UnknownJob(JobError):
    """No such job (or another user's)."""


@dataclass(frozen=True)
class Job:
    id: str
    kb: str
    state: State
    files: list[
        dict[str, Any]
    ]  # {"file", "status": waiting|added|updated|unchanged|failed|refused, "chunks", "reason"}
    error: str
    started: float
    finished: float | None

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    @property
    def done_files(self) -> int:
        return sum(1 for f in self.files if f["status"] != "waiting")


class IngestJobs:
    def __init__(self, data_dir: Path | str, ingest: IngestService) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._ingest = ingest
        self._turn = threading.Lock()  # one ingest at a time: they would only queue on the base's lock
        with self._db() as db:  # jobs a stopped server left running
            db.execute(
                "UPDATE jobs SET state = 'interrupted', finished = ? WHERE state IN ('queued', 'running')",
                (time.time(),),
            )

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        # one writer at a time: _record reads then writes a job's files
        return transaction(self.path, _SCHEMA, JobError, f"move {self.path} aside")

    def start(self, owner: str, kb: str, files: Sequence[str | Path]) -> Job:
        """Copy the uploads and ingest them in the background; the job as it starts."""
        if not files:
            raise JobError("no files to ingest", "choose one or more files first")
        copied, refused = self._ingest.stage(kb, files)
        return self._launch(owner, kb, copied, refused)

    def start_reingest(self, owner: str, kb: str, paths: Sequence[str | Path]) -> Job:
        """Ingest a base's own files again, where they are: changed ones are updated, unchanged ones kept,
        and a file that is gone is reported as failed (its chunks stay until it is removed)."""
        if not paths:
            raise JobError(f"knowledge base {kb!r} has no files to ingest again")
        return self._launch(owner, kb, [Path(p) for p in paths], [])

    def _launch(self, owner: str, kb: str, paths: list[Path], refused: list[tuple[str, str]]) -> Job:
        rows = [{"file": p.name, "status": "waiting", "chunks": 0, "reason": ""} for p in paths]
        rows += [{"file": name, "status": "refused", "chunks": 0, "reason": why} for name, why in refused]
        job_id = secrets.token_hex(8)
        state: State = "queued" if paths else "done"
        now = time.time()
        with self._db() as db:
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, '', ?, ?)",
                (job_id, owner, kb, state, json.dumps(rows, ensure_ascii=False), now, None if paths else now),
            )
        if paths:
            worker = threading.Thread(
                target=self._run, args=(job_id, kb, paths), name=f"zhiku-ingest-{job_id}", daemon=True
            )
            worker.start()
        return self.get(owner, job_id)

    def _run(self, job_id: str, kb: str, copied: list[Path]) -> None:
        with self._turn:
            try:
                self._set(job_id, state="running")
                self._ingest.ingest(kb, copied, on_outcome=lambda outcome: self._record(job_id, outcome))
            except Exception as err:  # the job says what went wrong; the server goes on
                log.exception("background ingest %s into %s failed", job_id, kb)
                self._end(job_id, "failed", f"{type(err).__name__}: {err}".splitlines()[0])
                return
            self._end(job_id, "done", "")

    def _end(self, job_id: str, state: State, error: str) -> None:
        try:
            self._set(job_id, state=state, error=error)
        except JobError:  # the jobs file itself failed: logged; the page shows the job as it last was
            log.exception("cannot record the end of ingest job %s", job_id)

    def active_for(self, kb: str) -> bool:
        """Whether a job is queued or running for ``kb`` (whoever started it)."""
        with self._db() as db:
            row = db.execute("SELECT 1 FROM jobs WHERE kb = ? AND state IN ('queued', 'running')", (kb,)).fetchone()
        return row is not None

    def _record(self, job_id: str, outcome: FileOutcome) -> None:
        name = Path(outcome.path).name
        with self._db() as db:
            (files,) = db.execute("SELECT files FROM jobs WHERE id = ?", (job_id,)).fetchone()
            rows = json.loads(files)
            for row in rows:
                if row["file"] == name and row["status"] == "waiting":
                    row.update(status=outcome.status, chunks=outcome.chunks, reason=outcome.reason)
                    break
            db.execute("UPDATE jobs SET files = ? WHERE id = ?", (json.dumps(rows, ensure_ascii=False), job_id))

    def _set(self, job_id: str, *, state: State, error: str = "") -> None:
        finished = time.time() if state in ("done", "failed") else None
        with self._db() as db:
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished = ? WHERE id = ?", (state, error, finished, job_id)
            )

    def get(self, owner: str, job_id: str) -> Job:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner)).fetchone()
        if row is None:
            raise UnknownJob(f"no ingest job {job_id}", "GET the job id that starting the ingest returned")
        return _job(row)

    def latest(self, owner: str) -> Job | None:
        """The owner's most recent job (what the knowledge-base page shows after a reload)."""
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE owner = ? ORDER BY started DESC LIMIT 1", (owner,)).fetchone()
        return None if row is None else _job(row)


def _job(row: Sequence[Any]) -> Job:
    job_id, _owner, kb, state, files, error, started, finished = row
    return Job(job_id, kb, state, json.loads(files), error, started, finished)
