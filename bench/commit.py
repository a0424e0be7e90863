"""How fast a knowledge base stores chunks: the commit stage of an ingest, alone.

    .venv/bin/python bench/commit.py [--chunks N] [--dim D] [--page-size BYTES ...]

Synthetic Chinese chunks of 400 characters with random ``--dim`` vectors (768: m3e-base) go in checkpoints of
64 files of 27 chunks (as ``ingest.commit_every`` and the dev corpus make them), one ``transaction()`` and
``put_files`` each, with the index file deferred to the end as in a bulk ingest. Each ``--page-size`` makes a
new base with SQLite pages of that size (the default: what new bases use, ``knowledge.docstore.PAGE_SIZE``).
Prints microseconds per chunk, the commit statements' share, and the docstore's size.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import knowledge.store as store_module  # noqa: E402
from knowledge.docstore import DB_NAME, PAGE_SIZE  # noqa: E402
from knowledge.ingest import text_hash  # noqa: E402
from knowledge.store import FileRecord, KnowledgeBase, Manifest, NewChunk  # noqa: E402

FILES_PER_CHECKPOINT = 64
CHUNKS_PER_FILE = 27


def make_files(chunks: int, dim: int) -> tuple[list[tuple[FileRecord, list[NewChunk]]], dict[str, np.ndarray]]:
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    vectors_rng = np.random.default_rng(0)
    files = []
    vectors: dict[str, np.ndarray] = {}
    for f in range(max(1, chunks // CHUNKS_PER_FILE)):
        new = []
        for s in range(CHUNKS_PER_FILE):
            text = "".join(rng.choices(alphabet, k=400))
            h = text_hash(text)
            new.append(NewChunk(text=text, text_hash=h, page=None, offset=s * 400, tokens=" ".join(text[:200])))
            vec = vectors_rng.standard_normal(dim).astype(np.float32)
            vectors[h] = vec / np.linalg.norm(vec)
        files.append((FileRecord(f"/bench/f{f:06d}.txt", "0" * 64, 1, 1, len(new), "utf-8", 0.0), new))
    return files, vectors


def store(
    root: Path, files: list[tuple[FileRecord, list[NewChunk]]], vectors: dict[str, np.ndarray], dim: int
) -> tuple[float, float]:
    """Seconds to store the files in checkpoints, and the seconds of that spent leaving the transactions
    (the COMMIT and what follows it)."""
    leaving = 0.0
    with KnowledgeBase.open(root, create=Manifest("bench:random", dim, 500, 50)) as kb:
        started = time.perf_counter()
        with kb.deferred_index(min_interval=3600.0):
            for i in range(0, len(files), FILES_PER_CHECKPOINT):
                with kb.transaction() as tx:
                    tx.put_files(files[i : i + FILES_PER_CHECKPOINT], vectors)
                    left = time.perf_counter()
                leaving += time.perf_counter() - left
            seconds = time.perf_counter() - started
    return seconds, leaving


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--chunks", type=int, default=25_920)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--page-size", type=int, nargs="+", default=[PAGE_SIZE])
    args = parser.parse_args(argv)
    files, vectors = make_files(args.chunks, args.dim)
    n = sum(len(c) for _, c in files)
    print(
        f"commit benchmark: {n} chunks of 400 characters, {args.dim}-d vectors, "
        f"{FILES_PER_CHECKPOINT} files a checkpoint"
    )
    for size in args.page_size:
        with tempfile.TemporaryDirectory(prefix="zhiku-bench-") as tmp:
            store_module.PAGE_SIZE = size  # what KnowledgeBase.open gives a new base
            seconds, leaving = store(Path(tmp) / "kb", files, vectors, args.dim)
            mb = (Path(tmp) / "kb" / DB_NAME).stat().st_size / 1e6
        print(
            f"page size {size:6d}: {seconds / n * 1e6:6.1f} us a chunk ({seconds:.2f} s; leaving the transactions "
            f"{leaving:.2f} s); docstore {mb:.0f} MB"
        )


if __name__ == "__main__":
    main()
