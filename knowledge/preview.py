"""Showing where an answer comes from: the sentences of a passage an answer draws on, and a PDF page
rendered with a passage's text marked.

Both are lexical and local: character bigrams for the sentences (as :func:`knowledge.evidence.best_source`
attributes answer sentences to passages), pdfplumber (rendering through pypdfium2) for the page.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowledge.evidence import CITATION, bigrams, normalize, sentence_spans, split_sentences

if TYPE_CHECKING:
    from PIL import Image

_WINDOW = 8  # when a sentence is not found whole on the page: look for its pieces of this many characters
_MIN_PIECE = 4  # shorter pieces match too many places to mean anything
HIGHLIGHT_FILL = (255, 214, 0, 80)  # translucent yellow
HIGHLIGHT_STROKE = (230, 150, 0, 220)


class PreviewError(ValueError):
    """A page that cannot be shown: the file is gone, is not a readable PDF, or has no such page."""


def evidence_spans(passage: str, answer: str) -> list[tuple[int, int]]:
    """(start, end) in ``passage`` of the sentence(s) that share the most character bigrams with
    ``answer`` (its [n] markers ignored): what the answer cites or quotes. [] when no sentence shares any."""
    grams = bigrams(CITATION.sub("", answer))
    if not grams:
        return []
    spans = sentence_spans(passage)
    shared = [len(grams & bigrams(passage[a:b])) for a, b in spans]
    best = max(shared, default=0)
    return [span for span, n in zip(spans, shared, strict=True) if best and n == best]


def evidence_share(passage: str, answer: str) -> float:
    """The share of the best sentence's bigrams that the answer holds (0 to 1): how much the answer takes
    from this passage at all."""
    grams = bigrams(CITATION.sub("", answer))
    best = 0.0
    for sentence in split_sentences(passage):
        own = bigrams(sentence)
        if own:
            best = max(best, len(own & grams) / len(own))
    return best


# ----- a PDF page with a passage marked -----------------------------------------------------------------
RENDER_TIMEOUT_S = 60.0


def render_page(path: Path, page: int, highlight: str, resolution: int = 100) -> Image.Image:
    """Page ``page`` (from 1) of the PDF at ``path`` as an RGB image, with a translucent rectangle over
    each line of the page that holds text of ``highlight`` (nothing marked when it is empty or not
    found). Raises :class:`PreviewError` with a readable message for a missing file, a file that is not
    a readable PDF, a page that is not in the document, or a renderer that crashed or hung.

    The page is rendered in a child process: PDFium (under pdfplumber's ``to_image``) is native code that is
    not thread-safe and can crash on a hostile PDF, and a crash there must not take the server with it (our
    browser test met a segmentation fault rendering in a server thread)."""
    import io
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout
    from concurrent.futures.process import BrokenProcessPool

    from PIL import Image

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        future = pool.submit(_render_png, str(path), page, highlight, resolution)
        try:
            png = future.result(timeout=RENDER_TIMEOUT_S)
        except BrokenProcessPool:
            raise PreviewError(f"cannot render {path.name}: the PDF renderer crashed on it") from None
        except FutureTimeout:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()  # a hung render is ended, not waited for
            raise PreviewError(f"cannot render {path.name}: rendering took over {RENDER_TIMEOUT_S:.0f} s") from None
    return Image.open(io.BytesIO(png)).convert("RGB")


def _render_png(path: str, page: int, highlight: str, resolution: int) -> bytes:
    """In the child process: the marked page as PNG bytes."""
    import io

    out = io.BytesIO()
    _render(Path(path), page, highlight, resolution).save(out, format="PNG")
    return out.getvalue()


def _render(path: Path, page: int, highlight: str, resolution: int) -> Image.Image:
    import pdfplumber
    from pdfminer.pdfparser import PDFSyntaxError
    from pdfplumber.utils.exceptions import PdfminerException

    try:
        with path.open("rb") as fh:
            head = fh.read(1024)
    except FileNotFoundError:
        raise PreviewError(f"{path.name} is no longer there ({path})") from None
    except OSError as err:
        raise PreviewError(f"cannot read {path.name}: {err.strerror or type(err).__name__}") from None
    if b"%PDF-" not in head:
        raise PreviewError(f"{path.name} is not a PDF")
    try:
        with pdfplumber.open(path) as pdf:
            count = len(pdf.pages)
            if not 1 <= page <= count:
                raise PreviewError(f"{path.name} has no page {page} (it has {count})")
            pdf_page = pdf.pages[page - 1]
            image = pdf_page.to_image(resolution=resolution)
            rects = highlight_rects(pdf_page.chars, highlight)
            if rects:
                image.draw_rects(rects, fill=HIGHLIGHT_FILL, stroke=HIGHLIGHT_STROKE, stroke_width=1)
            return image.annotated.convert("RGB")
    except PreviewError:
        raise
    except (PdfminerException, PDFSyntaxError, ValueError, KeyError, TypeError) as err:
        raise PreviewError(f"cannot render {path.name}: the PDF is damaged ({type(err).__name__})") from None


def highlight_rects(chars: Sequence[dict[str, Any]], highlight: str) -> list[tuple[float, float, float, float]]:
    """(x0, top, x1, bottom) boxes, one per line, around the page's characters that spell ``highlight``.

    Lines break mid-sentence in a PDF and punctuation may differ from the stored passage, so both sides are
    compared as letters and digits only (:func:`normalize`): each sentence of ``highlight`` is looked for
    whole, and when it is not on the page (the passage continues on the next page, cleaning changed it),
    its pieces of a few characters are."""
    glyphs = [c for c in chars if normalize(str(c.get("text", "")))]
    flat: list[str] = []
    owner: list[int] = []  # flat position -> index into glyphs
    for i, c in enumerate(glyphs):
        for ch in normalize(str(c["text"])):
            flat.append(ch)
            owner.append(i)
    page_text = "".join(flat)
    marked: set[int] = set()

    def mark(piece: str) -> bool:
        found, start = False, page_text.find(piece)
        while piece and start >= 0:
            marked.update(owner[start : start + len(piece)])
            found, start = True, page_text.find(piece, start + len(piece))
        return found

    for sentence in split_sentences(highlight):
        flat_sentence = normalize(sentence)
        if len(flat_sentence) < _MIN_PIECE and len(normalize(highlight)) >= _MIN_PIECE:
            continue
        if mark(flat_sentence):
            continue
        for at in range(0, len(flat_sentence), _WINDOW):
            piece = flat_sentence[at : at + _WINDOW]
            if len(piece) >= _MIN_PIECE:
                mark(piece)
    return _line_boxes([glyphs[i] for i in sorted(marked)])


def _line_boxes(chars: Sequence[dict[str, Any]], pad: float = 1.5) -> list[tuple[float, float, float, float]]:
    boxes: list[list[float]] = []
    for c in sorted(chars, key=lambda c: (round(float(c["top"])), float(c["x0"]))):
        x0, top, x1, bottom = float(c["x0"]), float(c["top"]), float(c["x1"]), float(c["bottom"])
        last = boxes[-1] if boxes else None
        if last is not None and abs(top - last[1]) < (bottom - top) / 2:
            last[:] = [min(last[0], x0), min(last[1], top), max(last[2], x1), max(last[3], bottom)]
        else:
            boxes.append([x0, top, x1, bottom])
    return [(x0 - pad, top - pad, x1 + pad, bottom + pad) for x0, top, x1, bottom in boxes]
