"""Bulk, incremental ingestion: files -> loader -> cleaning -> chunks -> embeddings -> knowledge base.

Files are parsed in worker processes (PDF parsing is CPU-bound; :mod:`knowledge.workers`) while the main
process embeds and writes. Files are keyed by path and content hash: unchanged files are skipped before
parsing, changed ones replace their chunks, identical chunks share one vector. Every ``commit_every`` files
are committed together, so an interrupted run keeps what it committed and a re-run finishes the rest.

One bad path is reported with a one-line reason and never stops the run: a file that cannot be parsed, a
FIFO or device (never opened), a symbolic link loop, a name that is not UTF-8, a folder that cannot be read
(nothing under it is pruned). The hash stored with a file is the hash of the bytes that were parsed: a file
that changes while it is read is parsed again. A file in the knowledge base that now fails loses its old
version, which is no longer what the file holds.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from knowledge.chunking import ChineseTextSplitter
from knowledge.cleaning import clean_pages
from knowledge.embedding import Embedder
from knowledge.lexical import fts_document
from knowledge.load_errors import NOT_REGULAR_FIX, not_regular_reason
from knowledge.loaders import LoaderRegistry, LoadError, load_file
from knowledge.store import FileRecord, NewChunk
from knowledge.workers import WorkerFailure, run_in_workers

Status = Literal["added", "updated", "unchanged", "failed", "removed"]

_READ_ATTEMPTS = 3  # a file still changing after this many reads is reported: "run ingest again"
_OLD_VERSION_REMOVED = "its old version was removed from the knowledge base"
# names from Windows zips and old Chinese systems are usually GBK
_RENAME_FIX = "rename it (e.g. `convmv -f gbk -t utf-8 --notest -r FOLDER`)"


class Transaction(Protocol):
    def put_file(self, record: FileRecord, chunks: Sequence[NewChunk], vectors: dict[str, np.ndarray]) -> int: ...

    def remove_file(self, path: str) -> int: ...


class IngestTarget(Protocol):
    """What ingestion needs of a knowledge base (:class:`knowledge.store.KnowledgeBase` has it)."""

    @property
    def root(self) -> Path: ...

    def check_compatible(self, model_id: str, dim: int) -> None: ...

    def file_record(self, path: str) -> FileRecord | None: ...

    def files(self) -> list[FileRecord]: ...

    def known_hashes(self, hashes: Iterable[str]) -> set[str]: ...

    def transaction(self) -> AbstractContextManager[Transaction]: ...


@dataclass(frozen=True)
class FileOutcome:
    path: str
    status: Status
    chunks: int = 0
    reason: str = ""


@dataclass
class IngestReport:
    outcomes: list[FileOutcome] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files of a type no loader handles
    new_vectors: int = 0
    pages: int = 0
    seconds: float = 0.0

    def count(self, status: Status) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def chunks_added(self) -> int:
        return sum(o.chunks for o in self.outcomes if o.status in ("added", "updated"))

    @property
    def failures(self) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def to_json(self) -> dict[str, Any]:
        return {
            "added": self.count("added"),
            "updated": self.count("updated"),
            "unchanged": self.count("unchanged"),
            "removed": self.count("removed"),
            "failed": [{"file": o.path, "reason": o.reason} for o in self.failures],
            "skipped": self.skipped,
            "chunks": self.chunks_added,
            "new_vectors": self.new_vectors,
            "pages": self.pages,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class ParsedFile:
    path: str
    pages: int
    encoding: str | None
    chunks: list[NewChunk]
    embed_texts: dict[str, str]  # text hash -> the text to embed (heading + chunk)
    sha256: str = ""  # of the bytes that were parsed (empty for a dry run)
    size: int = 0


# ----- paths and file identity -----------------------------------------------------------------------


class Signature(NamedTuple):
    """What changes whenever a file's content may have: a rewrite in place moves mtime and ctime (ctime
    even when a tool restores mtime), a replacement by rename changes the inode."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class FileState:
    sha256: str
    size: int
    signature: Signature


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def readable(text: str) -> str:
    """A path or message as one printable line: bytes that are not UTF-8 (kept by Python as lone
    surrogates, which no JSON or terminal output accepts) as ``\\xe9``, control characters as ``\\x0a``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", display_path(text))


def display_path(path: str) -> str:
    """The path for reports and JSON: as it is, unless it has bytes that are not UTF-8 (then escaped)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace") if _has_surrogates(path) else path


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _not_regular(path: str, mode: int) -> str:
    return f"{readable(Path(path).name)}: {not_regular_reason(mode)}; {NOT_REGULAR_FIX}"


