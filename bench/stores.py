"""Each vector store a knowledge base can use, at N stored vectors: build time, memory, one-query latency and
recall@10 against exact search.

    python bench/stores.py [--n 100000 1000000] [--dim 768] [--queries 50] [--stores faiss faiss-hnsw milvus-lite]
    python bench/stores.py --tiny        (seconds on a CPU: the smoke test runs this)

Everything goes through the index kinds a knowledge base uses (knowledge/vectors.py, knowledge/milvus.py), one
query per call as a chat's retrieval searches, on clustered vectors (bench/search.py's ``clustered`` set, closer
to text embeddings than uniform noise). ``faiss`` is the exact answer every recall is measured against. Memory
is the growth of this process's resident set while the store was built (Milvus Lite runs in process); the
figures feed docs/scaling.md's sizing table. A Milvus server is not measured here (none runs on this machine):
docs/scaling.md cites Milvus's published figures for it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from search import K, at_k, clustered_set, latency, timed  # noqa: E402  (bench/search.py, beside this file)

from knowledge.milvus import MilvusKind, collection_prefix  # noqa: E402
from knowledge.vectors import FaissKind, HnswKind, VectorIndex, VectorIndexKind  # noqa: E402

_ADD_ROWS = 50_000  # vectors per add call, as an ingest's commits hand them over


def rss_mb() -> float:
    """This process's resident set, in MiB (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def kinds(folder: Path) -> dict[str, Callable[[], VectorIndexKind]]:
    return {
        "faiss": lambda: FaissKind(gpu="off"),
        "faiss-hnsw": lambda: HnswKind(),
        "milvus-lite": lambda: MilvusKind(str(folder / "milvus-bench.db"), collection_prefix("bench")),
        # Milvus Lite's own HNSW (faiss underneath), as store.milvus.index_type: HNSW asks for
        "milvus-lite-hnsw": lambda: MilvusKind(
            str(folder / "milvus-bench.db"), collection_prefix("bench"), index_type="HNSW"
        ),
    }


def build(kind: VectorIndexKind, base: np.ndarray) -> tuple[VectorIndex, float, float]:
    """The index, seconds to add every vector, and the resident set it grew by (MiB)."""
    gc.collect()
    before = rss_mb()
    index = kind.create(base.shape[1])
    started = time.perf_counter()
    ids = np.arange(len(base), dtype=np.int64) + 1
    for at in range(0, len(base), _ADD_ROWS):
        index.add(ids[at : at + _ADD_ROWS], base[at : at + _ADD_ROWS])
    if isinstance(kind, MilvusKind):
        kind.call("flush", "flush", getattr(index, "collection", ""))
    seconds = time.perf_counter() - started
    gc.collect()
    return index, seconds, rss_mb() - before


def run(n: int, args: argparse.Namespace, folder: Path) -> None:
    data = clustered_set(n + args.queries, args.dim, seed=n % 1000)
    base, queries = data[:n], data[n:]
    truth: list[list[tuple[int, float]]] | None = None
    for name in args.stores:
        kind = kinds(folder)[name]()
        index, seconds, grown = build(kind, base)
        ms, found = timed(index, queries)
        truth = truth if truth is not None else found  # faiss (exact) runs first
        per_gb = n / max(grown, 1.0) * 1024
        print(
            f"{name:12} {n:>9,}  {latency(ms)}  {1000 / np.percentile(ms, 50):8.1f} q/s  recall@10 "
            f"{at_k(found, truth):.4f}  add {seconds:7.1f} s ({n / seconds:9,.0f}/s)  +{grown:7.0f} MiB "
            f"({per_gb:,.0f} vectors/GiB)"
        )
        sys.stdout.flush()
        del index
        if isinstance(kind, MilvusKind):
            kind.drop_all()
            kind.close()
        gc.collect()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="stored vectors")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--stores", nargs="+", default=["faiss", "faiss-hnsw", "milvus-lite"])
    ap.add_argument("--tiny", action="store_true", help="2,000 x 64: runs in seconds on a CPU")
    args = ap.parse_args(argv)
    if args.tiny:
        args.n, args.dim, args.queries = [2000], 64, 10
    if args.stores[0] != "faiss":
        args.stores = ["faiss", *[s for s in args.stores if s != "faiss"]]  # the exact answer comes first
    import faiss

    print(
        f"stores bench: {', '.join(f'{n:,}' for n in args.n)} x {args.dim} clustered vectors, {args.queries} "
        f"queries of k={K}, one at a time; faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
        f"{os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="zhiku-stores-") as folder:
        for n in args.n:
            run(n, args, Path(folder))


if __name__ == "__main__":
    main()
