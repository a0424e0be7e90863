"""Bulk, incremental ingestion: files -> loader -> cleaning -> chunks -> embeddings -> knowledge base.

Files are parsed in worker processes (PDF parsing is CPU-bound; :mod:`knowledge.workers`) while an embed
thread embeds the files parsed before and a commit thread writes the checkpoint embedded before that
(:class:`_Pipeline`): parsers do not wait for the embedding model, nor the model for SQLite. Files are keyed
by path and content hash: unchanged files are skipped before parsing, changed ones replace their chunks,
identical chunks share one vector. Every ``commit_every`` files are committed together, in one transaction,
so an interrupted run keeps what it committed and a re-run finishes the rest. The vector index file is
written on a timer and at the end, not per checkpoint (:meth:`knowledge.store.KnowledgeBase.deferred_index`).

One bad path is reported with a one-line reason and never stops the run: a file that cannot be parsed, a
FIFO or device (never opened), a symbolic link loop, a name that is not UTF-8, a folder that cannot be read
(nothing under it is pruned). The hash stored with a file is the hash of the bytes that were parsed: a file
that changes while it is read is parsed again. A file in the knowledge base that now fails loses its old
version, which is no longer what the file holds.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import hashlib
import itertools
import logging
import os
import queue
import re
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from common.errors import BackendUnavailableError
from common.threads import busy_cores
from knowledge.chunking import ChineseTextSplitter
from knowledge.cleaning import clean_pages
from knowledge.embedding import Embedder, Pretokenising
from knowledge.lexical import fts_document
from knowledge.load_errors import NOT_REGULAR_FIX, not_regular_reason
from knowledge.loaders import LoaderRegistry, LoadError, load_file
from knowledge.store import FileRecord, NewChunk
from knowledge.workers import WorkerFailure, run_in_workers

Status = Literal["added", "updated", "unchanged", "failed", "removed"]

_READ_ATTEMPTS = 3  # a file still changing after this many reads is reported: "run ingest again"
# what the parser processes' fork server imports once for all of them (knowledge/workers.py)
PARSER_MODULES = (__name__,)
_OLD_VERSION_REMOVED = "its old version was removed from the knowledge base"
# names from Windows zips and old Chinese systems are usually GBK
_RENAME_FIX = "rename it (e.g. `convmv -f gbk -t utf-8 --notest -r FOLDER`)"
log = logging.getLogger(__name__)


class Transaction(Protocol):
    def put_files(
        self, files: Sequence[tuple[FileRecord, Sequence[NewChunk]]], vectors: dict[str, np.ndarray]
    ) -> tuple[set[str], int]: ...

    def remove_file(self, path: str) -> int: ...


class IngestTarget(Protocol):
    """What ingestion needs of a knowledge base (:class:`knowledge.store.KnowledgeBase` has it)."""

    @property
    def root(self) -> Path: ...

    def check_compatible(self, model_id: str, dim: int) -> None: ...

    def file_records(self, paths: Sequence[str]) -> dict[str, FileRecord]: ...

    def files(self) -> list[FileRecord]: ...

    def known_hashes(self, hashes: Iterable[str]) -> set[str]: ...

    def transaction(self) -> AbstractContextManager[Transaction]: ...

    def deferred_index(self, min_interval: float = 30.0) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class FileOutcome:
    path: str
    status: Status
    chunks: int = 0
    reason: str = ""


_PER_FILE_STAGES = frozenset({"hash", "send_wait"})


@dataclass
class IngestReport:
    outcomes: list[FileOutcome] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files of a type no loader handles
    new_vectors: int = 0
    pages: int = 0
    seconds: float = 0.0
    # where the run's time went, for benchmarks and logs (not in the JSON): seconds per stage, each measured in
    # the thread that does it (hash, parse, send_wait, embed, commit, finish, index); stages overlap
    stages: dict[str, float] = field(default_factory=dict)
    # the timed blocks of the stages that run a few times per checkpoint, not per file, as (stage, start, end) in
    # time.perf_counter() seconds, in the order they ended: when each embedding call and commit ran, against the
    # last parse (bench/ingest.py --timeline)
    events: list[tuple[str, float, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Add the block's seconds to ``stage`` (also when it raises), and the block to ``events`` unless the
        stage is timed for every file."""
        started = time.perf_counter()
        try:
            yield
        finally:
            ended = time.perf_counter()
            self.stages[stage] = self.stages.get(stage, 0.0) + ended - started
            if stage not in _PER_FILE_STAGES:  # a million files would keep millions of them
                self.events.append((stage, started, ended))

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