def _path_error(path: str, err: OSError) -> str:
    """One line for a path that cannot even be looked at (os.stat failed)."""
    name = readable(Path(path).name or path)
    if err.errno == errno.ELOOP:
        return f"{name}: a symbolic link loop (the link leads back to itself); remove or fix the link"
    if err.errno == errno.ENAMETOOLONG:
        size = len(os.fsencode(path))
        return f"{name}: the path is too long for the system ({size} bytes); move the file to a shorter path"
    if err.errno == errno.ENOENT and Path(path).is_symlink():
        target = readable(str(Path(path).readlink()))
        return f"{name}: a broken symbolic link (its target {target} does not exist); remove or fix the link"
    return f"{name}: cannot read ({err.strerror or err}); check its permissions"


def _cannot_read(path: Path, err: OSError) -> str:
    return f"{readable(path.name)}: cannot read ({err.strerror or err}); check its permissions"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def read_state(path: Path, max_bytes: int | None = None) -> FileState:
    """Hash a regular file; a file that changes while it is hashed is hashed again.

    Raises LoadError when the path is not a regular file (never opened: a FIFO would block the open, a device
    never ends), is over ``max_bytes`` or keeps changing, and OSError when it cannot be read.
    """
    for _ in range(_READ_ATTEMPTS):
        # O_NONBLOCK: a FIFO swapped in after the scan must not block the open; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with open(fd, "rb", closefd=True) as fh:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise LoadError(path, not_regular_reason(before.st_mode), NOT_REGULAR_FIX)
            if max_bytes is not None and before.st_size > max_bytes:
                size_mb = before.st_size / 2**20
                raise LoadError(path, f"is {size_mb:.0f} MB, over ingest.max_file_mb", "raise the limit")
            digest = hashlib.sha256()
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
            after = os.fstat(fd)
        signature = Signature.of(before)
        # the path may have been replaced by a rename meanwhile: then it holds other bytes than these
        if Signature.of(after) == signature and Signature.of(path.stat()) == signature:
            return FileState(digest.hexdigest(), before.st_size, signature)
    raise LoadError(path, "changed while it was read", "run ingest again")


# ----- parsing (in worker processes) ------------------------------------------------------------------


def parse_file(path: str, registry: LoaderRegistry, chunk_size: int, chunk_overlap: int) -> ParsedFile:
    """Load, clean and chunk one file. Runs in a worker process; raises LoadError for a bad file."""
    pages = load_file(Path(path), registry)
    # PDF pages carry a page number; their text was extracted from a layout, with its artefacts
    laid_out = any(p.metadata.get("page") is not None for p in pages)
    cleaned = clean_pages([p.page_content for p in pages], laid_out=laid_out)
    for page, text in zip(pages, cleaned, strict=True):
        page.page_content = text
        page.metadata["source"] = path
    chunks = ChineseTextSplitter(chunk_size, chunk_overlap).split([p for p in pages if p.page_content.strip()])
    if not chunks:
        raise LoadError(Path(path), "no text left after cleaning", "check that the file holds readable text")
    new: list[NewChunk] = []
    embed_texts: dict[str, str] = {}
    for c in chunks:
        h = text_hash(c.embed_text)
        embed_texts[h] = c.embed_text
        new.append(
            NewChunk(
                text=c.text,
                text_hash=h,
                page=c.page,
                offset=c.offset,
                heading=c.heading,
                tokens=fts_document(c.embed_text),
            )
        )
    encoding = pages[0].metadata.get("encoding") if pages else None
    return ParsedFile(path, len(pages), encoding, new, embed_texts)


