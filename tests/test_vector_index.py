"""Every built-in vector index passes the contract suite (tests/vector_index_contract.py), in every variant
of where it searches; then what only one of them promises: the torch path ranks as faiss does, store.gpu
picks the backend, and the HNSW index keeps its tombstones and its recall."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from common import files
from knowledge import vectors
from knowledge.vectors import FaissIndex, FaissKind, HnswIndex, HnswKind, VectorIndexError, VectorIndexKind
from tests.vector_index_contract import DIM, VectorIndexContract, random_vectors, unit

VARIANTS: dict[str, Callable[[], VectorIndexKind]] = {
    "faiss-cpu": lambda: FaissKind(gpu="off"),
    "faiss-auto": lambda: FaissKind(gpu="auto"),  # the GPU where this machine has one, else faiss-cpu
    "torch-cpu": lambda: FaissKind(gpu="auto", torch_device="cpu"),  # the GPU path's code, on the CPU
    "faiss-hnsw": lambda: HnswKind(),
}


class TestBuiltinIndexes(VectorIndexContract):
    @pytest.fixture(params=sorted(VARIANTS))
    def kind(self, request: pytest.FixtureRequest) -> VectorIndexKind:
        return VARIANTS[request.param]()


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Vectors in clusters on a low-dimensional subspace, as text embeddings are (unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(16, dim))
    centres = rng.normal(size=(max(n // 50, 1), 16)) * 2
    points = centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, 16))
    return unit(points @ basis + 0.1 * rng.normal(size=(n, dim)))


def overlap_at_k(a: list[list[int]], b: list[list[int]]) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b, strict=True)]))


def top_ids(index: vectors.VectorIndex, queries: np.ndarray, k: int) -> list[list[int]]:
    return [[i for i, _ in index.search(q, k)] for q in queries]


# ----- the torch path ------------------------------------------------------------------------------------
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_the_torch_path_finds_the_same_top_k_as_faiss_flat(half: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    if half:  # the GPU's fp16 matrix, emulated on the CPU: the fp32 re-scoring keeps faiss's order
        monkeypatch.setattr(vectors, "_torch_dtype", lambda device: torch.float16)
    base, queries = clustered(6000, 96, seed=1), clustered(40, 96, seed=2)
    ids = np.arange(10**6, 10**6 + len(base), dtype=np.int64)
    flat, fast = FaissKind(gpu="off").create(96), FaissKind(torch_device="cpu").create(96)
    for index in (flat, fast):
        index.add(ids, base)
    assert isinstance(fast, FaissIndex) and fast.backend == "torch-cpu"
    assert overlap_at_k(top_ids(fast, queries, 10), top_ids(flat, queries, 10)) >= 0.99
    for q in queries[:5]:
        for (i, s), (j, t) in zip(fast.search(q, 10), flat.search(q, 10), strict=True):
            assert i == j and abs(s - t) < 1e-5  # scores are the exact fp32 ones, not fp16's


def test_the_torch_copy_follows_adds_and_removes_after_a_search() -> None:
    base = random_vectors(300, seed=5)
    index = FaissKind(torch_device="cpu").create(DIM)
    index.add(np.arange(300, dtype=np.int64), base)
    index.search(base[0], 1)  # builds the torch copy
    index.remove(np.arange(0, 300, 3, dtype=np.int64))
    index.add(np.array([1000], dtype=np.int64), base[:1])  # id 0's vector again, under a new id
    assert index.search(base[0], 1)[0][0] == 1000
    assert index._matrix is not None and index._matrix.rows == len(index) == 201


# ----- store.gpu picks the backend ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gpu", "faiss_gpus", "torch_cuda", "expected"),
    [
        ("off", 1, True, "faiss-cpu"),  # off never touches a GPU, whatever is installed
        ("auto", 0, False, "faiss-cpu"),
        ("auto", 1, True, "faiss-gpu"),  # faiss-gpu first: it is the same index
        ("auto", 0, True, "torch-cuda"),
        ("on", 0, True, "torch-cuda"),
        ("on", 1, False, "faiss-gpu"),
    ],
)
def test_store_gpu_picks_where_searches_run(
    gpu: str, faiss_gpus: int, torch_cuda: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vectors, "_faiss_gpus", lambda: faiss_gpus)
    monkeypatch.setattr(vectors, "_torch_sees_cuda", lambda: torch_cuda)
    index = FaissKind(gpu=gpu).create(DIM)
    assert isinstance(index, FaissIndex) and index.backend == expected


def test_store_gpu_on_without_any_gpu_path_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vectors, "_faiss_gpus", lambda: 0)
    monkeypatch.setattr(vectors, "_torch_sees_cuda", lambda: False)
    index = FaissKind(gpu="on").create(DIM)
    index.add(np.array([1], dtype=np.int64), random_vectors(1))
    with pytest.raises(RuntimeError, match=r"store\.gpu"):
        index.search(random_vectors(1)[0], 1)


def test_gpu_off_with_a_gpu_device_is_refused() -> None:
    with pytest.raises(ValueError):
        FaissKind(gpu="off", torch_device="cuda").create(DIM)


def test_an_hnsw_file_is_not_taken_for_a_flat_index_nor_the_reverse(tmp_path: Path) -> None:
    for writer, reader in ((HnswKind(), FaissKind(gpu="off")), (FaissKind(gpu="off"), HnswKind())):
        index = writer.create(DIM)
        index.add(np.arange(3, dtype=np.int64), random_vectors(3))
        index.save(tmp_path / "index-1.faiss")
        with pytest.raises(VectorIndexError):
            reader.load(tmp_path / "index-1.faiss")


# ----- HNSW ----------------------------------------------------------------------------------------------
def test_hnsw_tombstones_are_skipped_and_survive_a_save(tmp_path: Path) -> None:
    kind = HnswKind()
    index = kind.create(DIM)
    base = random_vectors(200, seed=6)
    index.add(np.arange(200, dtype=np.int64), base)
    index.remove(np.arange(0, 20, dtype=np.int64))  # 10 %: below the rebuild threshold
    assert isinstance(index, HnswIndex) and index.tombstones == 20 and len(index) == 180
    index.save(tmp_path / kind.file_name(1))
    again = kind.load(tmp_path / kind.file_name(1))
    assert isinstance(again, HnswIndex) and again.tombstones == 20 and len(again) == 180
    for row in range(20):
        assert not {i for i, _ in again.search(base[row], 50)} & set(range(20))
    assert again.search(base[150], 1)[0][0] == 150


def test_hnsw_rebuilds_without_its_tombstones_past_the_threshold() -> None:
    index = HnswKind().create(DIM)
    assert isinstance(index, HnswIndex)
    base = random_vectors(100, seed=7)
    index.add(np.arange(100, dtype=np.int64), base)
    index.remove(np.arange(15, dtype=np.int64))
    assert index.tombstones == 15
    index.remove(np.arange(15, 30, dtype=np.int64))  # 30 % dead > 20 %: a new graph of the 70 live
    assert index.tombstones == 0 and len(index) == 70
    assert index.search(base[50], 1)[0][0] == 50
    index.remove(np.arange(100, dtype=np.int64))
    assert len(index) == 0 and index.search(base[50], 3) == []


def test_hnsw_options_reach_the_index(tmp_path: Path) -> None:
    index = HnswKind(m=12, ef_search=40, ef_construction=60).create(DIM)
    assert isinstance(index, HnswIndex)
    assert (index._hnsw.hnsw.nb_neighbors(1), index._hnsw.hnsw.efConstruction, index.ef_search) == (12, 60, 40)
    index.add(np.arange(10, dtype=np.int64), random_vectors(10))
    index.save(tmp_path / "i")
    loaded = HnswKind(m=99, ef_search=7, ef_construction=33).load(tmp_path / "i")
    # M is the saved graph's; the search and insertion breadths are the configured ones
    assert (loaded._hnsw.hnsw.nb_neighbors(1), loaded._hnsw.hnsw.efConstruction, loaded.ef_search) == (12, 33, 7)


def test_hnsw_recall_at_10_against_flat_on_clustered_vectors() -> None:
    base, queries = clustered(8000, 64, seed=3), clustered(50, 64, seed=4)
    ids = np.arange(len(base), dtype=np.int64)
    flat, hnsw = FaissKind(gpu="off").create(64), HnswKind().create(64)
    for index in (flat, hnsw):
        index.add(ids, base)
    assert overlap_at_k(top_ids(hnsw, queries, 10), top_ids(flat, queries, 10)) >= 0.95


@pytest.mark.parametrize("make", [lambda: FaissKind(gpu="off"), lambda: HnswKind()], ids=["flat", "hnsw"])
def test_a_disk_full_while_the_index_file_is_streamed_is_an_os_error_and_keeps_the_old_file(
    make: Callable[[], VectorIndexKind], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is streamed through faiss's writer: a failed write must come out as the OSError it is (what the
    store reports as a save error), with the older file whole and no temp file left."""
    import errno

    kind = make()
    index = kind.create(DIM)
    index.add(np.arange(100, dtype=np.int64), random_vectors(100))
    path = tmp_path / kind.file_name(1)
    index.save(path)
    before = path.read_bytes()
    index.add(np.arange(100, 300, dtype=np.int64), random_vectors(200, seed=1))

    class FillsUp:
        def __init__(self, fh: BinaryIO) -> None:
            self.fh, self.written = fh, 0

        def write(self, data: bytes) -> int:
            if self.written + len(data) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.fh.write(data)

    def disk_fills_up(target: Path, write: Callable[[BinaryIO], object]) -> None:
        files.atomic_write(target, lambda fh: write(FillsUp(fh)))  # type: ignore[arg-type]

    monkeypatch.setattr(vectors, "atomic_write", disk_fills_up)
    with pytest.raises(OSError) as raised:
        index.save(path)
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and len(kind.load(path)) == 100
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_large_file_is_handed_to_the_disk_as_it_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ``every`` bytes written, the kernel is asked to start writing them (contiguous ranges, each already
    in the file when asked); the file holds exactly what was written. A handle without an OS file, or a system
    without the call, writes plainly."""
    requests: list[tuple[int, int, int]] = []

    def recording(fd: int, offset: int, count: int, flags: int) -> int:
        assert os.fstat(fd).st_size >= offset + count, "asked before the bytes reached the kernel"
        requests.append((offset, count, flags))
        return 0

    monkeypatch.setattr(files, "_sync_file_range", lambda: recording)
    pieces = [bytes([n]) * 3 for n in range(10)]
    target = tmp_path / "big.bin"

    def write(fh: BinaryIO) -> None:
        write_piece = files.writing_back(fh, every=8)
        for piece in pieces:
            assert write_piece(piece) == 3

    files.atomic_write(target, write)
    assert target.read_bytes() == b"".join(pieces)
    assert requests == [(0, 9, 2), (9, 9, 2), (18, 9, 2)]  # the last 3 bytes: left to the fsync

    buffer = io.BytesIO()
    assert files.writing_back(buffer) == buffer.write  # no OS file underneath: plain writes
    monkeypatch.setattr(files, "_sync_file_range", lambda: None)
    with open(tmp_path / "plain.bin", "wb") as fh:
        assert files.writing_back(fh) == fh.write


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_writeback_call_is_the_c_librarys(tmp_path: Path) -> None:
    start_writeback = files._sync_file_range()
    assert start_writeback is not None
    with open(tmp_path / "f.bin", "wb") as fh:
        fh.write(b"x" * 10_000)
        fh.flush()
        assert start_writeback(fh.fileno(), 0, 10_000, 2) == 0
        assert start_writeback(-1, 0, 10, 2) == -1  # a bad descriptor is refused, not ignored: the call is real
