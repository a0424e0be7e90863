"""A BERT encoder (m3e-base's architecture) run over packed sequences: no padding, fewer kernels.

The texts of a batch are laid end to end as one (tokens, hidden) matrix; attention keeps them apart with
cumulative sequence offsets (a Triton kernel, :func:`knowledge.triton_kernels.varlen_attention`, or flash
attention's variable-length kernel, ``torch.nn.attention.varlen``).
Nothing is spent on padding, and the small kernels between the matrix products are fused:

- q, k and v are one matrix product (their weights concatenated once, at load);
- GELU runs in the epilogue of the intermediate matrix product (``torch._addmm_activation``: cuBLASLt's
  GELU epilogue, tanh approximation, on CUDA);
- each residual add and the LayerNorm after it are one Triton kernel (:mod:`knowledge.triton_kernels`).

Profiled on an H200 (bench/README.md): in the padded transformers forward, LayerNorm, GELU and the residual
adds took 28 % of the GPU time and padding 8 % of the tokens.

The weights stay the transformers model's (views, no second copy except the fused q/k/v). On a CPU the same
code runs with per-sequence SDPA and plain LayerNorm: slower, but it lets the tests check the packing and
the fused layers against transformers' own forward with a tiny model. torch is imported inside functions.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


ATTENTION_BLOCK = 64  # queries per program of the Triton attention kernel (its sweep's best on an H200)


def blocks_per_sequence(lengths: np.ndarray, block: int = ATTENTION_BLOCK) -> np.ndarray:
    """Each sequence's blocks of ``block`` queries (its programs in the attention kernel's table)."""
    return -(-np.asarray(lengths, dtype=np.int64) // block)


def query_blocks(lengths: np.ndarray, size: int | None = None, block: int = ATTENTION_BLOCK) -> np.ndarray:
    """The Triton attention kernel's table: (2, size) int64, each column a program's (sequence, block of
    ``block`` queries); every query of every sequence is in one block. Longest sequences first, so that the
    programs with the most keys start first and the last wave is short. Columns past the blocks: -1 (no work);
    ``size`` None: exactly the blocks."""
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = blocks_per_sequence(lengths, block)
    order = np.argsort(-lengths, kind="stable")
    per_seq = counts[order]
    total = int(per_seq.sum())
    size = total if size is None else size
    if total > size:
        raise ValueError(f"{total} query blocks do not fit a table of {size}")
    table = np.full((2, size), -1, dtype=np.int64)
    table[0, :total] = np.repeat(order, per_seq)
    table[1, :total] = np.arange(total) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    return table


def varlen_attention_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def packed_bert_unsupported(model: Any, device: str) -> str | None:
    """Why :class:`PackedBert` cannot stand in for ``model`` on ``device`` (None when it can)."""
    import torch

    if type(model).__name__ != "BertModel":
        return f"{type(model).__name__}, not BertModel"
    config = model.config
    checks = {
        "position_embedding_type": getattr(config, "position_embedding_type", "absolute") != "absolute",
        # the epilogue computes tanh-approximated GELU: exact for the tanh variants, ~1e-3 off erf GELU ("gelu",
        # m3e-base's), which the load-time probe texts check against sentence-transformers' vectors
        "hidden_act": config.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"),
        "is_decoder": bool(getattr(config, "is_decoder", False)),
    }
    if any(checks.values()):
        return "config " + ", ".join(k for k, v in checks.items() if v)
    if device.startswith("cuda"):
        if model.dtype not in (torch.float16, torch.bfloat16):
            return f"{model.dtype} (flash attention runs float16 and bfloat16)"
        if not varlen_attention_available():
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


@dataclass
class _Layer:
    qkv_weight: torch.Tensor  # (3 hidden, hidden): q, k, v concatenated
    qkv_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    norm1: tuple[torch.Tensor, torch.Tensor, float]
    up_weight: torch.Tensor
    up_bias: torch.Tensor
    down_weight: torch.Tensor
    down_bias: torch.Tensor
    norm2: tuple[torch.Tensor, torch.Tensor, float]


class PackedBert:
    """``forward(ids, positions, cu_seqlens, max_length, blocks) -> (tokens, hidden)`` for a transformers
    ``BertModel`` in inference, over sequences packed end to end (see the module's docstring). ``blocks`` is
    :func:`query_blocks`' table on the device, for the Triton attention kernel (the others ignore it)."""

    def __init__(self, model: Any) -> None:
        import torch

        config = model.config
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        self.hidden = int(config.hidden_size)
        self.on_cuda = model.device.type == "cuda"
        embeddings = model.embeddings
        self.word = embeddings.word_embeddings.weight
        self.embed_norm = _norm(embeddings.LayerNorm)
        with torch.no_grad():  # the folded and fused copies are inference-only tensors, outside autograd
            # every token is of type 0: its embedding folds into the position table once
            self.position = embeddings.position_embeddings.weight + embeddings.token_type_embeddings.weight[0]
            self.layers = [_fused_layer(layer) for layer in model.encoder.layer]
        self._add_norm = _triton_add_norm() if self.on_cuda else None
        self.attention = self.default_attention()

    def default_attention(self) -> str:
        """The attention kernel: "triton" (knowledge.triton_kernels.varlen_attention, 1.75x torch's kernel on an
        H200 at head size 64: bench/README.md) on CUDA with Triton; else "torch" (flash attention's variable-length
        kernel on CUDA, one SDPA per sequence on a CPU). The Triton kernel takes head sizes that are powers of two
        from 16; knowledge.embed_fast.fast_path sets "torch" when it fails the probe texts."""
        fits = self.head_dim >= 16 and self.head_dim & (self.head_dim - 1) == 0
        return "triton" if self._add_norm is not None and fits else "torch"

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_length: int,
        blocks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states, (tokens, hidden), of the sequences ``ids[cu_seqlens[i]:cu_seqlens[i+1]]``."""
        import torch

        x = self.add_norm(torch.nn.functional.embedding(ids, self.word), self.position[positions], self.embed_norm)
        tokens = x.shape[0]
        for layer in self.layers:
            qkv = torch.addmm(layer.qkv_bias, x, layer.qkv_weight.t()).view(tokens, 3, self.heads, self.head_dim)
            q, k, v = qkv.unbind(1)
            context = self._attend(q, k, v, cu_seqlens, max_length, blocks).reshape(tokens, self.hidden)
            x = self.add_norm(torch.addmm(layer.out_bias, context, layer.out_weight.t()), x, layer.norm1)
            up = torch._addmm_activation(layer.up_bias, x, layer.up_weight.t(), use_gelu=True)
            x = self.add_norm(torch.addmm(layer.down_bias, up, layer.down_weight.t()), x, layer.norm2)
        return x

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor, float]
    ) -> torch.Tensor:
        """LayerNorm(x + residual)."""
        import torch

        if self._add_norm is not None:
            out: torch.Tensor = self._add_norm(x, residual, *norm)
            return out
        return torch.nn.functional.layer_norm(x + residual, (self.hidden,), norm[0], norm[1], norm[2])

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_length: int,
        blocks: torch.Tensor | None,
    ) -> torch.Tensor:
        """(tokens, heads, head_dim): each sequence attends only to itself."""
        import torch

        if self.attention == "triton":
            from knowledge.triton_kernels import varlen_attention

            if blocks is None:  # a caller without the table (BatchedEncoder always builds it): one sync here
                lengths = torch.diff(cu_seqlens).cpu().numpy()
                blocks = torch.from_numpy(query_blocks(lengths)).to(q.device)
            return varlen_attention(q, k, v, cu_seqlens, blocks, 1.0 / math.sqrt(self.head_dim))
        if self.on_cuda:
            from torch.nn.attention.varlen import varlen_attn

            out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length)
            assert not isinstance(out, tuple)  # a tuple only with return_aux
            return out
        # CPU: one SDPA per sequence (the tests' path; a CPU keeps the transformers forward); tokens after the
        # last sequence (padding) stay zero
        out = torch.zeros(q.shape, dtype=q.dtype)
        for start, end in itertools.pairwise(cu_seqlens.tolist()):
            if start == end:  # a fixed-shape batch's unused rows
                continue
            qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            scale = 1.0 / math.sqrt(self.head_dim)
            part = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=scale)
            out[start:end] = part.squeeze(0).transpose(0, 1)
        return out


def _fused_layer(layer: Any) -> _Layer:
    import torch

    attn = layer.attention
    q, k, v = attn.self.query, attn.self.key, attn.self.value
    return _Layer(
        qkv_weight=torch.cat([q.weight, k.weight, v.weight]).contiguous(),
        qkv_bias=torch.cat([q.bias, k.bias, v.bias]).contiguous(),
        out_weight=attn.output.dense.weight,
        out_bias=attn.output.dense.bias,
        norm1=_norm(attn.output.LayerNorm),
        up_weight=layer.intermediate.dense.weight,
        up_bias=layer.intermediate.dense.bias,
        down_weight=layer.output.dense.weight,
        down_bias=layer.output.dense.bias,
        norm2=_norm(layer.output.LayerNorm),
    )


def _norm(module: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    return module.weight, module.bias, float(module.eps)


def _triton_add_norm() -> Any:
    """The fused residual add + LayerNorm on CUDA, or None without Triton (plain torch then)."""
    try:
        from knowledge.triton_kernels import add_layer_norm
    except ImportError:
        return None
    return add_layer_norm
