"""The contract every vector index keeps (knowledge.vectors.VectorIndex), as one suite of tests.

An implementation proves itself by subclassing :class:`VectorIndexContract` and providing the ``kind``
fixture (see tests/test_vector_index.py); a GPU search path or a Milvus index plugs in the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from knowledge.vectors import VectorIndex, VectorIndexError, VectorIndexKind

DIM = 16


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def random_vectors(n: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, DIM)))


def exact_top(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    scores = vectors @ query
    return [int(ids[i]) for i in np.argsort(-scores, kind="stable")[:k]]


class VectorIndexContract:
    """Subclass and provide ``kind``; every test here must pass."""

    @pytest.fixture
    def kind(self) -> VectorIndexKind:
        raise NotImplementedError

    @pytest.fixture
    def filled(self, kind: VectorIndexKind) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
        index = kind.create(DIM)
        vectors = random_vectors(200)
        ids = np.arange(1000, 1200, dtype=np.int64)
        index.add(ids, vectors)
        return index, ids, vectors

    def test_a_new_index_is_empty_and_finds_nothing(self, kind: VectorIndexKind) -> None:
        index = kind.create(DIM)
        assert isinstance(index, VectorIndex)
        assert (len(index), index.dim) == (0, DIM)
        assert index.search(random_vectors(1)[0], 5) == []

    def test_search_returns_the_nearest_by_inner_product_best_first(
        self, filled: tuple[VectorIndex, np.ndarray, np.ndarray]
    ) -> None:
        index, ids, vectors = filled
        for seed in range(5):
            query = random_vectors(1, seed=100 + seed)[0]
            found = index.search(query, 10)
            assert [i for i, _ in found] == exact_top(vectors, ids, query, 10)
            scores = [s for _, s in found]
            assert scores == sorted(scores, reverse=True)
            expected = {int(i): float(v @ query) for i, v in zip(ids, vectors, strict=True)}
            assert all(abs(s - expected[i]) < 1e-3 for i, s in found)

    def test_a_stored_vector_finds_itself_with_similarity_one(
        self, filled: tuple[VectorIndex, np.ndarray, np.ndarray]
    ) -> None:
        index, ids, vectors = filled
        (first, score), *_ = index.search(vectors[17], 3)
        assert first == ids[17] and abs(score - 1.0) < 1e-3

    def test_k_larger_than_the_index_returns_every_vector_once(self, kind: VectorIndexKind) -> None:
        index = kind.create(DIM)
        index.add(np.array([5, 6, 7], dtype=np.int64), random_vectors(3))
        assert sorted(i for i, _ in index.search(random_vectors(1, 9)[0], 50)) == [5, 6, 7]
        assert index.search(random_vectors(1, 9)[0], 0) == []

    def test_removed_ids_are_never_found_and_unknown_ids_are_ignored(
        self, filled: tuple[VectorIndex, np.ndarray, np.ndarray]
    ) -> None:
        index, ids, vectors = filled
        gone = ids[:50]
        index.remove(np.concatenate([gone, np.array([99999], dtype=np.int64)]))
        assert len(index) == 150
        for row in range(0, 50, 7):
            assert not {i for i, _ in index.search(vectors[row], 150)} & set(gone.tolist())
        index.remove(np.array([], dtype=np.int64))
        assert len(index) == 150

    def test_adding_after_removing_keeps_both_right(self, kind: VectorIndexKind) -> None:
        index = kind.create(DIM)
        vectors = random_vectors(20, seed=3)
        index.add(np.arange(10, dtype=np.int64), vectors[:10])
        index.remove(np.arange(5, dtype=np.int64))
        index.add(np.arange(100, 110, dtype=np.int64), vectors[10:])
        assert len(index) == 15
        assert index.search(vectors[12], 1)[0][0] == 102
        assert index.search(vectors[7], 1)[0][0] == 7

    def test_changes_after_a_search_are_seen_by_the_next_search(self, kind: VectorIndexKind) -> None:
        """A search may set up state (a GPU copy of the vectors, a searcher): adds and removes must reach it."""
        index = kind.create(DIM)
        vectors = random_vectors(120, seed=4)
        ids = np.arange(500, 620, dtype=np.int64)
        index.add(ids[:100], vectors[:100])
        assert index.search(vectors[3], 1)[0][0] == 503
        index.remove(ids[:10])
        index.add(ids[100:], vectors[100:])
        live = np.r_[10:120]
        for row in (3, 15, 110):
            found = [i for i, _ in index.search(vectors[row], 5)]
            assert found == exact_top(vectors[live], ids[live], vectors[row], 5)
        assert len(index) == 110

    def test_a_saved_index_loads_back_equal(
        self, kind: VectorIndexKind, filled: tuple[VectorIndex, np.ndarray, np.ndarray], tmp_path: Path
    ) -> None:
        index, _, _ = filled
        path = tmp_path / kind.file_name(7)
        index.save(path)
        again = kind.load(path)
        assert (len(again), again.dim) == (len(index), index.dim)
        for seed in range(3):
            query = random_vectors(1, seed=50 + seed)[0]
            assert [i for i, _ in again.search(query, 8)] == [i for i, _ in index.search(query, 8)]
        assert not list(tmp_path.glob(".*.tmp"))  # the save was atomic: no temp file left

    def test_a_missing_or_damaged_file_is_a_vector_index_error(self, kind: VectorIndexKind, tmp_path: Path) -> None:
        with pytest.raises(VectorIndexError):
            kind.load(tmp_path / kind.file_name(1))
        damaged = tmp_path / kind.file_name(2)
        damaged.write_bytes(b"not an index at all" * 10)
        with pytest.raises(VectorIndexError):
            kind.load(damaged)

    def test_file_names_differ_per_generation(self, kind: VectorIndexKind) -> None:
        assert len({kind.file_name(g) for g in range(5)}) == 5

    def test_a_query_of_the_wrong_dimension_is_refused(self, kind: VectorIndexKind) -> None:
        index = kind.create(DIM)
        index.add(np.array([1], dtype=np.int64), random_vectors(1))
        with pytest.raises(ValueError):
            index.search(np.ones(DIM + 1, dtype=np.float32), 1)
