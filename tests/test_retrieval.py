"""Retrieval: fusion, BM25 kept in sync, threshold, neighbour expansion, evaluation metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.container import Zhiku
from knowledge.evaluation import Question, evaluate, load_questions
from knowledge.lexical import fts_query, tokenize
from knowledge.retrieval import RetrievalSettings, Retriever, merge_overlap, reciprocal_rank_fusion
from knowledge.store import Hit, StoredChunk
from tests.tiny_models import tiny_cross_encoder

SENTENCES = [f"第{i}段讲述编号为{i}的事件，事件{i}发生在不同的地方。" for i in range(12)]


def make_kb(app: Zhiku, folder: Path, files: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    kb = app.open_kb("r", create=True)
    report = app.ingestor(kb).run([folder], progress=False)
    assert report.failures == []
    return kb


def test_reciprocal_rank_fusion_rewards_agreement() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 4]], [1.0, 1.0], k=60)
    assert fused[3] == pytest.approx(1 / 63 + 1 / 61)
    assert sorted(fused, key=lambda t: -fused[t])[0] == 3  # in both lists beats first in one
    weighted = reciprocal_rank_fusion([[1], [2]], [1.0, 2.0], k=60)
    assert weighted[2] == pytest.approx(2 * weighted[1])


def test_tokens_for_chinese_and_english() -> None:
    assert "社区" in tokenize("路口镇辖8个村、2个社区") and "8" in tokenize("路口镇辖8个村")
    assert tokenize("Gettysburg Address, 1863") == ["gettysburg", "address", "1863"]
    assert fts_query('say "hi"') == '"say" OR "hi"'


def test_bm25_finds_a_rare_word_and_follows_updates_and_deletes(app: Zhiku, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    kb = make_kb(app, docs, {"a.txt": "钼铁矿石的冶炼方法。", "b.txt": "今天天气很好。"})
    with kb.snapshot() as snap:
        found = [h.chunk.source for h in snap.hits_for_texts(snap.lexical_search(fts_query("钼铁矿石"), 5))]
    assert found == [str((docs / "a.txt").resolve())]
    (docs / "a.txt").write_text("铜矿的开采历史。", encoding="utf-8")
    app.ingestor(kb).run([docs], progress=False)
    assert kb.lexical_search(fts_query("钼铁矿石"), 5) == []
    assert len(kb.lexical_search(fts_query("铜矿"), 5)) == 1
    (docs / "a.txt").unlink()
    app.ingestor(kb).run([docs], prune=True, progress=False)
    assert kb.lexical_search(fts_query("铜矿"), 5) == []
    assert kb.check() == []  # the FTS index holds exactly the stored texts
    kb.close()


def test_hybrid_beats_either_list_alone_on_a_rare_term(app: Zhiku, tmp_path: Path) -> None:
    files = {f"d{i}.txt": f"文档{i}：这里描述一种常见的天气现象和它的成因，第{i}种。" for i in range(8)}
    files["target.txt"] = "罕见词佐夫斯基出现在这份关于天气现象的文档里。"
    kb = make_kb(app, tmp_path / "docs", files)
    retriever = app.retriever(kb, RetrievalSettings(mode="hybrid", min_similarity=0.0, expand_window=0))
    hits = retriever.search("佐夫斯基", 3)
    assert Path(hits[0].chunk.source).name == "target.txt"
    assert hits[0].similarity is not None and hits[0].score >= hits[-1].score
    kb.close()


def test_threshold_drops_unrelated_passages(app: Zhiku, tmp_path: Path) -> None:
    kb = make_kb(app, tmp_path / "docs", {"a.txt": "长江是中国最长的河流。"})
    strict = app.retriever(kb, RetrievalSettings(min_similarity=0.999))
    assert strict.search("量子力学 quantum", 5) == []
    assert strict.context("量子力学 quantum", 5) == []
    loose = app.retriever(kb, RetrievalSettings(min_similarity=0.0))
    assert len(loose.search("量子力学 quantum", 5)) == 1
    kb.close()


def test_neighbours_merge_without_repeating_the_overlap_and_keep_the_budget(app: Zhiku, tmp_path: Path) -> None:
    app.settings.chunking.chunk_size, app.settings.chunking.chunk_overlap = 40, 10
    text = "".join(SENTENCES)
    kb = make_kb(app, tmp_path / "docs", {"long.txt": text})
    settings = RetrievalSettings(mode="bm25", min_similarity=0.0, expand_window=1)
    retriever = app.retriever(kb, settings)
    [passage] = retriever.context("编号为5的事件", 1, budget=10_000, measure=len)
    assert len(passage.chunk_ids) == 3  # the hit and one neighbour each side
    assert passage.text.replace("\n", "") in text  # merged in document order, nothing repeated
    assert "编号为5" in passage.text
    narrow = retriever.context("编号为5的事件", 1, budget=45, measure=len)
    assert sum(len(p.text) for p in narrow) <= 45 and len(narrow[0].chunk_ids) == 1
    no_expand = app.retriever(kb, settings.model_copy(update={"expand_window": 0}))
    assert len(no_expand.context("编号为5的事件", 1, budget=10_000)[0].chunk_ids) == 1
    # two adjacent hits become one passage, not two copies of the seam
    both = retriever.context("编号为5的事件 编号为6的事件", 2, budget=10_000, measure=len)
    ids = [i for p in both for i in p.chunk_ids]
    assert len(ids) == len(set(ids))
    kb.close()


def test_merge_overlap() -> None:
    assert merge_overlap("甲乙丙丁", "丙丁戊己") == "甲乙丙丁戊己"
    assert merge_overlap("abc", "xyz") == "abc\nxyz"


def _hit(text: str) -> Hit:
    return Hit(StoredChunk(0, text, "/f.txt", None, 0, "", None, None), 1.0)


def test_eval_metrics_on_a_set_with_known_answers(tmp_path: Path) -> None:
    questions = [
        Question("q1", "一", ("答案一",), "zh"),  # found at rank 1
        Question("q2", "二", ("答案二",), "zh"),  # found at rank 3
        Question("q3", "three", ("answer three",), "en"),  # never found
    ]
    results = {
        "一": ["答案一在这里", "无关", "无关"],
        "二": ["无关", "无关", "答案二在第三段"],
        "three": ["nothing", "here"],
    }
    r = evaluate(
        questions,
        lambda q, k: [_hit(t) for t in results[q][:k]],
        lambda q, budget: results[q],
        ks=(1, 3),
        budget_chars=8,
    ).to_json()
    assert r["questions"] == 3
    assert r["recall@1"] == pytest.approx(1 / 3, abs=1e-4) and r["recall@3"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["mrr"] == pytest.approx((1 + 1 / 3) / 3, abs=1e-4)
    assert r["recall@budget"] == pytest.approx(1 / 3, abs=1e-4)  # "答案二" lies beyond 8 characters
    assert r["budget_chars"] == 8 and r["mean_context_chars"] == pytest.approx(8.0)
    assert r["by_language"]["en"]["recall@3"] == 0 and r["by_language"]["zh"]["recall@3"] == 1


def test_question_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "a", "answers": ["b"]}\n{"q": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_questions(path)


def test_retriever_refuses_an_empty_question(app: Zhiku, tmp_path: Path) -> None:
    kb = make_kb(app, tmp_path / "docs", {"a.txt": "内容。"})
    with pytest.raises(ValueError, match="empty"):
        Retriever(kb, app.embedder(kb.manifest)).search("  ", 3)
    kb.close()


def test_cross_encoder_reranker_reorders_by_its_own_scores(app: Zhiku, tmp_path: Path) -> None:
    from knowledge.retrieval import CrossEncoderReranker

    reranker = CrossEncoderReranker(str(tiny_cross_encoder(tmp_path / "ce")))
    hits = [_hit("今天天气很好"), _hit("长江是中国最长的河流"), _hit("黄河是第二长河")]
    ranked = reranker.rerank("长江", hits)
    assert sorted(h.chunk.text for h in ranked) == sorted(h.chunk.text for h in hits)
    assert [h.score for h in ranked] == sorted((h.score for h in ranked), reverse=True)
    # the configured pipeline runs it: the order is the reranker's, not the fusion's
    kb = make_kb(app, tmp_path / "docs", {"a.txt": "长江是中国最长的河流。", "b.txt": "黄河是中国第二长河。"})
    settings = RetrievalSettings(min_similarity=0.0, reranker=str(tmp_path / "ce"))
    pipeline = app.retriever(kb, settings)
    assert pipeline.reranker is not None
    got = pipeline.search("长江", 2)
    expected = reranker.rerank(
        "长江", app.retriever(kb, settings.model_copy(update={"reranker": None})).search("长江", 2)
    )
    assert [h.chunk.text for h in got] == [h.chunk.text for h in expected]
    kb.close()
