"""The composition root: builds Zhiku's parts from typed settings, once, and hands them out.

Read this file to see what a running Zhiku is made of. It holds no module-level state: every CLI
invocation, test or server process makes its own :class:`Zhiku`.
"""

from __future__ import annotations

from functools import cached_property
from types import ModuleType

import pluggy

from app.settings import Settings
from knowledge import plugin as knowledge_plugin
from knowledge.catalog import Catalog
from knowledge.embedding import Embedder, EmbedderFactory, auto_backend, backend_of
from knowledge.ingest import Ingestor
from knowledge.loaders import LoaderRegistry
from knowledge.retrieval import CrossEncoderReranker, Reranker, RetrievalSettings, Retriever
from knowledge.store import FaissKnowledgeBase, Manifest, StoreError
from llms import plugin as llms_plugin
from llms.base import LLMFactory
from plugins.registry import Registry, build_plugin_manager

BUILTIN_PLUGINS: tuple[ModuleType, ...] = (knowledge_plugin, llms_plugin)


class Zhiku:
    def __init__(self, settings: Settings, *, entry_points: bool = True) -> None:
        self.settings = settings
        self._entry_points = entry_points
        self._embedders: dict[str, Embedder] = {}
        self._rerankers: dict[str, Reranker] = {}

    @cached_property
    def plugins(self) -> pluggy.PluginManager:
        return build_plugin_manager(BUILTIN_PLUGINS, entry_points=self._entry_points)

    @cached_property
    def loaders(self) -> LoaderRegistry:
        registry = LoaderRegistry()
        self.plugins.hook.register_loaders(register=registry.register)
        return registry

    @cached_property
    def embedder_factories(self) -> Registry[EmbedderFactory]:
        registry: Registry[EmbedderFactory] = Registry("embedder")
        self.plugins.hook.register_embedders(register=registry.register)
        return registry

    @cached_property
    def llm_factories(self) -> Registry[LLMFactory]:
        registry: Registry[LLMFactory] = Registry("LLM backend")
        self.plugins.hook.register_llms(register=registry.register)
        return registry

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog(self.settings.kb_root)

    def embedder(self, manifest: Manifest | None = None) -> Embedder:
        """The configured embedder; with ``backend: auto`` an existing knowledge base keeps its own model."""
        cfg = self.settings.embedding
        if manifest is not None and cfg.backend == "auto":
            backend = backend_of(manifest.embedding_model)
            if backend == "sentence-transformers":
                cfg = cfg.model_copy(update={"model": manifest.embedding_model.split(":", 1)[1]})
        else:
            backend = auto_backend(cfg)
        key = f"{backend}|{cfg.model}"
        if key not in self._embedders:
            self._embedders[key] = self.embedder_factories.get(backend)(cfg)
        return self._embedders[key]

    def open_kb(self, name: str, *, create: bool = False, readonly: bool = False) -> FaissKnowledgeBase:
        path = self.catalog.path(name)
        if not create:
            return FaissKnowledgeBase.open(path, gpu=self.settings.store.gpu, readonly=readonly)
        chunking = self.settings.chunking

        def new_manifest() -> Manifest:  # only for a missing base: an existing one keeps its own manifest
            embedder = self.embedder()
            return Manifest(embedder.model_id, embedder.dim, chunking.chunk_size, chunking.chunk_overlap)

        kb = FaissKnowledgeBase.open(path, create=new_manifest, gpu=self.settings.store.gpu)
        if (kb.manifest.chunk_size, kb.manifest.chunk_overlap) != (chunking.chunk_size, chunking.chunk_overlap):
            kb.close()
            raise StoreError(
                f"knowledge base {name!r} was chunked with chunk_size={kb.manifest.chunk_size}, "
                f"chunk_overlap={kb.manifest.chunk_overlap}; the config says {chunking.chunk_size}/"
                f"{chunking.chunk_overlap}. Use the same settings, or rebuild: `python -m app kb delete {name}`."
            )
        return kb

    def ingestor(self, kb: FaissKnowledgeBase) -> Ingestor:
        s = self.settings
        return Ingestor(
            kb,
            self.embedder(kb.manifest),
            self.loaders,
            chunk_size=s.chunking.chunk_size,
            chunk_overlap=s.chunking.chunk_overlap,
            workers=s.ingest.workers,
            commit_every=s.ingest.commit_every,
            max_file_mb=s.ingest.max_file_mb,
            max_file_seconds=s.ingest.max_file_seconds,
        )

    def retriever(self, kb: FaissKnowledgeBase, settings: RetrievalSettings | None = None) -> Retriever:
        """The configured retrieval pipeline (or ``settings``, e.g. plain vector top-k to compare)."""
        settings = settings or self.settings.retrieval
        reranker = self.reranker(settings.reranker) if settings.reranker else None
        return Retriever(kb, self.embedder(kb.manifest), settings, reranker)

    def reranker(self, model: str) -> Reranker:
        if model not in self._rerankers:
            self._rerankers[model] = CrossEncoderReranker(model)
        return self._rerankers[model]
