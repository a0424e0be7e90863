"""Text facts both knowledge/ and llms/ need: which characters are CJK, and token estimates."""

from __future__ import annotations

import functools
import re
from typing import Any, Literal

Language = Literal["zh-Hans", "zh-Hant", "other"]

# Scripts written without spaces between words: CJK ideographs (with extensions and compatibility forms),
# radicals, kana, bopomofo, CJK punctuation and full-width forms. A space between two of these in a PDF is
# an extraction artefact.
UNSPACED_RANGES = (
    "\u2e80-\u2eff\u2f00-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff"
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003134f"
)
# CJK for counting: the above plus Hangul (spaced, but still about one token per syllable).
CJK_RANGES = UNSPACED_RANGES + "\uac00-\ud7af"
# Han ideographs only: what makes a question Chinese (kana or Hangul alone do not).
HAN_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"

_CJK = re.compile(f"[{CJK_RANGES}]")
_HAN = re.compile(f"[{HAN_RANGES}]")


def is_cjk(ch: str) -> bool:
    """Whether one character belongs to a CJK script, punctuation or full-width form."""
    return bool(_CJK.match(ch))


def has_han(text: str) -> bool:
    """Whether the text holds any Han character (the question's language picks the prompt by this)."""
    return bool(_HAN.search(text))


def count_cjk(text: str) -> int:
    return len(_CJK.findall(text))


def estimate_tokens(text: str) -> int:
    """Tokens without a model's tokenizer: about one per CJK character, four characters per token
    otherwise; rounded up, so a budget in tokens is not overrun."""
    cjk = count_cjk(text)
    return cjk + (len(text) - cjk + 3) // 4


# Common characters written differently in the two Chinese scripts (each string pairs position by position:
# 这/這, 个/個 ...). A question is Traditional when more of its characters are in the second row.
_SIMPLIFIED_ONLY = (
    "这个们为国说时来会对学过还发经点后问动体与开关头长见进种实现两应车门书无机样听处让变远总边里么际认东"
    "乐买卖亲钱铁银队阳阴园图圆声岁岛广庆际汉区华历县层陆将级刘吗么读谁该谈谢请让记论诗语词译财贵费资运遗"
    "钟镇湾湖称标树线组织结给绍经继续导岸势热烧爱灵战护报损挂范药苏万与丛严丰临丽举义乌乐乔习乡书买乱争于"
    "亏云亚产亩亲亿仅从仑仓仪们价众优伙会伞伟传伤伦伪体佣侠侣侥侦侧侨侩侪侬俣俦俨俩俭债倾偬偻偾偿傥傧储傩"
    "儿兑兖党兰关兴兹养兽冁内冈册写军农冢冯冲决况冻净凄凉凌减凑凛凤处凫凭凯击凿刍划刘则刚创删别刬刭刹刽刿"
    "剀剂剐剑剥剧劝办务劢动励劲劳势勋"
)
_TRADITIONAL_ONLY = (
    "這個們為國說時來會對學過還發經點後問動體與開關頭長見進種實現兩應車門書無機樣聽處讓變遠總邊裡麼際認東"
    "樂買賣親錢鐵銀隊陽陰園圖圓聲歲島廣慶際漢區華歷縣層陸將級劉嗎麼讀誰該談謝請讓記論詩語詞譯財貴費資運遺"
    "鐘鎮灣湖稱標樹線組織結給紹經繼續導岸勢熱燒愛靈戰護報損掛範藥蘇萬與叢嚴豐臨麗舉義烏樂喬習鄉書買亂爭於"
    "虧雲亞產畝親億僅從侖倉儀們價眾優夥會傘偉傳傷倫偽體傭俠侶僥偵側僑儈儕儂俁儔儼倆儉債傾傯僂僨償儻儐儲儺"
    "兒兌兗黨蘭關興茲養獸囅內岡冊寫軍農塚馮衝決況凍淨淒涼淩減湊凜鳳處鳧憑凱擊鑿芻劃劉則剛創刪別剗剄剎劊劌"
    "剴劑剮劍剝劇勸辦務勱動勵勁勞勢勳"
)
_SIMPLIFIED_SET = frozenset(_SIMPLIFIED_ONLY) - frozenset(_TRADITIONAL_ONLY)
_TRADITIONAL_SET = frozenset(_TRADITIONAL_ONLY) - frozenset(_SIMPLIFIED_ONLY)


def language_of(text: str) -> Language:
    """``zh-Hant``, ``zh-Hans`` or ``other``: the script family a question is written in, which decides how
    retrieval weighs word matches (jieba's dictionary is Simplified) and where its similarity floor lies."""
    if not has_han(text):
        return "other"
    traditional = sum(ch in _TRADITIONAL_SET for ch in text)
    simplified = sum(ch in _SIMPLIFIED_SET for ch in text)
    return "zh-Hant" if traditional > simplified else "zh-Hans"


@functools.cache
def _t2s() -> Any:
    import opencc  # imported on first use: no work at import time

    return opencc.OpenCC("t2s")


def to_simplified(text: str) -> str:
    """``text`` with Traditional Chinese characters and phrases written in Simplified (OpenCC t2s), for
    comparing words across the scripts: "桃花源记中渔人" asked of "桃花源記 … 漁人"."""
    return _t2s().convert(text) if has_han(text) else text
