"""The composition root: builds Zhiku's parts from typed settings, once, and hands them out.

Read this file to see what a running Zhiku is made of. It holds no module-level state: every CLI
invocation, test or server process makes its own :class:`Zhiku`. The services built here (chat, ingest,
knowledge bases) are what the CLI, the UI and the HTTP API call; nothing they call comes back here.
"""

from __future__ import annotations

from functools import cached_property
from types import ModuleType
from typing import TYPE_CHECKING

import pluggy
from pydantic import BaseModel, ValidationError

from app.settings import ConfigError, Settings
from knowledge import plugin as knowledge_plugin
from knowledge.catalog import Catalog
from knowledge.embedding import Embedder, EmbedderFactory, Embedders
from knowledge.ingest import Ingestor
from knowledge.library import KnowledgeLibrary
from knowledge.loaders import LoaderRegistry
from knowledge.retrieval import Reranker, Rerankers, RetrievalSettings, Retriever
from knowledge.store import KnowledgeBase, Manifest, StoreError
from knowledge.stores import VectorStores
from knowledge.vectors import HnswKind, VectorIndexFactory, VectorIndexKind
from llms import plugin as llms_plugin
from llms.base import ChatBackend, LLMCatalog, LLMFactory, LLMSpec, NoOptions
from plugins.registry import Registry, build_plugin_manager

if TYPE_CHECKING:
    from app.access import KbAccess
    from app.conversations import ConversationStore
    from app.jobs import IngestJobs
    from app.services import ChatService, IngestService, KnowledgeBaseService

BUILTIN_PLUGINS: tuple[ModuleType, ...] = (knowledge_plugin, llms_plugin)


