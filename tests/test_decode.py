"""The decode engine (llms/decode.py) on tiny random-weight MOSS (CodeGen), Llama and Baichuan models, on the CPU:
the same greedy tokens as ``model.generate(do_sample=False)``, alone and batched with other requests that join
and leave between steps; sampling that a seed repeats; text pieces that never split a character."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llms import decode
from llms.decode import DecodeEngine, Sampling, detokenize, supports_slots
from tests.tiny_models import tiny_baichuan, tiny_llama, tiny_llama_gqa, tiny_moss

NAMES = ["moss", "llama", "baichuan"]
# the Llama-shaped models also run the fused decode step (llms/llama_step.py; on a GPU, the default)
STEPS = [*NAMES, "llama-fused", "baichuan-fused"]


@dataclass
class Tiny:
    name: str
    model: Any
    tokenizer: Any
    window: int
    fused: bool = False

    def engine(self, **kwargs: Any) -> DecodeEngine:
        """A DecodeEngine over this model, its steps through the fused step when the case asks for it."""
        kwargs.setdefault("window", self.window)
        kwargs.setdefault("fused_step", self.fused or None)
        return DecodeEngine(self.model, **kwargs)

    def prompt(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def reference(self, prompt: list[int], n: int, stop_ids: tuple[int, ...] = (), **generation: Any) -> list[int]:
        """generate()'s greedy tokens: exactly n unless a stop id ends them (it is included, as generate does)."""
        import torch

        out = self.model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=list(stop_ids) or None,
            pad_token_id=0,
            **generation,
        )
        return [int(t) for t in out[0, len(prompt) :]]


def _load(folder: Path, name: str) -> Tiny:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    model.generation_config.eos_token_id = None  # no early end unless a test asks for one
    window = 2048 if name == "moss" else 256
    return Tiny(name, model, AutoTokenizer.from_pretrained(folder), window)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    builders = {"moss": tiny_moss, "llama": tiny_llama, "baichuan": tiny_baichuan}
    return {name: build(tmp_path_factory.mktemp(f"tiny-{name}")) for name, build in builders.items()}


def _case(folders: dict[str, Path], case: str) -> Tiny:
    """``case`` is a model's name, with ``-fused`` for its steps through the fused step."""
    name, _, fused = case.partition("-")
    loaded = _load(folders[name], name)
    loaded.fused = bool(fused)
    return loaded


@pytest.fixture(params=STEPS)
def tiny(request: pytest.FixtureRequest, folders: dict[str, Path]) -> Tiny:
    return _case(folders, request.param)


PROMPTS = [
    "天生三桥在哪里？",
    "The Yangtze is the longest river in China. The Yellow",
    "首钢集团是中国的一家大型钢铁企业",
]


@pytest.mark.parametrize("batched", [True, False], ids=["slots", "serial"])
def test_greedy_is_generates_greedy(tiny: Tiny, batched: bool) -> None:
    engine = tiny.engine(max_batch=4, batched=batched)
    assert supports_slots(tiny.model)  # all three tiny models are transformers-native
    for text in PROMPTS:
        prompt = tiny.prompt(text)
        assert list(engine.submit(prompt, max_new_tokens=40)) == tiny.reference(prompt, 40)
    # a stop id ends the reply and is its last token, as in generate()
    prompt = tiny.prompt(PROMPTS[0])
    full = tiny.reference(prompt, 40)
    stop = full[10]
    got = list(engine.submit(prompt, max_new_tokens=40, stop_ids=[stop]))
    assert got == full[: full.index(stop) + 1] == tiny.reference(prompt, 40, (stop,))
    if tiny.name == "llama":
        assert tiny.model.config._attn_implementation == "sdpa"  # the prefill runs SDPA


def test_repetition_penalty_of_the_generation_config_is_applied_like_generate(folders: dict[str, Path]) -> None:
    tiny = _load(folders["llama"], "llama")
    tiny.model.generation_config.repetition_penalty = 1.5  # Baichuan2-Chat ships 1.05 in its config
    prompt = tiny.prompt(PROMPTS[1])
    plain = list(DecodeEngine(tiny.model, window=256).submit(prompt, max_new_tokens=30))
    assert plain == tiny.reference(prompt, 30)
    for batched in (True, False):
        assert list(DecodeEngine(tiny.model, window=256, batched=batched).submit(prompt, max_new_tokens=30)) == plain
    tiny.model.generation_config.repetition_penalty = 1.0
    assert tiny.reference(prompt, 30) != plain  # the penalty made a difference


