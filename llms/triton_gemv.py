"""A Triton matrix-vector product for decode: ``x @ W.T`` at 1-16 rows of activations, faster than cuBLAS there.

At a few rows each product of a Llama layer is bound by reading its weight once. :func:`gemv` computes
``x @ W.T`` for a row-major ``W`` of shape (N, K), as ``nn.Linear`` stores it, with a launch configuration
(:class:`GemvConfig`) measured per shape; on an H200 in bfloat16 at Llama-2-7B's shapes it reads the weight
5-20 % faster than cuBLAS at one row and 3-9 % faster at eight (bench/gemv.py). :func:`gemv_reference` is the
same product in torch, for the CPU and the tests.

It is the plain product on purpose. Fusing the operations around it was measured slower on the same H200: an
RMSNorm prologue (each program recomputing its rows' norm) took 44.6 us against 25.7 us for the plain product at
12288x4096 (one row), a SiLU x up prologue 108 us against 25.7 us at 4096x11008 (eight rows), and a layer of
four fused GEMVs 130 us against 122.6 us for cuBLAS plus llms/triton_decode.py's three small kernels; a residual-add
epilogue cost nothing but saved nothing either.

Accumulation is float32 in a fixed order per config; a split-K config writes float32 partial sums to a
workspace and a second small kernel adds them in a fixed order. No host synchronisation and a fixed grid for
fixed shapes, so a call can be captured in a CUDA graph (outputs and the workspace come from ``torch.empty``,
which the graph's memory pool serves).

torch and Triton are imported on first use; :func:`_kernels` binds ``tl`` and compiles nothing until a launch.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch
    import triton.language as tl
else:
    tl = None  # triton.language, bound by _kernels(): the kernel bodies below read it as a module global

MAX_ROWS = 16  # beyond, a matrix product (cuBLAS) is the better kernel


class GemvConfig(NamedTuple):
    """One launch configuration of :func:`gemv`.

    ``dot``: ``tl.dot`` over rows padded to 16 (tensor cores) instead of a broadcast multiply and a row sum
    over each [block_n, block_k] weight tile; ``split_k``: programs along K per block of outputs (partial sums
    in float32, added by a second kernel), for shapes whose N gives too few programs to fill the GPU."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    dot: bool = False

    def label(self) -> str:
        mode = "dot" if self.dot else "red"
        return f"{mode} n{self.block_n} k{self.block_k} w{self.num_warps} s{self.num_stages} sk{self.split_k}"


def default_config(rows: int, n: int, k: int) -> GemvConfig:
    """The configuration for ``rows`` rows times a weight of N=``n`` outputs by K=``k`` columns, chosen by N.

    Measured: the fastest of bench/gemv.py's sweep on an H200, bfloat16, at Llama-2-7B's shapes, in us per
    call with cuBLAS's ``x @ W.T`` in brackets ("red": the multiply + row sum path, "dot": tl.dot):

        N x K               1 row                                8 rows
        4096 x 4096 (o)     red n16 k1024 w8 s3   11.08 (13.17)  dot n32 k128 w4 s5 sk2  12.03 (13.09)
        4096 x 11008 (down) red n16 k1024 w8 s3   24.37 (27.41)  dot n32 k128 w4 s5 sk2  25.69 (28.09)
        12288 x 4096 (qkv)  dot n32 k128 w4 s4    25.68 (27.70)  dot n32 k256 w4 s3      26.56 (28.06)
        22016 x 4096 (g/u)  red n32 k256 w4 s3    43.43 (46.36)  dot n64 k128 w4 s3      44.20 (45.47)
        32000 x 4096 (head) red n32 k256 w8 s3    61.57 (65.54)  dot n64 k128 w4 s3      62.93 (66.38)

    Other shapes take the line of their range of N, and 2-16 rows the 8-row column: N up to 8192 (few outputs:
    small output blocks, and long K steps at one row or split-K at several, to keep every SM reading) the first
    two lines, up to 16384 the qkv line, beyond the gate/up line (the head's 8 warps beyond 24576 at one row).
    So Llama-2-13B's 5120 x 5120 and 5120 x 13824 take the first lines, its 15360-wide qkv the third, its
    27648-wide gate/up and its head the last. ``block_k`` shrinks to K rounded up to a power of two (at least
    64): a small K loads no mostly masked tile."""
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"{rows} rows: this kernel is for 1 to {MAX_ROWS}")
    if rows == 1:
        if n <= 8192:
            cfg = GemvConfig(block_n=16, block_k=1024, num_warps=8, num_stages=3)
        elif n <= 16384:
            cfg = GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=4, dot=True)
        else:
            cfg = GemvConfig(block_n=32, block_k=256, num_warps=4 if n <= 24576 else 8, num_stages=3)
    elif n <= 8192:
        cfg = GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=5, split_k=2, dot=True)
    elif n <= 16384:
        cfg = GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=3, dot=True)
    else:
        cfg = GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, dot=True)
    return cfg._replace(block_k=min(cfg.block_k, max(64, _next_power_of_2(k))))


