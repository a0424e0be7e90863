"""The Milvus store (Milvus Lite, in process): the vector index contract, then what only a shared index
needs: snapshots by generation, removals that wait for the save, a crashed transaction's rows purged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from knowledge.milvus import MilvusKind, collection_prefix, lite_path
from tests.vector_index_contract import DIM, VectorIndexContract, random_vectors

pytest.importorskip("milvus_lite")


@pytest.fixture
def milvus(tmp_path: Path) -> Iterator[MilvusKind]:
    kind = MilvusKind(str(lite_path(tmp_path / "kb", "base-1")), collection_prefix("base-1"))
    yield kind
    kind.close()


class TestMilvusLite(VectorIndexContract):
    @pytest.fixture
    def kind(self, milvus: MilvusKind) -> MilvusKind:
        return milvus


def test_an_id_removed_and_added_again_in_one_transaction_keeps_the_committed_row_until_the_save(
    milvus: MilvusKind, tmp_path: Path
) -> None:
    old, new = random_vectors(2, seed=11)
    index = milvus.create(DIM)
    index.begin(1)
    index.add(np.array([7]), old[None])
    index.save(tmp_path / milvus.file_name(1))  # generation 1 committed and saved
    index.begin(2)
    index.remove(np.array([7]))
    index.add(np.array([7]), new[None])  # the same id, another text
    assert len(index) == 1 and index.search(new, 1)[0][0] == 7 and index.search(new, 1)[0][1] > 0.999
    rolled_back = milvus.load(tmp_path / milvus.file_name(1))  # generation 2 never committed: readers see 1
    assert len(rolled_back) == 1 and rolled_back.search(old, 1)[0][1] > 0.999
    index.save(tmp_path / milvus.file_name(2))  # generation 2 committed: the old row is deleted now
    again = milvus.load(tmp_path / milvus.file_name(2))
    assert len(again) == 1 and again.search(new, 1)[0][1] > 0.999
    assert milvus.call("count", "query", index.collection, filter="", output_fields=["count(*)"])[0]["count(*)"] == 1