def test_concurrent_requests_are_batched_and_each_gets_its_own_tokens(tiny: Tiny) -> None:
    prompts = [tiny.prompt(t) for t in PROMPTS]
    alone = [tiny.reference(p, 30) for p in prompts]
    seeded = Sampling(temperature=0.9, top_p=0.95, top_k=50, seed=3)
    engine = tiny.engine(max_batch=4)
    sampled_alone = list(engine.submit(prompts[0], max_new_tokens=30, sampling=seeded))
    with engine.hold():  # all four join the same step
        streams = [engine.submit(p, max_new_tokens=30) for p in prompts]
        streams.append(engine.submit(prompts[0], max_new_tokens=30, sampling=seeded))
    outs = [list(s) for s in streams]
    assert outs[:3] == alone
    assert outs[3] == sampled_alone  # a seeded request repeats whatever else is in the batch
    assert engine.stats.most_rows == 4 and engine.stats.prefills == 5


def test_requests_join_and_leave_between_steps(tiny: Tiny) -> None:
    a, b, c = (tiny.prompt(t) for t in PROMPTS)
    ref_a, ref_b, ref_c = tiny.reference(a, 50), tiny.reference(b, 50), tiny.reference(c, 20)
    engine = tiny.engine(max_batch=4)
    first = engine.submit(a, max_new_tokens=50)
    got_a = [next(first) for _ in range(5)]
    second = engine.submit(b, max_new_tokens=50)  # joins a running batch
    got_b = [next(second) for _ in range(3)]
    got_a += [next(first) for _ in range(3)]
    second.close()  # leaves mid-reply: returns once the worker has let go of it
    assert second._req.released.is_set() and list(second) == []
    third = engine.submit(c, max_new_tokens=20)  # takes the freed slot
    got_c = list(third)
    got_a += list(first)
    assert got_a == ref_a and got_b == ref_b[:3] and got_c == ref_c
    assert engine.stats.most_rows == 2


def test_more_requests_than_slots_wait_for_one(folders: dict[str, Path]) -> None:
    tiny = _load(folders["llama"], "llama")
    prompts = [tiny.prompt(t) for t in [*PROMPTS, "长江有多长？"]]
    engine = DecodeEngine(tiny.model, window=256, max_batch=2)
    with engine.hold():
        streams = [engine.submit(p, max_new_tokens=12) for p in prompts]
    assert [list(s) for s in streams] == [tiny.reference(p, 12) for p in prompts]
    assert engine.stats.most_rows == 2


@pytest.mark.parametrize("case", ["llama", "llama-fused"])
def test_each_step_is_sent_before_the_previous_ones_tokens_are_read(folders: dict[str, Path], case: str) -> None:
    """The pipelined loop: a reply that fills the window to its last column (the step sent after its last token
    stays inside the cache) gives generate's tokens, and the next request in that slot does too."""
    tiny = _case(folders, case)
    engine = tiny.engine(max_batch=2)
    runner: Any = engine._make_runner()
    engine._runner = runner
    sent, outstanding = [0], [0]
    launch, collect = runner.launch, runner.collect

    def counted_launch(reqs: Any) -> Any:
        sent[0] += 1
        outstanding[0] = max(outstanding[0], sent[0])
        return launch(reqs)

    def counted_collect(launched: Any) -> Any:
        sent[0] -= 1
        return collect(launched)

    runner.launch, runner.collect = counted_launch, counted_collect
    prompt = tiny.prompt(PROMPTS[0])
    n = tiny.window - len(prompt)
    assert list(engine.submit(prompt, max_new_tokens=n)) == tiny.reference(prompt, n)
    other = tiny.prompt(PROMPTS[1])
    assert list(engine.submit(other, max_new_tokens=20)) == tiny.reference(other, 20)
    assert outstanding[0] == 2 and sent[0] == 0


