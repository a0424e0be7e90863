"""Chinese-aware chunking on top of LangChain's recursive splitter.

Split on paragraphs, then sentence ends (Chinese and ASCII), then clauses, then anything; sizes are in
characters. Each chunk keeps its source, page and character offset within the page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from langchain_core.documents import Document
from langchain_text_splitters import RecursiveCharacterTextSplitter

# Most significant first. The ASCII sentence ends carry a trailing space so "3.14" or "e.g" survive.
SEPARATORS: tuple[str, ...] = (
    "\n\n",
    "\n",
    "。",
    "！",
    "？",
    "…",
    ". ",
    "! ",
    "? ",
    "；",
    "; ",
    "，",
    "、",
    ", ",
    " ",
    "",
)


# A heading: a paragraph of one short line that does not end like a sentence.
_HEADING = re.compile(r"^[^\n]{1,40}$")
_SENTENCE_END = tuple('。！？；，：、…!?;,:.」”"')


@dataclass(frozen=True)
class Chunk:
    text: str
    source: str
    page: int | None
    offset: int  # character offset of the chunk within its page's cleaned text
    heading: str = ""  # the section heading the chunk sits under, if the page has headings

    @property
    def embed_text(self) -> str:
        """What gets embedded: the heading gives a chunk from the middle of a section its topic."""
        return f"{self.heading}\n{self.text}" if self.heading and not self.text.startswith(self.heading) else self.text


def is_heading(paragraph: str) -> bool:
    line = paragraph.strip()
    return bool(_HEADING.match(line)) and not line.endswith(_SENTENCE_END)


def sections(text: str) -> list[tuple[str, int, int, str]]:
    """Split a page at heading paragraphs into (heading, heading offset, body offset, body).

    Text before the first heading has heading "". Consecutive headings (a chapter, then a section)
    are joined with a space. Headings with no body after them (the last line of a page, a file of one
    short line) become a section of their own with heading "", so their text is never dropped.
    """
    out: list[tuple[str, int, int, str]] = []
    heading, heading_at, body_at = "", 0, 0
    for match in re.finditer(r"[^\n](?:.|\n(?!\n))*", text):  # paragraphs: runs without a blank line
        if not is_heading(match.group()):
            continue
        if text[body_at : match.start()].strip():
            out.append((heading, heading_at, body_at, text[body_at : match.start()]))
            heading, heading_at = "", match.start()
        heading = f"{heading} {match.group().strip()}".strip() if heading else match.group().strip()
        body_at = match.end()
    if text[body_at:].strip():
        out.append((heading, heading_at, body_at, text[body_at:]))
    elif heading:  # headings with no text after them (a page's last line, a one-line file): keep them as text
        out.append(("", heading_at, heading_at, text[heading_at:]))
    return out


class ChineseTextSplitter:
    """Splits cleaned pages into overlapping chunks without breaking sentences where it can."""

    def __init__(self, chunk_size: int, chunk_overlap: int) -> None:
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self._splitter = RecursiveCharacterTextSplitter(
            separators=list(SEPARATORS),
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            keep_separator="end",  # a sentence keeps its 。 instead of the next chunk starting with it
            add_start_index=True,
            strip_whitespace=True,
        )

    def split(self, pages: list[Document]) -> list[Chunk]:
        chunks: list[Chunk] = []
        for page in pages:
            source, page_no = str(page.metadata["source"]), page.metadata.get("page")
            for heading, heading_at, body_at, body in sections(page.page_content):
                first = True
                for piece in self._splitter.create_documents([body]):
                    text = piece.page_content.strip()
                    if not text:
                        continue
                    offset = body_at + body.index(text, int(piece.metadata.get("start_index", 0)))
                    # the heading opens its first chunk when it fits, instead of becoming a tiny chunk
                    if first and heading and len(heading) + 1 + len(text) <= self.chunk_size:
                        text, offset = f"{heading}\n{text}", heading_at
                    first = False
                    chunks.append(Chunk(text, source, page_no, offset, heading))
        return chunks
