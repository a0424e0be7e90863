"""bench/ingest.py (with its tiny random model) and bench/commit.py run end to end on the CPU (their figures are not
checked)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import make_corpus, run_bench

pytestmark = pytest.mark.slow


def test_the_ingest_benchmark_prints_parse_embed_and_whole_rates(tmp_path: Path) -> None:
    make_corpus(tmp_path / "docs")
    lines = run_bench(
        "ingest.py",
        "--tiny",
        "--workers",
        "1",
        "--copies",
        "1",
        "--rounds",
        "2",
        "--timeline",
        "--spread",
        str(tmp_path / "docs"),
        env={"ZHIKU_DATA_DIR": str(tmp_path / "unused")},
    )
    header = re.fullmatch(
        r"ingest benchmark: (\d+) files, \d+ pages, (\d+) chunks \((\d+) distinct texts\); embedder "
        r"tiny:random-64; 1 parser processes; \d+ CPU cores",
        lines[0],
    )
    assert header, lines[0]
    files, chunks, texts = (int(g) for g in header.groups())
    originals = [p for p in (tmp_path / "docs").rglob("*") if p.is_file()]
    text_files = [p for p in originals if p.suffix in {".txt", ".md"}]
    assert 0 < len(text_files) < len(originals)  # the corpus has a PDF, which is not copied
    assert files == len(originals) + len(text_files)
    assert chunks > files and texts > chunks // 2  # the copies' texts are new texts
    median = r" \(median of rounds\)"
    assert re.fullmatch(r"parse-only   \(1 processes\): +[\d.]+ chunks/s  \([\d.]+ s\)" + median, lines[1]), lines[1]
    assert re.fullmatch(r"embed-only   \(tiny:random-64\): +[\d.]+ chunks/s  \([\d.]+ s\)", lines[2]), lines[2]
    whole = re.fullmatch(
        r"whole ingest \(1 processes\): +[\d.]+ chunks/s  \([\d.]+ s; (\d+) chunks, (\d+) new vectors, 0 files "
        r"failed\)" + median,
        lines[3],
    )
    assert whole and int(whole.group(1)) == chunks and int(whole.group(2)) == texts, lines[3]
    stages = re.fullmatch(r"whole ingest, seconds per stage \(each in its own thread; they overlap\): (.*)", lines[4])
    assert stages, lines[4]
    named = dict(part.split(" ") for part in stages.group(1).split(", "))
    assert set(named) == {"hash", "send_wait", "parse", "embed", "commit", "finish", "index"}, named
    assert all(float(v) >= 0 for v in named.values()) and float(named["parse"]) > 0
    assert re.fullmatch(r"whole / slower stage: [\d.]+", lines[5]), lines[5]
    for n, line in enumerate(lines[6:8], 1):  # parse-only and whole, alternating, with the process's CPU time
        assert re.fullmatch(
            rf"round {n}: parse-only [\d.]+ chunks/s \([\d.]+ s, this process [\d.]+ CPU s\), whole [\d.]+ chunks/s "
            r"\([\d.]+ s, this process [\d.]+ CPU s, ended [\d.]+ s after its last parse\), whole / parse-only [\d.]+",
            line,
        ), line
    assert re.fullmatch(
        r"whole / parse-only: median [\d.]+ of 2 rounds; the whole ingest ended a median [\d.]+ s after its last parse",
        lines[8],
    ), lines[8]
    timeline = re.fullmatch(r"last round, seconds from the last parse \(stage start\+duration\): (.*)", lines[9])
    assert timeline, lines[9]
    steps = [
        re.fullmatch(r"(embed|commit|index|end) ([+-][\d.]+)(\+[\d.]+)?", part)
        for part in timeline.group(1).split(", ")
    ]
    assert all(steps), timeline.group(1)
    names = [m.group(1) for m in steps if m]
    # the run ends with the index file, after the last commit, which follows the last embedding call
    assert names[-2:] == ["index", "end"] and "commit" in names and "embed" in names, names
    assert len(lines) == 10, lines


def test_spread_puts_each_non_text_file_before_an_even_share_of_the_text_files() -> None:
    from bench.ingest import spread

    pdfs = [Path(f"p{n}.pdf") for n in range(3)]
    texts = [Path(f"t{n}.txt") for n in range(6)] + [Path("t6.md")]
    p0, p1, p2 = pdfs
    t0, t1, t2, t3, t4, t5, t6 = texts
    assert spread([*pdfs, *texts]) == [p0, t0, t1, p1, t2, t3, p2, t4, t5, t6]
    assert spread(texts) == texts and spread(pdfs) == pdfs


def test_the_commit_benchmark_prints_a_rate_per_page_size() -> None:
    lines = run_bench("commit.py", "--chunks", "270", "--dim", "16", "--page-size", "4096", "32768")
    assert lines[0] == "commit benchmark: 270 chunks of 400 characters, 16-d vectors, 64 files a checkpoint", lines
    for line, size in zip(lines[1:], (4096, 32768), strict=True):
        rate = re.fullmatch(
            rf"page size +{size}: +([\d.]+) us a chunk \([\d.]+ s; leaving the transactions [\d.]+ s\); "
            r"docstore \d+ MB",
            line,
        )
        assert rate and float(rate.group(1)) > 0, line


def test_the_index_write_benchmark_prints_both_saves() -> None:
    lines = run_bench("index_write.py", "--rows", "300", "--dim", "16", "--repeats", "2")
    assert lines[0] == "index write benchmark: 300 x 16 flat index, 0 MB, 2 saves each", lines
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["writing back", "plain"], lines
    for line in lines[1:]:
        assert re.search(r"median [\d.]+ s \([\d.]+-[\d.]+\), \d+ MB/s$", line), line
