"""Search latency for one query over N x dim vectors: faiss flat on the CPU, the GPU path, faiss HNSW on the CPU.

    python bench/search.py [--n 1000000] [--dim 768] [--queries 200] [--threads T]
                           [--m 32] [--ef-construction 80] [--ef-search 64 128 256] [--data random clustered]
    python bench/search.py --tiny          (seconds on a CPU: the smoke test runs this)

Everything goes through Zhiku's own indexes (knowledge/vectors.py), one query per call, as a chat's
retrieval searches. Per data set it prints the flat CPU index's p50/p95 (the exact answer every other line is
compared with), the GPU path's p50/p95 and its top-10 overlap with flat (faiss-gpu when installed, else the
torch fp16 path; skipped without CUDA), and for each efSearch the HNSW index's p50/p95 and recall@10.

Two data sets: ``random`` (uniform on the sphere: no structure, the worst case for a graph index) and
``clustered`` (clusters in a 64-d subspace plus isotropic noise, which is closer to how text embeddings
sit). Queries are fresh draws from the same distribution, not stored vectors.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from knowledge import vectors  # noqa: E402
from knowledge.vectors import FaissIndex, FaissKind, HnswIndex, HnswKind, VectorIndex  # noqa: E402

K = 10
_SLICE = 1 << 17  # rows generated at a time: bounds the float32 temporaries at 1 M x 768


def normalise(rows: np.ndarray) -> np.ndarray:
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def random_set(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for at in range(0, n, _SLICE):
        out[at : at + _SLICE] = normalise(rng.standard_normal((min(_SLICE, n - at), dim), dtype=np.float32))
    return out


def clustered_set(
    n: int, dim: int, seed: int, sub: int = 64, per_cluster: int = 100, noise_std: float = 0.5
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((sub, dim), dtype=np.float32) / np.float32(np.sqrt(sub))
    centres = 2 * rng.standard_normal((max(n // per_cluster, 1), sub), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for at in range(0, n, _SLICE):
        m = min(_SLICE, n - at)
        inner = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, sub), dtype=np.float32)
        noise = np.float32(noise_std) * rng.standard_normal((m, dim), dtype=np.float32)
        out[at : at + m] = normalise(inner @ basis + noise)
    return out


DATA: dict[str, Callable[[int, int, int], np.ndarray]] = {"random": random_set, "clustered": clustered_set}


def timed(index: VectorIndex, queries: np.ndarray) -> tuple[np.ndarray, list[list[tuple[int, float]]]]:
    """Milliseconds per query, and each query's top-k (id, score)."""
    for q in queries[:5]:  # warm-up: lazy set-up (a GPU copy of the vectors), caches, clocks
        index.search(q, K)
    times, found = [], []
    for q in queries:
        started = time.perf_counter()
        hits = index.search(q, K)
        times.append((time.perf_counter() - started) * 1e3)
        found.append(hits)
    return np.asarray(times), found


def at_k(found: list[list[tuple[int, float]]], truth: list[list[tuple[int, float]]]) -> float:
    """Mean share of the true top-k that was found (recall@k; the top-k overlap for an exact search)."""
    shares = [len({i for i, _ in f} & {i for i, _ in t}) / max(len(t), 1) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(shares))


def latency(ms: np.ndarray) -> str:
    return f"p50 {np.percentile(ms, 50):8.3f} ms  p95 {np.percentile(ms, 95):8.3f} ms"


def gpu_path(flat: FaissIndex, torch_cpu: bool) -> FaissIndex | None:
    """The same faiss index searched on the GPU, or None (no CUDA). ``torch_cpu``: the torch path on the CPU."""
    if vectors._faiss_gpus() > 0 or vectors._torch_sees_cuda():
        return FaissIndex(flat._index, gpu="on")
    return FaissIndex(flat._index, gpu="off", torch_device="cpu") if torch_cpu else None


def run(name: str, args: argparse.Namespace, seed: int) -> None:
    data = DATA[name](args.n + args.queries, args.dim, seed)
    base, queries = data[: args.n], data[args.n :]
    ids = np.arange(args.n, dtype=np.int64) + 1
    flat = FaissKind(gpu="off").create(args.dim)
    started = time.perf_counter()
    flat.add(ids, base)
    added = time.perf_counter() - started
    ms, truth = timed(flat, queries)
    print(f"flat   {name:9}  {flat.backend:22}  {latency(ms)}  (add {added:.1f} s)")
    nearest = np.mean([t[0][1] for t in truth]), np.mean([t[-1][1] for t in truth])
    print(f"data   {name:9}  a query's nearest stored vector: cosine {nearest[0]:.3f}, its 10th: {nearest[1]:.3f}")

    gpu = gpu_path(flat, args.tiny)
    if gpu is None:
        print(f"gpu    {name:9}  skipped: neither faiss-gpu nor torch sees CUDA")
    else:
        ms, found = timed(gpu, queries)
        print(f"gpu    {name:9}  {gpu.backend:22}  {latency(ms)}  overlap@10 {at_k(found, truth):.4f} vs flat")
    del gpu
    gc.collect()

    hnsw = HnswKind(m=args.m, ef_construction=args.ef_construction).create(args.dim)
    assert isinstance(hnsw, HnswIndex)
    started = time.perf_counter()
    hnsw.add(ids, base)
    built = time.perf_counter() - started
    for ef in args.ef_search:
        hnsw.ef_search = ef
        ms, found = timed(hnsw, queries)
        label = f"M={args.m} efC={args.ef_construction} efS={ef}"
        print(f"hnsw   {name:9}  {label:22}  {latency(ms)}  recall@10 {at_k(found, truth):.4f}  (build {built:.1f} s)")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="stored vectors")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--m", type=int, default=32, help="HNSW graph degree")
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--data", nargs="+", choices=sorted(DATA), default=["random", "clustered"])
    ap.add_argument("--threads", type=int, default=0, help="faiss/OpenMP threads; 0 = faiss's default")
    ap.add_argument("--tiny", action="store_true", help="2,000 x 64: runs in seconds on a CPU, torch path too")
    args = ap.parse_args(argv)
    if args.tiny:
        args.n, args.dim, args.queries, args.ef_search = 2000, 64, 20, [16, 64]
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(
        f"search bench: {args.n:,} x {args.dim}, {args.queries} queries of k={K}, one at a time; "
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads"
    )
    for seed, name in enumerate(args.data):
        run(name, args, seed)
        gc.collect()


if __name__ == "__main__":
    main()