# The kernels: plain functions here, compiled by triton.jit in _kernels() so that importing this module imports
# neither torch nor Triton. Untyped parameters: Triton reads annotations as specialisation hints.


def _gemv_kernel(  # type: ignore[no-untyped-def]
    X, W, OUT, PART, M, N, K, stride_x, stride_w, stride_o, k_per_split,
    SPLIT: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    row_in = rows < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    x_rows = X + rows[:, None] * stride_x
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    if PDL:  # started while the previous kernel finishes: wait for it, then let the next kernel start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):  # the last split may be shorter
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < K
        a = tl.load(x_rows + ks[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
        # the weight is read once per step: evict it first and keep the activations in L2
        w = tl.load(
            W + offs_n[:, None] * stride_w + ks[None, :],
            mask=n_in[:, None] & k_in[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        if DOT:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")  # ieee: no tf32 for float32 inputs
        elif BLOCK_M == 1:
            acc += tl.sum(a.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]  # [1, BK] x [BN, BK] -> [BN]
        else:
            acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    out_mask = row_in[:, None] & n_in[None, :]
    if SPLIT:
        tl.store(PART + (pid_k * M + rows[:, None]) * N + offs_n[None, :], acc, mask=out_mask)
    else:
        tl.store(OUT + rows[:, None] * stride_o + offs_n[None, :], acc.to(OUT.dtype.element_ty), mask=out_mask)


def _split_sum_kernel(  # type: ignore[no-untyped-def]
    PART, OUT, M, N, stride_o, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    m = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # a fixed order: the same sum on every run
        acc += tl.load(PART + (s * M + m) * N + offs, mask=inside, other=0.0)
    tl.store(OUT + m * stride_o + offs, acc.to(OUT.dtype.element_ty), mask=inside)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The two kernels jitted (compiled on first launch per specialisation); binds ``tl`` for their bodies."""
    import triton
    import triton.language

    globals()["tl"] = triton.language
    return triton.jit(_gemv_kernel), triton.jit(_split_sum_kernel)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def launch_options(pdl: bool) -> dict[str, bool]:
    """The launch options of a kernel launched with programmatic dependent launch or not; the option is named
    only where it is used."""
    return {"launch_pdl": True} if pdl else {}


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``x @ weight.T`` in ``x``'s dtype, shaped (..., N), for ``weight`` (N, K) and ``x`` (..., K).

    ``x``'s leading dimensions hold 1 to 16 rows; ``x`` and ``weight`` share a dtype and have a contiguous last
    dimension. ``out`` (..., N), contiguous: written and returned instead of a new tensor. ``config``: the
    launch configuration, :func:`default_config` for the shape when left out.

    ``pdl``: launch with programmatic dependent launch (CUDA, compute capability 9.0 or later; Triton's
    interpreter cannot run it): the kernel's programs are set up while the previous kernel in the stream
    finishes, and wait for it (``gdc_wait``) before they read or write anything. Every kernel launched so must
    wait like this, so that a kernel that has waited has every earlier one finished."""
    import torch

    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns, expected {k} for a weight of {n}x{k}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share one dtype")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"{rows} rows: this kernel is for 1 to {MAX_ROWS} (use a matrix product beyond)")
    if x2.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x and weight need a contiguous last dimension")
    if out is None:
        out = torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    elif out.shape != (*lead, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*lead, n)}")
    out2 = out.view(rows, n)

    cfg = config or default_config(rows, n, k)
    block_m = max(16, _next_power_of_2(rows)) if cfg.dot else _next_power_of_2(rows)
    # K cut into split_k ranges of whole blocks; no range is empty, so every partial sum gets written
    k_per_split = _cdiv(_cdiv(k, max(1, cfg.split_k)), cfg.block_k) * cfg.block_k
    split = _cdiv(k, k_per_split)
    part = torch.empty((split, rows, n), dtype=torch.float32, device=x.device) if split > 1 else out2
    launch = launch_options(pdl)
    gemv_kernel, split_sum_kernel = _kernels()
    gemv_kernel[(_cdiv(n, cfg.block_n), split)](
        x2, weight, out2, part, rows, n, k, x2.stride(0), weight.stride(0), out2.stride(0), k_per_split,
        SPLIT=split > 1, DOT=cfg.dot, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        PDL=pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch,
    )  # fmt: skip
    if split > 1:
        block = 1024
        split_sum_kernel[(_cdiv(n, block), rows)](
            part, out2, rows, n, out2.stride(0), SPLIT_K=split, BLOCK=block, PDL=pdl, num_warps=4, **launch
        )  # fmt: skip
    return out


def gemv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`gemv` in torch (``x @ weight.T``), for the CPU and the tests."""
    return x @ weight.t()