def _parse_safely(path: str, registry: LoaderRegistry, size: int, overlap: int) -> ParsedFile | FileOutcome:
    """The per-file error boundary: whatever one file does, it becomes that file's failure."""
    try:
        return parse_file(path, registry, size, overlap)
    except LoadError as err:
        return FileOutcome(path, "failed", reason=str(err))
    except Exception as err:  # noqa: BLE001 - a parser bug in one file must not stop the bulk run
        return FileOutcome(path, "failed", reason=f"{Path(path).name}: {type(err).__name__}: {err}".splitlines()[0])


def _warm_up() -> None:
    """Run once in each parser process before it takes files: the first tokenisation builds jieba's
    dictionary (seconds on a busy machine), which is not the first file's parsing time."""
    fts_document("中文")


@dataclass(frozen=True)
class ParseTask:
    path: str
    state: FileState | None = None  # what was hashed; None: parse without checking (dry runs)
    max_bytes: int | None = None


def _parse_task(
    task: ParseTask, registry: LoaderRegistry, chunk_size: int, chunk_overlap: int
) -> ParsedFile | FileOutcome:
    """Parse a file and make sure the bytes parsed are the bytes hashed: a file that changed meanwhile (a
    copy still being written, an editor saving) is hashed and parsed again."""
    state = task.state
    for _ in range(_READ_ATTEMPTS):
        result = _parse_safely(task.path, registry, chunk_size, chunk_overlap)
        if state is None:
            return result
        try:
            unchanged = Signature.of(Path(task.path).stat()) == state.signature
        except OSError:
            unchanged = False
        if unchanged:
            return replace(result, sha256=state.sha256, size=state.size) if isinstance(result, ParsedFile) else result
        try:
            state = read_state(Path(task.path), task.max_bytes)
        except LoadError as err:
            return FileOutcome(task.path, "failed", reason=str(err))
        except OSError as err:
            return FileOutcome(task.path, "failed", reason=_cannot_read(Path(task.path), err))
    name = readable(Path(task.path).name)
    return FileOutcome(task.path, "failed", reason=f"{name}: changed while it was read; run ingest again")


# ----- finding the files ------------------------------------------------------------------------------


@dataclass
class Scan:
    files: list[Path] = field(default_factory=list)  # regular files of a supported type, resolved
    unsupported: list[str] = field(default_factory=list)
    failed: list[FileOutcome] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)  # failed paths that hold no regular file (pipes, broken links)
    seen: set[str] = field(default_factory=set)  # every path found, failed or not: never pruned
    unreadable: list[str] = field(default_factory=list)  # folders whose content is unknown: never pruned


def scan(
    paths: Iterable[Path], extensions: frozenset[str], exclude: Iterable[Path] = ()
) -> tuple[list[Path], list[str], list[FileOutcome]]:
    """Expand files and folders (recursively; hidden entries and ``exclude`` folders skipped) into
    (files, unsupported, failed)."""
    found = scan_paths(paths, extensions, exclude)
    return found.files, found.unsupported, found.failed


