"""The Milvus store (Milvus Lite, in process): the vector index contract, then what only a shared index
needs: snapshots by generation, removals that wait for the save, a crashed transaction's rows purged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from knowledge.milvus import MilvusKind, collection_prefix, lite_path
from tests.vector_index_contract import VectorIndexContract

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
