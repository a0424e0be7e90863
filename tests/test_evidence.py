"""Sentence-level evidence: the tight context, the "can these passages answer?" check, follow-ups,
citations, answer matching and the question's script."""

from __future__ import annotations

import pytest

from common.text import language_of
from knowledge.evidence import (
    best_quote,
    best_quotes,
    citations,
    cite,
    contains_normalized,
    content_terms,
    coverage,
    is_follow_up,
    is_not_found,
    rank_sentences,
    select_evidence,
    split_sentences,
)

RIVER = "长江是中国最长的河流。它全长约6300公里，流经十一个省份。黄河是中国第二长河，被称为母亲河。"
TOWN = "路口镇位于长沙县东北部。2004年村级区划调整后，全镇辖8个村、2个社区。镇政府驻路口村。"


def test_sentences_split_on_chinese_and_latin_ends_and_keep_closing_quotes() -> None:
    assert split_sentences("第一页\n他说：“好吗？”我说。Then it ends. Next!") == [
        "第一页",
        "他说：“好吗？”",
        "我说。",
        "Then it ends.",
        "Next!",
    ]


def test_a_sentence_never_ends_inside_a_title_brackets_or_an_initial() -> None:
    album = "《卡拉OK.LIVE！‧台北‧我》是张雨生发行的第六张国语专辑。专辑中所有歌曲的词曲皆由他自己创作！"
    assert split_sentences(album, whole=True) == [
        "《卡拉OK.LIVE！‧台北‧我》是张雨生发行的第六张国语专辑。",
        "专辑中所有歌曲的词曲皆由他自己创作！",
    ]
    assert split_sentences("由汤玛斯·霍尔兹（Thomas R. Holtz）正式建立。同年另一支。", whole=True) == [
        "由汤玛斯·霍尔兹（Thomas R. Holtz）正式建立。",
        "同年另一支。",
    ]
    # a bracket a chunk left open glues nothing together
    assert split_sentences("开了（没有关。后面一句。", whole=True) == ["开了（没有关。", "后面一句。"]


def test_the_quote_answers_the_question_and_a_short_one_takes_the_next_sentence() -> None:
    plant = "六耳铃是菊科艾纳香属的植物。花期从10月起\n至翌年5~6月结果。"
    quote = best_quote("花期是什么时候？", [RIVER, plant], min_chars=12)
    assert quote is not None and quote.passage == 1
    # 7 characters alone say too little: the next sentence comes too, on one line
    assert quote.text == "花期从10月起 至翌年5~6月结果。"
    assert best_quote("花期是什么时候？", [RIVER, plant], min_chars=0).text == "花期从10月起"
    assert best_quote("量子计算机", [RIVER]) is None


def test_quotes_are_the_best_sentences_best_first_never_overlapping() -> None:
    question = "长江全长多少公里，流经几个省份？"
    first, second = best_quotes(question, [TOWN, RIVER], min_chars=0, count=2)
    assert (first.passage, first.text) == (1, "它全长约6300公里，流经十一个省份。")  # holds both asked things
    assert second.passage == 1 and second.text != first.text and first.score >= second.score
    # a short quote takes the next sentence: that one is not quoted again
    long_first, *rest = best_quotes(question, [RIVER], min_chars=30, count=3)
    assert all(q.text not in long_first.text for q in rest)
    assert best_quotes(question, [RIVER], count=1) == [best_quote(question, [RIVER])]
    assert best_quotes("量子计算机", [RIVER]) == []


def test_a_simplified_question_finds_its_answer_in_a_traditional_passage() -> None:
    story = "桃花源記\n東晉 陶淵明\n晉太元中，武陵人捕魚為業。緣溪行，忘路之遠近。漁人甚異之。"
    guide = "注意：Big5 编码的文件也能被当作 GB18030 解码，本目录中的《桃花源记》就是这样。"
    question = "桃花源记中捕鱼的武陵人是哪个朝代的人？"
    quote = best_quote(question, [story, guide])
    assert quote is not None and quote.passage == 0 and "晉太元中" in quote.text  # quoted as the passage has it
    # every word this question shares with the story is written differently in the two scripts
    only_across_scripts = best_quote("捕鱼为业的是什么人？", [story])
    assert only_across_scripts is not None and "武陵人捕魚為業" in only_across_scripts.text
    assert coverage(question, [story]) > coverage(question, [guide])


def test_the_evidence_is_the_best_sentence_and_its_neighbours_verbatim_within_the_budget() -> None:
    evidence = select_evidence("路口镇管辖下有几个村和社区？", [RIVER, TOWN], budget=60)
    assert evidence[0] == ""  # the river passage shares no word with the question
    assert "全镇辖8个村、2个社区。" in evidence[1] and evidence[1] in TOWN  # exactly as the passage has it
    tight = select_evidence("路口镇管辖下有几个村和社区？", [RIVER, TOWN], budget=5, neighbours=0)
    assert tight == ["", "2004年村级区划调整后，全镇辖8个村、2个社区。"]  # over budget: the best sentence alone


