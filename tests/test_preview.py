"""knowledge/preview.py: the sentences an answer draws on, and a PDF page rendered with a passage marked."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import ImageChops

from knowledge.preview import PreviewError, evidence_share, evidence_spans, highlight_rects, render_page
from tests.helpers import make_pdf

PAGES = [
    "第一页\n长江是中国最长的河流，全长约6300公里。\n长江流经十一个省区。",
    "第二页\n黄河是中国第二长河，被称为母亲河。",
]
PASSAGE = "长江是中国最长的河流，全长约6300公里。"


@pytest.fixture(scope="module")
def pdf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pdf(tmp_path_factory.mktemp("preview") / "report.pdf", PAGES)


def test_evidence_spans_pick_the_sentences_the_answer_uses() -> None:
    passage = "黄河是中国第二长河。长江全长约6300公里。长江流经十一个省区。"
    (span,) = evidence_spans(passage, "长江全长约6300公里[1]。")
    assert passage[slice(*span)] == "长江全长约6300公里。"
    assert evidence_spans(passage, "") == [] and evidence_spans(passage, "Paris") == []
    assert evidence_share(passage, "长江全长约6300公里") == 1.0
    assert evidence_share(passage, "Paris") == 0.0


def test_render_page_size_and_marked_passage(pdf: Path) -> None:
    import pdfplumber

    plain = render_page(pdf, 1, "", resolution=72)
    marked = render_page(pdf, 1, PASSAGE, resolution=72)
    assert plain.size == marked.size
    for resolution in (72, 144):  # A4 is 595.3 x 841.9 points; a point is 1/72 inch
        width, height = render_page(pdf, 2, "", resolution=resolution).size
        assert abs(width - 595.3 * resolution / 72) <= 1 and abs(height - 841.9 * resolution / 72) <= 1
    diff = ImageChops.difference(plain, marked).getbbox()
    assert diff is not None, "the highlight changed nothing"
    with pdfplumber.open(pdf) as doc:
        (box,) = highlight_rects(doc.pages[0].chars, PASSAGE)  # one line of text: one box
        line = [c for c in doc.pages[0].chars if c["text"] in "长江是中国最长的河流"][:10]
    x0, top, x1, bottom = box
    # the changed pixels are the box around the passage's line: not the heading, not the next line
    assert diff[0] >= x0 - 2 and diff[2] <= x1 + 2 and diff[1] >= top - 2 and diff[3] <= bottom + 2
    assert x0 <= min(c["x0"] for c in line) and top <= min(c["top"] for c in line)
    assert x1 - x0 > 150  # the whole sentence, not a fragment


def test_a_passage_broken_across_lines_is_found_in_pieces(pdf: Path) -> None:
    import pdfplumber

    with pdfplumber.open(pdf) as doc:
        chars = doc.pages[0].chars
        # punctuation differs, and the text runs on across a line break
        boxes = highlight_rects(chars, "长江是中国最长的河流 全长约6300公里\n长江流经十一个省区")
        assert len(boxes) == 2
        assert highlight_rects(chars, "完全无关的一句话。") == []


def test_a_page_out_of_range_is_a_clear_error(pdf: Path, tmp_path: Path) -> None:
    with pytest.raises(PreviewError, match=r"report\.pdf has no page 3 \(it has 2\)"):
        render_page(pdf, 3, PASSAGE)
    with pytest.raises(PreviewError, match="no page 0"):
        render_page(pdf, 0, PASSAGE)
    with pytest.raises(PreviewError, match="no longer there"):
        render_page(tmp_path / "gone.pdf", 1, "")
    fake = tmp_path / "fake.pdf"
    fake.write_text("长江", encoding="utf-8")
    with pytest.raises(PreviewError, match="not a PDF"):
        render_page(fake, 1, "")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\n" + b"\x00garbage" * 20)
    with pytest.raises(PreviewError, match=r"broken\.pdf"):
        render_page(broken, 1, "")
