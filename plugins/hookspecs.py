"""Zhiku's extension points.

Built-in loaders, embedders and (later) LLM backends register through these same hooks as third-party
plugins do; a third-party package exposes a module in the ``zhiku`` entry-point group.
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
# register(name, factory): factory(settings: EmbeddingSettings) -> Embedder
RegisterEmbedder = Callable[[str, Any], None]


@hookspec
def register_loaders(register: RegisterLoader) -> None:
    """Register file loaders by extension, e.g. ``register(".docx", load_docx)``."""


@hookspec
def register_embedders(register: RegisterEmbedder) -> None:
    """Register embedding backends by name, e.g. ``register("my-embedder", factory)``."""


# register(name, factory): factory(options: dict) -> llms.base.ChatBackend
RegisterLLM = Callable[[str, Any], None]


@hookspec
def register_llms(register: RegisterLLM) -> None:
    """Register chat backends by name, e.g. ``register("my-llm", factory)``."""
