"""bench/chat.py --tiny runs on a CPU and prints every line it promises (the figures are not checked)."""

from __future__ import annotations

import re

from tests.helpers import run_bench

NUMBER = r"[\d.]+"


def test_the_chat_bench_runs_tiny_on_a_cpu() -> None:
    lines = run_bench("chat.py", "--tiny", "--chats", "4")
    assert len(lines) == 8, lines
    assert lines[0].startswith("model: tiny Llama, random weights, torch.float32 on cpu (CPU)"), lines[0]
    assert lines[0].endswith("prompt 300 tokens, 32 new tokens"), lines[0]
    assert re.fullmatch(
        rf"anchor: generate\(\) in the main thread: first token {NUMBER} ms, decode {NUMBER} tokens/s, "
        rf"32 tokens in {NUMBER} s",
        lines[1],
    ), lines[1]
    # every reply is exactly --new-tokens long: the tiny model cannot draw its EOS id; on a CPU (no CUDA graphs)
    # the fused step stays off whatever the setting says
    for fused, (single, batched_line) in zip(("false", "true"), (lines[2:4], lines[4:6]), strict=True):
        assert re.fullmatch(
            rf"zhiku \(fused_step: {fused}\): TransformersBackend\.stream\(\), 1 chat: first token {NUMBER} ms, "
            rf"decode {NUMBER} tokens/s, 32 tokens in {NUMBER} s \(CUDA graphs: off, fused step: off\)",
            single,
        ), single
        batched = re.fullmatch(
            rf"zhiku \(fused_step: {fused}\): 4 concurrent chats: {NUMBER} tokens/s aggregate, 128 tokens in "
            rf"{NUMBER} s, first token median {NUMBER} ms, at most (\d) chats in one step, 0 CUDA graphs captured",
            batched_line,
        )
        assert batched and 2 <= int(batched.group(1)) <= 4, batched_line  # the chats shared decode steps
    # on a CPU both runs take the model's forward: the same greedy tokens
    assert lines[6] == "greedy replies of both steps: the first 32 of 32 tokens identical", lines[6]
    assert re.fullmatch(rf"single stream: {NUMBER}x the anchor's decode tokens/s", lines[7])