def scan_paths(paths: Iterable[Path], extensions: frozenset[str], exclude: Iterable[Path] = ()) -> Scan:
    """Expand files and folders (recursively; hidden entries, ``exclude`` folders and symlinked folders
    skipped) into regular files. Nothing is opened: a path that is not a regular file, cannot be looked at
    or has a name that is not UTF-8 is a failure of its own, and so is a folder that cannot be listed."""
    skip = {os.path.realpath(p) for p in exclude}
    found = Scan()

    def fail(path: str, reason: str, *, gone: bool = False) -> None:
        found.failed.append(FileOutcome(display_path(path), "failed", reason=reason))
        found.seen.add(os.path.realpath(path))
        if gone:
            found.gone.add(path)

    def not_utf8(path: str, what: str) -> None:
        # Not stored under an escaped name: a source that no user, link or tool could open again. Failing
        # with the fix is what users expect of a name the rest of their tools cannot show either.
        name = readable(Path(path).name or path)
        under = "; nothing under it was ingested" if what == "folder" else ""
        fail(path, f"{name}: the {what} name is not valid UTF-8{under}; {_RENAME_FIX}")
        found.unreadable.append(os.path.realpath(path) + os.sep)

    def take(path: str) -> None:
        if _has_surrogates(path):
            not_utf8(path, "file")
            return
        try:
            st = Path(path).stat()  # follows a symbolic link: what it points to is what would be read
        except OSError as err:
            gone = err.errno in (errno.ELOOP, errno.ENOENT)
            fail(path, _path_error(path, err), gone=gone)
            return
        resolved = os.path.realpath(path)
        if resolved in found.seen:
            return
        found.seen.add(resolved)
        if Path(resolved).suffix.lower() not in extensions:
            found.unsupported.append(display_path(resolved))
        elif stat.S_ISREG(st.st_mode):
            found.files.append(Path(resolved))
        else:
            fail(resolved, _not_regular(path, st.st_mode), gone=True)

    def unreadable_folder(err: OSError) -> None:
        folder = os.fspath(err.filename) if err.filename is not None else "?"
        reason = (
            f"{readable(folder)}{os.sep}: cannot read this folder ({err.strerror or err}); nothing under it was "
            "ingested or removed; check its permissions"
        )
        if err.errno == errno.ENAMETOOLONG:
            size = len(os.fsencode(folder))
            reason = (
                f"{readable(Path(folder).name)}: the folder path is too long for the system ({size} bytes); "
                "nothing under it was ingested or removed; move it to a shorter path"
            )
        fail(folder, reason)
        found.unreadable.append(os.path.realpath(folder) + os.sep)

    for root in paths:
        top = os.fspath(root)
        if _has_surrogates(top):
            not_utf8(top, "folder" if Path(top).is_dir() else "file")
            continue
        try:
            is_dir = stat.S_ISDIR(Path(top).stat().st_mode)
        except OSError as err:
            if err.errno == errno.ENOENT and not Path(top).is_symlink():
                fail(top, f"{top}: no such file or folder")
            else:
                fail(top, _path_error(top, err), gone=err.errno in (errno.ELOOP, errno.ENOENT))
            continue
        if not is_dir:
            take(top)
            continue
        # os.walk does not follow symlinked folders (no loops), and reports unlistable ones to onerror
        for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable_folder):
            keep = []
            for d in sorted(dirnames):
                full = str(Path(dirpath, d))
                if d.startswith(".") or os.path.realpath(full) in skip:
                    continue
                if _has_surrogates(d):
                    not_utf8(full, "folder")
                    continue
                keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                if not name.startswith("."):
                    take(str(Path(dirpath, name)))
    return found


# ----- the run ----------------------------------------------------------------------------------------


class _Put(NamedTuple):
    record: FileRecord
    parsed: ParsedFile


class _Drop(NamedTuple):
    """A failed file whose stored version goes: it is no longer what the file holds."""

    failure: FileOutcome


