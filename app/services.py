"""The services every entry point shares: the CLI, the web UI and the HTTP API call these, never the
parts below them. Built once by :class:`app.container.Zhiku`."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.chat import ChatService
from app.settings import Settings
from app.uploads import check_uploads, upload_destination, uploads_folder
from knowledge.catalog import Catalog, validate_name
from knowledge.ingest import FileOutcome, Ingestor, IngestReport
from knowledge.library import KnowledgeLibrary
from knowledge.migrate import Migration
from knowledge.milvus import MilvusError
from knowledge.store import KnowledgeBase, StoreError
from knowledge.stores import VectorStores

log = logging.getLogger(__name__)

__all__ = ["ChatService", "IngestResult", "IngestService", "KnowledgeBaseService", "UploadResult"]

OpenKb = Callable[..., KnowledgeBase]
OnOutcome = Callable[[FileOutcome], None]


@dataclass
class IngestResult:
    kb: str
    report: IngestReport
    total: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        """What ``ingest --json`` prints (a contract; see README.md)."""
        return {**self.report.to_json(), "kb": self.kb, "total": self.total}


@dataclass
class UploadResult:
    kb: str
    ingest: IngestResult | None = None  # None: no file was accepted
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file name, one-line reason)


class IngestService:
    """Files into knowledge bases: folders from the CLI, uploads from the UI and the API."""

    def __init__(
        self,
        settings: Settings,
        open_kb: OpenKb,
        ingestor_for: Callable[[KnowledgeBase], Ingestor],
        library: KnowledgeLibrary,
        extensions: Collection[str],
    ) -> None:
        self.settings = settings
        self._open_kb = open_kb
        self._ingestor_for = ingestor_for
        self._library = library
        self.extensions = sorted(extensions)

    def ingest(
        self,
        kb: str,
        paths: Iterable[Path],
        *,
        prune: bool = False,
        progress: bool = False,
        on_outcome: OnOutcome | None = None,
    ) -> IngestResult:
        """Ingest files and folders (recursively) into ``kb``, creating it if missing."""
        validate_name(kb)
        with self._open_kb(kb, create=True) as store:
            report = self._ingestor_for(store).run(paths, prune=prune, progress=progress, on_outcome=on_outcome)
            total = store.counts()
        return IngestResult(kb, report, total)

    def upload(self, kb: str, files: Sequence[str | Path], on_outcome: OnOutcome | None = None) -> UploadResult:
        """Keep uploaded files under ``<data_dir>/uploads/<kb>`` and ingest them. Files of a type no loader
        reads, over ``server.max_upload_mb`` or not regular files are refused with a reason, never copied."""
        copied, rejected = self.stage(kb, files)
        result = UploadResult(kb, rejected=rejected)
        if copied:
            result.ingest = self.ingest(kb, copied, on_outcome=on_outcome)
        return result

    def stage(self, kb: str, files: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
        """Copy the acceptable uploads under ``<data_dir>/uploads/<kb>`` (before the request's temp files go);
        returns (the copies, (file name, one-line reason) for each refused one)."""
        validate_name(kb)
        accepted, rejected = check_uploads(files, self.extensions, self.settings.server.max_upload_mb)
        copied: list[Path] = []
        for filename, src in accepted.items():
            try:
                dest = upload_destination(self.settings.data_dir, kb, filename)
            except ValueError as err:  # belt and braces after safe_filename
                rejected.append((filename, str(err)))
                continue
            copied.append(_copy_atomically(src, dest))
        return copied, rejected


def _copy_atomically(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        Path(tmp).replace(dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


class KnowledgeBaseService:
    """List, inspect, check and delete knowledge bases."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        open_kb: OpenKb,
        library: KnowledgeLibrary,
        stores: VectorStores | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self._open_kb = open_kb
        self._library = library
        self._stores = stores

    def migrate(
        self,
        name: str,
        to: str,
        uri: str | None = None,
        *,
        drop_source: bool = False,
        sample: int = 100,
        progress: Callable[[int, int], None] | None = None,
    ) -> Migration:
        """Move a base's vectors to another store (``kb migrate``); ``uri`` defaults to store.uri."""
        from knowledge.migrate import drop_source as drop
        from knowledge.migrate import migrate

        if self._stores is None:
            raise StoreError("this Zhiku was built without vector stores", "use the app's container")
        where = self.settings.store.uri if uri is None else uri  # migrate() ignores it for faiss
        with self._open_kb(name) as kb:
            report = migrate(kb, self._stores, to, where, sample=sample, progress=progress)
            if drop_source:
                report.dropped = drop(kb, self._stores)
        return report

    def names(self) -> list[str]:
        return self.catalog.names()

    def info(self, name: str) -> dict[str, Any]:
        """What ``kb info --json`` prints (a contract; see README.md)."""
        with self._open_kb(name, readonly=True) as store:
            return {"name": name, **store.info()}

    def check(self, name: str) -> list[str]:
        """Consistency problems; opens the base for writing, like any maintenance, so a manifest or index
        file that a crash left behind the docstore is brought up to date first."""
        with self._open_kb(name) as store:
            return store.check()

    def remove_file(self, name: str, path: str) -> int:
        """Remove one file (as ``info()["sources"]`` names it) from a knowledge base, in one transaction: its
        chunks, and the vectors no other chunk uses. An uploaded copy of it goes too. Returns the chunks
        removed."""
        with self._open_kb(name) as store:
            if path not in {s["path"] for s in store.info()["sources"]}:
                raise StoreError(f"knowledge base {name!r} has no file {path}", "pick one from its file list")
            with store.transaction() as tx:
                removed = tx.remove_file(path)
        uploads = uploads_folder(self.settings.data_dir, name).resolve()
        copy = Path(path).resolve()
        if copy.parent == uploads:  # only ever a file Zhiku itself copied in
            copy.unlink(missing_ok=True)
        return removed

    def _forget_store(self, name: str) -> None:
        """Before a delete: let go of the base's Milvus client, and drop its collections on a Milvus server."""
        if self._stores is None:
            return
        try:
            with self._open_kb(name, readonly=True) as kb:
                root, manifest = kb.root, kb.manifest
        except StoreError:
            return  # a base too damaged to open has no store to reach: its folder still goes
        try:
            self._stores.forget(root, manifest, drop=True)
        except MilvusError as err:  # a server that is gone must not keep a base from being deleted
            log.warning("deleting %s: its collections on the Milvus server stay there (%s)", name, err)

    def delete(self, name: str) -> None:
        """Delete a knowledge base and the files uploaded into it."""
        if not self.catalog.exists(name):
            raise StoreError(
                f"knowledge base {name!r} does not exist", "`python -m app kb list` shows the ones there are"
            )
        self._library.forget(name)
        self._forget_store(name)
        try:
            self.catalog.delete(name)
            shutil.rmtree(uploads_folder(self.settings.data_dir, name), ignore_errors=False)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise StoreError(
                f"cannot delete knowledge base {name!r} ({err.strerror or err})",
                f"the user running Zhiku needs write access to {self.settings.data_dir}",
            ) from err
