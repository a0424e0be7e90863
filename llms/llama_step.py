"""A decode step for Llama-architecture models (Llama-2, Baichuan-7B) with fused weights and fewer kernels.

The decode engine's step (llms/decode.py) runs one token for every row over the slot cache. Through the
transformers model that step launches, per layer, three separate q/k/v products and two gate/up products,
plus the layout work that a general forward needs (mask preparation, transposes, a cache object's update).
At a few rows every product is a matrix-vector product bound by reading its weights, and each separate
launch reads at a lower rate than one large one (bench/decode_floor.py: the fused step is 159.8 tokens/s
alone and 970 tokens/s at 8 rows where the transformers forward gave 144 and 752).

:class:`LlamaDecodeStep` runs the same arithmetic in the same order with q/k/v and gate/up each one product.
To keep one copy of the weights, the model's own ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/
``up_proj`` parameters become views into the fused matrices: the prefill (transformers' forward) reads the
very same memory. The rotary angles, the attention scale and the LM head are the model's own (so scaled rope
variants stay transformers'); each RMSNorm is one kernel over the model's weights. On CUDA the small operations
between the products run as Triton kernels (:mod:`llms.triton_decode`: rotary + cache write, residual add +
RMSNorm, SiLU x up), and so do the products themselves at up to 16 rows (:mod:`llms.triton_gemv`, which reads
the weights faster than cuBLAS at a few rows); elsewhere torch operations with transformers' arithmetic, which
the tests compare against the model's forward. torch is imported inside functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def fused_step_unsupported(model: Any) -> str | None:
    """Why :class:`LlamaDecodeStep` cannot run ``model`` (None when it can)."""
    if type(model).__name__ != "LlamaForCausalLM":
        return f"{type(model).__name__}, not LlamaForCausalLM"
    config = model.config
    checks = {
        "attention_bias": bool(getattr(config, "attention_bias", False)),
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        "hidden_act": config.hidden_act != "silu",
        "quantized": bool(getattr(model, "is_quantized", False) or getattr(config, "quantization_config", None)),
        "several devices": len({p.device for p in model.parameters()}) != 1,
    }
    if any(checks.values()):
        return ", ".join(k for k, v in checks.items() if v)
    return None


class LlamaDecodeStep:
    """``step(ids, positions, mask, keys, values) -> logits`` for ``rows`` sequences, one new token each.

    ``ids`` and ``positions`` are (rows, 1); ``mask`` is the additive (rows, 1, 1, length) mask over the cache
    columns; ``keys[i]``/``values[i]`` are layer i's cache, (slots, kv_heads, window, head_dim), into which the
    new token's key and value are written at each row's position.
    """

    def __init__(self, model: Any, kernels: bool | None = None) -> None:
        """``kernels``: the Triton kernels of :mod:`llms.triton_decode` for the small operations; None means on
        CUDA when Triton is installed and the head size is a power of two; False keeps torch's operations."""
        import torch

        reason = fused_step_unsupported(model)
        if reason:
            raise ValueError(f"the fused decode step cannot run this model: {reason}")
        self.model = model
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.layers = list(model.model.layers)
        self.qkv: list[torch.Tensor] = []
        self.gate_up: list[torch.Tensor] = []
        # normal tensors even when built on the decode worker (inside inference_mode): the model's parameters
        # become views into them, and must stay usable for loading weights or a forward with gradients
        with torch.inference_mode(False), torch.no_grad():
            for layer in self.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self.qkv.append(_fuse(attn.q_proj, attn.k_proj, attn.v_proj))
                self.gate_up.append(_fuse(mlp.gate_proj, mlp.up_proj))
        self.ffn = int(config.intermediate_size)
        # the norm before each layer's attention, before its MLP, and the final one, in the order the step uses them
        self.norms = [n for la in self.layers for n in (la.input_layernorm, la.post_attention_layernorm)]
        self.norms.append(model.model.norm)
        self.kernels: Any = None
        power_of_two = self.head_dim & (self.head_dim - 1) == 0
        if kernels or (kernels is None and model.device.type == "cuda" and power_of_two):
            try:
                from llms import triton_decode
            except ImportError:
                if kernels:
                    raise
            else:
                self.kernels = triton_decode
        # the kernels launched with programmatic dependent launch where the GPU has it (Hopper and later)
        self.pdl = self.kernels is not None and self.kernels.pdl_supported(model.device)
        self.kernels_checked = kernels is not None  # chosen by default: the first step may fall back

    def first_step_failed(self, error: BaseException) -> bool:
        """After the first step raised ``error``: whether the step can run again with less (the kernels were
        chosen by default and may not build on this GPU or driver): first without programmatic dependent launch,
        then without the Triton kernels."""
        if self.kernels is None or self.kernels_checked:
            return False
        if self.pdl:
            self.pdl = False
            return True
        self.kernels = None
        self.kernels_checked = True
        return True

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        import torch.nn.functional as F

        inner = self.model.model
        rows, length = ids.shape[0], mask.shape[-1]
        x = inner.embed_tokens(ids)  # (rows, 1, hidden)
        cos, sin = inner.rotary_emb(x, positions)  # (rows, 1, head_dim)
        normed = F.rms_norm(x, (x.shape[-1],), self.norms[0].weight, self.norms[0].variance_epsilon)
        for i, layer in enumerate(self.layers):
            qkv = self._linear(normed, self.qkv[i])
            q = self._rope_and_cache(qkv, cos, sin, positions, keys[i], values[i])
            attended = F.scaled_dot_product_attention(
                q,
                keys[i][:rows, :, :length],
                values[i][:rows, :, :length],
                attn_mask=mask,
                scale=layer.self_attn.scaling,
                enable_gqa=self.kv_heads != self.heads,
            )
            attended = attended.transpose(1, 2).reshape(rows, 1, -1)
            x, normed = self._add_norm(x, self._linear(attended, layer.self_attn.o_proj.weight), 2 * i + 1)
            gate_up = self._linear(normed, self.gate_up[i])
            x, normed = self._add_norm(x, self._linear(self._silu_mul(gate_up), layer.mlp.down_proj.weight), 2 * i + 2)
        logits: torch.Tensor = self._linear(normed, self.model.lm_head.weight)[:, -1, :]
        return logits

    # the small operations: Triton kernels on CUDA, else torch's, the same arithmetic as transformers' modules

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` (the projections have no bias: fused_step_unsupported checks). With the kernels, up to
        16 rows run Triton's matrix-vector product, which reads the weight faster than cuBLAS at a few rows."""
        import torch

        rows = x.numel() // x.shape[-1]
        if self.kernels is not None and rows <= self.kernels.LINEAR_MAX_ROWS:
            out: torch.Tensor = self.kernels.linear(x, weight, self.pdl)
            return out
        return torch.matmul(x, weight.t())

    def _rope_and_cache(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        """q rotated (rows, heads, 1, head_dim); k rotated and v written into the cache at each row's position."""
        from transformers.models.llama.modeling_llama import rotate_half

        rows, heads, kv_heads, d = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        if self.kernels is not None:
            flat, cos, sin = qkv.view(rows, -1), cos.view(rows, d), sin.view(rows, d)
            q: torch.Tensor = self.kernels.rope_and_cache(
                flat, cos, sin, positions.view(rows), keys, values, heads, kv_heads, self.pdl
            )
            return q
        qk, v = qkv.split([(heads + kv_heads) * d, kv_heads * d], dim=-1)
        # q and k rotated together: one set of kernels for both, the arithmetic of apply_rotary_pos_emb
        qk = qk.view(rows, 1, heads + kv_heads, d).transpose(1, 2)
        qk = qk * cos.unsqueeze(1) + rotate_half(qk) * sin.unsqueeze(1)
        where = positions.view(rows, 1, 1, 1).expand(rows, kv_heads, 1, d)
        keys[:rows].scatter_(2, where, qk[:, heads:].to(keys.dtype))
        values[:rows].scatter_(2, where, v.view(rows, 1, kv_heads, d).transpose(1, 2).to(values.dtype))
        return qk[:, :heads]

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor, norm: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the ``norm``-th RMSNorm of it)."""
        import torch.nn.functional as F

        weight, eps = self.norms[norm].weight, self.norms[norm].variance_epsilon
        if self.kernels is not None:
            total, normed = self.kernels.add_rms_norm(x, delta, weight, eps, self.pdl)
            return total, normed
        x = x + delta
        return x, F.rms_norm(x, (x.shape[-1],), weight, eps)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        if self.kernels is not None:
            out: torch.Tensor = self.kernels.silu_mul(gate_up, self.pdl)
            return out
        gate, up = gate_up.split(self.ffn, dim=-1)
        return F.silu(gate) * up


def _fuse(*linears: Any) -> torch.Tensor:
    """One matrix of the linears' weights stacked by rows; each linear's weight becomes a view into it.

    Done once per model: a second step (a new engine over the same model) finds the matrix and reuses it, so
    there is never a second copy, and graphs captured by the first still read live memory."""
    import torch

    fused: torch.Tensor | None = getattr(linears[0], "zhiku_fused", None)
    if fused is not None and linears[0].weight.data_ptr() == fused.data_ptr():
        return fused
    fused = torch.cat([linear.weight for linear in linears]).contiguous()
    start = 0
    for linear in linears:
        n = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(fused[start : start + n], requires_grad=False)
        start += n
    linears[0].zhiku_fused = fused  # a plain attribute: not a parameter, buffer or state_dict entry
    return fused
