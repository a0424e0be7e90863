"""Local LLM decode speed: Zhiku's transformers backend beside plain ``generate``, in one run.

    .venv/bin/python bench/chat.py [--prompt-tokens 1556] [--new-tokens 256] [--chats 8] [--runs 3] [--no-graphs]
    .venv/bin/python bench/chat.py --tiny       # a tiny Llama on the CPU in seconds (the smoke test runs this)
    .venv/bin/python bench/chat.py --llamacpp   # the embedded default (llama.cpp): first token and tokens/s

The model is the Llama-2-7B architecture with random weights (bf16 on CUDA, fp32 on the CPU), so no download is
needed; its tokenizer is one token per character, so a RAG-shaped prompt (a system prompt, passages, a question,
in the Llama-2-chat format) has exactly ``--prompt-tokens`` tokens. Its EOS id lies outside the model's
vocabulary: random weights would otherwise end replies early, and every reply here is exactly ``--new-tokens``.

Printed, in order:
- anchor: ``model.generate`` (dynamic cache, eager) in the main thread: time to first token (a 1-token
  generate), decode tokens/s after it;
- zhiku, 1 chat: ``TransformersBackend.stream()`` as the chat service calls it (text pieces, stop strings):
  time to the first piece, decode tokens/s after it (median of ``--runs`` after a warm-up that captures graphs);
- zhiku, N concurrent chats: N threads streaming different prompts at once, aggregate tokens/s;
both zhiku lines for ``fused_step: false`` (each step through the model's forward), then for the fused step
(llms/llama_step.py), which runs where CUDA graphs do. On CUDA the fused step runs three times, so that each
change to it is measured in the same run: with cuBLAS's matrix products and no programmatic dependent launch (PDL),
with Triton's products and no PDL, then as configured (Triton's products, PDL on Hopper and later);
- on CUDA, last, the fused step alone per variant: its CUDA graph replayed back to back at 1 and ``--chats`` rows
  over a 1,792-column cache (ms per step), and whether its logits are bitwise equal with and without PDL under
  a deterministic attention backend (memory-efficient SDPA; cuDNN's is not deterministic run to run).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llms.base import GenerationOptions, Message  # noqa: E402

PASSAGE = "天生三桥位于重庆武隆县仙女山镇，是重庆直辖市级风景名胜区，重庆武隆岩溶国家地质公园的一部分。" * 4
QUESTIONS = ["天生三桥位于哪里？", "天生三桥属于什么级别的景区？", "天生三桥是哪个地质公园的一部分？"]
SYSTEM = "学习以下文段, 用中文回答用户问题。"


# --- the random model ------------------------------------------------------------------------------------------


def char_tokenizer(vocab_size: int) -> Any:
    """One token per character: <unk> 0, <s> 1, printable ASCII and newline, then CJK characters; </s> gets the
    id ``vocab_size``, which a model of ``vocab_size`` logits never draws."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    chars += [chr(c) for c in range(0x4E00, 0x4E00 + vocab_size - 2 - len(chars))]
    vocab = {"<unk>": 0, "<s>": 1, **{ch: i + 2 for i, ch in enumerate(chars)}, "</s>": vocab_size}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def random_llama(tiny: bool, device: str, dtype: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab = 1000 if tiny else 32000
    hidden, ffn, layers, heads = (64, 128, 2, 4) if tiny else (4096, 11008, 32, 32)  # Llama-2-7B's shape
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=None,  # the tokenizer's </s> is outside the vocabulary: every reply is --new-tokens long
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 7B model's random init on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = 0
    return model.eval(), char_tokenizer(vocab)


def conversation(backend: Any, prompt_tokens: int, seed: int) -> list[Message]:
    """A RAG question whose prompt has exactly ``prompt_tokens`` tokens (different passages for each seed)."""
    rng = random.Random(seed)
    question = QUESTIONS[seed % len(QUESTIONS)]

    def messages(passages: str) -> list[Message]:
        return [Message("system", SYSTEM), Message("user", f"{passages}\n\n问题：{question}")]

    base = backend.count_tokens(messages(""))
    if base > prompt_tokens:
        raise SystemExit(f"--prompt-tokens must be at least {base}")
    text = list((PASSAGE * (prompt_tokens // len(PASSAGE) + 1))[: prompt_tokens - base])
    rng.shuffle(text)  # every chat reads different text, so no two prompts are the same
    msgs = messages("".join(text))
    assert backend.count_tokens(msgs) == prompt_tokens
    return msgs


# --- measurements ----------------------------------------------------------------------------------------------


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def anchor(backend: Any, msgs: list[Message], new_tokens: int) -> tuple[float, float, float]:
    """(first token s, decode tokens/s, total s) of plain generate() in this thread."""
    import torch

    loaded = backend.load()
    ids = torch.tensor([loaded.fmt.encode(msgs, loaded.tokenizer)], device=loaded.model.device)

    def run(n: int) -> float:
        sync()
        started = time.perf_counter()
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n
        )
        sync()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - started

    run(2)  # warm-up: kernels, allocator
    first = statistics.median(run(1) for _ in range(3))
    total = run(new_tokens)
    return first, (new_tokens - 1) / max(total - first, 1e-9), total


def one_chat(backend: Any, msgs: list[Message], options: GenerationOptions) -> tuple[float, float, int]:
    """(first piece s, end s, tokens) of one streamed reply."""
    engine = backend.engine()
    before = engine.stats.tokens
    started = time.perf_counter()
    first = 0.0
    for _piece in backend.stream(msgs, options):
        first = first or time.perf_counter()
    end = time.perf_counter()
    return first - started, end - started, engine.stats.tokens - before


def concurrent(backend: Any, chats: list[list[Message]], options: GenerationOptions) -> tuple[float, int, float]:
    """(wall s, tokens, median first piece s) of all chats streamed at once, one thread each."""
    engine = backend.engine()
    before = engine.stats.tokens
    barrier = threading.Barrier(len(chats) + 1)
    firsts: list[float] = []
    errors: list[BaseException] = []

    def chat(msgs: list[Message]) -> None:
        barrier.wait()
        try:
            firsts.append(one_chat(backend, msgs, options)[0])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=chat, args=(m,)) for m in chats]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return wall, engine.stats.tokens - before, statistics.median(firsts)


def transformers_bench(args: argparse.Namespace) -> None:
    import torch

    from llms.formats import Llama2Format
    from llms.transformers_backend import LlamaSettings, LoadedModel, TransformersBackend

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if args.tiny:
        args.prompt_tokens = args.prompt_tokens or 300
        args.new_tokens = args.new_tokens or 32
        args.runs = args.runs or 1
    args.prompt_tokens = args.prompt_tokens or 1556
    args.new_tokens = args.new_tokens or 256
    args.runs = args.runs or 3
    started = time.perf_counter()
    model, tokenizer = random_llama(args.tiny, device, dtype)
    fmt = Llama2Format()
    settings = LlamaSettings(
        model="random-weights", context_window=4096, max_batch_size=args.chats, cuda_graphs=not args.no_graphs
    )
    backend = TransformersBackend("llama", settings, fmt, loaded=LoadedModel(tokenizer, model, fmt))
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    arch = "tiny Llama" if args.tiny else "Llama-2-7B architecture"
    print(
        f"model: {arch}, random weights, {dtype} on {device} ({where}), built in {time.perf_counter() - started:.1f} s;"
        f" prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens"
    )
    msgs = conversation(backend, args.prompt_tokens, seed=0)
    options = GenerationOptions(temperature=0, max_new_tokens=args.new_tokens)

    first, rate, total = anchor(backend, msgs, args.new_tokens)
    print(
        f"anchor: generate() in the main thread: first token {first * 1e3:.1f} ms, decode {rate:.1f} tokens/s, "
        f"{args.new_tokens} tokens in {total:.2f} s"
    )

    # the model's own forward first: the fused step turns the model's q/k/v and gate/up weights into views. On
    # CUDA the fused step also runs with cuBLAS's products instead of Triton's matrix-vector product, and with
    # Triton's products but no programmatic dependent launch (both were the step before each change)
    variants = [(False, True, True)]
    if device.startswith("cuda"):
        variants += [(True, False, False), (True, True, False)]
    variants.append((True, True, True))
    replies = []
    for fused, triton_products, pdl in variants:
        settings = settings.model_copy(update={"fused_step": fused})
        backend = TransformersBackend("llama", settings, fmt, loaded=LoadedModel(tokenizer, model, fmt))
        label = f"fused_step: {str(fused).lower()}"
        label += ("" if triton_products else ", cuBLAS products") + ("" if pdl else ", no PDL")
        with _kernels(triton_products, pdl):
            z_rate = zhiku_runs(backend, args, options, msgs, label)
            reply = "".join(backend.stream(msgs, options))
        if triton_products and pdl:
            replies.append(reply)
    same = next((i for i, (a, b) in enumerate(zip(*replies, strict=False)) if a != b), min(map(len, replies)))
    # one token per character; random weights give near-even logits, where a rounding difference can flip a tie
    print(f"greedy replies of both steps: the first {same} of {len(replies[0])} tokens identical")
    print(f"single stream: {z_rate / rate:.1f}x the anchor's decode tokens/s")
    if device.startswith("cuda"):
        step_replays(model, rows_list=(1, args.chats), columns=1792)


def step_replays(model: Any, rows_list: tuple[int, ...], columns: int, repeat: int = 200) -> None:
    """The fused step alone, per variant: its CUDA graph replayed ``repeat`` times back to back over a cache of
    ``columns`` columns (ms per step); then, with a deterministic attention backend (cuDNN's is not), whether
    launching with PDL changes any logit."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llms.llama_step import LlamaDecodeStep

    config = model.config
    gen = torch.Generator(device=model.device).manual_seed(0)
    with torch.inference_mode():
        step = LlamaDecodeStep(model)
        shape = (step.kv_heads, columns, step.head_dim)  # one layer's cache per row: (kv_heads, window, head_dim)
        variants = [("cuBLAS products, no PDL", False, False), ("Triton products, no PDL", True, False)]
        variants += [("Triton products, PDL", True, True)] if step.pdl else []
        for rows in rows_list:
            cache = [
                torch.randn((rows, *shape), device=model.device, dtype=model.dtype, generator=gen)
                for _ in range(2 * config.num_hidden_layers)
            ]
            ids = torch.randint(0, config.vocab_size, (rows, 1), device=model.device, generator=gen)
            pos = torch.arange(columns - 256, columns - 256 + rows, device=model.device).view(rows, 1)
            cols = torch.arange(columns, device=model.device)
            mask = torch.where(cols[None, :] <= pos, 0.0, float("-inf")).to(model.dtype).view(rows, 1, 1, columns)
            inputs = (ids, pos, mask, cache[0::2], cache[1::2])
            for label, products, pdl in variants:
                graph, _ = _captured(step, inputs, products, pdl)
                for _ in range(20):
                    graph.replay()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeat):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / repeat
                print(
                    f"fused step alone ({label}), {rows} row(s), {columns}-column cache: {ms:.3f} ms per step, "
                    f"{rows / ms * 1e3:.1f} tokens/s ({repeat} CUDA graph replays back to back)"
                )
            if len(variants) < 3:
                continue
            logits: list[list[Any]] = []
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                for pdl in (False, True):
                    graph, out = _captured(step, inputs, True, pdl)
                    logits.append([])
                    for _ in range(10):
                        graph.replay()
                        logits[-1].append(out["logits"].clone())
            repeatable = all(torch.equal(x, runs[0]) for runs in logits for x in runs)
            print(
                f"fused step, {rows} row(s), memory-efficient attention: logits with and without PDL bitwise "
                f"equal: {torch.equal(logits[0][0], logits[1][0])}; 10 replays of each bitwise equal: {repeatable}"
            )


def _captured(step: Any, inputs: tuple[Any, ...], products: bool, pdl: bool) -> tuple[Any, dict[str, Any]]:
    """``step(*inputs)`` captured as a CUDA graph, and the dict whose "logits" each replay rewrites."""
    import torch

    out: dict[str, Any] = {}
    step.pdl = pdl
    with _kernels(products, pdl):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # once eagerly outside the capture: compiles kernels, plans cuDNN's
            step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out["logits"] = step(*inputs)
    return graph, out


@contextlib.contextmanager
def _kernels(triton_products: bool, pdl: bool) -> Iterator[None]:
    """With ``triton_products`` False, the fused step's matrix products go to cuBLAS; with ``pdl`` False, its
    Triton kernels launch without programmatic dependent launch (steps built meanwhile keep both)."""
    if triton_products and pdl:
        yield
        return
    from llms import triton_decode

    kept = triton_decode.LINEAR_MAX_ROWS, triton_decode.PDL
    triton_decode.LINEAR_MAX_ROWS = triton_decode.LINEAR_MAX_ROWS if triton_products else 0
    triton_decode.PDL = pdl
    try:
        yield
    finally:
        triton_decode.LINEAR_MAX_ROWS, triton_decode.PDL = kept


def zhiku_runs(
    backend: Any, args: argparse.Namespace, options: GenerationOptions, msgs: list[Message], label: str
) -> float:
    """One chat (median of the runs), then N concurrent chats; returns the single chat's decode tokens/s."""
    one_chat(backend, conversation(backend, args.prompt_tokens, seed=100), options)  # warm-up: graphs, cache
    runs = [one_chat(backend, msgs, options) for _ in range(args.runs)]
    tokens = runs[0][2]
    assert all(r[2] == args.new_tokens for r in runs), [r[2] for r in runs]
    z_first = statistics.median(r[0] for r in runs)
    z_rate = statistics.median((r[2] - 1) / max(r[1] - r[0], 1e-9) for r in runs)
    z_total = statistics.median(r[1] for r in runs)
    runner: Any = backend.engine()._runner
    graphs = getattr(runner, "use_graphs", False)
    fused = getattr(runner, "step_fn", None) is not None
    print(
        f"zhiku ({label}): TransformersBackend.stream(), 1 chat: first token {z_first * 1e3:.1f} ms, decode "
        f"{z_rate:.1f} tokens/s, {tokens} tokens in {z_total:.2f} s (CUDA graphs: {'on' if graphs else 'off'}, "
        f"fused step: {'on' if fused else 'off'})"
    )

    chats = [conversation(backend, args.prompt_tokens, seed=s) for s in range(1, args.chats + 1)]
    concurrent(backend, [conversation(backend, args.prompt_tokens, seed=s + 200) for s in range(args.chats)], options)
    wall, n, c_first = concurrent(backend, chats, options)
    assert n == args.chats * args.new_tokens, n
    stats = backend.engine().stats
    print(
        f"zhiku ({label}): {args.chats} concurrent chats: {n / wall:.1f} tokens/s aggregate, {n} tokens in "
        f"{wall:.2f} s, first token median {c_first * 1e3:.1f} ms, at most {stats.most_rows} chats in one step, "
        f"{stats.graphs} CUDA graphs captured"
    )
    return z_rate


def llamacpp_bench(args: argparse.Namespace) -> None:
    """The embedded default (llama.cpp + the bundled GGUF): median first token and tokens/s."""
    from llms.llamacpp import LlamaCppBackend, LlamaCppSettings

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        backend = LlamaCppBackend(LlamaCppSettings(cache_dir=str(Path(tmp) / "models")))
        llm = backend._load()
        print(f"load (join parts + sha256 + mmap): {time.perf_counter() - started:.2f} s")
        ttft, decode, overall, prompt_tokens = [], [], [], []
        for run in range(args.runs or 5):
            passages = "\n\n".join(f"[{n}] doc{n}.txt\n{PASSAGE}" for n in range(1, 6))
            question = QUESTIONS[run % len(QUESTIONS)]
            # a different first token each run: llama.cpp cannot reuse the previous prompt's KV cache
            system = f"（第{run + 1}次）学习以下文段, 用中文回答用户问题。"
            msgs = [Message("system", system), Message("user", f"{passages}\n\n问题：{question}")]
            prompt_tokens.append(backend.count_tokens(msgs))
            options = GenerationOptions(temperature=0, max_new_tokens=args.new_tokens or 128, seed=run)
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
        print(f"prompt tokens (median): {med(prompt_tokens):.0f}; runs: {len(ttft)}")
        print(f"time to first token (median): {med(ttft):.3f} s")
        print(f"decode tokens/s (median): {med(decode):.1f}")
        print(f"end-to-end tokens/s incl. prompt (median): {med(overall):.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama on the CPU (smoke test)")
    ap.add_argument("--llamacpp", action="store_true", help="bench the embedded default (llama.cpp) instead")
    ap.add_argument("--device", default=None, help="default: cuda when available (not with --tiny), else cpu")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="default 1556 (--tiny: 300)")
    ap.add_argument("--new-tokens", type=int, default=0, help="default 256 (--tiny: 32; --llamacpp: 128)")
    ap.add_argument("--chats", type=int, default=8, help="concurrent chats")
    ap.add_argument("--runs", type=int, default=0, help="single-chat runs, median (default 3, --tiny 1)")
    ap.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs (cuda_graphs: false)")
    args = ap.parse_args()
    if args.llamacpp:
        llamacpp_bench(args)
    else:
        transformers_bench(args)


if __name__ == "__main__":
    main()