class Zhiku:
    def __init__(self, settings: Settings, *, entry_points: bool = True) -> None:
        self.settings = settings
        self._entry_points = entry_points

    def close(self) -> None:
        """Let go of connections to outside stores (a Milvus Lite folder is one process's at a time)."""
        if "stores" in self.__dict__:
            self.stores.close()

    # ----- plugins -------------------------------------------------------------------------------
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
    def vector_index_factories(self) -> Registry[VectorIndexFactory]:
        registry: Registry[VectorIndexFactory] = Registry("vector index")
        self.plugins.hook.register_vector_indexes(register=registry.register)
        return registry

    @cached_property
    def llm_specs(self) -> Registry[LLMSpec]:
        registry: Registry[LLMSpec] = Registry("LLM backend")

        def register(name: str, factory: LLMFactory, settings: type[BaseModel] = NoOptions) -> None:
            registry.register(name, LLMSpec(factory, settings))

        self.plugins.hook.register_llms(register=register)
        return registry

    # ----- configuration checked against what plugins registered ---------------------------------
    def llm_options(self, name: str) -> BaseModel:
        """``llm.<name>`` validated against the settings model that backend registered."""
        spec = self.llm_specs.get(name)
        try:
            return spec.settings.model_validate(self.settings.llm.sections().get(name) or {})
        except ValidationError as err:
            problems = "; ".join(
                f"llm.{name}.{'.'.join(str(p) for p in e['loc'])}: "
                + ("unknown key (check its spelling)" if e["type"] == "extra_forbidden" else str(e["msg"]))
                for e in err.errors()
            )
            raise ConfigError(f"invalid configuration: {problems}") from None

    def check(self) -> Zhiku:
        """Validate what only the plugins can tell (backend sections, the chosen backend) at start-up."""
        names = self.llm_specs.names()
        for section in self.settings.llm.sections():
            if section not in names:
                raise ConfigError(
                    f"llm.{section}: no LLM backend is named {section!r}",
                    f"registered backends: {', '.join(names)}; fix the key or install the plugin that provides it",
                )
            self.llm_options(section)
        # llm.backend itself is checked where a chat needs it: ingest and search run without the LLM
        self.vector_kind  # noqa: B018 - resolves store.index now, so a wrong name fails at start-up
        return self

    @cached_property
    def llms(self) -> LLMCatalog:
        """Builds chat backends by name; every registered backend's section validated now."""
        return LLMCatalog(self.llm_specs.get, {name: self.llm_options(name) for name in self.llm_specs.names()})

    def backend(self, name: str | None = None) -> ChatBackend:
        """A new chat backend (it loads its model lazily); the chat service keeps one per name."""
        return self.llms.build(name or self.settings.llm.backend)

    # ----- knowledge ------------------------------------------------------------------------------
    @cached_property
    def catalog(self) -> Catalog:
        return Catalog(self.settings.kb_root)

    @cached_property
    def embedders(self) -> Embedders:
        return Embedders(self.settings.embedding, self.embedder_factories.get)

    def embedder(self, manifest: Manifest | None = None) -> Embedder:
        """The configured embedder; with ``backend: auto`` an existing knowledge base keeps its own model."""
        return self.embedders.for_model(manifest.embedding_model) if manifest else self.embedders.configured()

    @cached_property
    def vector_kind(self) -> VectorIndexKind:
        store = self.settings.store
        kind = self.vector_index_factories.get(store.index)(store.gpu)
        if isinstance(kind, HnswKind):  # its options live in store.hnsw
            kind = HnswKind(store.gpu, **store.hnsw.model_dump())
        return kind

    @cached_property
    def stores(self) -> VectorStores:
        """Each base's vector index, from its own manifest: the configured FAISS kind, or its Milvus."""
        return VectorStores(self.vector_kind, self.settings.store.milvus)

    @cached_property
    def rerankers(self) -> Rerankers:
        return Rerankers()

    def reranker(self, model: str) -> Reranker:
        return self.rerankers.get(model)

    @cached_property
    def library(self) -> KnowledgeLibrary:
        """The read side: open knowledge bases by name, one retriever each."""
        return KnowledgeLibrary(
            self.catalog,
            kind_for=self.stores,
            embedder_for=self.embedders.for_model,
            retrieval=self.settings.retrieval,
            reranker_for=self.rerankers.get,
        )

    def open_kb(self, name: str, *, create: bool = False, readonly: bool = False) -> KnowledgeBase:
        """A knowledge base of one's own (the library shares read-only ones): for writing, or a one-off read."""
        path = self.catalog.path(name)
        if not create:
            return KnowledgeBase.open(path, kind_for=self.stores, readonly=readonly, name=name)
        chunking = self.settings.chunking

        def new_manifest() -> Manifest:  # only for a missing base: an existing one keeps its own manifest
            embedder = self.embedder()
            store = self.settings.store
            return Manifest(
                embedder.model_id,
                embedder.dim,
                chunking.chunk_size,
                chunking.chunk_overlap,
                store=store.backend,
                store_uri=store.uri if store.backend == "milvus" else "",
            )

        kb = KnowledgeBase.open(path, create=new_manifest, kind_for=self.stores, name=name)
        if (kb.manifest.chunk_size, kb.manifest.chunk_overlap) != (chunking.chunk_size, chunking.chunk_overlap):
            kb.close()
            raise StoreError(
                f"knowledge base {name!r} was chunked with chunk_size={kb.manifest.chunk_size}, "
                f"chunk_overlap={kb.manifest.chunk_overlap}; the config says {chunking.chunk_size}/"
                f"{chunking.chunk_overlap}",
                f"use the same settings, or rebuild: `python -m app kb delete {name}` and ingest again",
            )
        return kb

    def ingestor(self, kb: KnowledgeBase) -> Ingestor:
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
            index_interval=s.ingest.index_every_s,
        )

    def retriever(self, kb: KnowledgeBase, settings: RetrievalSettings | None = None) -> Retriever:
        """A retriever over a base opened with :meth:`open_kb` (the configured pipeline, or ``settings``)."""
        settings = settings or self.settings.retrieval
        reranker = self.reranker(settings.reranker) if settings.reranker else None
        return Retriever(kb, self.embedder(kb.manifest), settings, reranker)

    # ----- services: what every entry point calls -------------------------------------------------
    @cached_property
    def chat(self) -> ChatService:
        from app.services import ChatService

        return ChatService(self.settings, self.library, self.llms.build)

    @cached_property
    def ingest(self) -> IngestService:
        from app.services import IngestService

        return IngestService(self.settings, self.open_kb, self.ingestor, self.library, self.loaders.extensions)

    @cached_property
    def access(self) -> KbAccess:
        """Who may see and change which knowledge base when login is on."""
        from app.access import KbAccess

        return KbAccess(self.settings.data_dir)

    @cached_property
    def conversations(self) -> ConversationStore:
        """The saved conversations (the UI's sidebar, the API's /v1/conversations)."""
        from app.conversations import ConversationStore

        return ConversationStore(self.settings.data_dir)

    @cached_property
    def jobs(self) -> IngestJobs:
        """Background ingests (the UI's knowledge-base page); jobs a stopped server left running are marked
        interrupted when this is first built."""
        from app.jobs import IngestJobs

        return IngestJobs(self.settings.data_dir, self.ingest)

    @cached_property
    def kbs(self) -> KnowledgeBaseService:
        from app.services import KnowledgeBaseService

        return KnowledgeBaseService(self.settings, self.catalog, self.open_kb, self.library, self.stores)
