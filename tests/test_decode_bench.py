"""bench/chat.py --tiny runs on a CPU and prints every line it promises (the figures are not checked)."""

from __future__ import annotations

import re

from tests.helpers import run_bench

NUMBER = r"[\d.]+"


def test_the_chat_bench_runs_tiny_on_a_cpu() -> None:
    lines = run_bench("chat.py", "--tiny", "--chats", "4")
    assert len(lines) == 5, lines
    assert lines[0].startswith("model: tiny Llama, random weights, torch.float32 on cpu (CPU)"), lines[0]
    assert lines[0].endswith("prompt 300 tokens, 32 new tokens"), lines[0]
    assert re.fullmatch(
        rf"anchor: generate\(\) in the main thread: first token {NUMBER} ms, decode {NUMBER} tokens/s, "
        rf"32 tokens in {NUMBER} s",
        lines[1],
    ), lines[1]
    # every reply is exactly --new-tokens long: the tiny model cannot draw its EOS id
    assert re.fullmatch(
        rf"zhiku: TransformersBackend\.stream\(\), 1 chat: first token {NUMBER} ms, decode {NUMBER} tokens/s, "
        rf"32 tokens in {NUMBER} s \(CUDA graphs: off\)",
        lines[2],
    ), lines[2]
    batched = re.fullmatch(
        rf"zhiku: 4 concurrent chats: {NUMBER} tokens/s aggregate, 128 tokens in {NUMBER} s, "
        rf"first token median {NUMBER} ms, at most (\d) chats in one step",
        lines[3],
    )
    assert batched and 2 <= int(batched.group(1)) <= 4, lines[3]  # the chats shared decode steps
    assert re.fullmatch(rf"single stream: {NUMBER}x the anchor's decode tokens/s; 0 CUDA graphs captured", lines[4])
