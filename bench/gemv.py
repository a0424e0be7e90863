"""The Triton GEMV of llms/triton_gemv.py against cuBLAS at Llama-2-7B's decode shapes, on CUDA.

    python bench/gemv.py                          # bf16; rows 1 and 8; every weight shape; ~1-3 minutes
    python bench/gemv.py --rows 1 --shapes 4096x4096 --all
    python bench/gemv.py --tiny                   # a tiny shape on the CPU by Triton's interpreter (smoke test)

For each weight shape (q/k/v 12288x4096, o 4096x4096, gate/up 22016x4096, down 4096x11008, head 32000x4096)
and row count, from CUDA graphs replayed many times (timed with CUDA events), with each call reading another
copy of the weight so that the copies together exceed the L2 cache four times over (as a decode step's layers do):
- cuBLAS ``x @ W.T``;
- the Triton GEMV over a sweep of configurations (block of outputs, block of K, warps, pipeline stages,
  tl.dot on rows padded to 16 or a broadcast multiply + row sum), then split-K 2 and 4 on the best three; the
  best five are printed (``--all``: every one), and llms/triton_gemv.py's ``default_config`` (the configs
  this benchmark measured on an H200) where it is not the best;
- microseconds per call, TB/s of weight bytes, and the largest absolute difference from cuBLAS.

Last, the best configuration per shape and row count, to compare with (or paste into) ``default_config``.

Needs only torch and Triton with a CUDA device; random weights. Most of the time goes to compiling the swept
configurations (Triton caches them on disk: a second run is faster).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llms.triton_gemv import GemvConfig, default_config, gemv  # noqa: E402

SHAPES = {
    "qkv": (12288, 4096),
    "o": (4096, 4096),
    "gate_up": (22016, 4096),
    "down": (4096, 11008),
    "head": (32000, 4096),
}

# (block_n, block_k, num_warps, num_stages, dot): one row, then 2-16 rows. Triton pipelines (cp.async, num_stages
# deep) the loads that feed tl.dot, not those of the multiply + row sum: there, bytes in flight come from the tile
# size and from programs per SM (small block_n, split-K), so its stages are not swept.
SWEEP_ONE_ROW = [
    (16, 512, 4, 3, False),
    (8, 512, 4, 3, False),
    (16, 256, 4, 3, False),
    (16, 512, 8, 3, False),
    (16, 1024, 8, 3, False),
    (32, 256, 4, 3, False),
    (32, 256, 8, 3, False),
    (64, 128, 4, 3, False),
    (16, 256, 4, 3, True),
    (16, 256, 4, 5, True),
    (16, 512, 4, 3, True),
    (32, 128, 4, 4, True),
    (32, 256, 4, 3, True),
    (32, 256, 8, 4, True),
    (64, 128, 4, 4, True),
]
SWEEP_ROWS = [
    (16, 128, 4, 3, True),
    (16, 256, 4, 3, True),
    (16, 256, 4, 5, True),
    (16, 512, 4, 3, True),
    (32, 128, 4, 3, True),
    (32, 128, 4, 5, True),
    (32, 256, 4, 3, True),
    (32, 256, 8, 4, True),
    (64, 128, 4, 3, True),
    (64, 128, 8, 4, True),
    (16, 128, 4, 3, False),
    (16, 256, 8, 3, False),
]
QUICK = 5  # --quick: the first five of each list


def _time_us(calls: list[Callable[[], object]], repeat: int) -> float:
    """Microseconds per call: ``calls`` captured in one CUDA graph, replayed ``repeat`` times between events."""
    if not _on_cuda():  # --tiny: Triton's interpreter on the CPU, timed eagerly (its figures mean nothing)
        for call in calls:
            call()
        started = time.perf_counter()
        for _ in range(repeat):
            for call in calls:
                call()
        return (time.perf_counter() - started) * 1e6 / (repeat * len(calls))
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, cuBLAS picks its kernel
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        graph.replay()
    end.record()
    end.synchronize()
    us = start.elapsed_time(end) * 1e3 / (repeat * len(calls))
    del graph
    return us


def _on_cuda() -> bool:
    """False with --tiny (TRITON_INTERPRET=1): the kernels run on the CPU."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def _calls(fn: Callable[[Any], object], weights: list[Any], per_graph: int) -> list[Callable[[], object]]:
    """``fn(w)`` over the weight copies in turn, at least ``per_graph`` calls (graph launch cost amortised)."""
    rounds = max(1, math.ceil(per_graph / len(weights)))
    return [functools.partial(fn, w) for _ in range(rounds) for w in weights]


def _matmul(x: Any, w: Any) -> Any:
    return x @ w.t()


def _max_err(got: Any, want: Any) -> float:
    return float((got.float() - want.float()).abs().max())


def _row(shape: str, rows: int, kernel: str, config: str, us: float, weight_bytes: int, err: float | None) -> None:
    tbps = weight_bytes / (us * 1e-6) / 1e12
    err_text = "" if err is None else f"{err:9.2e}"
    print(f"{shape:>11} {rows:>4}  {kernel:<26} {config:<28} {us:8.2f} {tbps:6.2f} {err_text}")


