"""Every built-in vector index passes the contract suite (tests/vector_index_contract.py)."""

from __future__ import annotations

import pytest

from knowledge.vectors import FaissKind, VectorIndexKind
from tests.vector_index_contract import VectorIndexContract


class TestFaissIndex(VectorIndexContract):
    @pytest.fixture
    def kind(self) -> VectorIndexKind:
        return FaissKind(gpu="off")