def default_workers(cores: int | None = None) -> int:
    """Parser processes when ``ingest.workers`` is 0: one per core, less a quarter of the cores from 4 up. The
    ingesting process needs those: its threads receive the parsed files, tokenise and embed (the tokenizer's
    own threads too) and commit (H200 box, 16 cores, 22,695 chunks: 12 parsers ingest in 7.7 s, 16 in 9.1 s,
    where each file took 1.6x as long to parse as with the cores to themselves); see common.threads."""
    return busy_cores(cores)


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


# a file found: its path, the version the base holds, and its hash, or why it could not be hashed
_HASH_BLOCK = 500  # files whose stored versions are looked up together
_HASHED_AHEAD = 4096  # files hashed and not yet taken by the parsers, at most
_HASH_JOIN_S = 1.0  # how long a run that stops waits for the hashing thread to leave a file it reads
_Hashed = tuple[Path, FileRecord | None, "FileState | LoadError | OSError"]


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
        if _has_surrogates(resolved):  # a link with a UTF-8 name to a file or folder without one
            not_utf8(resolved, "file")
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


# ----- the run: parse -> embed -> commit, overlapped ------------------------------------------------


class _Put(NamedTuple):
    record: FileRecord
    parsed: ParsedFile


class _Drop(NamedTuple):
    """A failed file whose stored version goes: it is no longer what the file holds."""

    failure: FileOutcome


@dataclass(eq=False)
class _Entry:
    """One file on its way through the pipeline: what to write, in which checkpoint, whether an older
    version of it is stored (a failure then removes that), and the vectors of its texts the base lacks."""

    item: _Put | _Drop
    checkpoint: int
    stale: bool = False
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: dict[str, Any] = field(default_factory=dict)  # its texts tokenised ahead (Pretokenising embedders)
    failed: bool = False  # its texts could not be embedded, and it has no stored version to remove
    reserved: int = 0  # its chunks, counted in the pipeline's in_flight until it is committed or dropped


@dataclass(frozen=True)
class _Checkpoint:
    """The entries sent before it (since the previous one) are committed together."""

    number: int
    last: bool = False


class _Cancelled(Exception):
    """The run is stopping (an error in another stage, Ctrl-C): a stage leaves without finishing."""


_POLL_S = 0.1  # how often a stage waiting on a queue looks whether the run is stopping
# An embedding call waits up to _GROUP_LINGER_S for _GROUP_MIN_TEXTS texts, across checkpoints: each call has a
# fixed cost (a tokeniser thread, batch planning, a device sync), and calls of ~256 texts, one or two per
# checkpoint, made the embedder 2.2x slower inside an ingest than alone (H200, 22,695 chunks: 6.5 s vs 2.9 s;
# 5.0-5.5 s with these values).
_GROUP_MIN_TEXTS = 2048
# and takes about this many at most, so that commits are not held back long, and the last group, embedded after
# the last file was parsed, is short
_GROUP_MAX_TEXTS = 4096
_GROUP_LINGER_S = 0.5
# texts tokenised in one call ahead of the embedder (a Pretokenising one), waiting up to _TOKENISE_LINGER_S for
# them. Calls of whatever was queued (a file or a few) made an ingest use 0.8 CPU s more than tokenising inside
# the embedding calls, and end 0.2 s later (H200 box, 25,983 texts); calls of ~500 texts use no more. The tokens
# are still ready long before their embedding call, which waits for 2,048
_TOKENISE_TEXTS = 512
_TOKENISE_LINGER_S = 0.1
_TOKENISE_FAILURES = 3  # calls that fail before a run stops tokenising ahead (its embedding calls tokenise then)
# chunks parsed and not yet committed: what bounds the run's memory (about 100 MB of texts, tokens and vectors).
# Room for several checkpoints, so that the parsers go on while a commit or an embedding call takes its time (H200,
# 25,983 chunks: parsers waited 1.0 s of a 6.7 s ingest with room for about 5,000)
_MAX_IN_FLIGHT = 16_384


