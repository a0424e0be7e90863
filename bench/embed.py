"""Embedding throughput of the sentence-transformers path (m3e-base on CUDA) against the CPU.

    python bench/embed.py [--model PATH] [--n 20000] [--devices cuda cpu]

Without --model it builds a random-weight BertModel of m3e-base's architecture (BERT-base, vocab 21128,
768-d) with a character vocabulary, so the speed is m3e-base's without downloading it. Texts are synthetic
Chinese passages of ~250 characters (a chunk_size of 300). Prints chunks/s and tokens/s per device, and the
GPU/CPU ratio measured in this one run.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from knowledge.embedding import SentenceTransformerEmbedder  # noqa: E402


def random_m3e(folder: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast  # type: ignore[attr-defined]

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 21128 - len(specials))]
    (folder / "vocab.txt").write_text("\n".join(specials + chars) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=21128)).save_pretrained(folder)  # BERT-base: 12 layers, 768-d
    return folder


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    return ["".join(rng.choices(alphabet, k=rng.randint(150, 300))) + "。" for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--cpu-n", type=int, default=1000, help="fewer texts on the CPU: it is slow")
    ap.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(random_m3e(Path(tmp)))
        rates = {}
        for device in args.devices:
            emb = SentenceTransformerEmbedder(model, device=device, batch_size=args.batch_size, max_seq_length=512)
            n = args.n if device.startswith("cuda") else args.cpu_n
            data = texts(n)
            emb.embed_documents(data[: args.batch_size])  # warm-up: kernels, allocator
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            started = time.perf_counter()
            vecs = emb.embed_documents(data)
            seconds = time.perf_counter() - started
            tokens = sum(min(len(t) + 2, 512) for t in data)  # one token a character, plus [CLS]/[SEP]
            rates[device] = n / seconds
            print(
                f"{device:>5}: {n} chunks in {seconds:.2f} s = {n / seconds:,.0f} chunks/s, "
                f"{tokens / seconds:,.0f} tokens/s, dtype {emb._model.dtype}, dim {vecs.shape[1]}"
            )
        if len(rates) == 2:
            gpu, cpu = (rates[d] for d in args.devices)
            print(f"ratio {args.devices[0]}/{args.devices[1]}: {gpu / cpu:.1f}x")


if __name__ == "__main__":
    main()