def test_words_the_passage_repeats_count_less_than_the_rare_ones_that_answer() -> None:
    # The subject and the year are in several sentences (the passage was retrieved for them); "日本政府"
    # and "授予" are only in the one that answers. Plain word overlap picked the date of her death.
    passage = (
        "1970年（昭和45年），为维护知识产权，长谷川町子向没有征得作者同意擅自使用「蝾螺小姐」的角色图案的立川"
        "巴士公司提出控诉 。1992年（平成4年）5月27日，长谷川町子因心衰竭去世，享年72岁。"
        "遵照她的遗嘱，去世的消息在月内并未公开。一个月后（6月末）朝日新闻社和富士电视台公布了她的死讯。同年7月，日本政府为表彰她的家族漫画"
        "对安定战后日本社会的贡献授予其国民荣誉赏。"
    )
    best = rank_sentences("1992年7月，日本政府授予长谷川町子什么奖项？", [passage], whole=True)[0]
    assert "国民荣誉赏" in best.text
    # a word that jieba cuts differently in the question and the passage still counts by its characters
    best = rank_sentences("哪一年进行了村级区划的调整？", [TOWN])[0]
    assert best.text == "2004年村级区划调整后，全镇辖8个村、2个社区。"


def test_coverage_tells_an_answerable_question_from_an_unrelated_one() -> None:
    assert "社区" in content_terms("路口镇管辖下有几个村和社区？") and "什么" not in content_terms("是什么？")
    assert coverage("路口镇管辖下有几个村和社区？", [RIVER, TOWN]) >= 0.5
    assert coverage("2022年世界杯冠军是谁？", [RIVER, TOWN]) < 0.5
    assert coverage("How long is the Yangtze river?", ["The Yangtze river is 6,300 km long."]) >= 0.5
    assert coverage("Who won the 2022 World Cup?", ["The Yangtze river is 6,300 km long."]) < 0.5


@pytest.mark.parametrize(
    ("question", "follows"),
    [
        ("他为什么要出山？", True),
        ("那面积呢？", True),
        ("它的别名是什么？", True),
        ("当时是谁在执政？", True),
        ("What is its length?", True),
        ("诸葛亮为什么要出山？", False),
        ("路口镇管辖下有几个村和社区？", False),
        ("How long is the Yangtze river?", False),
    ],
)
def test_a_follow_up_is_told_by_its_pronouns_and_ellipsis(question: str, follows: bool) -> None:
    assert is_follow_up(question) is follows


def test_citations_are_attached_to_the_passage_a_sentence_comes_from_and_invented_ones_dropped() -> None:
    passages = [RIVER, TOWN]
    assert cite("全镇辖8个村、2个社区。", passages) == "全镇辖8个村、2个社区[2]。"
    # [6] of two passages is invented: dropped, and the sentence gets the passage it comes from
    assert cite("长江全长约6300公里[1]。路口镇有8个村[6]。", passages) == "长江全长约6300公里[1]。路口镇有8个村[2]。"
    assert cite("我不知道。", passages) == "我不知道。"  # from no passage: no marker
    assert citations("甲[2]。乙[1]。丙[2]。") == [2, 1]
    # a "！" inside a title is not the end of the sentence: the marker goes after the title, not into it
    album = "《卡拉OK.LIVE！‧台北‧我》是张雨生发行的第六张国语专辑。"
    assert cite("第六张专辑是《卡拉OK.LIVE！‧台北‧我》。", [album]) == "第六张专辑是《卡拉OK.LIVE！‧台北‧我》[1]。"


def test_answers_match_ignoring_width_case_spaces_and_punctuation() -> None:
    assert contains_normalized("全镇辖 8 个村、2 个社区[2]", ["8个村、2个社区。"])
    assert contains_normalized("ＣＳ/ＭＰＱ－７８ radar", ["cs mpq-78"])
    assert not contains_normalized("9个村", ["8个村"]) and not contains_normalized("anything", [""])


def test_not_found_replies_are_recognised() -> None:
    assert is_not_found("知识库中没有找到这个问题的答案。")
    assert is_not_found("The knowledge base does not contain the answer to this question.")
    assert not is_not_found("路口镇辖8个村、2个社区[2]。")


def test_the_script_of_a_question() -> None:
    assert language_of("路口镇管辖下有几个村和社区？") == "zh-Hans"
    assert language_of("桃花源記的作者是誰？") == "zh-Hant"
    assert language_of("How long is the Yangtze?") == "other"
