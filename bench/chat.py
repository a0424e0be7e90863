"""Embedded default LLM speed on this machine: time to first token and decode tokens/s.

    .venv/bin/python bench/chat.py [--runs 5] [--max-new-tokens 128]

Asks RAG-shaped questions (five ~300-character passages + a question, as the chat service sends them)
with greedy decoding and reports the median time to first token (prompt evaluation included), decode
tokens/s after the first token, and end-to-end tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llms.base import GenerationOptions, Message  # noqa: E402
from llms.llamacpp import LlamaCppBackend, LlamaCppSettings  # noqa: E402

PASSAGE = "天生三桥位于重庆武隆县仙女山镇，是重庆直辖市级风景名胜区，重庆武隆岩溶国家地质公园的一部分。" * 4
QUESTIONS = ["天生三桥位于哪里？", "天生三桥属于什么级别的景区？", "天生三桥是哪个地质公园的一部分？"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        backend = LlamaCppBackend(LlamaCppSettings(cache_dir=str(Path(tmp) / "models")))
        backend._load()
        print(f"load (join parts + sha256 + mmap): {time.perf_counter() - started:.2f} s")
        llm = backend._load()
        ttft, decode, overall, prompt_tokens = [], [], [], []
        for run in range(args.runs):
            passages = "\n\n".join(f"[{n}] doc{n}.txt\n{PASSAGE}" for n in range(1, 6))
            question = QUESTIONS[run % len(QUESTIONS)]
            # a different first token each run: llama.cpp cannot reuse the previous prompt's KV cache
            system = f"（第{run + 1}次）学习以下文段, 用中文回答用户问题。"
            msgs = [Message("system", system), Message("user", f"{passages}\n\n问题：{question}")]
            prompt_tokens.append(backend.count_tokens(msgs))
            options = GenerationOptions(temperature=0, max_new_tokens=args.max_new_tokens, seed=run)
            t0 = time.perf_counter()
            first = None
            text = ""
            for piece in backend.stream(msgs, options):
                first = first or time.perf_counter()
                text += piece
            end = time.perf_counter()
            n = len(llm.tokenize(text.encode("utf-8"), add_bos=False))
            assert first is not None
            ttft.append(first - t0)
            decode.append((n - 1) / max(end - first, 1e-9))
            overall.append(n / (end - t0))
        med = statistics.median
        print(f"prompt tokens (median): {med(prompt_tokens):.0f}; runs: {args.runs}")
        print(f"time to first token (median): {med(ttft):.3f} s")
        print(f"decode tokens/s (median): {med(decode):.1f}")
        print(f"end-to-end tokens/s incl. prompt (median): {med(overall):.1f}")


if __name__ == "__main__":
    main()