@pytest.mark.parametrize("case", ["moss", "llama-fused"])
def test_padded_graph_buckets_give_the_same_tokens(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """On a GPU each step replays a graph captured for (rows rounded up to a power of two, columns rounded up to
    LENGTH_BUCKET). Here a stand-in "graph" replays the same step on the CPU: the padding rows and columns must
    not change a token, and a bucket is captured once."""
    tiny = _case(folders, case)
    monkeypatch.setattr(decode, "LENGTH_BUCKET", 16)
    engine = tiny.engine(max_batch=4)
    runner: Any = engine._make_runner()
    engine._runner = runner
    runner.use_graphs = True

    class StandIn:
        def __init__(self, rows: int, length: int) -> None:
            self.rows, self.length = rows, length

        def replay(self) -> None:
            runner._forward(self.rows, self.length)

    def capture(rows: int, length: int) -> StandIn:
        assert rows in (1, 2, 4) and length % 16 == 0
        runner.graphs[(rows, length)] = StandIn(rows, length)
        engine.stats.graphs += 1
        return runner.graphs[(rows, length)]

    monkeypatch.setattr(runner, "_capture", capture)
    prompts = [tiny.prompt(t) for t in PROMPTS]
    with engine.hold():
        streams = [engine.submit(p, max_new_tokens=40) for p in prompts]
    assert [list(s) for s in streams] == [tiny.reference(p, 40) for p in prompts]
    assert 0 < engine.stats.graphs < engine.stats.steps // 2


def test_sampling_is_seeded_and_top_k_1_is_greedy(folders: dict[str, Path]) -> None:
    tiny = _load(folders["llama"], "llama")
    prompt = tiny.prompt(PROMPTS[0])
    engine = DecodeEngine(tiny.model, window=256)
    greedy = list(engine.submit(prompt, max_new_tokens=20))
    hot = Sampling(temperature=1.5, top_p=1.0, top_k=0, seed=11)
    runs = [list(engine.submit(prompt, max_new_tokens=20, sampling=hot)) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0] != greedy
    other_seed = list(engine.submit(prompt, max_new_tokens=20, sampling=Sampling(1.5, 1.0, 0, seed=12)))
    assert other_seed != runs[0]
    for narrow in (Sampling(1.5, 1.0, 1, seed=5), Sampling(1.5, 1e-6, 0, seed=5)):  # one token left to draw
        assert list(engine.submit(prompt, max_new_tokens=20, sampling=narrow)) == greedy


def test_an_error_fails_the_batch_and_the_engine_serves_on(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = _load(folders["llama"], "llama")
    prompts = [tiny.prompt(t) for t in PROMPTS[:2]]
    engine = DecodeEngine(tiny.model, window=256)
    real = tiny.model.forward
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > 4:  # after both prefills and two steps
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "forward", flaky)
    with engine.hold():
        streams = [engine.submit(p, max_new_tokens=20) for p in prompts]
    for stream in streams:
        with pytest.raises(RuntimeError, match="simulated"):
            list(stream)
    monkeypatch.undo()
    assert list(engine.submit(prompts[0], max_new_tokens=20)) == tiny.reference(prompts[0], 20)


def test_the_idle_worker_ends_and_comes_back(folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = _load(folders["llama"], "llama")
    monkeypatch.setattr(decode, "IDLE_EXIT_S", 0.05)
    engine = DecodeEngine(tiny.model, window=256)
    prompt = tiny.prompt(PROMPTS[0])
    first = list(engine.submit(prompt, max_new_tokens=5))
    deadline = time.monotonic() + 10
    while engine._worker is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine._worker is None
    assert list(engine.submit(prompt, max_new_tokens=5)) == first


def test_shutdown_ends_the_worker_and_its_requests_and_is_registered_for_interpreter_exit(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon worker still inside a torch operation when the interpreter tears down aborts the process
    ("terminate called without an active exception": bench/chat.py in CI, once its last reply was read). So the
    first worker of each engine registers the engine's shutdown at exit, through a weak reference."""
    import gc
    import threading

    tiny = _load(folders["llama"], "llama")
    hooks: list[tuple[Any, tuple[Any, ...]]] = []
    monkeypatch.setattr(decode.atexit, "register", lambda func, *args: hooks.append((func, args)))
    engine = DecodeEngine(tiny.model, window=256)
    prompt = tiny.prompt(PROMPTS[0])
    with engine.hold():  # the worker waits at its first step
        running = engine.submit(prompt, max_new_tokens=50)
        stopper = threading.Thread(target=engine.shutdown)
        stopper.start()
        deadline = time.monotonic() + 10
        while not engine._shut and time.monotonic() < deadline:
            time.sleep(0.01)
    with pytest.raises(RuntimeError, match="shut down") as raised:
        list(running)
    stopper.join(10)
    assert not stopper.is_alive() and engine._worker is None
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(prompt, max_new_tokens=5)
    assert len(hooks) == 1
    hook, args = hooks[0]
    hook(*args)  # at exit, on an engine already shut down: nothing to do
    del engine, running, raised
    gc.collect()
    assert args[0]() is None  # the hook kept no engine (nor its model) alive


def test_requests_that_do_not_fit_are_refused(folders: dict[str, Path]) -> None:
    tiny = _load(folders["llama"], "llama")
    engine = DecodeEngine(tiny.model, window=256)
    with pytest.raises(ValueError, match="window"):
        engine.submit([5] * 250, max_new_tokens=7)
    with pytest.raises(ValueError, match="no tokens"):
        engine.submit([], max_new_tokens=7)


def test_detokenize_never_splits_a_character(folders: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    moss = AutoTokenizer.from_pretrained(folders["moss"])  # byte-level: a rare character takes several tokens
    text = "龘靐齉 MOSS 说：长江约6300公里。<eom>𠀀!"
    ids = moss(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2
    pieces = list(detokenize(iter(ids), moss))
    assert "".join(pieces) == moss.decode(ids, skip_special_tokens=True) == text.replace("<eom>", "")
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 5
    assert "龘" in pieces[0] and "靐" in pieces[1]  # each rare character comes out whole, as soon as it is whole
    llama = AutoTokenizer.from_pretrained(folders["llama"])  # SentencePiece-style spaces
    ids = llama("The Yangtze is the longest river. 长江 </s> end", add_special_tokens=False)["input_ids"]
    assert "".join(detokenize(ids, llama)) == llama.decode(ids, skip_special_tokens=True)
    assert list(detokenize([], llama)) == []


@pytest.mark.parametrize("case", ["llama", "moss", "llama-fused"])
def test_the_decode_step_traces_as_one_graph(folders: dict[str, Path], case: str) -> None:
    """What a CUDA graph captures must be pure tensor work: no host sync (.item(), .tolist()), no branch on a
    tensor's value. torch.compile(fullgraph=True) refuses exactly those, so tracing the step on the CPU guards
    the GPU path (repetition penalty on, so its branch is traced too)."""
    import torch

    tiny = _case(folders, case)
    tiny.model.generation_config.repetition_penalty = 1.2
    engine = tiny.engine(max_batch=2)
    runner: Any = engine._make_runner()
    with torch.inference_mode():
        runner.admit(decode._Request(tiny.prompt(PROMPTS[0]), 8, (), Sampling()), 0)
        runner._forward(2, 32)
        eager = runner.logits[:2].clone()
        torch.compile(runner._forward, fullgraph=True, backend="eager", dynamic=False)(2, 32)
        assert torch.equal(runner.logits[:2], eager)  # the step is idempotent: same inputs, same writes


def one_step(model: Any, prompts: list[list[int]], fused: bool, kernels: bool | None = None) -> tuple[Any, Any, Any]:
    """One decode step of len(prompts) rows after their prefills: (logits, layer 1's keys, its values) as the
    slot runner computes them, through the model's forward or the fused step (with or without its kernels)."""
    import torch

    from llms.llama_step import LlamaDecodeStep

    runner: Any = DecodeEngine(model, window=256, max_batch=len(prompts), fused_step=fused)._make_runner()
    if fused:
        runner.step_fn = LlamaDecodeStep(model, kernels=kernels)
        assert (runner.step_fn.kernels is not None) == bool(kernels)
    with torch.inference_mode():
        for slot, prompt in enumerate(prompts):
            runner.admit(decode._Request(prompt, 8, (), Sampling()), slot)
        runner._forward(len(prompts), 64)
    layer = runner.cache.layers[1]
    rows = len(prompts)
    return runner.logits[:rows].clone(), layer.keys[:rows, :, :64].clone(), layer.values[:rows, :, :64].clone()


def test_the_fused_step_keeps_grouped_kv_heads_and_scaled_rope() -> None:
    import torch

    model = tiny_llama_gqa()
    prompts = [[5, 17, 99, 42] * 5, [7, 8, 9], list(range(3, 45))]
    for expected, got in zip(one_step(model, prompts, False), one_step(model, prompts, True), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_kernels_chosen_by_default_that_fail_fall_back_to_torch_operations(
    folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """On a GPU whose Triton cannot build the kernels, the first step drops them: every chat still decodes."""
    tiny = _load(folders["llama"], "llama")
    engine = tiny.engine(fused_step=True)
    runner: Any = engine._make_runner()
    engine._runner = runner

    class Broken:
        LINEAR_MAX_ROWS = 16

        def linear(self, *args: Any) -> Any:  # the step's first kernel
            raise RuntimeError("PTXASError: ptxas fatal")

        rope_and_cache = linear

    runner.step_fn.kernels, runner.step_fn.kernels_checked = Broken(), False  # as chosen by default on CUDA
    prompt = tiny.prompt(PROMPTS[0])
    assert list(engine.submit(prompt, max_new_tokens=20)) == tiny.reference(prompt, 20)
    assert runner.step_fn.kernels is None and "ptxas fatal" in caplog.text


class _TorchKernels:
    """llms.triton_decode's interface in torch, where every kernel raises when launched with PDL: a GPU whose
    driver or Triton builds the kernels but not programmatic dependent launch."""

    LINEAR_MAX_ROWS = 16

    def __init__(self) -> None:
        self.calls = {True: 0, False: 0}

    def _launch(self, pdl: bool) -> None:
        self.calls[pdl] += 1
        if pdl:
            raise RuntimeError("CUDA error: griddepcontrol not supported")

    def linear(self, x: Any, weight: Any, pdl: bool) -> Any:
        self._launch(pdl)
        return x @ weight.t()

    def rope_and_cache(
        self, qkv: Any, cos: Any, sin: Any, positions: Any, keys: Any, values: Any, heads: int, kv: int, pdl: bool
    ) -> Any:
        import torch

        self._launch(pdl)
        rows, d = qkv.shape[0], keys.shape[-1]
        qk = qkv[:, : (heads + kv) * d].reshape(rows, heads + kv, 1, d)
        half = torch.cat([-qk[..., d // 2 :], qk[..., : d // 2]], dim=-1)
        qk = qk * cos.view(rows, 1, 1, d) + half * sin.view(rows, 1, 1, d)
        v = qkv[:, (heads + kv) * d :].reshape(rows, kv, d)
        for r in range(rows):
            keys[r, :, positions[r]] = qk[r, heads:, 0].to(keys.dtype)
            values[r, :, positions[r]] = v[r].to(values.dtype)
        return qk[:, :heads]

    def add_rms_norm(self, x: Any, delta: Any, weight: Any, eps: float, pdl: bool) -> Any:
        import torch.nn.functional as F

        self._launch(pdl)
        total = x + delta
        return total, F.rms_norm(total, (total.shape[-1],), weight, eps)

    def silu_mul(self, gate_up: Any, pdl: bool) -> Any:
        import torch.nn.functional as F

        self._launch(pdl)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def test_kernels_that_fail_with_programmatic_dependent_launch_run_without_it(
    folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Launched with PDL (Hopper and later) by default: where that fails, the first step keeps the kernels
    without it, rather than dropping them."""
    import torch

    tiny = _load(folders["llama"], "llama")
    engine = tiny.engine(fused_step=True)
    runner: Any = engine._make_runner()
    engine._runner = runner
    kernels = _TorchKernels()
    runner.step_fn.kernels, runner.step_fn.pdl, runner.step_fn.kernels_checked = kernels, True, False
    prompt = tiny.prompt(PROMPTS[0])
    assert list(engine.submit(prompt, max_new_tokens=20)) == tiny.reference(prompt, 20)
    assert runner.step_fn.kernels is kernels and not runner.step_fn.pdl
    assert kernels.calls[True] == 1 and kernels.calls[False] > 20  # one failed launch, then every step's kernels
    assert "griddepcontrol" in caplog.text and "without programmatic dependent launch" in caplog.text

    # the check itself settles it in one call: the failed launch, then a whole step without PDL
    runner.step_fn.pdl, runner.step_fn.kernels_checked, kernels.calls = True, False, {True: 0, False: 0}
    with torch.inference_mode():  # as on the decode worker
        runner._first_fused_step(1, 8)
    assert runner.step_fn.kernels_checked and not runner.step_fn.pdl and runner.step_fn.kernels is kernels
    assert kernels.calls[True] == 1 and kernels.calls[False] > 0


def test_a_graph_capture_that_fails_with_pdl_is_captured_without_it(
    folders: dict[str, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver that runs kernels launched with PDL but cannot capture them in a CUDA graph: the step is captured
    again without PDL, rather than decoding without graphs (which costs far more than PDL saves)."""
    import torch

    tiny = _load(folders["llama"], "llama")
    runner: Any = tiny.engine(fused_step=True)._make_runner()
    runner.step_fn.pdl = True
    replayed: list[tuple[int, int]] = []

    class Graph:
        def __init__(self, key: tuple[int, int]) -> None:
            self.key = key

        def replay(self) -> None:
            replayed.append(self.key)

    def capture(rows: int, length: int) -> Graph:
        if runner.step_fn.pdl:
            raise RuntimeError("operation not permitted when stream is capturing")
        runner.graphs[(rows, length)] = Graph((rows, length))
        return runner.graphs[(rows, length)]

    monkeypatch.setattr(runner, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    runner.use_graphs = True
    runner._replay(1, 256)
    assert replayed == [(1, 256)] and runner.use_graphs and not runner.step_fn.pdl
    assert "capturing without PDL" in caplog.text

    runner._replay(1, 256)  # captured once: replayed, not captured again
    assert replayed == [(1, 256), (1, 256)] and list(runner.graphs) == [(1, 256)]


def test_the_fused_step_shares_the_models_weights_and_refuses_other_models(folders: dict[str, Path]) -> None:
    import torch

    from llms.llama_step import LlamaDecodeStep

    tiny = _load(folders["llama"], "llama")
    layer = tiny.model.model.layers[0]
    before = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
    params = sum(p.numel() for p in tiny.model.parameters())
    with torch.inference_mode():  # as the decode worker builds it
        step = LlamaDecodeStep(tiny.model)
    assert torch.equal(step.qkv[0], before)
    # the model's projections now read the fused matrix: one copy of the weights, not two
    assert layer.self_attn.q_proj.weight.data_ptr() == step.qkv[0].data_ptr()
    assert layer.mlp.up_proj.weight.untyped_storage().data_ptr() == step.gate_up[0].untyped_storage().data_ptr()
    assert sum(p.numel() for p in tiny.model.parameters()) == params

    # a step's logits: the fused step's equal the model's forward over the same cache (greedy tokens alone would
    # hide a small error, e.g. in the rotary embedding, on a tiny random model)
    prompts = [tiny.prompt(text) for text in PROMPTS]
    for expected, got in zip(one_step(tiny.model, prompts, False), one_step(tiny.model, prompts, True), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # logits ~0.4; sin x 0.9 moves them 6e-5

    # a second engine over the same model reuses the fused matrices; they are normal tensors although built
    # inside inference_mode, so the model still loads weights and runs with gradients
    again = LlamaDecodeStep(tiny.model)
    assert again.qkv[0] is step.qkv[0] and again.gate_up[1] is step.gate_up[1]
    assert not layer.self_attn.q_proj.weight.is_inference()
    tiny.model.load_state_dict(tiny.model.state_dict())

    moss = _load(folders["moss"], "moss")
    with pytest.raises(ValueError, match="not LlamaForCausalLM"):
        DecodeEngine(moss.model, window=moss.window, fused_step=True)._make_runner()
