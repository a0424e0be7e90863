"""Vector indexes: integer ids -> L2-normalised vectors, searched by inner product (cosine).

:class:`VectorIndex` is the protocol every implementation keeps (tests/vector_index_contract.py is its
contract suite); :class:`VectorIndexKind` makes and loads one. A knowledge base keeps the SQLite docstore as
the source of truth and asks its kind for an index per committed generation, so an implementation only has
to be able to add, remove, search and save. FAISS is the built-in one; others (a GPU search path, Milvus)
register through the ``register_vector_indexes`` plugin hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from common.files import atomic_write_bytes


class VectorIndexError(Exception):
    """An index file that cannot be read; the knowledge base rebuilds it from the docstore."""


@runtime_checkable
class VectorIndex(Protocol):
    """Vectors by int64 id. Not safe for concurrent writes; concurrent searches are fine."""

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int:
        """How many vectors the index holds."""
        ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` ((n, dim) float32) under ``ids`` ((n,) int64, not in the index yet)."""
        ...

    def remove(self, ids: np.ndarray) -> None:
        """Remove these ids; ids that are not in the index are ignored."""
        ...

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(id, inner product) of the ``min(k, len)`` nearest vectors, best first. ``query``: (dim,)."""
        ...

    def save(self, path: Path) -> None:
        """Write the index to ``path`` atomically (readers see the old file or the new one)."""
        ...


class VectorIndexKind(Protocol):
    """Makes, loads and names the indexes of one implementation."""

    name: str

    def create(self, dim: int) -> VectorIndex: ...

    def load(self, path: Path) -> VectorIndex:
        """The index saved at ``path``; VectorIndexError when it is missing or damaged."""
        ...

    def file_name(self, generation: int) -> str:
        """The file of the index that matches a committed generation of the docstore."""
        ...


VectorIndexFactory = Callable[[str], VectorIndexKind]  # factory(store.gpu setting) -> kind


def _faiss() -> Any:
    import faiss  # lazily: importing faiss costs time and is not needed to list knowledge bases

    return faiss


class FaissIndex:
    """``IndexIDMap2`` over exact inner product; searched on the GPUs when faiss-gpu sees any."""

    def __init__(self, index: Any, gpu: str = "auto") -> None:
        self._index = index
        self._gpu = gpu
        self._searcher: Any = None

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        self._index.add_with_ids(vecs, np.ascontiguousarray(ids, dtype=np.int64))
        self._searcher = None

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
            self._searcher = None

    def _search_index(self) -> Any:
        if self._searcher is None:
            faiss = _faiss()
            gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
            if self._gpu == "on" and gpus == 0:
                raise RuntimeError("store.gpu is 'on' but faiss sees no GPU; install faiss-gpu or set store.gpu: auto")
            use_gpu = self._gpu != "off" and gpus > 0 and len(self) > 0
            self._searcher = faiss.index_cpu_to_all_gpus(self._index) if use_gpu else self._index
        return self._searcher

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vector has {q.shape[1]} dimensions, the index {self.dim}")
        if k <= 0 or len(self) == 0:
            return []
        scores, ids = self._search_index().search(q, min(k, len(self)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, _faiss().serialize_index(self._index).tobytes())


class FaissKind:
    name = "faiss"

    def __init__(self, gpu: str = "auto") -> None:
        self.gpu = gpu

    def create(self, dim: int) -> FaissIndex:
        faiss = _faiss()
        return FaissIndex(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), self.gpu)

    def load(self, path: Path) -> FaissIndex:
        faiss = _faiss()
        try:
            data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        except OSError as err:
            raise VectorIndexError(f"{path.name}: {err.strerror or err}") from err
        index = None
        with contextlib.suppress(RuntimeError):  # faiss raises RuntimeError for a damaged file
            index = faiss.deserialize_index(data)
        if index is None:
            raise VectorIndexError(f"{path.name} is damaged")
        return FaissIndex(index, self.gpu)

    def file_name(self, generation: int) -> str:
        return f"index-{generation}.faiss"


def faiss_factory(gpu: str) -> FaissKind:
    return FaissKind(gpu)