class Ingestor:
    """Feeds files into one knowledge base. Build one per run; it holds no global state."""

    def __init__(
        self,
        kb: IngestTarget,
        embedder: Embedder,
        registry: LoaderRegistry,
        *,
        chunk_size: int,
        chunk_overlap: int,
        workers: int = 0,
        commit_every: int = 64,
        max_file_mb: float = 200.0,
        max_file_seconds: float = 0.0,
    ) -> None:
        kb.check_compatible(embedder.model_id, embedder.dim)
        self.kb = kb
        self.embedder = embedder
        self.registry = registry
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.workers = workers or (os.cpu_count() or 1)
        self.commit_every = commit_every
        self.max_bytes = int(max_file_mb * 1024 * 1024)
        self.max_seconds = max_file_seconds  # 0: no limit (and single-process parsing stays in-process)

    def run(
        self,
        paths: Iterable[Path],
        *,
        prune: bool = False,
        progress: bool = True,
        on_outcome: Callable[[FileOutcome], None] | None = None,
    ) -> IngestReport:
        from tqdm import tqdm

        started = time.perf_counter()
        roots = [Path(p) for p in paths]
        report = IngestReport()
        # never ingest the knowledge bases themselves when a folder holding the data dir is given
        found = scan_paths(roots, self.registry.extensions, exclude=[self.kb.root.parent])
        report.skipped = found.unsupported

        def record(outcome: FileOutcome) -> None:
            if outcome.status == "failed":  # one printable line, whatever the file is called
                outcome = replace(outcome, reason=readable(outcome.reason))
            report.outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)

        pending: list[_Put | _Drop] = []  # written together at the next commit
        had_version: set[str] = set()  # files to parse that have an older version in the base

        def failed(outcome: FileOutcome, *, stale: bool) -> None:
            if stale:
                pending.append(_Drop(outcome))
            else:
                record(outcome)

        for outcome in found.failed:
            failed(outcome, stale=outcome.path in found.gone and self.kb.file_record(outcome.path) is not None)
        todo: list[ParseTask] = []
        for path in found.files:
            old = self.kb.file_record(str(path))
            try:
                state = read_state(path, self.max_bytes)
            except LoadError as err:  # too big, no longer a regular file, still being written
                failed(FileOutcome(str(path), "failed", reason=str(err)), stale=old is not None)
                continue
            except OSError as err:  # its content is unknown: an old version stays
                record(FileOutcome(str(path), "failed", reason=_cannot_read(path, err)))
                continue
            if old is not None and old.sha256 == state.sha256:
                record(FileOutcome(str(path), "unchanged", old.chunks))
                continue
            if old is not None:
                had_version.add(str(path))
            todo.append(ParseTask(str(path), state, self.max_bytes))

        bar = tqdm(total=len(todo), unit="file", desc="ingest", disable=not progress, dynamic_ncols=True)
        embed_bar = tqdm(total=0, unit="chunk", desc="embed", disable=not progress, dynamic_ncols=True)
        try:
            for task, result in self._parse_all(todo):
                bar.update(1)
                if isinstance(result, FileOutcome):
                    failed(result, stale=task.path in had_version)
                else:
                    rec = FileRecord(
                        path=task.path,
                        sha256=result.sha256,
                        size=result.size,
                        pages=result.pages,
                        chunks=len(result.chunks),
                        encoding=result.encoding,
                        ingested_at=time.time(),
                    )
                    pending.append(_Put(rec, result))
                    report.pages += result.pages
                if len(pending) >= self.commit_every:
                    self._commit(pending, report, record, embed_bar)
                    pending = []
                unsaved = sum(len(e.parsed.chunks) for e in pending if isinstance(e, _Put))
                bar.set_postfix(chunks=report.chunks_added + unsaved, refresh=False)
            self._commit(pending, report, record, embed_bar)
            if prune:
                self._prune(roots, found, record)
        finally:
            bar.close()
            embed_bar.close()
        report.seconds = time.perf_counter() - started
        return report

    def parse(self, paths: list[Path]) -> Iterator[ParsedFile | FileOutcome]:
        """Parse files (in parallel) without storing them: for benchmarks and dry runs."""
        for _, result in self._parse_all([ParseTask(str(p)) for p in paths]):
            yield result

    def _parse_all(self, tasks: list[ParseTask]) -> Iterator[tuple[ParseTask, ParsedFile | FileOutcome]]:
        parse = functools.partial(
            _parse_task, registry=self.registry, chunk_size=self.chunk_size, chunk_overlap=self.chunk_overlap
        )
        if not tasks:
            return
        if (self.workers <= 1 or len(tasks) <= 1) and not self.max_seconds:
            for task in tasks:  # in-process: no worker to start, nothing to time out
                yield task, parse(task)
            return
        workers = min(self.workers, len(tasks))
        runs = run_in_workers(parse, tasks, workers=workers, time_limit=self.max_seconds, initializer=_warm_up)
        for task, result in runs:
            yield task, self._worker_failed(task.path, result) if isinstance(result, WorkerFailure) else result

    def _worker_failed(self, path: str, failure: WorkerFailure) -> FileOutcome:
        name = readable(Path(path).name)
        if failure.kind == "timeout":
            reason = (
                f"{name}: parsing took longer than {self.max_seconds:g} s (ingest.max_file_seconds); "
                "check the file, or raise the limit"
            )
        elif failure.kind == "crash":
            reason = f"{name}: the parser crashed on this file ({failure.detail}); check the file"
        else:
            reason = f"{name}: the parser failed ({failure.detail})"
        return FileOutcome(path, "failed", reason=reason)

    def _commit(
        self,
        pending: list[_Put | _Drop],
        report: IngestReport,
        record: Callable[[FileOutcome], None],
        embed_bar: Any,
    ) -> None:
        if not pending:
            return
        puts = [e for e in pending if isinstance(e, _Put)]
        wanted: dict[str, str] = {}
        for put in puts:
            wanted.update(put.parsed.embed_texts)
        missing = sorted(set(wanted) - self.kb.known_hashes(wanted))
        embed_bar.total += len(missing)
        embed_bar.refresh()
        vectors: dict[str, np.ndarray] = {}
        if missing:
            matrix = self.embedder.embed_documents([wanted[h] for h in missing], progress=embed_bar.update)
            vectors = dict(zip(missing, matrix, strict=True))
        outcomes = []
        with self.kb.transaction() as tx:
            # another writer may have removed texts since `missing` was computed (the lock is held now)
            late = sorted(set(wanted) - self.kb.known_hashes(wanted) - vectors.keys())
            if late:
                vectors.update(zip(late, self.embedder.embed_documents([wanted[h] for h in late]), strict=True))
            for entry in pending:
                if isinstance(entry, _Drop):
                    removed = tx.remove_file(entry.failure.path)
                    reason = entry.failure.reason + (f"; {_OLD_VERSION_REMOVED}" if removed else "")
                    outcomes.append(replace(entry.failure, reason=reason))
                    continue
                rec, parsed = entry
                existed = self.kb.file_record(rec.path) is not None
                report.new_vectors += tx.put_file(rec, parsed.chunks, vectors)
                outcomes.append(FileOutcome(rec.path, "updated" if existed else "added", len(parsed.chunks)))
        for outcome in outcomes:  # only after the commit: a reported file is a stored file
            record(outcome)

    def _prune(self, roots: list[Path], found: Scan, record: Callable[[FileOutcome], None]) -> None:
        folders = tuple(os.path.realpath(r) + os.sep for r in roots if r.is_dir())
        unknown = tuple(found.unreadable)  # folders that could not be read: their files may well be there
        keep = found.seen
        gone = [
            f.path
            for f in self.kb.files()
            if f.path not in keep and f.path.startswith(folders) and not f.path.startswith(unknown)
        ]
        if not gone:
            return
        with self.kb.transaction() as tx:
            removed = [(path, tx.remove_file(path)) for path in gone]
        for path, n in removed:
            record(FileOutcome(path, "removed", n))
