"""The Triton kernels (knowledge/triton_kernels.py, llms/triton_decode.py) run by Triton's interpreter on the CPU
against the torch operations they replace. Run by tests/test_triton_kernels.py in a subprocess, with
TRITON_INTERPRET=1 set before Triton is imported; exits non-zero (an AssertionError) on a mismatch."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def check_add_layer_norm() -> None:
    import torch

    from knowledge.triton_kernels import add_layer_norm

    torch.manual_seed(0)
    x, r = torch.randn(5, 48), torch.randn(5, 48)  # 48: not a power of two, the block's tail is masked
    w, b = torch.randn(48), torch.randn(48)
    expected = torch.nn.functional.layer_norm(x + r, (48,), w, b, 1e-12)
    torch.testing.assert_close(add_layer_norm(x, r, w, b, 1e-12), expected, rtol=1e-5, atol=1e-5)


def check_varlen_attention() -> None:
    """Packed sequences (lengths 1, 40, 130: one block, several, a partial last block) from views into one q/k/v
    product, against SDPA per sequence; the table's unused programs write nothing."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from knowledge.embed_packed import query_blocks
    from knowledge.triton_kernels import varlen_attention

    torch.manual_seed(0)
    lengths, heads, d = [1, 40, 130], 3, 16
    qkv = torch.randn(sum(lengths), 3, heads, d)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    blocks = torch.from_numpy(query_blocks(np.array(lengths), size=10, block=32))  # 8 blocks, then 2 unused
    got = varlen_attention(q, k, v, cu, blocks, 0.25, block_m=32, block_n=16)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        want = F.scaled_dot_product_attention(qs, ks, vs, scale=0.25).transpose(0, 1)
        torch.testing.assert_close(got[start:end], want, rtol=1e-5, atol=1e-5)


def check_segment_mean() -> None:
    """Rows of 3, 0 (an unused row of a fixed layout) and 37 tokens (blocks of 32, the last partial), 300 columns
    (blocks of 128, the last partial), against the mean of each segment times its weight."""
    import torch

    from knowledge.triton_kernels import segment_mean

    torch.manual_seed(0)
    hidden = torch.randn(45, 300)  # 5 padding tokens after the rows: never read
    cu = torch.tensor([0, 3, 3, 40])
    weight = torch.tensor([1.0, 0.0, 0.5])
    want = torch.stack([hidden[0:3].mean(0), torch.zeros(300), hidden[3:40].mean(0) * 0.5])
    torch.testing.assert_close(segment_mean(hidden, cu, weight), want, rtol=1e-5, atol=1e-5)


def check_decode_kernels() -> None:
    import torch

    from llms.triton_decode import add_rms_norm, silu_mul

    torch.manual_seed(0)
    x, delta, w = torch.randn(3, 1, 40), torch.randn(3, 1, 40), torch.randn(40)
    total, normed = add_rms_norm(x, delta, w, 1e-6)
    torch.testing.assert_close(total, x + delta)
    torch.testing.assert_close(normed, torch.nn.functional.rms_norm(x + delta, (40,), w, 1e-6), rtol=1e-5, atol=1e-5)
    gate_up = torch.randn(3, 1, 2 * 1500)  # more than one block of 1,024, the last one partly masked
    gate, up = gate_up.split(1500, dim=-1)
    torch.testing.assert_close(silu_mul(gate_up), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6)


def check_fused_step_with_kernels() -> None:
    """One decode step of 3 rows: logits and the cache rows written equal the model's forward (rope_and_cache
    writes k and v at each row's own position), also with grouped kv heads and llama3-scaled rope."""
    import torch

    from tests.test_decode import PROMPTS, _load, one_step
    from tests.tiny_models import tiny_llama, tiny_llama_gqa

    tiny = _load(tiny_llama(Path(tempfile.mkdtemp())), "llama")
    gqa = tiny_llama_gqa()
    for model, prompts in [
        (tiny.model, [tiny.prompt(text) for text in PROMPTS]),
        (gqa, [[5, 17, 99, 42] * 5, [7, 8, 9], list(range(3, 45))]),
    ]:
        expected = one_step(model, prompts, False)
        for want, got in zip(expected, one_step(model, prompts, True, kernels=True), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before Triton is imported"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    check_add_layer_norm()
    check_varlen_attention()
    check_segment_mean()
    check_decode_kernels()
    check_fused_step_with_kernels()
    print("ok")


if __name__ == "__main__":
    main()
