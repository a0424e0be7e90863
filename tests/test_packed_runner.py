"""Packed batches in fixed layouts (knowledge/packed_runner.py): one layout per padded token count, the shape a
CUDA graph replays. On the CPU the same layouts run eagerly, so their filling, their unused rows and their
padding are checked here against exact batches; the graphs themselves need CUDA (bench/embed.py checks them)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from knowledge.embed_batches import BatchedEncoder, one_sequence_each, plan_packed
from knowledge.embed_packed import query_blocks
from tests.tiny_models import tiny_bert


def test_query_blocks_cover_each_query_once_longest_sequences_first() -> None:
    lengths = np.array([3, 130, 64, 65, 1])
    table = query_blocks(lengths, size=12, block=32)
    seqs, blocks = table
    used = seqs >= 0
    assert int(used.sum()) == 1 + 5 + 2 + 3 + 1  # ceil(length / 32) each
    assert (seqs[~used] == -1).all() and (blocks[~used] == -1).all() and used[:11].all()
    assert list(dict.fromkeys(seqs[used].tolist())) == [1, 3, 2, 0, 4]  # longest first: most keys first
    covered = {(s, q) for s, b in zip(seqs[used], blocks[used], strict=True) for q in range(b * 32, b * 32 + 32)}
    assert all(((s, q) in covered) for s, n in enumerate(lengths) for q in range(n))
    assert query_blocks(lengths, block=32).shape == (2, 12)
    with pytest.raises(ValueError, match="do not fit"):
        query_blocks(lengths, size=11, block=32)


def test_packed_plans_cap_their_rows() -> None:
    lengths = np.array([2, 2, 2, 2, 2, 9])
    assert [len(b) for b in plan_packed(lengths, token_budget=100)] == [6]
    assert [len(b) for b in plan_packed(lengths, token_budget=100, max_rows=4)] == [4, 2]


def _states(ids: Any, positions: Any, cu: Any, max_length: int, blocks: Any) -> Any:
    """Hidden states (id, 1) per token: a sequence's mean is (its mean id, 1)."""
    import torch

    return torch.stack([ids.float(), torch.ones(len(ids))], dim=1)


def _tokenise(texts: list[str]) -> Any:
    return one_sequence_each([np.array([ord(c) for c in t], dtype=np.int64) for t in texts])


def _fixed_encoder(packed: Any, **options: Any) -> BatchedEncoder:
    return BatchedEncoder(
        lambda ids, mask: None, device="cpu", pad_id=0, pooling="mean", packed=packed, fixed_shapes=True, **options
    )


def test_fixed_layouts_change_no_vector() -> None:
    """Batches in their token count's fixed layout (unused rows, padding tokens) give the exact batches' vectors."""
    import torch

    seen: list[tuple[int, int, int]] = []

    def packed(ids: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor, max_length: int, blocks: Any) -> Any:
        real = int(cu[-1])
        seen.append((len(ids), len(cu), real))
        hidden = torch.stack([ids.float(), torch.ones(len(ids))], dim=1)
        hidden[real:] = 1e6  # would show in any vector it was pooled into
        return hidden

    texts = ["\x03\x03\x03", "\x01\x02", "\x04" * 7, "\x05", "\x02\x06", "\x07" * 5]
    exact = _fixed_encoder(packed, token_budget=12, token_multiple=4)
    exact.runner.fixed_shapes = False  # type: ignore[union-attr]
    expected = exact.encode(texts, _tokenise, dim=2)

    fixed = _fixed_encoder(packed, token_budget=12, token_multiple=4, max_rows=3)
    seen.clear()
    assert fixed.warm_up(max_length=4) == 4  # 12, 8 and 4 tokens, then short sequences
    assert fixed.runner is not None and sorted(fixed.runner._captured) == [4, 8, 12]
    seen.clear()
    got = fixed.encode(texts, _tokenise, dim=2)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert all(cu == 4 and n in (4, 8, 12) for n, cu, _ in seen)  # every batch: 3 rows, a padded count
    assert sum(real for *_, real in seen) == sum(map(len, texts))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny-m3e"))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_a_bert_in_fixed_layouts_gives_sentence_transformers_vectors(
    tmp_path: Path, bert_dir: Path, pooling: str
) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from knowledge.embed_fast import FastSentenceTransformer, plain_encoder

    st = SentenceTransformer(str(bert_dir), device="cpu")
    st[1] = Pooling(st.get_embedding_dimension(), pooling_mode=pooling)
    st.max_seq_length = 64
    found = plain_encoder(st)
    assert not isinstance(found, str)
    fast = FastSentenceTransformer(st, *found, device="cpu", token_budget=128, packed=True)
    assert fast.packed is not None
    fast.encoder = BatchedEncoder(
        fast._forward,
        device="cpu",
        pad_id=0,
        pooling=found[1],
        token_budget=128,
        packed=fast.packed.forward,
        token_multiple=32,
        fixed_shapes=True,
        max_rows=5,
    )
    assert fast.encoder.warm_up(64, seconds=600) == 5
    rng = np.random.default_rng(0)
    chars = "长江黄河中国最长的河流北京上海天气很好abc "
    texts = ["".join(rng.choice(list(chars), size=int(n))) for n in rng.integers(1, 90, size=30)]
    expected = st.encode_document(texts, normalize_embeddings=True, show_progress_bar=False)
    got = fast.encode(texts, "document", st.get_embedding_dimension())
    assert float((got * expected).sum(axis=1).min()) >= 0.999


def test_two_threads_share_the_fixed_layouts() -> None:
    """The layouts' buffers (and on CUDA the graphs) are shared: concurrent encode calls take turns per batch."""
    import torch

    def packed(ids: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor, max_length: int, blocks: Any) -> Any:
        threading.Event().wait(0.001)  # lets the other thread run mid-batch
        return torch.stack([ids.float() * (positions.float() + 1), torch.ones(len(ids))], dim=1)

    encoder = _fixed_encoder(packed, token_budget=16, token_multiple=4, max_rows=4)
    encoder.warm_up(max_length=4)
    inputs = [[chr(1 + (i + j) % 50) * (1 + (i * j) % 6) for j in range(40)] for i in range(4)]
    expected = [encoder.encode(texts, _tokenise, dim=2) for texts in inputs]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(5):
            np.testing.assert_allclose(encoder.encode(inputs[i], _tokenise, dim=2), expected[i], rtol=1e-6)
        results[i] = expected[i]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2, 3]


def test_a_failed_capture_leaves_eager_batches(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from knowledge.packed_runner import PackedRunner

    def cannot_capture(self: Any, plan: Any, pool: Any) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(PackedRunner, "_capture", cannot_capture)
    encoder = _fixed_encoder(_states, token_budget=12, token_multiple=4, max_rows=3)
    assert encoder.warm_up(max_length=4) == 4
    assert encoder.runner is not None and not encoder.runner.fixed_shapes and not encoder.runner._captured
    assert "no CUDA graphs" in caplog.text
    got = encoder.encode(["\x03\x03", "\x05"], _tokenise, dim=2)
    np.testing.assert_allclose(got, [[3 / np.sqrt(10), 1 / np.sqrt(10)], [5 / np.sqrt(26), 1 / np.sqrt(26)]], rtol=1e-6)
