"""Regenerate samples/corpus/chushibiao.pdf, the PDF document of the sample corpus.

Usage: .venv/bin/python samples/make_pdf.py

The text is 诸葛亮《出师表》 (public domain).  It is set in the Adobe CID font
STSong-Light, which every PDF reader provides, so no font file is embedded or
needed.  ``invariant`` mode makes the output byte-for-byte reproducible.
"""

from __future__ import annotations

from pathlib import Path

from reportlab import rl_config
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer

OUT: Path = Path(__file__).resolve().parent / "corpus" / "chushibiao.pdf"
FONT = "STSong-Light"

TITLE = "出师表"
AUTHOR = "蜀汉　诸葛亮"
PARAGRAPHS: tuple[str, ...] = (
    "先帝创业未半而中道崩殂，今天下三分，益州疲弊，此诚危急存亡之秋也。然侍卫之臣不懈于内，"
    "忠志之士忘身于外者，盖追先帝之殊遇，欲报之于陛下也。诚宜开张圣听，以光先帝遗德，"
    "恢弘志士之气，不宜妄自菲薄，引喻失义，以塞忠谏之路也。",
    "宫中府中，俱为一体，陟罚臧否，不宜异同。若有作奸犯科及为忠善者，宜付有司论其刑赏，"
    "以昭陛下平明之理，不宜偏私，使内外异法也。",
    "侍中、侍郎郭攸之、费祎、董允等，此皆良实，志虑忠纯，是以先帝简拔以遗陛下。"
    "愚以为宫中之事，事无大小，悉以咨之，然后施行，必能裨补阙漏，有所广益。",
    "将军向宠，性行淑均，晓畅军事，试用于昔日，先帝称之曰能，是以众议举宠为督。"
    "愚以为营中之事，悉以咨之，必能使行阵和睦，优劣得所。",
    "亲贤臣，远小人，此先汉所以兴隆也；亲小人，远贤臣，此后汉所以倾颓也。先帝在时，"
    "每与臣论此事，未尝不叹息痛恨于桓、灵也。侍中、尚书、长史、参军，此悉贞良死节之臣，"
    "愿陛下亲之信之，则汉室之隆，可计日而待也。",
    "臣本布衣，躬耕于南阳，苟全性命于乱世，不求闻达于诸侯。先帝不以臣卑鄙，猥自枉屈，"
    "三顾臣于草庐之中，咨臣以当世之事，由是感激，遂许先帝以驱驰。后值倾覆，受任于败军之际，"
    "奉命于危难之间，尔来二十有一年矣。",
    "先帝知臣谨慎，故临崩寄臣以大事也。受命以来，夙夜忧叹，恐托付不效，以伤先帝之明，"
    "故五月渡泸，深入不毛。今南方已定，兵甲已足，当奖率三军，北定中原，庶竭驽钝，攘除奸凶，"
    "兴复汉室，还于旧都。此臣所以报先帝之职分也。至于斟酌损益，进尽忠言，则攸之、祎、允之任也。",
    "愿陛下托臣以讨贼兴复之效，不效，则治臣之罪，以告先帝之灵。若无兴德之言，"
    "则责攸之、祎、允等之慢，以彰其咎；陛下亦宜自谋，以咨诹善道，察纳雅言，深追先帝遗诏，"
    "臣不胜受恩感激。",
    "今当远离，临表涕零，不知所言。",
)


def build(out: Path = OUT) -> Path:
    """Write the PDF to ``out`` and return its path."""
    rl_config.invariant = True
    pdfmetrics.registerFont(UnicodeCIDFont(FONT))
    title = ParagraphStyle("title", fontName=FONT, fontSize=20, leading=28, alignment=1)
    byline = ParagraphStyle("byline", fontName=FONT, fontSize=12, leading=18, alignment=1)
    body = ParagraphStyle(
        "body", fontName=FONT, fontSize=13, leading=22, firstLineIndent=26, wordWrap="CJK", spaceAfter=6
    )
    story = [Paragraph(TITLE, title), Paragraph(AUTHOR, byline), Spacer(1, 8 * mm)]
    story += [Paragraph(p, body) for p in PARAGRAPHS]
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = SimpleDocTemplate(
        str(out),
        pagesize=A4,
        leftMargin=25 * mm,
        rightMargin=25 * mm,
        topMargin=25 * mm,
        bottomMargin=25 * mm,
        title=TITLE,
        author="诸葛亮",
        subject="Zhiku sample corpus (public domain)",
    )
    doc.build(story)
    return out


if __name__ == "__main__":
    print(build())
