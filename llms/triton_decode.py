"""Triton kernels for the fused decode step (llms/llama_step.py) on CUDA; imported only there (importing this
module imports Triton).

At a few rows a decode step is bound by reading the weights, and the small operations between the matrix
products cost a kernel launch each inside the CUDA graph (~2 us apiece, ~20 per layer). These kernels do that
work in fewer launches:

- :func:`rope_and_cache`: the rotary embedding of q and k, and the writes of k and v into the slot cache at
  each row's position, in one launch (in torch: ~8 kernels);
- :func:`add_rms_norm`: the residual add and the next RMSNorm in one launch, the sum kept in the model's dtype
  as ``x + delta`` rounds it, the norm computed in float32 as ``torch.nn.functional.rms_norm`` does;
- :func:`silu_mul`: ``silu(gate) * up`` over the fused gate/up product in one launch;
- :func:`linear`: the matrix products themselves at up to 16 rows, as Triton's matrix-vector product
  (:mod:`llms.triton_gemv`), which reads a weight 5-20 % faster than cuBLAS at one row on an H200.

With ``pdl`` (:func:`pdl_supported`: compute capability 9.0 or later) each kernel is launched with programmatic
dependent launch: its programs are launched and set up while the kernel before it finishes, and wait for that
kernel (``gdc_wait``) before they read or write anything it could touch. Every kernel launched so waits, which
keeps the order transitive: a kernel that has waited has every earlier kernel finished. On an H200 this took a
7B step's CUDA graph from 4.095 to 3.935 ms at one row (bench/chat.py, bench/README.md).

Each computes in float32 and rounds once, where torch's separate kernels round after each step: the results
differ from the torch path by bf16 rounding, which the device check in bench/README.md measures.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llms.triton_gemv import MAX_ROWS, gemv, launch_options

LINEAR_MAX_ROWS = MAX_ROWS  # more rows: a matrix product, for cuBLAS
PDL = True  # programmatic dependent launch where pdl_supported(); bench/chat.py turns it off to compare


def pdl_supported(device: torch.device) -> bool:
    """Whether ``device`` runs programmatic dependent launch (CUDA, compute capability 9.0 or later, and not
    Triton's interpreter, which cannot run ``gdc_wait``)."""
    if not PDL or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit  # untyped: Triton reads parameter annotations as specialisation hints
def _rope_cache_kernel(  # type: ignore[no-untyped-def]
    QKV, COS, SIN, POS, QOUT, KC, VC, qkv_stride, cs_stride, c_row, c_head, c_pos,
    H: tl.constexpr, K: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.program_id(0)
    j = tl.program_id(1)  # head: q heads, then k heads, then v heads
    offs = tl.arange(0, D)
    base = QKV + r * qkv_stride + j * D
    x = tl.load(base + offs).to(tl.float32)
    if j < H + K:
        half = D // 2
        first = offs < half
        partner = tl.load(base + tl.where(first, offs + half, offs - half)).to(tl.float32)
        cos = tl.load(COS + r * cs_stride + offs).to(tl.float32)
        sin = tl.load(SIN + r * cs_stride + offs).to(tl.float32)
        y = x * cos + tl.where(first, -partner, partner) * sin  # rotate_half(x) = (-x2, x1)
        if j < H:
            tl.store(QOUT + (r * H + j) * D + offs, y.to(QOUT.dtype.element_ty))
        else:
            p = tl.load(POS + r)
            tl.store(KC + r * c_row + (j - H) * c_head + p * c_pos + offs, y.to(KC.dtype.element_ty))
    else:
        p = tl.load(POS + r)
        tl.store(VC + r * c_row + (j - H - K) * c_head + p * c_pos + offs, x.to(VC.dtype.element_ty))


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    kv_heads: int,
    pdl: bool = False,
) -> torch.Tensor:
    """q rotated, (rows, heads, 1, head_dim); k rotated and v written into ``keys``/``values`` (slots, kv_heads,
    window, head_dim) at row r's ``positions[r]``. ``qkv`` is (rows, (heads + 2 kv_heads) head_dim) contiguous,
    ``cos``/``sin`` (rows, head_dim) contiguous."""
    rows = qkv.shape[0]
    d = keys.shape[-1]
    q = torch.empty((rows, heads, 1, d), dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(rows, heads + 2 * kv_heads)](
        qkv, cos, sin, positions, q, keys, values, qkv.stride(0), cos.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2), H=heads, K=kv_heads, D=d, PDL=pdl, num_warps=1,
        **launch_options(pdl),
    )  # fmt: skip
    return q


@triton.jit  # untyped: see above
def _add_rms_kernel(X, DELTA, W, XOUT, NOUT, n, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    inside = offs < n
    w = tl.load(W + offs, mask=inside, other=0.0).to(tl.float32)  # a weight: never written, read before waiting
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(X + r * n + offs, mask=inside, other=0.0).to(tl.float32)
    delta = tl.load(DELTA + r * n + offs, mask=inside, other=0.0).to(tl.float32)
    total = (x + delta).to(XOUT.dtype.element_ty)  # the residual stream, rounded as `x + delta` rounds it
    tl.store(XOUT + r * n + offs, total, mask=inside)
    t = total.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(t * t, axis=0) / n + eps)
    tl.store(NOUT + r * n + offs, (t * rstd * w).to(NOUT.dtype.element_ty), mask=inside)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * weight), both shaped like ``x`` (contiguous, last dimension normed)."""
    n = x.shape[-1]
    rows = x.numel() // n
    total, normed = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(n)
    _add_rms_kernel[(rows,)](
        x, delta.contiguous(), weight, total, normed, n, eps, BLOCK=block, PDL=pdl,
        num_warps=min(16, max(1, block // 256)), **launch_options(pdl),
    )  # fmt: skip
    return total, normed


@triton.jit  # untyped: see above
def _silu_mul_kernel(GU, OUT, f, BLOCK: tl.constexpr, PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < f
    gate = tl.load(GU + r * 2 * f + offs, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(GU + r * 2 * f + f + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(OUT + r * f + offs, (gate / (1.0 + tl.exp(-gate)) * up).to(OUT.dtype.element_ty), mask=inside)


def silu_mul(gate_up: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up`` is [gate | up] along its (contiguous) last dimension."""
    f = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * f)
    out = torch.empty((*gate_up.shape[:-1], f), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(f, block))](
        gate_up.contiguous(), out, f, BLOCK=block, PDL=pdl, num_warps=4, **launch_options(pdl)
    )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """``x @ weight.T`` for 1 to LINEAR_MAX_ROWS rows, with the configuration measured for the shape."""
    return gemv(x, weight, pdl=pdl)