def _put_unless_stopped(q: queue.Queue[Any], item: object, stop: threading.Event) -> bool:
    """Put ``item`` on ``q``, waiting for room as long as ``stop`` is not set; False if it was set first."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _texts_in(item: _Entry | _Checkpoint) -> int:
    return len(item.item.parsed.embed_texts) if isinstance(item, _Entry) and isinstance(item.item, _Put) else 0


def _puts(items: list[_Entry | _Checkpoint]) -> list[_Entry]:
    """The entries of files to store (not failed files' drops, nor checkpoint marks)."""
    return [item for item in items if isinstance(item, _Entry) and isinstance(item.item, _Put)]


def _tokenising_ahead(embedder: Embedder) -> Pretokenising | None:
    """``embedder`` where it tokenises ahead (it says so for no texts), else None."""
    if not isinstance(embedder, Pretokenising):
        return None
    try:
        return embedder if embedder.tokenise_documents([]) is not None else None
    except Exception as err:  # noqa: BLE001 - its embedding calls tokenise: the ingest goes on without this
        log.warning("the embedder cannot tokenise ahead of its embedding calls: %s", _one_line(err))
        return None


def _is_last(item: _Entry | _Checkpoint) -> bool:
    return isinstance(item, _Checkpoint) and item.last


def _one_line(err: BaseException) -> str:
    return (f"{type(err).__name__}: {err}".splitlines() or [""])[0][:300]


class _Pipeline:
    """The stages of one run, each in its own thread, so that none waits for another's work:

    - the caller's thread drives the parser processes and sends each parsed file (:meth:`send`);
    - with a :class:`~knowledge.embedding.Pretokenising` embedder, the tokenise thread tokenises each file's
      texts as it comes, so that the embedding calls find them ready;
    - the embed thread embeds the texts the base lacks, a group of files at a time, while parsing goes on;
    - the commit thread writes each checkpoint (``commit_every`` files) in one transaction while the next
      one is embedded.

    The chunks between parsing and their commit are bounded (_MAX_IN_FLIGHT; a file larger than that goes
    alone): parsers wait only when embedding or committing is behind by that much, and a checkpoint that
    would not fit closes early. A file whose texts cannot be embedded fails alone, with its name; any other
    error stops every stage and is raised in the caller's thread (:meth:`check`, :meth:`finish`). Each checkpoint is
    one SQLite transaction, so a kill at any moment keeps exactly the checkpoints committed before it.
    """

    def __init__(
        self, ingestor: Ingestor, report: IngestReport, record: Callable[[FileOutcome], None], embed_bar: Any
    ) -> None:
        self.ingestor = ingestor
        self.report = report
        self.record = record
        self.embed_bar = embed_bar
        self.to_embed: queue.Queue[_Entry | _Checkpoint] = queue.Queue()  # bounded by in_flight
        self.to_tokenise: queue.Queue[_Entry | _Checkpoint] = queue.Queue()
        self.to_commit: queue.Queue[_Entry | _Checkpoint] = queue.Queue()
        self.in_flight = 0  # chunks sent and not yet committed (or dropped)
        self.room = threading.Condition()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.committed = -1  # number of the last checkpoint committed (written by the commit thread only)
        # one embedding call at a time: embedders need not be thread-safe (a Pretokenising one's tokenising must)
        self.embed_lock = threading.Lock()
        self.checkpoint = 0
        self.in_checkpoint = 0
        self.threads = [
            threading.Thread(target=self._guard, args=(self._embed_stage,), name="ingest-embed", daemon=True),
            threading.Thread(target=self._guard, args=(self._commit_stage,), name="ingest-commit", daemon=True),
        ]
        self.tokeniser = _tokenising_ahead(ingestor.embedder)
        if self.tokeniser is not None:
            self.threads.append(
                threading.Thread(target=self._guard, args=(self._tokenise_stage,), name="ingest-tokenise", daemon=True)
            )

    # ----- the caller's side -----
    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def send(self, item: _Put | _Drop, *, stale: bool) -> None:
        chunks = len(item.parsed.chunks) if isinstance(item, _Put) else 0
        with self.report.timing("send_wait"):  # parsed files waiting for room: embedding or committing is behind
            if self.in_checkpoint and not self._has_room(chunks):
                self._close_checkpoint()  # room comes back only as checkpoints commit
            self._reserve(chunks)
        self._send(_Entry(item, self.checkpoint, stale, reserved=chunks))
        self.in_checkpoint += 1
        if self.in_checkpoint >= self.ingestor.commit_every:
            self._close_checkpoint()

    def _close_checkpoint(self) -> None:
        self._send(_Checkpoint(self.checkpoint))
        self.checkpoint += 1
        self.in_checkpoint = 0

    def check(self) -> None:
        """Raise the error that stopped a stage, if one did."""
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Commit what is left and wait for the stages to end."""
        self._send(_Checkpoint(self.checkpoint, last=True))
        for thread in self.threads:
            while thread.is_alive():
                thread.join(_POLL_S)
        self.check()

    def abort(self) -> None:
        """Stop every stage (an error, Ctrl-C). A commit under way is let finish: only the SQLite transaction
        makes anything visible, so even a kill in the middle keeps the base whole, but a clean stop also
        leaves no rolled-back work behind. The embedding call is left at its next progress report."""
        self.stop.set()
        embed, commit, *others = self.threads
        commit.join()
        for thread in (embed, *others):
            thread.join(1.0)

    def _send(self, item: _Entry | _Checkpoint) -> None:
        try:
            self._put(self.to_embed if self.tokeniser is None else self.to_tokenise, item)
        except _Cancelled:
            self.check()
            raise

    def _has_room(self, chunks: int) -> bool:
        return not self.in_flight or self.in_flight + chunks <= _MAX_IN_FLIGHT

    def _reserve(self, chunks: int) -> None:
        with self.room:
            while not self._has_room(chunks) and not self.stop.is_set():
                self.room.wait(_POLL_S)
            if self.stop.is_set():
                self.check()
                raise _Cancelled
            self.in_flight += chunks

    def _release(self, entries: list[_Entry]) -> None:
        with self.room:
            self.in_flight -= sum(e.reserved for e in entries)
            self.room.notify_all()

    # ----- shared -----
    def _guard(self, stage: Callable[[], None]) -> None:
        try:
            stage()
        except _Cancelled:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread, which raises it
            if self.error is None:
                self.error = err
            self.stop.set()

    def _put(self, q: queue.Queue[_Entry | _Checkpoint], item: _Entry | _Checkpoint) -> None:
        if not _put_unless_stopped(q, item, self.stop):
            raise _Cancelled

    def _get(self, q: queue.Queue[_Entry | _Checkpoint], timeout: float | None = None) -> _Entry | _Checkpoint:
        """The next item; queue.Empty after ``timeout`` seconds (None: wait as long as the run goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stop.is_set():
            wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            if wait <= 0:
                return q.get_nowait()
            try:
                return q.get(timeout=wait)
            except queue.Empty:
                continue
        raise _Cancelled

    def _embed_texts(
        self, hashes: list[str], texts: dict[str, str], tokens: dict[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """The vectors of ``texts[h]`` for ``hashes``; ``tokens``: some of them tokenised ahead (hash -> item)."""

        def progress(n: int) -> None:
            if self.stop.is_set():
                raise _Cancelled  # leaves a long embedding call at its next batch
            self.embed_bar.update(n)

        batch = [texts[h] for h in hashes]
        ready = {texts[h]: tokens[h] for h in hashes if h in tokens} if tokens else {}
        with self.embed_lock, self.report.timing("embed"):
            if ready and self.tokeniser is not None:
                matrix = self.tokeniser.embed_tokenised(batch, ready, progress=progress)
            else:
                matrix = self.ingestor.embedder.embed_documents(batch, progress=progress)
        return dict(zip(hashes, matrix, strict=True))

    # ----- the tokenise stage -----
    def _tokenise_stage(self) -> None:
        failures = 0
        while True:
            items = self._gather(self.to_tokenise, _TOKENISE_TEXTS, _TOKENISE_TEXTS, _TOKENISE_LINGER_S)
            puts = _puts(items)
            wanted = {h: t for entry in puts for h, t in _put_of(entry).parsed.embed_texts.items()}
            if failures < _TOKENISE_FAILURES and wanted:
                with self.report.timing("tokenise"):
                    # only the texts the base lacks (an edited file's others are stored): the embed stage asks too
                    hashes = sorted(wanted.keys() - self.ingestor.kb.known_hashes(wanted))
                    tokens = self._tokenise([wanted[h] for h in hashes])
                if tokens is None:
                    failures += 1
                else:
                    by_hash = dict(zip(hashes, tokens, strict=True))
                    for entry in puts:
                        texts = _put_of(entry).parsed.embed_texts
                        entry.tokens = {h: by_hash[h] for h in texts if h in by_hash}
            for item in items:
                self._put(self.to_embed, item)
            if _is_last(items[-1]):
                return

    def _tokenise(self, texts: list[str]) -> list[Any] | None:
        """The texts' tokens (none to tokenise: []); None when tokenising them failed: their embedding call
        tokenises them again, and a file it fails on fails alone, with its name."""
        assert self.tokeniser is not None
        if not texts:
            return []
        try:
            tokens = self.tokeniser.tokenise_documents(texts)
            if tokens is None or len(tokens) != len(texts):
                raise ValueError(f"{0 if tokens is None else len(tokens)} results for {len(texts)} texts")
            return tokens
        except Exception as err:  # noqa: BLE001 - left to the embedding call, which says which file it was
            log.warning(
                "tokenising texts ahead of their embedding failed; their embedding call tokenises them: %s",
                _one_line(err),
            )
            return None

    # ----- the embed stage -----
    def _embed_stage(self) -> None:
        # vectors embedded for checkpoints not committed yet: a text met again meanwhile is not embedded twice
        recent: dict[str, tuple[np.ndarray, int]] = {}
        while True:
            group = self._gather(self.to_embed, _GROUP_MIN_TEXTS, _GROUP_MAX_TEXTS, _GROUP_LINGER_S)
            for h in [h for h, (_, number) in recent.items() if number <= self.committed]:
                del recent[h]  # in the docstore now
            self._embed_group(_puts(group), recent)
            for item in group:
                if isinstance(item, _Entry) and item.failed:
                    self._release([item])
                    continue
                self._put(self.to_commit, item)
            if _is_last(group[-1]):
                return

    def _gather(
        self, q: queue.Queue[_Entry | _Checkpoint], least: int, most: int, linger: float
    ) -> list[_Entry | _Checkpoint]:
        """The next files (and checkpoint marks) of ``q`` to take together, in order: waiting up to ``linger``
        seconds for ``least`` texts, then taking what is already queued, up to about ``most`` texts or the run's
        last checkpoint."""
        group = [self._get(q)]
        texts = _texts_in(group[0])
        linger_until = time.monotonic() + linger
        while texts < most and not _is_last(group[-1]):
            wait = max(0.0, linger_until - time.monotonic()) if texts < least else 0.0
            try:
                group.append(self._get(q, timeout=wait))
            except queue.Empty:
                break
            texts += _texts_in(group[-1])
        return group

    def _embed_group(self, entries: list[_Entry], recent: dict[str, tuple[np.ndarray, int]]) -> None:
        """Give each entry the vectors of its texts that the base lacks; an entry whose texts cannot be
        embedded fails alone, with its name."""
        wanted: dict[str, str] = {}
        tokens: dict[str, Any] = {}
        for entry in entries:
            wanted.update(_put_of(entry).parsed.embed_texts)
            tokens.update(entry.tokens)
            entry.tokens = {}  # not kept until the commit
        vectors = {h: recent[h][0] for h in wanted if h in recent}
        missing = sorted(wanted.keys() - vectors.keys() - self.ingestor.kb.known_hashes(wanted.keys() - vectors.keys()))
        self.embed_bar.total += len(missing)
        self.embed_bar.refresh()
        failed: dict[int, str] = {}
        if missing:
            try:
                vectors.update(self._embed_texts(missing, wanted, tokens))
            except (_Cancelled, BackendUnavailableError):
                raise  # an unreachable embedding server fails every file alike: the run stops, committed work stays
            except Exception:  # noqa: BLE001 - find the files it fails on: one at a time
                todo = set(missing)
                for i, entry in enumerate(entries):
                    own = sorted(todo.intersection(_put_of(entry).parsed.embed_texts))
                    try:
                        vectors.update(self._embed_texts(own, wanted, tokens))
                    except (_Cancelled, BackendUnavailableError):
                        raise
                    except Exception as err:  # noqa: BLE001 - this file's failure; the run goes on
                        failed[i] = _one_line(err)
                    todo.difference_update(own)
        for i, entry in enumerate(entries):
            put = _put_of(entry)
            if i in failed:
                self._embedding_failed(entry, failed[i])
                continue
            entry.vectors = {h: vectors[h] for h in put.parsed.embed_texts if h in vectors}
            for h, vec in entry.vectors.items():
                recent[h] = (vec, entry.checkpoint)

    def _embedding_failed(self, entry: _Entry, detail: str) -> None:
        path = _put_of(entry).record.path
        outcome = FileOutcome(
            path, "failed", reason=f"{Path(path).name}: the embedding model failed on this file ({detail})"
        )
        if entry.stale:  # its stored version goes, as for a file that fails to parse
            entry.item = _Drop(outcome)
        else:
            entry.failed = True
            self.record(outcome)

    # ----- the commit stage -----
    def _commit_stage(self) -> None:
        pending: list[_Entry] = []
        while True:
            item = self._get(self.to_commit)
            if isinstance(item, _Entry):
                pending.append(item)
                continue
            with self.report.timing("commit"):
                self._commit(pending)
            self._release(pending)
            pending = []
            self.committed = item.number
            if item.last:
                return

    def _commit(self, pending: list[_Entry]) -> None:
        if not pending:
            return
        kb = self.ingestor.kb
        wanted: dict[str, str] = {}
        vectors: dict[str, np.ndarray] = {}
        for entry in pending:
            if isinstance(entry.item, _Put):
                wanted.update(entry.item.parsed.embed_texts)
                vectors.update(entry.vectors)
        outcomes = []
        puts = [(entry.item.record, entry.item.parsed.chunks) for entry in pending if isinstance(entry.item, _Put)]
        with kb.transaction() as tx:
            # another writer may have removed texts since they were found stored (the lock is held now)
            late = sorted(set(wanted) - kb.known_hashes(wanted) - vectors.keys())
            if late:
                vectors.update(self._embed_texts(late, wanted))
            for entry in pending:
                if isinstance(entry.item, _Drop):
                    failure = entry.item.failure
                    removed = tx.remove_file(failure.path)
                    reason = failure.reason + (f"; {_OLD_VERSION_REMOVED}" if removed else "")
                    outcomes.append(replace(failure, reason=reason))
            # all the checkpoint's files in one call: a few statements, not a few per file (see insert_rows)
            try:
                held, new_vectors = tx.put_files(puts, vectors) if puts else (set(), 0)
            except sqlite3.Error as err:  # the whole checkpoint rolls back; say where it happened
                raise type(err)(f"{err}, while storing {_names(rec.path for rec, _ in puts)}") from err
        self.report.new_vectors += new_vectors
        outcomes += [FileOutcome(r.path, "updated" if r.path in held else "added", len(c)) for r, c in puts]
        for outcome in outcomes:  # only after the commit: a reported file is a stored file
            self.record(outcome)


def _names(paths: Iterable[str], shown: int = 3) -> str:
    """``a.txt``, or ``5 files (a.txt, b.txt, c.txt and 2 more)``."""
    names = [readable(Path(p).name) for p in paths]
    if len(names) == 1:
        return names[0]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} files ({', '.join(names[:shown])}{more})"


# what an ingest changes is process-wide (the collector's frozen objects, the interpreter's switch interval), so the
# runs that share a process (a server ingesting uploads beside a job) are counted: the last one to end undoes it
_tuned_runs = 0
_tuned_lock = threading.Lock()
_saved_switch_interval = 0.0
_tuned_switch_interval = 0.0
# seconds a thread runs Python before one waiting for the interpreter lock gets it (Python's default: 0.005)
_SWITCH_INTERVAL_S = 0.0005


@contextlib.contextmanager
def _process_tuned_for_ingest() -> Iterator[None]:
    """For the run's duration:

    - leave the objects alive at the start (the embedding model and its libraries: about 600 k with torch and
      transformers) out of the garbage collector's full passes. A full pass over them holds the interpreter lock
      for 0.3 s on the H200 box, stalling every stage, and the run's own objects brought one about in 3 of 4
      ingests of 26 k chunks there;
    - hand the interpreter lock over every 0.5 ms rather than 5 ms. The thread that gives the parsers their files
      lets the lock go at each pipe read and write, and waits a whole interval to take it back whenever another
      stage's thread is running Python: on the H200 box the 12 parsers kept 9.6 cores busy in an ingest, 11.5
      when parsing alone, waiting for it.
    """
    global _tuned_runs, _saved_switch_interval, _tuned_switch_interval
    with _tuned_lock:
        if not _tuned_runs:
            _saved_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_switch_interval, _SWITCH_INTERVAL_S))
            _tuned_switch_interval = sys.getswitchinterval()  # as the interpreter stores it
        gc.freeze()
        _tuned_runs += 1
    try:
        yield
    finally:
        with _tuned_lock:
            _tuned_runs -= 1
            if not _tuned_runs:
                gc.unfreeze()  # all collectable again, as before the run
                if sys.getswitchinterval() == _tuned_switch_interval:  # not changed by someone else meanwhile
                    sys.setswitchinterval(_saved_switch_interval)


def _put_of(entry: _Entry) -> _Put:
    assert isinstance(entry.item, _Put)
    return entry.item


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
        index_interval: float = 30.0,
    ) -> None:
        kb.check_compatible(embedder.model_id, embedder.dim)
        self.kb = kb
        self.embedder = embedder
        self.registry = registry
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.workers = workers or default_workers()
        self.commit_every = commit_every
        self.max_bytes = int(max_file_mb * 1024 * 1024)
        self.max_seconds = max_file_seconds  # 0: no limit (and single-process parsing stays in-process)
        self.index_interval = index_interval  # seconds between vector index file writes during a run

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
        recording = threading.Lock()  # outcomes come from the caller's thread and the pipeline's

        def record(outcome: FileOutcome) -> None:
            if outcome.status == "failed":  # one printable line, whatever the file is called
                outcome = replace(outcome, reason=readable(outcome.reason))
            with recording:
                report.outcomes.append(outcome)
                if on_outcome:
                    on_outcome(outcome)

        bar = tqdm(total=0, unit="file", desc="ingest", disable=not progress, dynamic_ncols=True)
        embed_bar = tqdm(total=0, unit="chunk", desc="embed", disable=not progress, dynamic_ncols=True)
        pipeline = _Pipeline(self, report, record, embed_bar)
        try:
            # the index file is written on a timer and once at the end: the rows are the source of truth
            with _process_tuned_for_ingest(), self.kb.deferred_index(self.index_interval):
                pipeline.start()
                try:
                    self._feed(pipeline, found, record, bar)
                    with report.timing("finish"):  # embedding and committing the last files
                        pipeline.finish()
                except BaseException:
                    pipeline.abort()
                    raise
                if prune:
                    self._prune(roots, found, record)
                closing = time.perf_counter()
            closed = time.perf_counter()
            report.stages["index"] = closed - closing  # the index file written at the end
            report.events.append(("index", closing, closed))
        finally:
            bar.close()
            embed_bar.close()
        report.seconds = time.perf_counter() - started
        return report

    def _feed(self, pipeline: _Pipeline, found: Scan, record: Callable[[FileOutcome], None], bar: Any) -> None:
        """Hash the files, skip the unchanged ones, and send the rest, parsed, down the pipeline."""

        def failed(outcome: FileOutcome, *, stale: bool) -> None:
            if stale:
                pipeline.send(_Drop(outcome), stale=True)
            else:
                record(outcome)

        had_version: set[str] = set()  # files to parse that have an older version in the base
        with pipeline.report.timing("hash"):
            # a name that is not UTF-8 is never stored (nor bound to a query)
            stored = self.kb.file_records(sorted(p for p in found.gone if not _has_surrogates(p)))
            for outcome in found.failed:
                failed(outcome, stale=outcome.path in stored)
        bar.total = len(found.files)
        bar.refresh()

        def to_parse(hashed: Iterator[_Hashed]) -> Iterator[ParseTask]:
            """The files that changed, as they are hashed: the parsers start on the first ones meanwhile."""
            for path, old, state in hashed:
                pipeline.check()  # a stage that failed ends the run here, not after the unchanged files
                if isinstance(state, LoadError):  # too big, no longer a regular file, still being written
                    failed(FileOutcome(str(path), "failed", reason=str(state)), stale=old is not None)
                elif isinstance(state, OSError):  # its content is unknown: an old version stays
                    record(FileOutcome(str(path), "failed", reason=_cannot_read(path, state)))
                elif old is not None and old.sha256 == state.sha256:
                    record(FileOutcome(str(path), "unchanged", old.chunks))
                else:
                    if old is not None:
                        had_version.add(str(path))
                    yield ParseTask(str(path), state, self.max_bytes)
                    continue
                bar.update(1)

        parsed_chunks = 0
        # until the last file was parsed and sent. Closed on any error: the parser processes end now, not when
        # the traceback lets go of them
        with (
            pipeline.report.timing("parse"),
            self._hashing(found.files, pipeline.report) as hashed,
            contextlib.closing(self._parse_all(to_parse(hashed))) as results,
        ):
            for task, result in results:
                pipeline.check()
                bar.update(1)
                stale = task.path in had_version
                if isinstance(result, FileOutcome):
                    failed(result, stale=stale)
                    continue
                rec = FileRecord(
                    path=task.path,
                    sha256=result.sha256,
                    size=result.size,
                    pages=result.pages,
                    chunks=len(result.chunks),
                    encoding=result.encoding,
                    ingested_at=time.time(),
                )
                pipeline.send(_Put(rec, result), stale=stale)
                pipeline.report.pages += result.pages
                parsed_chunks += len(result.chunks)
                bar.set_postfix(chunks=parsed_chunks, refresh=False)

    @contextlib.contextmanager
    def _hashing(self, paths: list[Path], report: IngestReport) -> Iterator[Iterator[_Hashed]]:
        """Hash the files in a thread of their own, ahead of the parsers, and give (path, stored record, state or
        the error that replaced it) in order. Not in the thread that hands the parsers their files: each of a
        file's system calls lets the interpreter lock go, and taking it back waits for the other stages' threads.
        Hashed there, one file as each parser took one, 941 files took 0.8-1.0 s of that thread's time in an
        ingest on the H200 box (0.05 s all at once before the parse, or in a thread of their own)."""
        done = queue.Queue[_Hashed | BaseException | None](maxsize=_HASHED_AHEAD)
        stop = threading.Event()

        def put(item: _Hashed | BaseException | None) -> None:
            _put_unless_stopped(done, item, stop)  # stopped: the reader is gone

        def work() -> None:
            try:
                for start in range(0, len(paths), _HASH_BLOCK):
                    block = paths[start : start + _HASH_BLOCK]
                    with report.timing("hash"):
                        stored = self.kb.file_records([str(p) for p in block])  # a query per block, not per file
                    for path in block:
                        if stop.is_set():
                            return
                        with report.timing("hash"):
                            try:
                                state: FileState | LoadError | OSError = read_state(path, self.max_bytes)
                            except (LoadError, OSError) as err:  # the file's own failure, told apart by the reader
                                state = err
                        put((path, stored.get(str(path)), state))
                put(None)
            except BaseException as err:  # noqa: BLE001 - raised in the reading thread
                put(err)

        def read() -> Iterator[_Hashed]:
            while (item := done.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item

        thread = threading.Thread(target=work, name="ingest-hash", daemon=True)
        thread.start()
        try:
            yield read()
        except BaseException:
            # Ctrl-C or an error: not held up by a read that hangs (a stalled network mount); the thread only
            # reads, and stops at its next file
            stop.set()
            thread.join(_HASH_JOIN_S)
            raise
        stop.set()
        thread.join()

    def parse(self, paths: list[Path]) -> Iterator[ParsedFile | FileOutcome]:
        """Parse files (in parallel) without storing them: for benchmarks and dry runs. The process is tuned as
        for a run (:func:`_process_tuned_for_ingest`): parse-only is what a run's rate is measured against, and on
        the H200 box a full collection over the embedding model's objects held every parser up for ~0.3 s in 3 of
        8 parse-only runs of 26 k chunks (parse-only took a median 4.82 s untuned, 4.57 s tuned)."""
        with _process_tuned_for_ingest():
            for _, result in self._parse_all([ParseTask(str(p)) for p in paths]):
                yield result

    def _parse_all(
        self, tasks: Iterable[ParseTask]
    ) -> Generator[tuple[ParseTask, ParsedFile | FileOutcome], None, None]:
        """Parse the tasks, taken from ``tasks`` as parsers have room (a generator of them runs alongside)."""
        parse = functools.partial(
            _parse_task, registry=self.registry, chunk_size=self.chunk_size, chunk_overlap=self.chunk_overlap
        )
        source = iter(tasks)
        # as many tasks as there are parsers, to know how many to start: none for no file, and a single file is
        # parsed in this process (a re-run that finds one changed file among thousands starts no worker)
        first = list(itertools.islice(source, max(self.workers, 1)))
        if not first:
            return
        if (self.workers <= 1 or len(first) <= 1) and not self.max_seconds:
            for task in itertools.chain(first, source):  # in-process: no worker to start, nothing to time out
                yield task, parse(task)
            return
        runs = run_in_workers(
            parse,
            itertools.chain(first, source),
            workers=len(first),
            time_limit=self.max_seconds,
            initializer=_warm_up,
            preload=PARSER_MODULES,
        )
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
