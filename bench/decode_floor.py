"""What the GPU itself allows for one decode step of a 7B model: the floor that bench/chat.py is measured against.

    python bench/decode_floor.py                 # Llama-2-7B shape, bf16, on CUDA
    python bench/decode_floor.py --tiny          # a tiny shape on the CPU, eager (the smoke test runs this)

Printed, in order:
- gemv: ``x @ W.T`` for each weight shape of one Llama-2-7B layer (and the LM head), 1 and 8 rows, replayed
  from a CUDA graph: microseconds and the memory bandwidth it reaches (the weights are read once per step);
- copy: a 1 GiB device-to-device copy, the practical bandwidth ceiling;
- step: a minimal Llama decode step written for speed (q/k/v and gate/up fused into one matmul each, a static
  KV cache written in place, SDPA over the cache with a mask, greedy argmax), captured as one CUDA graph, for
  1 and 8 rows at a 1,792-column cache: eager kernels, then the same step through ``torch.compile``.

Random weights; nothing is loaded. The step is not Zhiku's code: it is the lower bound a transformers-based
decode loop (bench/chat.py) can hope to approach without custom kernels.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any


def _timed(run: Callable[[], object], device: str, repeat: int) -> float:
    """Seconds per call of ``run``: from a CUDA graph of it on a GPU, eager on the CPU."""
    import torch

    if device == "cpu":
        run()
        started = time.perf_counter()
        for _ in range(repeat):
            run()
        return (time.perf_counter() - started) / repeat
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture: cuBLAS handles, compiled kernels
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeat


def gemv(shapes: list[tuple[int, int]], device: str, dtype: Any, repeat: int) -> None:
    import torch

    for n, k in shapes:
        weight = torch.randn(n, k, device=device, dtype=dtype)
        for rows in (1, 8):
            x = torch.randn(rows, k, device=device, dtype=dtype)
            seconds = _timed(lambda x=x, weight=weight: x @ weight.t(), device, repeat)  # type: ignore[misc]
            gbps = n * k * weight.element_size() / seconds / 1e9
            print(f"gemv {rows} row(s) {n}x{k}: {seconds * 1e6:8.1f} us  {gbps:7.0f} GB/s")


def copy_bandwidth(device: str, repeat: int) -> None:
    import torch

    if device == "cpu":
        return
    a = torch.empty(2**30, device=device, dtype=torch.uint8)
    b = torch.empty_like(a)
    seconds = _timed(lambda: b.copy_(a), device, repeat)
    print(f"copy 1 GiB: {2 * 2**30 / seconds / 1e9:.0f} GB/s (read + write)")


class Step:
    """One greedy decode step for ``rows`` sequences over a static cache of ``window`` columns."""

    def __init__(self, dims: dict[str, int], rows: int, window: int, device: str, dtype: Any) -> None:
        import torch

        torch.manual_seed(0)
        hidden, ffn, heads = dims["hidden"], dims["ffn"], dims["heads"]
        self.layers, self.heads, self.head_dim, self.hidden = dims["layers"], heads, hidden // heads, hidden
        self.rows, self.dtype = rows, dtype

        def weight(*shape: int) -> Any:
            return torch.randn(*shape, device=device, dtype=dtype) * 0.02

        self.weights = [
            {
                "norm1": torch.ones(hidden, device=device, dtype=dtype),
                "qkv": weight(3 * hidden, hidden),
                "o": weight(hidden, hidden),
                "norm2": torch.ones(hidden, device=device, dtype=dtype),
                "gate_up": weight(2 * ffn, hidden),
                "down": weight(hidden, ffn),
            }
            for _ in range(self.layers)
        ]
        self.embed, self.head = weight(dims["vocab"], hidden), weight(dims["vocab"], hidden)
        self.final_norm = torch.ones(hidden, device=device, dtype=dtype)
        shape = (rows, heads, window, self.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.layers)]
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = torch.full((rows,), window - 256, dtype=torch.long, device=device)
        self.columns = torch.arange(window, device=device)
        d = self.head_dim
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
        self.layer_fn: Callable[..., Any] = self.layer

    @staticmethod
    def rms(x: Any, w: Any, eps: float = 1e-5) -> Any:
        import torch

        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rotate(self, x: Any, cos: Any, sin: Any) -> Any:
        import torch

        half = self.head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def layer(self, x: Any, w: dict[str, Any], keys: Any, values: Any, cos: Any, sin: Any, mask: Any) -> Any:
        import torch.nn.functional as F

        rows, heads, d = self.rows, self.heads, self.head_dim
        q, k, v = (self.rms(x, w["norm1"]) @ w["qkv"].t()).view(rows, 1, 3, heads, d).unbind(2)
        q, k = self.rotate(q.transpose(1, 2), cos, sin), self.rotate(k.transpose(1, 2), cos, sin)
        where = self.pos.view(rows, 1, 1, 1).expand(rows, heads, 1, d)
        keys.scatter_(2, where, k)
        values.scatter_(2, where, v.transpose(1, 2))
        length = mask.shape[-1]
        attended = F.scaled_dot_product_attention(q, keys[:, :, :length], values[:, :, :length], attn_mask=mask)
        x = x + attended.transpose(1, 2).reshape(rows, 1, self.hidden) @ w["o"].t()
        gate, up = (self.rms(x, w["norm2"]) @ w["gate_up"].t()).chunk(2, -1)
        return x + (F.silu(gate) * up) @ w["down"].t()

    def __call__(self, length: int) -> None:
        import torch

        x = self.embed[self.ids].view(self.rows, 1, self.hidden)
        freqs = self.pos.float()[:, None] * self.inv_freq[None]
        angles = torch.cat((freqs, freqs), -1)
        cos, sin = angles.cos().to(self.dtype)[:, None, None], angles.sin().to(self.dtype)[:, None, None]
        visible = self.columns[None, :length] <= self.pos[:, None]
        mask = torch.where(visible, 0.0, float("-inf")).to(self.dtype).view(self.rows, 1, 1, length)
        for i in range(self.layers):
            x = self.layer_fn(x, self.weights[i], self.keys[i], self.values[i], cos, sin, mask)
        self.ids.copy_((self.rms(x, self.final_norm) @ self.head.t()).float()[:, -1].argmax(-1))


def steps(dims: dict[str, int], device: str, dtype: Any, repeat: int, compiled: bool) -> None:
    import torch

    window = dims["window"]
    weight_bytes = None
    for mode in ("eager", "compiled") if compiled else ("eager",):
        for rows in (1, 8):
            step = Step(dims, rows, window, device, dtype)
            if weight_bytes is None:
                tensors = [t for w in step.weights for t in w.values()] + [step.head]
                weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
            if mode == "compiled":
                step.layer_fn = torch.compile(step.layer, fullgraph=True, dynamic=False)
            seconds = _timed(lambda step=step: step(window - 256), device, repeat)  # type: ignore[misc]
            print(
                f"step {mode:8} {rows} row(s): {seconds * 1e3:7.3f} ms  {rows / seconds:8.1f} tokens/s  "
                f"(weights read at {weight_bytes / seconds / 1e9:.0f} GB/s)"
            )
            del step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU, eager only (smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--repeat", type=int, default=100)
    args = parser.parse_args(argv)
    import torch

    if args.tiny:
        device, dtype, repeat = "cpu", torch.float32, 3
        dims = {"layers": 2, "hidden": 64, "ffn": 128, "heads": 4, "vocab": 1000, "window": 512}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny on a CPU")
        device, dtype, repeat = "cuda", torch.bfloat16, args.repeat
        dims = {"layers": 32, "hidden": 4096, "ffn": 11008, "heads": 32, "vocab": 32000, "window": 2048}
    with torch.inference_mode():
        h, f = dims["hidden"], dims["ffn"]
        gemv([(3 * h, h), (h, h), (2 * f, h), (h, f), (dims["vocab"], h)], device, dtype, repeat)
        copy_bandwidth(device, repeat // 5 or 1)
        steps(dims, device, dtype, repeat, compiled=not (args.tiny or args.no_compile))


if __name__ == "__main__":
    main()
