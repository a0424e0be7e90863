"""Vector indexes: integer ids -> L2-normalised vectors, searched by inner product (cosine).

:class:`VectorIndex` is the protocol every implementation keeps (tests/vector_index_contract.py is its
contract suite); :class:`VectorIndexKind` makes and loads one. A knowledge base keeps the SQLite docstore as
the source of truth and asks its kind for an index per committed generation, so an implementation only has
to be able to add, remove, search and save. Built in: ``faiss`` (exact; searched on the GPU with faiss-gpu, or
with torch over an fp16 copy of the vectors, as ``store.gpu`` allows) and ``faiss-hnsw`` (approximate, for
large bases on a CPU). Others register through the ``register_vector_indexes`` plugin hook.

An index that lives outside the process (Milvus: knowledge/milvus.py) holds every committed row itself, so
:class:`knowledge.store.KnowledgeBase` asks it for a little more, where it has it: its kind's ``shared`` (readers
never rebuild it) and ``discard(old_file, keep=)`` (drops what only an older file used); the index's
``begin(generation)`` (tags what a transaction adds, purges a crashed one's rows), ``catch_up(generation,
removals)`` (seen at a generation, hiding what the docstore removed since its file) and ``search_among(query, k,
ids)`` (a source filter in the engine).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import numpy as np

from common.files import atomic_write, writing_back


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


@functools.cache
def _torch_sees_cuda() -> bool:
    """Whether torch is installed and sees a CUDA (or ROCm) device; asked once per process."""
    if "torch" not in sys.modules and sys.platform.startswith("linux"):
        # No GPU driver node: the answer is no, without importing torch (seconds) to hear it
        if not any(Path(node).exists() for node in ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")):
            return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _faiss_gpus() -> int:
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _query_row(query: np.ndarray, dim: int) -> np.ndarray:
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    if q.shape[1] != dim:
        raise ValueError(f"query vector has {q.shape[1]} dimensions, the index {dim}")
    return q


def _read_faiss_file(path: Path) -> Any:
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
    return index


def _save_faiss_file(index: Any, path: Path) -> None:
    faiss = _faiss()

    def write(fh: BinaryIO) -> None:
        # streamed in 1 MB pieces: serialize_index().tobytes() makes three whole copies first (a 1 M x 768 base:
        # 3 GB), and was half of the index write at the end of an ingest; the disk starts on them as they come
        faiss.write_index(index, faiss.PyCallbackIOWriter(writing_back(fh)))

    atomic_write(path, write)


# The torch path ranks in fp16 and re-scores this many extra candidates in fp32 on the host, so ties and
# fp16 rounding never change the order or the scores against the exact CPU search.
_RERANK_MARGIN = 16
_COPY_ROWS = 1 << 16  # host -> device copies in slices: no full-size fp32 temporary on the device


def _torch_dtype(device: Any) -> Any:
    """fp16 on a GPU halves the bytes each search reads (the matrix-vector product is bandwidth-bound)."""
    import torch

    return torch.float16 if device.type == "cuda" else torch.float32


class _TorchMatrix:
    """The flat index's vectors on a torch device (fp16 on a GPU), in the faiss storage's row order."""

    def __init__(self, device: str, vectors: np.ndarray) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.dtype = _torch_dtype(self.device)
        self.rows = 0
        self._buf = torch.empty((len(vectors), vectors.shape[1]), dtype=self.dtype, device=self.device)
        self.append(vectors)

    def append(self, vectors: np.ndarray) -> None:
        need = self.rows + len(vectors)
        if need > self._buf.shape[0]:  # grow by half: a run of small adds copies the matrix O(log n) times
            grown = self._torch.empty(
                (max(need, self._buf.shape[0] * 3 // 2), self._buf.shape[1]), dtype=self.dtype, device=self.device
            )
            grown[: self.rows] = self._buf[: self.rows]
            self._buf = grown
        for start in range(0, len(vectors), _COPY_ROWS):
            part = np.ascontiguousarray(vectors[start : start + _COPY_ROWS], dtype=np.float32)
            at = self.rows + start
            self._buf[at : at + len(part)].copy_(self._torch.from_numpy(part))
        self.rows = need

    def keep(self, mask: np.ndarray) -> None:
        """Keep the rows where ``mask`` is true, in order (as faiss's remove_ids compacts its storage)."""
        rows = self._torch.from_numpy(np.flatnonzero(mask)).to(self.device)
        kept = self._buf[: self.rows].index_select(0, rows)
        self._buf[: len(rows)] = kept
        self.rows = len(rows)

    def top(self, query: np.ndarray, k: int) -> np.ndarray:
        """Row numbers of the ``k`` largest inner products with ``query`` ((dim,) float32), unordered."""
        torch = self._torch
        with torch.inference_mode():
            q = torch.from_numpy(query).to(self.device, self.dtype)
            scores = torch.mv(self._buf[: self.rows], q)
            return torch.topk(scores, k, sorted=False).indices.cpu().numpy()


class FaissIndex:
    """``IndexIDMap2`` over exact inner product.

    Where it searches is chosen at the first search, from ``gpu``: ``off`` is faiss on the CPU; ``auto`` and
    ``on`` use faiss-gpu when it sees a GPU, else torch when it sees CUDA (the vectors kept on the GPU in fp16,
    a matrix-vector product and top-k), else (``auto`` only) the CPU. ``torch_device`` forces the torch path
    on that device (fp32 on a CPU): tests and benchmarks use it. The faiss index stays the one that is saved.
    """

    def __init__(self, index: Any, gpu: str = "auto", torch_device: str | None = None) -> None:
        if gpu == "off" and torch_device not in (None, "cpu"):
            raise ValueError(f"store.gpu is 'off' but the torch device is {torch_device!r}")
        self._index = index
        self._gpu = gpu
        self._torch_device = torch_device
        self._backend: str | None = None
        self._searcher: Any = None  # faiss-gpu: a copy of the index on the GPUs, made again after a change
        self._matrix: _TorchMatrix | None = None  # torch: the vectors on the device, kept up to date
        self._lock = threading.Lock()  # one thread picks the backend and copies the vectors over

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def backend(self) -> str:
        """Where searches run: faiss-cpu, faiss-gpu, torch-cuda or torch-cpu."""
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = self._pick_backend()
        return self._backend

    def _pick_backend(self) -> str:
        if self._torch_device is not None:
            return f"torch-{self._torch_device.split(':')[0]}"
        if self._gpu == "off":
            return "faiss-cpu"
        if _faiss_gpus() > 0:
            return "faiss-gpu"
        if _torch_sees_cuda() and self._flat_storage() is not None:
            return "torch-cuda"
        if self._gpu == "on":
            raise RuntimeError(
                "store.gpu is 'on' but neither faiss-gpu nor torch sees a GPU; install one or set store.gpu: auto"
            )
        return "faiss-cpu"

    def _flat_storage(self) -> Any:
        """The ``IndexFlat`` under the id map (the torch path reads its vectors), or None."""
        faiss = _faiss()
        if not isinstance(self._index, faiss.IndexIDMap):
            return None
        flat = faiss.downcast_index(self._index.index)
        return flat if isinstance(flat, faiss.IndexFlat) and flat.metric_type == faiss.METRIC_INNER_PRODUCT else None

    def _host_vectors(self) -> np.ndarray:
        """A view of the stored vectors, (len, dim) float32; valid until the next add or remove."""
        flat = self._flat_storage()
        return _faiss().rev_swig_ptr(flat.get_xb(), len(self) * self.dim).reshape(len(self), self.dim)

    def _id_map(self) -> np.ndarray:
        """A view of the ids by storage row; valid until the next add or remove."""
        return _faiss().rev_swig_ptr(self._index.id_map.data(), len(self))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        self._index.add_with_ids(vecs, np.ascontiguousarray(ids, dtype=np.int64))
        self._searcher = None
        if self._matrix is not None:
            self._matrix.append(vecs)

    def remove(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        keep = ~np.isin(self._id_map(), ids) if self._matrix is not None and len(self) else None
        self._index.remove_ids(ids)
        self._searcher = None
        if self._matrix is not None and keep is not None:
            if int(keep.sum()) == len(self):
                self._matrix.keep(keep)
            else:  # not the rows faiss removed (duplicate ids?): copy the vectors again at the next search
                self._matrix = None

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        q = _query_row(query, self.dim)
        if k <= 0 or len(self) == 0:
            return []
        k = min(k, len(self))
        if self.backend.startswith("torch"):
            return self._torch_search(q[0], k)
        scores, ids = self._faiss_searcher().search(q, k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def _faiss_searcher(self) -> Any:
        searcher = self._searcher
        if searcher is None:
            faiss = _faiss()
            searcher = faiss.index_cpu_to_all_gpus(self._index) if self.backend == "faiss-gpu" else self._index
            self._searcher = searcher
        return searcher

    def _torch_search(self, q: np.ndarray, k: int) -> list[tuple[int, float]]:
        matrix = self._matrix
        if matrix is None:
            with self._lock:
                if self._matrix is None:
                    device = self._torch_device or "cuda"
                    self._matrix = _TorchMatrix(device, self._host_vectors())
                matrix = self._matrix
        rows = np.sort(matrix.top(q, min(len(self), k + _RERANK_MARGIN)))
        exact = self._host_vectors()[rows] @ q  # fp32 scores of the candidates: the CPU path's order
        best = rows[np.argsort(-exact, kind="stable")[:k]]
        ids = self._id_map()[best]
        return [(int(i), float(s)) for i, s in zip(ids, np.sort(exact)[::-1][:k], strict=True)]

    def save(self, path: Path) -> None:
        _save_faiss_file(self._index, path)


class FaissKind:
    name = "faiss"

    def __init__(self, gpu: str = "auto", torch_device: str | None = None) -> None:
        self.gpu = gpu
        self.torch_device = torch_device

    def create(self, dim: int) -> FaissIndex:
        faiss = _faiss()
        return FaissIndex(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), self.gpu, self.torch_device)

    def load(self, path: Path) -> FaissIndex:
        index = FaissIndex(_read_faiss_file(path), self.gpu, self.torch_device)
        if index._flat_storage() is None:  # e.g. another kind's file: the store rebuilds it from SQLite
            raise VectorIndexError(f"{path.name} is not an exact inner-product index")
        return index

    def file_name(self, generation: int) -> str:
        return f"index-{generation}.faiss"


def faiss_factory(gpu: str) -> FaissKind:
    return FaissKind(gpu)


class HnswIndex:
    """Approximate search: faiss ``IndexHNSWFlat`` (inner product) under an ``IndexIDMap``, on the CPU.

    HNSW cannot delete a node (faiss raises on ``remove_ids``), so a removed id becomes a tombstone: its
    entry in the id map is set to -1 and searches skip it with an id selector. Its node stays in the graph
    as a stepping stone, so the graph stays connected and recall does not drop, and the tombstones live in
    the ordinary faiss file (no side file, no pickle). When more than ``rebuild_fraction`` of the nodes are
    tombstones, the graph is rebuilt from the live vectors, so the wasted memory and search work stay
    bounded; removals are rare (files re-ingested or deleted), so the rebuild's cost is paid rarely.
    """

    def __init__(self, index: Any, ef_search: int, rebuild_fraction: float = 0.2) -> None:
        faiss = _faiss()
        self._index = index
        self._hnsw = faiss.downcast_index(index.index)
        self.ef_search = ef_search
        self.rebuild_fraction = rebuild_fraction
        self._dead = int(np.count_nonzero(self._id_map() == -1)) if index.ntotal else 0
        # faiss keeps raw pointers to the inner selector: hold both
        self._tombstone = faiss.IDSelectorBatch(np.array([-1], dtype=np.int64))
        self._alive = faiss.IDSelectorNot(self._tombstone)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal) - self._dead

    @property
    def tombstones(self) -> int:
        """Removed ids whose nodes are still in the graph."""
        return self._dead

    def _id_map(self) -> np.ndarray:
        """A writable view of the ids by graph node; valid until the next add."""
        return _faiss().rev_swig_ptr(self._index.id_map.data(), int(self._index.ntotal))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        self._index.add_with_ids(vecs, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        if not len(ids) or not self._index.ntotal:
            return
        id_map = self._id_map()
        hit = np.isin(id_map, np.asarray(ids, dtype=np.int64)) & (id_map != -1)
        id_map[hit] = -1
        self._dead += int(hit.sum())
        if self._dead > self.rebuild_fraction * self._index.ntotal:
            self.rebuild()

    def rebuild(self) -> None:
        """A new graph over the live vectors only (drops the tombstones)."""
        faiss = _faiss()
        id_map = self._id_map()
        live = id_map != -1
        storage = faiss.downcast_index(self._hnsw.storage)
        vectors = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * self.dim).reshape(-1, self.dim)[live]
        fresh = _new_hnsw(self.dim, int(self._hnsw.hnsw.nb_neighbors(1)), int(self._hnsw.hnsw.efConstruction))
        fresh.add_with_ids(vectors, id_map[live].copy())
        self._index, self._hnsw, self._dead = fresh, faiss.downcast_index(fresh.index), 0

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        q = _query_row(query, self.dim)
        if k <= 0 or len(self) == 0:
            return []
        faiss = _faiss()
        # a fresh parameter object per search: IndexIDMap swaps its selector in place while searching
        params = faiss.SearchParametersHNSW(efSearch=self.ef_search)
        if self._dead:
            params.sel = self._alive
        scores, ids = self._index.search(q, min(k, len(self)), params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def save(self, path: Path) -> None:
        _save_faiss_file(self._index, path)


def _new_hnsw(dim: int, m: int, ef_construction: int) -> Any:
    faiss = _faiss()
    hnsw = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = ef_construction
    return faiss.IndexIDMap(hnsw)


class HnswKind:
    """``store.index: faiss-hnsw``. ``m``: graph degree (fixed when the index is built; memory grows with it);
    ``ef_search``: candidates per search (recall and latency grow with it); ``ef_construction``: candidates
    per insertion (graph quality and build time grow with it). ``store.gpu`` does not apply: this is the
    option for CPUs; a GPU searches the exact ``faiss`` index in well under a millisecond."""

    name = "faiss-hnsw"

    def __init__(self, gpu: str = "auto", m: int = 32, ef_search: int = 128, ef_construction: int = 80) -> None:
        self.gpu = gpu
        self.m = m
        self.ef_search = ef_search
        self.ef_construction = ef_construction

    def create(self, dim: int) -> HnswIndex:
        return HnswIndex(_new_hnsw(dim, self.m, self.ef_construction), self.ef_search)

    def load(self, path: Path) -> HnswIndex:
        faiss = _faiss()
        index = _read_faiss_file(path)
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else None
        if isinstance(index, faiss.IndexIDMap2) or not isinstance(inner, faiss.IndexHNSWFlat):
            raise VectorIndexError(f"{path.name} is not an HNSW index")
        inner.hnsw.efConstruction = self.ef_construction  # for what is added from now on
        return HnswIndex(index, self.ef_search)

    def file_name(self, generation: int) -> str:
        return f"index-{generation}.hnsw.faiss"  # "index-*": the store's clean-up of old generations finds it


def hnsw_factory(gpu: str) -> HnswKind:
    return HnswKind(gpu)
