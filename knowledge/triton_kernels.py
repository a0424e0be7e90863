"""Triton kernels for the CUDA embedding path; imported only there (importing this module imports Triton).

``add_layer_norm(x, residual, weight, bias, eps)`` = ``layer_norm(x + residual)`` in one pass over memory:
one program per row, the sum and the statistics in float32. Between BERT's matrix products this replaces
three kernels (the add, and LayerNorm's two passes) that only move memory.

``varlen_attention(q, k, v, cu_seqlens, blocks, scale)``: attention within each packed sequence, the
arithmetic of flash attention's variable-length kernel; :class:`knowledge.embed_packed.PackedBert` runs it on
CUDA (and torch's kernel where it fails the probe texts).

``segment_mean(hidden, cu_seqlens, weight)``: each packed sequence's mean hidden state times its weight, the
mean pooling of :class:`knowledge.packed_runner.PackedRunner` on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from knowledge.embed_packed import ATTENTION_BLOCK


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


@triton.jit  # untyped: see above
def _segment_mean_kernel(H, CU, W, OUT, stride, n_cols, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = cols < n_cols
    start = tl.load(CU + row).to(tl.int64)
    end = tl.load(CU + row + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for t in range(start, end, BLOCK_T):
        tokens = t + tl.arange(0, BLOCK_T)
        keep = (tokens < end)[:, None] & inside[None, :]
        acc += tl.sum(tl.load(H + tokens[:, None] * stride + cols[None, :], mask=keep, other=0.0).to(tl.float32), 0)
    mean = acc / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(OUT + row * n_cols + cols, mean * tl.load(W + row), mask=inside)


def segment_mean(hidden: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(rows, hidden) float32: row i is the mean of ``hidden[cu_seqlens[i]:cu_seqlens[i+1]]`` (summed in float32)
    times ``weight[i]``; an empty row is 0. One pass over ``hidden``, no atomics: it replaces a float32 copy of
    the hidden states and an ``index_add_`` into the rows."""
    n = hidden.shape[1]
    assert hidden.stride(1) == 1, "hidden: rows contiguous"
    rows = weight.shape[0]
    out = torch.empty((rows, n), dtype=torch.float32, device=hidden.device)
    block_d = min(128, triton.next_power_of_2(n))
    _segment_mean_kernel[(rows, triton.cdiv(n, block_d))](
        hidden, cu_seqlens, weight, out, hidden.stride(0), n, BLOCK_T=32, BLOCK_D=block_d
    )
    return out


@triton.jit  # untyped: see above
def _varlen_attention_kernel(  # type: ignore[no-untyped-def]
    Q, K, V, CU, BLOCKS, n_blocks, OUT, scale, stride_t, stride_h, out_t, out_h,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(BLOCKS + program)
    if seq < 0:  # the table's unused tail (a fixed-size grid: one CUDA graph per token count)
        return
    block = tl.load(BLOCKS + n_blocks + program)
    start = tl.load(CU + seq).to(tl.int64)  # offsets in int64: a large token budget times the row stride
    length = tl.load(CU + seq + 1) - start
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    inside = rows < length
    q = tl.load(Q + (start + rows)[:, None] * stride_t + h * stride_h + dims[None, :], mask=inside[:, None], other=0.0)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    whole = length // BLOCK_N * BLOCK_N
    for n in range(0, whole, BLOCK_N):  # whole blocks of keys: no masks (6 % faster on an H200)
        where = (start + n + tl.arange(0, BLOCK_N))[:, None] * stride_t + h * stride_h + dims[None, :]
        k = tl.load(K + where)
        scores = tl.dot(q, tl.trans(k))
        new_best = tl.maximum(best, tl.max(scores, axis=1) * scale)  # scale includes log2(e): exp2 below
        p = tl.exp2(scores * scale - new_best[:, None])
        alpha = tl.exp2(best - new_best)
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(V + where)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        best = new_best
    if whole < length:  # the last, partial block
        cols = whole + tl.arange(0, BLOCK_N)
        keep_col = cols < length
        where = (start + cols)[:, None] * stride_t + h * stride_h + dims[None, :]
        k = tl.load(K + where, mask=keep_col[:, None], other=0.0)
        scores = tl.where(keep_col[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        p = tl.exp2(scores - new_best[:, None])
        alpha = tl.exp2(best - new_best)
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(V + where, mask=keep_col[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    out = acc / total[:, None]
    where_out = (start + rows)[:, None] * out_t + h * out_h + dims[None, :]
    tl.store(OUT + where_out, out.to(OUT.dtype.element_ty), mask=inside[:, None])


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    blocks: torch.Tensor,
    scale: float,
    block_m: int = ATTENTION_BLOCK,
    block_n: int = 64,
    warps: int = 4,
    stages: int = 3,
) -> torch.Tensor:
    """Attention within each packed sequence ``[cu_seqlens[i], cu_seqlens[i+1])``, no mask otherwise: ``q``, ``k``,
    ``v`` are (tokens, heads, head_dim) with one layout (views into one q/k/v product are fine), the result is
    (tokens, heads, head_dim) contiguous. The same arithmetic as flash attention's variable-length kernel.

    ``blocks`` (2, programs), integers: the sequence and the block of ``block_m`` queries each program runs
    (:func:`knowledge.embed_packed.query_blocks`); a sequence of -1 runs nothing. The grid is the table's size,
    not the batch's, so one CUDA graph serves every batch of a token count. Tokens that no block covers are
    left as they were (uninitialised). The block sizes are the fastest of a sweep on an H200 at head size 64
    over sequences of 60-400 tokens (bench/README.md): 222 TFLOP/s where torch's kernel gave 127."""
    tokens, heads, d = q.shape
    assert k.stride() == q.stride() and v.stride() == q.stride() and q.stride(2) == 1, "q, k, v: one layout"
    assert blocks.dim() == 2 and blocks.shape[0] == 2 and blocks.is_contiguous(), "blocks: (2, programs)"
    out = torch.empty((tokens, heads, d), dtype=q.dtype, device=q.device)
    programs = blocks.shape[1]
    if programs == 0:
        return out
    _varlen_attention_kernel[(programs, heads)](
        q, k, v, cu_seqlens, blocks, programs, out, scale * 1.4426950408889634, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
