"""llms/triton_gemv.py: the Triton matrix-vector product against torch, run by Triton's interpreter on the CPU,
its argument checks, and the measured configurations of ``default_config``.

The kernel checks run in a subprocess (``python -m tests.test_triton_gemv``, as tests/test_triton_kernels.py
runs tests/triton_interpreted.py) because TRITON_INTERPRET=1 must be set before Triton is imported. Shapes are
small and not multiples of the blocks (N=200 and 37 outputs, K=256, 320 and 200 columns) so the masked tails run.

The interpreter's limits shape the dtype matrix: it rounds float32 -> bfloat16 by truncation (the GPU rounds to
nearest even), so bfloat16 gets a tolerance of a couple of units in the last place; and its ``tl.dot`` on
bfloat16 multiplies the raw bits, so the tensor-core path is checked in float32 and float16 here and in
bfloat16 by bench/gemv.py on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, run_bench, run_interpreted


def test_gemv_kernel_matches_torch_under_the_interpreter() -> None:
    pytest.importorskip("triton", reason="requirements-dev.txt installs Triton (its interpreter runs on a CPU)")
    run_interpreted("tests.test_triton_gemv")


def test_the_gemv_bench_runs_tiny_on_a_cpu() -> None:
    """bench/gemv.py --tiny: both row counts timed against torch's product, each config's output checked."""
    pytest.importorskip("triton", reason="requirements-dev.txt installs Triton (its interpreter runs on a CPU)")
    lines = run_bench("gemv.py", "--tiny")
    assert lines[0].startswith("CPU, Triton's interpreter"), lines[0]
    for rows in (1, 3):
        ours = [line.split() for line in lines if line.split()[:3] == ["96x80", str(rows), "triton"]]
        assert ours, lines
        assert all(float(parts[-1]) < 1e-5 for parts in ours), ours  # max |err| against torch, float32
    assert lines[-1].startswith("done in"), lines[-1]
    assert sum(line.startswith("  (96x80, ") for line in lines) == 2, lines


def test_importing_the_module_imports_neither_torch_nor_triton() -> None:
    code = "import sys, llms.triton_gemv; print(sorted({'torch', 'triton'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_gemv_rejects_what_it_cannot_compute() -> None:
    import torch

    from llms.triton_gemv import gemv

    w = torch.zeros(8, 16)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"x": torch.zeros(1, 15)}, "columns"),
        ({"x": torch.zeros(17, 16)}, "17 rows"),
        ({"x": torch.zeros(0, 16)}, "0 rows"),
        ({"x": torch.zeros(1, 16, dtype=torch.float16)}, "dtype"),
        ({"x": torch.zeros(16, 2).t()[:1]}, "contiguous last dimension"),
        ({"x": torch.zeros(2, 16), "out": torch.zeros(1, 8)}, "out must be"),
        ({"x": torch.zeros(2, 16), "out": torch.zeros(2, 8, dtype=torch.float16)}, "out must be"),
        ({"x": torch.zeros(2, 16), "out": torch.zeros(8, 2).t()}, "out must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            gemv(weight=w, **kwargs)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        gemv(torch.zeros(1, 16), torch.zeros(16, 8).t())


# bench/gemv.py's fastest configs on an H200, bfloat16: (N, K, rows) -> (dot, block_n, block_k, warps, stages, split)
MEASURED = {
    (12288, 4096, 1): (True, 32, 128, 4, 4, 1),
    (12288, 4096, 8): (True, 32, 256, 4, 3, 1),
    (4096, 4096, 1): (False, 16, 1024, 8, 3, 1),
    (4096, 4096, 8): (True, 32, 128, 4, 5, 2),
    (22016, 4096, 1): (False, 32, 256, 4, 3, 1),
    (22016, 4096, 8): (True, 64, 128, 4, 3, 1),
    (4096, 11008, 1): (False, 16, 1024, 8, 3, 1),
    (4096, 11008, 8): (True, 32, 128, 4, 5, 2),
    (32000, 4096, 1): (False, 32, 256, 8, 3, 1),
    (32000, 4096, 8): (True, 64, 128, 4, 3, 1),
}


def test_default_config_is_the_measured_one_at_llama_2_7b_shapes() -> None:
    from llms.triton_gemv import GemvConfig, default_config

    for (n, k, rows), (dot, block_n, block_k, warps, stages, split) in MEASURED.items():
        want = GemvConfig(block_n, block_k, warps, stages, split, dot)
        assert default_config(rows, n, k) == want, (n, k, rows)
        if rows == 8:  # every multi-row count takes the 8-row config
            assert all(default_config(r, n, k) == want for r in range(2, 17)), (n, k)


def test_default_config_is_valid_for_other_shapes() -> None:
    from llms.triton_gemv import default_config

    def power_of_2(v: int) -> bool:
        return v > 0 and v & (v - 1) == 0

    llama_2_13b = [(15360, 5120), (5120, 5120), (27648, 5120), (5120, 13824), (32000, 5120)]
    odd = [(1, 1), (37, 200), (200, 320), (1000, 64), (8193, 3000), (65536, 8192), (4096, 28672)]
    for n, k in llama_2_13b + odd:
        for rows in (1, 2, 3, 8, 16):
            cfg = default_config(rows, n, k)
            where = (rows, n, k, cfg)
            assert power_of_2(cfg.block_n) and power_of_2(cfg.block_k) and cfg.block_k >= 64, where
            assert cfg.num_warps in (1, 2, 4, 8, 16) and cfg.num_stages >= 1 and cfg.split_k >= 1, where
            assert cfg.block_k <= max(64, 2 * k), where  # no block mostly beyond K
            assert cfg.dot or rows == 1, where  # several rows: the tensor-core path measured faster everywhere
    for rows in (0, 17):
        with pytest.raises(ValueError, match="rows"):
            default_config(rows, 4096, 4096)


# Run in the subprocess: `python -m tests.test_triton_gemv` with TRITON_INTERPRET=1.

# per dtype: (rtol, atol) on outputs of standard deviation ~1.6
TOLERANCES = {"float32": (1e-5, 1e-5), "float16": (2e-3, 4e-3), "bfloat16": (2e-2, 6e-2)}


def check_gemv() -> int:
    """The product over configs that take different code paths; returns the number of comparisons.
    Few, large blocks: the interpreter's cost is per program and per operation, not per element."""
    import torch

    from llms.triton_gemv import GemvConfig, gemv, gemv_reference

    reduce_ = GemvConfig(block_n=128, block_k=128, num_warps=4, num_stages=1)
    # K=320 in 3 splits of 128 + 128 + 64 columns: the last range shorter
    dot_split = GemvConfig(block_n=128, block_k=64, num_warps=4, num_stages=1, split_k=3, dot=True)
    dot_ = GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=1, dot=True)
    reduce_split = GemvConfig(block_n=128, block_k=64, num_warps=4, num_stages=1, split_k=2)
    cases = [
        *((torch.float32, reduce_, rows, 200, 256) for rows in (1, 3, 8)),
        *((torch.float32, dot_split, rows, 200, 320) for rows in (1, 3, 8)),
        (torch.float32, dot_, 3, 200, 200),  # whole-K tl.dot, K not a multiple of the block
        (torch.float32, reduce_split, 3, 37, 200),  # K=200 in 128 + 72: a block of the last split partly masked
        (torch.float16, dot_split, 3, 200, 320),
        (torch.bfloat16, reduce_, 1, 200, 256),
        (torch.bfloat16, reduce_, 8, 200, 256),
        (torch.bfloat16, reduce_split, 3, 200, 256),
    ]
    done = 0
    for dtype, cfg, rows, n, k in cases:
        torch.manual_seed(done)
        x = torch.randn(rows, k).to(dtype)
        w = (torch.randn(n, k) * 0.1).to(dtype)
        want = gemv_reference(x, w)
        with_out = done % 2 == 1
        if with_out:  # into a given tensor, leading dimensions kept
            x = x.view(1, rows, k)
            target = torch.full((1, rows, n), float("nan"), dtype=dtype)
            got = gemv(x, w, config=cfg, out=target)
            assert got.data_ptr() == target.data_ptr()
            got = got.view(rows, n)
        else:
            got = gemv(x, w, config=cfg)
        rtol, atol = TOLERANCES[str(dtype).removeprefix("torch.")]
        where = f"{dtype}, {cfg.label()}, {rows} rows, {n}x{k}, out={with_out}"
        assert got.shape == want.shape and got.dtype == dtype, where
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        except AssertionError as error:
            raise AssertionError(f"{where}: {error}") from None
        done += 1
    return done


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before Triton is imported"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(f"{check_gemv()} comparisons")
    print("ok")


if __name__ == "__main__":
    main()
