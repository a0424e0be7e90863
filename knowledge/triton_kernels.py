"""Triton kernels for the CUDA embedding path; imported only there (importing this module imports Triton).

``add_layer_norm(x, residual, weight, bias, eps)`` = ``layer_norm(x + residual)`` in one pass over memory:
one program per row, the sum and the statistics in float32. Between BERT's matrix products this replaces
three kernels (the add, and LayerNorm's two passes) that only move memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit  # untyped: Triton reads parameter annotations as specialisation hints
def _add_layer_norm_kernel(X, R, W, B, Y, stride, n_cols, eps, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(X + row * stride + cols, mask=inside, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride + cols, mask=inside, other=0.0).to(tl.float32)
    s = x + r
    mean = tl.sum(s, axis=0) / n_cols
    centred = tl.where(inside, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + row * stride + cols, (centred * rstd * w + b).to(Y.dtype.element_ty), mask=inside)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x + residual`` (both (rows, n), contiguous, same dtype)."""
    rows, n = x.shape
    x, residual = x.contiguous(), residual.contiguous()
    out = torch.empty_like(x)
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 1024 else 8
    _add_layer_norm_kernel[(rows,)](x, residual, weight, bias, out, n, n, eps, BLOCK=block, num_warps=warps)
    return out
