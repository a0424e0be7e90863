"""The Triton kernels of the CUDA paths, run on the CPU by Triton's interpreter (tests/triton_interpreted.py):
the packed embedder's add + LayerNorm, and the fused decode step's rotary + cache write, add + RMSNorm and
SiLU x up, each against the torch operations it replaces. On the GPU, bench/README.md records the same checks."""

from __future__ import annotations

import pytest

from tests.helpers import run_interpreted

pytest.importorskip("triton", reason="requirements-dev.txt installs Triton (its interpreter runs on a CPU)")


def test_triton_kernels_match_the_torch_operations_they_replace() -> None:
    run_interpreted("tests.triton_interpreted")
