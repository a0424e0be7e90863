"""The read side of the knowledge bases: open bases by name, for every question of a process.

A :class:`KnowledgeLibrary` opens a knowledge base once (read-only) and keeps one retriever for it; each
search then reads one committed generation (see ``KnowledgeBase.snapshot``), so ingests may commit at any
time. A base deleted, or deleted and made again under the same name, is noticed at the next question and
reopened (or reported gone). It is handed the embedder lookup and the reranker by the application, so a
question never climbs back into the code that wired it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from knowledge.catalog import Catalog
from knowledge.embedding import Embedder
from knowledge.retrieval import Reranker, RetrievalSettings, Retriever
from knowledge.store import KindFor, KnowledgeBase, StoreError


class KnowledgeLibrary:
    """Shared by all sessions of a process; holds only the open bases and their retrievers."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        kind_for: KindFor,
        embedder_for: Callable[[str], Embedder],
        retrieval: RetrievalSettings,
        reranker_for: Callable[[str], Reranker] | None = None,
    ) -> None:
        self.catalog = catalog
        self.kind_for = kind_for  # each base's vector index, from its manifest
        self.embedder_for = embedder_for  # embedding model id (from a base's manifest) -> embedder
        self.retrieval = retrieval
        self.reranker_for = reranker_for
        self._open: dict[str, tuple[KnowledgeBase, Retriever]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return self.catalog.names()

    def get(self, name: str) -> KnowledgeBase:
        return self._entry(name)[0]

    def retriever(self, name: str, settings: RetrievalSettings | None = None) -> Retriever:
        """The base's retriever with the configured pipeline, or a new one with ``settings`` (e.g. plain
        vector search, to compare)."""
        kb, retriever = self._entry(name)
        return retriever if settings is None else self._make_retriever(kb, settings)

    def _entry(self, name: str) -> tuple[KnowledgeBase, Retriever]:
        path = self.catalog.path(name)
        with self._lock:
            entry = self._open.get(name)
            if entry is not None and not entry[0].is_stale():
                return entry
            if entry is not None:  # deleted, rebuilt, or changed under an immutable reader
                # dropped first, so it is never left cached if the reopen fails; not closed: a search of
                # another thread may still be reading it (its connections close when it is collected)
                del self._open[name]
            if not self.catalog.exists(name):
                raise StoreError(
                    f"knowledge base {name!r} does not exist", "`python -m app kb list` shows the ones there are"
                )
            kb = KnowledgeBase.open(path, kind_for=self.kind_for, readonly=True, name=name)
            try:
                entry = (kb, self._make_retriever(kb, self.retrieval))
            except BaseException:
                kb.close()
                raise
            self._open[name] = entry
            return entry

    def _make_retriever(self, kb: KnowledgeBase, settings: RetrievalSettings) -> Retriever:
        reranker = self.reranker_for(settings.reranker) if settings.reranker and self.reranker_for else None
        return Retriever(kb, self.embedder_for(kb.manifest.embedding_model), settings, reranker)

    def forget(self, name: str) -> None:
        """Drop a base (before deleting it, say); the next question opens it again."""
        with self._lock:
            self._open.pop(name, None)

    def close(self) -> None:
        with self._lock:
            entries, self._open = list(self._open.values()), {}
        for kb, _ in entries:
            kb.close()
