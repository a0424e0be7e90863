"""Builders for test documents, and a runner for the benchmarks' smoke tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def run_interpreted(module: str) -> str:
    """Run ``python -m module`` with Triton's interpreter (CUDA kernels on the CPU; it must be set before Triton is
    imported, hence a process of its own); fails the test unless it exits 0 and prints "ok" last."""
    done = subprocess.run(
        [sys.executable, "-m", module],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""},
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok"), done.stdout[-2000:]
    return done.stdout


def run_bench(script: str, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> list[str]:
    """``bench/<script> args`` on one CPU thread (no GPU); its stdout lines, after checking it exited 0."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})},
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


ARTICLE = (
    "天生三桥\n\n天生三桥位于重庆武隆县仙女山镇，是重庆直辖市级风景名胜区。"
    "2007年6月作为中国南方喀斯特的组成部分被列入联合国世界自然遗产。"
    "从天龙桥上端到黑龙桥下端，直线距离仅有1500米，全世界仅此一例。\n\n"
    "首钢集团\n\n首钢集团是中国的一家大型钢铁企业，总部位于北京市石景山区。"
    "首钢的前身是1919年建立的龙烟铁矿公司石景山炼厂。\n"
)


def make_pdf(path: Path, pages: list[str]) -> Path:
    """A PDF with one text block per page, in a CID font that needs no font file."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    c = canvas.Canvas(str(path), pagesize=A4)
    for text in pages:
        y = 780
        for line in text.split("\n"):
            c.setFont("STSong-Light", 11)
            c.drawString(60, y, line)
            y -= 18
        c.showPage()
    c.save()
    return path


def make_corpus(folder: Path) -> dict[str, Path]:
    """One file per encoding users have, plus a PDF, in nested folders."""
    (folder / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    files = {
        "utf-8": folder / "utf8.txt",
        "utf-8-sig": folder / "sub" / "bom.md",
        "utf-16": folder / "sub" / "utf16.txt",
        "gb18030": folder / "sub" / "deeper" / "gbk.txt",
    }
    for encoding, path in files.items():
        path.write_bytes(ARTICLE.replace("天生三桥", f"天生三桥（{encoding}）").encode(encoding))
    big5 = folder / "big5.txt"
    big5.write_bytes(
        "桃花源記\n\n晉太元中，武陵人捕魚為業。緣溪行，忘路之遠近。忽逢桃花林，夾岸數百步。\n".encode("big5")
    )
    files["big5"] = big5
    files["pdf"] = make_pdf(
        folder / "report.pdf",
        ["第一页\n长江是中国最长的河流，全长约6300公里。", "第二页\n黄河是中国第二长河，被称为母亲河。"],
    )
    return files
