"""Zhiku's extension points.

Built-in loaders, embedders, vector indexes and LLM backends register through these same hooks as
third-party plugins do; a third-party package exposes a module in the ``zhiku`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "zhiku"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# register(extension, loader): loader(path) -> list[langchain_core.documents.Document]
RegisterLoader = Callable[[str, Any], None]
# register(name, factory): factory(settings: knowledge.embedding.EmbeddingSettings) -> Embedder
RegisterEmbedder = Callable[[str, Any], None]
# register(name, factory): factory(gpu: "auto" | "on" | "off") -> knowledge.vectors.VectorIndexKind
RegisterVectorIndex = Callable[[str, Any], None]
# register(name, factory, settings): settings is a pydantic model of the backend's options (the
# ``llm.<name>`` section of config.yml, validated at start-up); factory(settings) -> llms.base.ChatBackend
RegisterLLM = Callable[..., None]


@hookspec
def register_loaders(register: RegisterLoader) -> None:
    """Register file loaders by extension, e.g. ``register(".docx", load_docx)``."""


@hookspec
def register_embedders(register: RegisterEmbedder) -> None:
    """Register embedding backends by name, e.g. ``register("my-embedder", factory)``."""


@hookspec
def register_vector_indexes(register: RegisterVectorIndex) -> None:
    """Register vector index implementations by name, e.g. ``register("milvus", factory)``."""


@hookspec
def register_llms(register: RegisterLLM) -> None:
    """Register chat backends by name with their options model, e.g.
    ``register("my-llm", factory, settings=MyLLMSettings)``."""
