"""How long the vector index file takes to save: what the end of every ingest waits for.

    .venv/bin/python bench/index_write.py [--rows N] [--dim D] [--repeats K] [--folder DIR]

A flat index of ``--rows`` random ``--dim`` vectors (25,983 x 768: the H200 ingest benchmark's base, ~80 MB) is
saved as a knowledge base saves it (streamed, into a temp file, fsynced, renamed) ``--repeats`` times, alternating
with the same save without asking the kernel to write each 8 MB as it comes (common.files.writing_back), so that
the disk's drift falls on both. ``--folder``: where to write (a knowledge base's disk; default: a temp folder).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import knowledge.vectors as vectors  # noqa: E402


def run(rows: int, dim: int, repeats: int, folder: Path) -> dict[str, list[float]]:
    import faiss

    index = faiss.IndexFlatIP(dim)
    index.add(np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32))
    real = vectors.writing_back
    plain = lambda fh: fh.write  # noqa: E731 - the variant without writeback requests
    seconds: dict[str, list[float]] = {"writing back": [], "plain": []}
    try:
        for n in range(repeats):
            variants = ["writing back", "plain"] if n % 2 == 0 else ["plain", "writing back"]
            for variant in variants:
                vectors.writing_back = real if variant == "writing back" else plain  # type: ignore[assignment]
                path = folder / f"index-{n}.faiss"
                started = time.perf_counter()
                vectors._save_faiss_file(index, path)
                seconds[variant].append(time.perf_counter() - started)
                path.unlink()
    finally:
        vectors.writing_back = real
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=25_983)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--folder", type=Path, default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zhiku-index-", dir=args.folder) as tmp:
        seconds = run(args.rows, args.dim, max(1, args.repeats), Path(tmp))
    megabytes = args.rows * args.dim * 4 / 1e6
    print(f"index write benchmark: {args.rows} x {args.dim} flat index, {megabytes:.0f} MB, {args.repeats} saves each")
    for variant, times in seconds.items():
        print(
            f"{variant:>12}: median {statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f}), "
            f"{megabytes / statistics.median(times):.0f} MB/s"
        )


if __name__ == "__main__":
    main()
