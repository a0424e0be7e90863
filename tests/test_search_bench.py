"""bench/search.py --tiny runs on a CPU and prints every line it promises (the figures are not checked)."""

from __future__ import annotations

import re

from tests.helpers import run_bench


def test_the_search_bench_runs_tiny_on_a_cpu() -> None:
    lines = run_bench("search.py", "--tiny")
    assert lines[0].startswith("search bench: 2,000 x 64, 20 queries of k=10")
    ms = r"p50 +[\d.]+ ms +p95 +[\d.]+ ms"
    for data in ("random", "clustered"):
        mine = [line for line in lines if re.match(rf"\w+ +{data} ", line)]
        assert re.match(rf"flat +{data} +faiss-cpu +{ms}", mine[0]), mine
        assert re.match(rf"data +{data} +a query's nearest stored vector: cosine [\d.]+", mine[1]), mine
        # without CUDA the tiny run times the torch path on the CPU; it is exact, so it overlaps flat fully
        gpu = re.match(rf"gpu +{data} +(torch-cuda|torch-cpu|faiss-gpu) +{ms} +overlap@10 ([\d.]+) vs flat", mine[2])
        assert gpu and float(gpu.group(2)) >= 0.99, mine
        hnsw = [re.match(rf"hnsw +{data} +M=32 efC=80 efS=(\d+) +{ms} +recall@10 ([\d.]+)", line) for line in mine[3:]]
        assert [m.group(1) for m in hnsw if m] == ["16", "64"], mine
        assert all(m and 0.0 <= float(m.group(2)) <= 1.0 for m in hnsw)