def _sweep_configs(rows: int, n: int, k: int, quick: bool) -> list[GemvConfig]:
    """The sweep list for ``rows``, with llms/triton_gemv.py's default for the shape among them."""
    table = SWEEP_ONE_ROW if rows == 1 else SWEEP_ROWS
    chosen = table[:QUICK] if quick else table
    configs = [GemvConfig(bn, bk, w, s, 1, dot) for bn, bk, w, s, dot in chosen]
    default = default_config(rows, n, k)
    return configs if default in configs else [default, *configs]


def bench_shape(
    n: int, k: int, rows_list: list[int], args: argparse.Namespace, best: dict[tuple[str, int], GemvConfig]
) -> None:
    import torch

    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if _on_cuda() else "cpu")
    weight_bytes = n * k * torch.finfo(dtype).bits // 8
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)) if _on_cuda() else 0
    copies = max(1, min(16, math.ceil(4 * l2 / weight_bytes)))
    torch.manual_seed(0)
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    shape = f"{n}x{k}"
    for rows in rows_list:
        x = torch.randn(rows, k, device=device, dtype=dtype)
        want = x @ weights[0].t()
        us = _time_us(_calls(functools.partial(_matmul, x), weights, args.per_graph), args.repeat)
        _row(shape, rows, "cuBLAS x @ W.T", "-", us, weight_bytes, None)

        def triton_us(cfg: GemvConfig, x: Any = x) -> float | None:
            try:
                call = functools.partial(gemv, x, config=cfg)
                return _time_us(_calls(call, weights, args.per_graph), args.repeat)
            except Exception as error:  # noqa: BLE001 - a config that does not build on this GPU is reported
                print(f"{'':>17}{cfg.label()}: failed, {type(error).__name__}: {str(error)[:80]}")
                return None

        timed: dict[GemvConfig, float] = {}
        for cfg in _sweep_configs(rows, n, k, args.quick):
            t = triton_us(cfg)
            if t is not None:
                timed[cfg] = t
        if not timed:
            continue
        for cfg in sorted(timed, key=timed.__getitem__)[:3]:  # split-K on the three best whole-K configs
            for split in (2, 4):
                if k // split >= cfg.block_k:
                    t = triton_us(cfg._replace(split_k=split))
                    if t is not None:
                        timed[cfg._replace(split_k=split)] = t
        ranked = sorted(timed, key=timed.__getitem__)
        top = ranked[0]
        best[(shape, rows)] = top
        default = default_config(rows, n, k)
        labels = {top: "triton (best, default)" if top == default else "triton (best)"}
        if default in timed and default != top:
            labels[default] = "triton (default)"
        for cfg, label in labels.items():
            err = _max_err(gemv(x, weights[0], config=cfg), want)
            _row(shape, rows, label, cfg.label(), timed[cfg], weight_bytes, err)
        shown = ranked if args.all else ranked[:5]
        print(f"{'':>17}sweep, us: " + ", ".join(f"{c.label()} {timed[c]:.2f}" for c in shown))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="rows of activations (1-16)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"of {', '.join(SHAPES)}, or NxK")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeat", type=int, default=50, help="graph replays per timing")
    parser.add_argument("--per-graph", type=int, default=16, help="calls captured per graph (at least)")
    parser.add_argument("--quick", action="store_true", help=f"only the first {QUICK} configs of each sweep list")
    parser.add_argument("--all", action="store_true", help="print every config of the sweep, not the best five")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU by Triton's interpreter")
    args = parser.parse_args(argv)
    if args.tiny:  # before Triton is imported; float32: the interpreter's bfloat16 products are wrong
        os.environ["TRITON_INTERPRET"] = "1"
        args.shapes, args.rows, args.dtype, args.repeat, args.per_graph, args.quick = (
            ["96x80"],
            [1, 3],
            "float32",
            1,
            1,
            True,
        )
    import torch

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark times GPU kernels (--tiny runs a tiny shape on the CPU)")
    started = time.perf_counter()
    if _on_cuda():
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 0) / 2**20
        print(
            f"{props.name}: {props.multi_processor_count} SMs, L2 {l2:.0f} MiB; torch {torch.__version__}; {args.dtype}"
        )
    else:
        print(f"CPU, Triton's interpreter; torch {torch.__version__}; {args.dtype}")
    print(f"{'shape':>11} {'rows':>4}  {'kernel':<26} {'config':<28} {'us':>8} {'TB/s':>6} {'max|err|':>9}")
    best: dict[tuple[str, int], GemvConfig] = {}
    with torch.inference_mode():
        for spec in args.shapes:
            n, k = SHAPES[spec] if spec in SHAPES else (int(v) for v in spec.lower().split("x"))
            bench_shape(n, k, args.rows, args, best)
            if _on_cuda():
                torch.cuda.empty_cache()  # the shape's weight copies, freed on return
    print("best configs (default_config's where it differs):")
    for (shape, rows), cfg in best.items():
        n, k = (int(v) for v in shape.split("x"))
        default = default_config(rows, n, k)
        note = "" if cfg == default else f"  (default: {default.label()})"
        print(f"  ({shape}, {rows} rows): {cfg!r}{note}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
