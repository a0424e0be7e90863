"""bench/stores.py --tiny runs on a CPU and prints one line per store (the figures are not checked)."""

from __future__ import annotations

import re

from tests.helpers import run_bench


def test_the_stores_bench_runs_tiny_on_a_cpu() -> None:
    lines = run_bench("stores.py", "--tiny")
    assert lines[0].startswith("stores bench: 2,000 x 64 clustered vectors, 10 queries of k=10")
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["faiss", "faiss-hnsw", "milvus-lite"]
    for name, line in rows.items():
        found = re.match(
            rf"{name} +2,000 +p50 +[\d.]+ ms +p95 +[\d.]+ ms +[\d.]+ q/s +recall@10 ([\d.]+) +add +[\d.]+ s", line
        )
        assert found, line
        # the exact stores agree with flat search; HNSW is approximate but near-exact on 2,000 vectors
        assert float(found.group(1)) == 1.0 if name != "faiss-hnsw" else float(found.group(1)) >= 0.9


def test_the_migration_bench_runs_tiny_and_finds_the_same_answers() -> None:
    lines = run_bench("migrate_dev.py", "--tiny")
    assert lines[0].startswith("migrate bench: 'tiny'") and "3 questions" in lines[0]
    assert re.match(r"migrated faiss -> milvus \(Lite\): \d+ vectors in [\d.]+ s, \d+ checked", lines[1]), lines
    # a tiny base's top-5 cannot differ between two exact stores: this part is checked
    assert "top-5 pipeline  identical for 3/3 questions" in lines
    assert "top-5 vector    identical for 3/3 questions" in lines
    recalls = [line.split() for line in lines if line.startswith(("recall@", "mrr"))]
    assert len(recalls) == 4 and all(r[2] == r[4] for r in recalls), recalls
