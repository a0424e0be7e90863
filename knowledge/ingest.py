"""Bulk, incremental ingestion: files -> loader -> cleaning -> chunks -> embeddings -> knowledge base.

Files are parsed in worker processes (PDF parsing is CPU-bound) while the main process embeds and
writes. Files are keyed by path and content hash: unchanged files are skipped before parsing, changed
ones replace their chunks, identical chunks share one vector. Every ``commit_every`` files are committed
together, so an interrupted run keeps what it committed and a re-run finishes the rest.
One bad file is reported with its reason and never stops the run.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from knowledge.chunking import ChineseTextSplitter
from knowledge.cleaning import clean_pages
from knowledge.embedding import Embedder
from knowledge.lexical import fts_document
from knowledge.loaders import LoaderRegistry, LoadError, load_file
from knowledge.store import FaissKnowledgeBase, FileRecord, NewChunk

Status = Literal["added", "updated", "unchanged", "failed", "removed"]


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


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def scan(
    paths: Iterable[Path], extensions: frozenset[str], exclude: Iterable[Path] = ()
) -> tuple[list[Path], list[str], list[FileOutcome]]:
    """Expand files and folders (recursively; hidden entries and ``exclude`` folders skipped) into
    (files, unsupported, missing)."""
    skip = {p.resolve() for p in exclude}
    files: list[Path] = []
    unsupported: list[str] = []
    missing: list[FileOutcome] = []
    seen: set[Path] = set()

    def take(p: Path) -> None:
        resolved = p.resolve()
        if resolved in seen:
            return
        seen.add(resolved)
        if resolved.suffix.lower() in extensions:
            files.append(resolved)
        else:
            unsupported.append(str(resolved))

    for root in paths:
        if root.is_file():
            take(root)
        elif root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinked folders: no loops
                dirnames[:] = sorted(
                    d for d in dirnames if not d.startswith(".") and (Path(dirpath) / d).resolve() not in skip
                )
                for name in sorted(filenames):
                    if not name.startswith("."):
                        take(Path(dirpath) / name)
        else:
            missing.append(FileOutcome(str(root), "failed", reason=f"{root}: no such file or folder"))
    return files, unsupported, missing


def _kill(pool: ProcessPoolExecutor) -> None:
    """End a pool whose worker is stuck in a parse (the executor has no public way to)."""
    for process in list(getattr(pool, "_processes", {}).values()):
        process.kill()


class Ingestor:
    """Feeds files into one knowledge base. Build one per run; it holds no global state."""

    def __init__(
        self,
        kb: FaissKnowledgeBase,
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
        files, report.skipped, missing = scan(roots, self.registry.extensions, exclude=[self.kb.root.parent])
        report.outcomes.extend(missing)

        def record(outcome: FileOutcome) -> None:
            report.outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)

        todo: list[tuple[Path, FileRecord]] = []
        for path in files:
            try:
                size = path.stat().st_size
                if size > self.max_bytes:
                    raise LoadError(path, f"is {size / 2**20:.0f} MB, over ingest.max_file_mb", "raise the limit")
                record_ = FileRecord(str(path), file_sha256(path), size, 0, 0, None, time.time())
            except (LoadError, OSError) as err:
                record(
                    FileOutcome(
                        str(path),
                        "failed",
                        reason=str(err)
                        if isinstance(err, LoadError)
                        else f"{path.name}: cannot read ({err.strerror or err}); check its permissions",
                    )
                )
                continue
            old = self.kb.file_record(str(path))
            if old is not None and old.sha256 == record_.sha256:
                record(FileOutcome(str(path), "unchanged", old.chunks))
            else:
                todo.append((path, record_))

        bar = tqdm(total=len(todo), unit="file", desc="ingest", disable=not progress, dynamic_ncols=True)
        embed_bar = tqdm(total=0, unit="chunk", desc="embed", disable=not progress, dynamic_ncols=True)
        pending: list[tuple[FileRecord, ParsedFile]] = []
        try:
            for _path, rec, result in self._parse_all(todo):
                bar.update(1)
                if isinstance(result, FileOutcome):
                    record(result)
                    continue
                pending.append((rec, result))
                report.pages += result.pages
                if len(pending) >= self.commit_every:
                    self._commit(pending, report, record, embed_bar)
                    pending = []
                bar.set_postfix(chunks=report.chunks_added + sum(len(p.chunks) for _, p in pending), refresh=False)
            self._commit(pending, report, record, embed_bar)
            if prune:
                self._prune(roots, files, record)
        finally:
            bar.close()
            embed_bar.close()
        report.seconds = time.perf_counter() - started
        return report

    def parse(self, paths: list[Path]) -> Iterator[ParsedFile | FileOutcome]:
        """Parse files (in parallel) without storing them: for benchmarks and dry runs."""
        dummy = FileRecord("", "", 0, 0, 0, None, 0.0)
        for _, _, result in self._parse_all([(p, dummy) for p in paths]):
            yield result

    def _parse_all(
        self, todo: list[tuple[Path, FileRecord]]
    ) -> Iterator[tuple[Path, FileRecord, ParsedFile | FileOutcome]]:
        args = (self.registry, self.chunk_size, self.chunk_overlap)
        if (self.workers <= 1 or len(todo) <= 1) and not self.max_seconds:
            for path, rec in todo:  # in-process: no pool to start, nothing to time out
                yield path, rec, _parse_safely(str(path), *args)
            return
        queue = list(reversed(todo))
        # spawn, not fork: the parent may hold torch/BLAS threads that do not survive a fork
        ctx = multiprocessing.get_context("spawn")
        # with a time limit, only as many tasks as workers are in flight, so submitted = started
        in_flight = self.workers if self.max_seconds else self.workers * 4
        while queue:
            pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
            running: dict[Future[ParsedFile | FileOutcome], tuple[Path, FileRecord, float]] = {}
            try:
                while queue or running:
                    while queue and len(running) < in_flight:  # bounded: memory stays flat
                        path, rec = queue.pop()
                        running[pool.submit(_parse_safely, str(path), *args)] = (path, rec, time.monotonic())
                    done, _ = wait(running, timeout=1.0 if self.max_seconds else None, return_when=FIRST_COMPLETED)
                    for fut in done:
                        path, rec, _ = running[fut]
                        result = fut.result()  # a crashed worker raises here, leaving its file in `running`
                        del running[fut]
                        yield path, rec, result
                    late = [f for f, (*_, t0) in running.items() if self._too_slow(t0)]
                    if late:
                        for fut in late:
                            path, rec, _ = running.pop(fut)
                            yield path, rec, self._timed_out(path)
                        # a running task cannot be cancelled: end the pool, redo the innocent in-flight files
                        queue.extend((path, rec) for path, rec, _ in running.values())
                        running.clear()
                        _kill(pool)
                        break
            except BrokenProcessPool:
                # A parser crashed its process (e.g. a native library fault). Retry the in-flight files
                # one at a time in fresh pools so only the culprit fails.
                for path, rec, _ in running.values():
                    yield path, rec, self._parse_isolated(path, ctx)
                running.clear()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    def _too_slow(self, started: float) -> bool:
        return bool(self.max_seconds) and time.monotonic() - started > self.max_seconds

    def _timed_out(self, path: Path) -> FileOutcome:
        return FileOutcome(
            str(path),
            "failed",
            reason=f"{path.name}: parsing took longer than {self.max_seconds:g} s (ingest.max_file_seconds); "
            "check the file, or raise the limit",
        )

    def _parse_isolated(self, path: Path, ctx: Any) -> ParsedFile | FileOutcome:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
        try:
            fut = pool.submit(_parse_safely, str(path), self.registry, self.chunk_size, self.chunk_overlap)
            return fut.result(timeout=self.max_seconds or None)
        except BrokenProcessPool:
            return FileOutcome(str(path), "failed", reason=f"{path.name}: the parser crashed on this file")
        except TimeoutError:
            _kill(pool)
            return self._timed_out(path)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _commit(
        self,
        pending: list[tuple[FileRecord, ParsedFile]],
        report: IngestReport,
        record: Callable[[FileOutcome], None],
        embed_bar: Any,
    ) -> None:
        if not pending:
            return
        wanted: dict[str, str] = {}
        for _, parsed in pending:
            wanted.update(parsed.embed_texts)
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
            for rec, parsed in pending:
                existed = self.kb.file_record(rec.path) is not None
                full = FileRecord(
                    rec.path, rec.sha256, rec.size, parsed.pages, len(parsed.chunks), parsed.encoding, rec.ingested_at
                )
                report.new_vectors += tx.put_file(full, parsed.chunks, vectors)
                outcomes.append(FileOutcome(rec.path, "updated" if existed else "added", len(parsed.chunks)))
        for outcome in outcomes:  # only after the commit: a reported file is a stored file
            record(outcome)

    def _prune(self, roots: list[Path], present: list[Path], record: Callable[[FileOutcome], None]) -> None:
        folders = [str(r.resolve()) + os.sep for r in roots if r.is_dir()]
        keep = {str(p) for p in present}
        gone = [f for f in self.kb.files() if f.path not in keep and any(f.path.startswith(d) for d in folders)]
        if not gone:
            return
        with self.kb.transaction() as tx:
            removed = [(f.path, tx.remove_file(f.path)) for f in gone]
        for path, n in removed:
            record(FileOutcome(path, "removed", n))
