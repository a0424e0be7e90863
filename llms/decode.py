"""Decode loop for local transformers chat models: one worker thread per model batches every open chat.

``model.generate`` in a thread per chat (the old way) ran each chat alone, so concurrent chats queued one behind
another; it grew a dynamic KV cache every step, launched each of a 7B model's ~700 kernels from Python every
token, and re-decoded the whole reply for each streamed piece.

Here a :class:`DecodeEngine` owns the model, and requests join and leave a running batch between steps
(continuous batching). A new request is prefilled alone, exactly as ``generate`` prefills (the model's own
attention: SDPA for Llama-shaped models, a DynamicCache), and its keys and values are copied into one row ("slot")
of a preallocated static cache (:class:`transformers.StaticCache` with per-row write positions). From then on
one forward pass per step advances every row, each at its own position: per-row position ids, and an additive
mask that hides the cache columns a row has not written. On a CUDA GPU the step is captured as a CUDA graph per
(rows, cache length) bucket and replayed, so a token costs one graph launch instead of hundreds of kernel
launches. Greedy rows take the argmax inside that step; sampling rows draw from their own seeded generator.

The loop is pipelined: the worker sends step n+1 before it reads step n's tokens back (each step leaves the
next input tokens on the device), so the GPU never waits while the worker delivers tokens, admits requests or
launches the next graph. A request that ends with step n's token had step n+1 computed for nothing; its token
is dropped.

Tokens reach each request's queue as ids; the caller's thread turns them into text (:func:`detokenize`), so the
worker never waits on string work. Models whose code the slot cache does not fit (remote code with tuple caches,
sliding-window attention) run through a plain one-request-at-a-time loop over the model's own cache instead.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import logging
import os
import queue
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from llms.llama_step import LlamaDecodeStep

__all__ = ["DecodeEngine", "EngineStats", "Sampling", "TokenStream", "detokenize", "supports_slots"]

log = logging.getLogger(__name__)

# How long closing a stream waits for the worker to drop the request; it does so after the current step.
JOIN_TIMEOUT_S = 30.0
# A worker with nothing to do for this long ends; the next request starts a new one.
IDLE_EXIT_S = 30.0
# CUDA graphs are captured per cache length rounded up to this many columns: few graphs, little wasted attention.
LENGTH_BUCKET = 256
# Share of the free device memory (or available RAM) the static cache may take; the rest is for prefill.
CACHE_MEMORY_SHARE = 0.5
# generation_config fields that change generate()'s tokens and that this loop does not apply (it applies
# repetition_penalty; temperature, top_k and top_p come with each request): a model that sets one gets a warning.
_NOT_APPLIED = {
    "min_length",
    "min_new_tokens",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "encoder_repetition_penalty",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "min_p",
    "num_beams",
    "penalty_alpha",
    "dola_layers",
    "guidance_scale",
    "watermarking_config",
}


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling: temperature 0 is greedy (the argmax, as ``generate(do_sample=False)``)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class EngineStats:
    """Counters for tests and benches."""

    steps: int = 0  # batched decode steps
    prefills: int = 0
    tokens: int = 0  # tokens handed to requests
    most_rows: int = 0  # the most requests decoded in one step
    graphs: int = 0  # CUDA graphs captured


class _End:
    """Queue marker: the request is finished."""


_END = _End()


class _Request:
    def __init__(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Iterable[int], sampling: Sampling):
        self.prompt = [int(t) for t in prompt]
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.sampling = sampling
        self.out: queue.SimpleQueue[int | _End | BaseException] = queue.SimpleQueue()
        self.cancelled = False  # set by the consumer, read by the worker between steps
        self.released = threading.Event()  # the worker holds nothing of this request any more
        self.generated = 0
        self.cut_short = False  # ended at max_new_tokens, not at a stop id
        self.slot = -1
        self.position = 0  # cache column the next input token is written to
        self.generator: Any = None  # torch.Generator for sampling

    def finish(self, item: _End | BaseException = _END) -> None:
        self.out.put(item)
        self.released.set()


@dataclass
class _Launched:
    """One decode step sent to the device: the requests it advanced (their slots then) and where its tokens
    arrive. ``tokens`` is filled by the copy the step ends with; ``ready`` (a CUDA event) says it has landed."""

    reqs: list[_Request]
    slots: list[int]
    tokens: Any
    ready: Any = None


class _Runner(Protocol):
    """How the worker drives a model: prefill a request into a free slot, then step all active slots.
    ``launch`` sends a step, ``collect`` waits for its tokens. A ``pipelined`` runner takes the next launch before
    the previous step's tokens are collected, so the device never waits for the worker's Python."""

    pipelined: bool

    def free_slot(self) -> int | None: ...

    def admit(self, req: _Request, slot: int) -> int: ...

    def launch(self, reqs: Sequence[_Request]) -> _Launched: ...

    def collect(self, launched: _Launched) -> list[int]: ...

    def release(self, req: _Request) -> None: ...


def supports_slots(model: Any) -> bool:
    """Whether the slot cache fits the model's code: a transformers-native decoder with full attention whose
    forward takes position ids, a Cache and a 4D mask. Remote code (tuple caches) and sliding windows do not."""
    if not type(model).__module__.startswith("transformers.models."):
        return False
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            return False
    elif getattr(config, "sliding_window", None):
        return False
    params = inspect.signature(model.forward).parameters
    return {"input_ids", "position_ids", "attention_mask", "past_key_values"} <= set(params)


class TokenStream:
    """The new token ids of one request, as the worker produces them; a stop id, when drawn, is the last one (as
    ``generate`` includes it). ``close()`` drops the request from the batch and returns once the worker has let
    go of it; a stream dropped without closing is cancelled when collected."""

    def __init__(self, engine: DecodeEngine, req: _Request) -> None:
        self._engine = engine
        self._req = req
        self._done = False

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        if self._done:
            raise StopIteration
        item = self._req.out.get()
        if isinstance(item, int):
            return item
        self._done = True
        if isinstance(item, BaseException):
            raise item
        raise StopIteration

    @property
    def cut_short(self) -> bool:
        """Whether the request ended at ``max_new_tokens`` rather than at a stop id (known once it has ended)."""
        return self._req.cut_short

    def close(self) -> None:
        self._done = True
        if not self._req.released.is_set():
            self._engine._cancel(self._req)
            self._req.released.wait(JOIN_TIMEOUT_S)

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._req.released.is_set():
            with contextlib.suppress(Exception):  # at interpreter exit the engine may be half torn down
                self._engine._cancel(self._req)


class DecodeEngine:
    """Decodes every request for one model in one worker thread, batched. Thread-safe; loads nothing itself."""

    def __init__(
        self,
        model: Any,
        *,
        window: int,
        max_batch: int = 8,
        cuda_graphs: bool = True,
        name: str = "llm",
        batched: bool | None = None,
        fused_step: bool | None = None,
    ) -> None:
        """``window``: positions the model attends to (prompt + reply). ``batched``: None picks the slot cache
        when :func:`supports_slots`; False forces the one-at-a-time loop. ``fused_step``: None runs the slot
        cache's steps through :class:`llms.llama_step.LlamaDecodeStep` where the steps are CUDA graphs and the
        model is Llama-shaped; True asks for it anywhere (an error if the model is not); False never."""
        self.model = model
        self.fused_step = fused_step
        self.window = window
        self.max_batch = max(1, max_batch)
        self.cuda_graphs = cuda_graphs
        self.name = name
        self.batched = supports_slots(model) if batched is None else batched
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._worker: threading.Thread | None = None
        self._runner: _Runner | None = None
        self._inflight: _Launched | None = None  # a step sent to the device whose tokens are not delivered yet
        self._hold = threading.Lock()  # held by the worker during each iteration; hold() pauses it
        self._shut = False  # shutdown() was called: no more requests
        self._exit_hook = False  # shutdown() is registered to run at interpreter exit
        _warn_ignored_generation_config(model, name)

    # --- consumer side -------------------------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        stop_ids: Iterable[int] = (),
        sampling: Sampling | None = None,
    ) -> TokenStream:
        """Queue a request; it joins the batch at the next step. Iterate the returned stream for the new token
        ids; close it to drop the request."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if max_new_tokens < 1 or len(prompt) + max_new_tokens > self.window:
            raise ValueError(
                f"{len(prompt)} prompt + {max_new_tokens} new tokens do not fit the window of {self.window}"
            )
        req = _Request(prompt, max_new_tokens, stop_ids, sampling or Sampling())
        with self._cv:
            if self._shut:
                raise RuntimeError(f"{self.name}: the decode engine was shut down")
            self._pending.append(req)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name=f"decode-{self.name}", daemon=True)
                self._worker.start()
                if not self._exit_hook:
                    # a daemon worker still inside a torch operation while the interpreter tears down aborts the
                    # process ("terminate called without an active exception"): a CLI chat that has printed its
                    # answer, a bench. A weak reference: the hook keeps no model alive.
                    atexit.register(_shutdown_engine, weakref.ref(self))
                    self._exit_hook = True
            self._cv.notify()
        return TokenStream(self, req)

    def shutdown(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Stop the worker after its current step and wait for it; requests not finished end with an error, and
        new ones are refused. Run at interpreter exit for every engine that started a worker."""
        with self._cv:
            self._shut = True
            worker = self._worker
            self._cv.notify_all()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    def _cancel(self, req: _Request) -> None:
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Pause the worker between steps (tests and benches use it to start several requests together)."""
        with self._hold:
            yield

    # --- worker --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        if self.model.device.type == "cuda":
            torch.cuda.set_device(self.model.device)  # the current device is per thread; cuda:0 otherwise
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._shut and not self._pending and not self._active and self._inflight is None:
                        if not self._cv.wait(IDLE_EXIT_S) and not self._pending:
                            self._worker = None
                            return
                    shut = self._shut
                    if shut:
                        waiting = list(self._pending)
                        self._pending.clear()
                        self._worker = None
                if shut:
                    self._inflight = None
                    error = RuntimeError(f"{self.name}: the decode engine was shut down")
                    self._fail([*self._active, *waiting], self._runner, error)
                    return
                with self._hold:
                    try:
                        self._iterate()
                    except Exception as exc:  # a bug must not leave consumers waiting forever
                        log.exception("%s: decode worker error", self.name)
                        with self._cv:
                            waiting = list(self._pending)
                            self._pending.clear()
                        self._inflight = None
                        self._fail([*self._active, *waiting], self._runner, exc)

    def _iterate(self) -> None:
        runner = self._runner
        if runner is None:
            runner = self._runner = self._make_runner()
        for req in [r for r in self._active if r.cancelled]:
            self._drop(runner, req)
        while True:
            slot = runner.free_slot()
            with self._cv:
                if slot is None or not self._pending:
                    break
                req = self._pending.popleft()
            if req.cancelled:
                req.finish()
                continue
            try:
                first = runner.admit(req, slot)
            except Exception as exc:  # noqa: BLE001 - the request's consumer re-raises it
                log.warning("%s: prefill failed: %s", self.name, exc)
                self._fail([req], runner, exc)
                continue
            self.stats.prefills += 1
            self._active.append(req)
            self._deliver(runner, req, first)
        launched = None
        if self._active:
            try:
                launched = runner.launch(self._active)
            except Exception as exc:  # noqa: BLE001 - every request in the batch re-raises it
                log.warning("%s: decode step failed: %s", self.name, exc)
                self._inflight = None
                self._fail(list(self._active), runner, exc)
                return
            self.stats.steps += 1
            self.stats.most_rows = max(self.stats.most_rows, len(self._active))
        # pipelined: the step just sent runs while the one before it is delivered. A request that ends with the
        # earlier step's token has had one step too many computed: its token is dropped, its slot freed after it
        if runner.pipelined:
            launched, self._inflight = self._inflight, launched
        if launched is None:
            return
        try:
            tokens = runner.collect(launched)
        except Exception as exc:  # noqa: BLE001 - every request in the batch re-raises it
            log.warning("%s: decode step failed: %s", self.name, exc)
            self._inflight = None
            self._fail(list(self._active), runner, exc)
            return
        for req, token in zip(launched.reqs, tokens, strict=True):
            if req.released.is_set():
                continue  # ended (or was dropped) after this step was sent
            if req.cancelled:  # the consumer is waiting for this: let go now, not after one more step
                self._drop(runner, req)
            else:
                self._deliver(runner, req, token)

    def _deliver(self, runner: _Runner, req: _Request, token: int) -> None:
        req.generated += 1
        self.stats.tokens += 1
        req.out.put(token)
        if token in req.stop_ids or req.generated >= req.max_new_tokens:
            req.cut_short = token not in req.stop_ids
            self._drop(runner, req)

    def _drop(self, runner: _Runner, req: _Request) -> None:
        with contextlib.suppress(ValueError):
            self._active.remove(req)
        try:
            runner.release(req)
        finally:
            req.finish()

    def _fail(self, reqs: list[_Request], runner: _Runner | None, exc: BaseException) -> None:
        for req in reqs:
            with contextlib.suppress(ValueError):
                self._active.remove(req)
            if runner is not None:
                with contextlib.suppress(Exception):
                    runner.release(req)
            req.finish(exc)

    def _make_runner(self) -> _Runner:
        if self.batched:
            return _SlotRunner(
                self.model,
                window=self.window,
                max_batch=self.max_batch,
                cuda_graphs=self.cuda_graphs,
                stats=self.stats,
                name=self.name,
                fused_step=self.fused_step,
            )
        return _SerialRunner(self.model)


def _shutdown_engine(ref: weakref.ref[DecodeEngine]) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()


# --- picking tokens --------------------------------------------------------------------------------------------


def _repetition_penalty(model: Any) -> float | None:
    value = getattr(getattr(model, "generation_config", None), "repetition_penalty", None)
    return float(value) if value is not None and float(value) != 1.0 else None


def _warn_ignored_generation_config(model: Any, name: str) -> None:
    config = getattr(model, "generation_config", None)
    if config is None or not hasattr(config, "to_diff_dict"):
        return
    ignored = sorted(set(config.to_diff_dict()) & _NOT_APPLIED)
    if ignored:
        log.warning("%s: the decode loop ignores generation_config %s", name, ", ".join(ignored))


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """generate()'s repetition penalty: tokens already in the sequence get their logit divided (if positive) or
    multiplied (if negative) by ``penalty``."""
    import torch

    scaled = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, scaled, logits)


def _new_generator(sampling: Sampling, device: torch.device) -> Any:
    import torch

    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    return generator


def _to_device(values: list[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor on ``device`` without waiting for the device: ``torch.tensor(values, device=cuda)`` copies
    from pageable memory and synchronises, which would stall a pipelined decode loop every step."""
    import torch

    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _sample(logits: torch.Tensor, samplings: Sequence[Sampling], generators: Sequence[Any]) -> torch.Tensor:
    """One token per row of ``logits`` (float32), as generate's warpers pick them (temperature, then top-k, then
    top-p), drawn with each row's own generator so a seeded request repeats whatever else is in the batch."""
    import torch

    device, vocab = logits.device, logits.shape[-1]
    temperature = _to_device([s.temperature for s in samplings], torch.float32, device)
    top_k = _to_device([s.top_k if 0 < s.top_k < vocab else vocab for s in samplings], torch.long, device)
    top_p = _to_device([s.top_p for s in samplings], torch.float32, device)
    ordered, order = (logits / temperature[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)
    ordered = ordered.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = ordered.softmax(dim=-1)
    better = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    probs = probs.masked_fill(better >= top_p[:, None], 0.0)  # the best token always stays (0 < top_p)
    # argmax(p / Exp(1) noise) draws from p (the exponential race); the noise comes from each row's generator
    noise = torch.stack([torch.empty(vocab, device=device).exponential_(generator=g) for g in generators])
    choice = (probs / noise.clamp_min(1e-20)).argmax(dim=-1)
    return order.gather(1, choice[:, None]).squeeze(1)


def _pick(logits: torch.Tensor, req: _Request) -> torch.Tensor:
    """The next token (0-d tensor) from one row of float32 logits."""
    if req.sampling.greedy:
        return logits.argmax(dim=-1)
    if req.generator is None:
        req.generator = _new_generator(req.sampling, logits.device)
    return _sample(logits[None], [req.sampling], [req.generator])[0]


# --- the plain loop --------------------------------------------------------------------------------------------


class _SerialRunner:
    """One request at a time over the model's own cache, as ``generate`` drives it: for models whose code the
    slot cache does not fit. Concurrent requests wait in the engine's queue."""

    pipelined = False  # each step waits for the one before: a token must be read to feed the next

    def __init__(self, model: Any) -> None:
        self.model = model
        self.penalty = _repetition_penalty(model)
        self.device = model.device  # where the inputs go, as generate() puts them
        self.busy = False
        self.past: Any = None
        self.mask: Any = None
        self.last: Any = None
        self.seen: Any = None

    def free_slot(self) -> int | None:
        return None if self.busy else 0

    def _next(self, logits: torch.Tensor, req: _Request) -> int:
        import torch

        logits = logits[0, -1].float()
        if self.seen is not None:
            logits = _penalize(logits, self.seen, self.penalty or 1.0)
        token = _pick(logits, req)
        if self.seen is not None:
            self.seen[token] = True
        self.last = token.view(1, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(1, 1)], dim=1)
        return int(token)

    def admit(self, req: _Request, slot: int) -> int:
        import torch

        ids = torch.tensor([req.prompt], dtype=torch.long, device=self.device)
        self.mask = torch.ones_like(ids)
        out = self.model(input_ids=ids, attention_mask=self.mask, use_cache=True)
        self.busy = True
        self.past = out.past_key_values
        if self.penalty is not None:
            self.seen = torch.zeros(out.logits.shape[-1], dtype=torch.bool, device=out.logits.device)
            self.seen[ids[0].to(self.seen.device)] = True
        return self._next(out.logits, req)

    def launch(self, reqs: Sequence[_Request]) -> _Launched:
        (req,) = reqs
        out = self.model(input_ids=self.last, attention_mask=self.mask, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return _Launched([req], [0], [self._next(out.logits, req)])

    def collect(self, launched: _Launched) -> list[int]:
        tokens: list[int] = launched.tokens
        return tokens

    def release(self, req: _Request) -> None:
        self.busy = False
        self.past = self.mask = self.last = self.seen = None


# --- the slot cache --------------------------------------------------------------------------------------------


class _View:
    """What every cache layer needs to know about the current step (set by the runner before each forward)."""

    def __init__(self) -> None:
        self.rows = 1
        self.length = 1
        self.positions: dict[Any, Any] = {}  # device -> LongTensor [slots]: the column each row writes


@functools.cache
def _slot_cache_classes() -> tuple[type[Any], type[Any]]:
    """(SlotCache, SlotLayer), built on first use so that importing this module does not import transformers."""
    from transformers import StaticCache
    from transformers.cache_utils import Cache, StaticLayer

    class SlotLayer(StaticLayer):
        """A StaticLayer of [slots, heads, window, head_dim] where each row writes at its own position."""

        def __init__(self, view: _View, slots: int, window: int, keys_like: Any, values_like: Any) -> None:
            import torch

            super().__init__(max_cache_len=window)
            self.view = view
            self.dtype, self.device = keys_like.dtype, keys_like.device
            self.keys: Any = torch.zeros(
                (slots, keys_like.shape[1], window, keys_like.shape[3]), dtype=self.dtype, device=self.device
            )
            self.values: Any = torch.zeros(
                (slots, values_like.shape[1], window, values_like.shape[3]), dtype=self.dtype, device=self.device
            )
            self.is_initialized = True

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:  # allocated in __init__
            return None

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            rows, length = self.view.rows, self.view.length
            if key_states.shape[2] != 1:
                raise ValueError("the slot cache takes one new token per row; prefill goes through a DynamicCache")
            where = self.view.positions[self.device][:rows].view(rows, 1, 1, 1)
            self.keys[:rows].scatter_(2, where.expand_as(key_states), key_states.to(self.dtype))
            self.values[:rows].scatter_(2, where.expand_as(value_states), value_states.to(self.dtype))
            return self.keys[:rows, :, :length], self.values[:rows, :, :length]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.view.length, 0

        def get_seq_length(self) -> int:
            return self.view.length

        def load(self, slot: int, keys: Any, values: Any) -> None:
            """Copy one prefilled sequence ([1, heads, n, head_dim]) into row ``slot``."""
            n = keys.shape[2]
            self.keys[slot, :, :n].copy_(keys[0])
            self.values[slot, :, :n].copy_(values[0])

    class SlotCache(StaticCache):
        """A StaticCache whose rows are independent sequences (slots), each at its own length."""

        def __init__(self, layers: list[Any]) -> None:
            Cache.__init__(self, layers=layers)

    return SlotCache, SlotLayer


def _available_bytes(device: Any) -> int | None:
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


class _SlotRunner:
    """Continuous batching over a static cache of ``slots`` rows; see the module docstring."""

    # the next step reads its input tokens from the device, so it can be sent before this one's are read back
    pipelined = True

    def __init__(
        self,
        model: Any,
        *,
        window: int,
        max_batch: int,
        cuda_graphs: bool,
        stats: EngineStats,
        name: str,
        fused_step: bool | None = None,
    ) -> None:
        self.model = model
        self.window = window
        self.max_batch = max_batch
        self.stats = stats
        self.name = name
        self.penalty = _repetition_penalty(model)
        self.device = model.device  # where the inputs go, as generate() puts them
        self.view = _View()
        self.cache: Any = None  # allocated at the first prefill, when the key/value shapes are known
        self.slots: list[_Request | None] = []
        devices = {p.device for p in model.parameters()}
        quantized = getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None)
        # a graph replays fixed kernels on fixed memory: one CUDA device, no quantization kernels that sync
        self.use_graphs = bool(
            cuda_graphs and self.device.type == "cuda" and devices == {self.device} and not quantized
        )
        self.step_fn: LlamaDecodeStep | None = None
        if self.use_graphs if fused_step is None else fused_step:
            from llms.llama_step import LlamaDecodeStep, fused_step_unsupported

            reason = fused_step_unsupported(model)
            if reason is None:
                try:
                    self.step_fn = LlamaDecodeStep(model)  # makes q/k/v and gate/up views into fused weights
                except (RuntimeError, ValueError) as exc:  # e.g. out of memory for one layer's fused copy
                    if fused_step:
                        raise
                    log.warning("%s: decode steps through the model's forward (fused step: %s)", name, exc)
            elif fused_step:
                raise ValueError(f"{name}: the fused decode step cannot run this model: {reason}")
            else:
                log.info("%s: decode steps through the model's forward (%s)", name, reason)
        self.graphs: dict[tuple[int, int], Any] = {}
        self.pool: Any = None
        self.capture_stream: Any = None
        # per-step inputs and outputs live in fixed buffers, so a captured graph reads and writes the same memory
        self.ids: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.launches = 0

    # allocation

    def _allocate(self, dyn: Any, vocab: int) -> None:
        import torch

        slot_cache, slot_layer = _slot_cache_classes()
        per_token: dict[Any, int] = {}
        for layer in dyn.layers:
            k, v = layer.keys, layer.values  # [1, heads, prompt, head_dim]
            size = (k.shape[1] * k.shape[3] + v.shape[1] * v.shape[3]) * k.element_size()
            per_token[k.device] = per_token.get(k.device, 0) + size
        slots = self.max_batch
        for dev, size in per_token.items():
            available = _available_bytes(dev)
            if available is not None:
                slots = min(slots, int(available * CACHE_MEMORY_SHARE) // (size * self.window))
        slots = max(1, slots)
        if slots < self.max_batch:
            log.info("%s: KV cache for %d concurrent chats (memory)", self.name, slots)
        self.view.positions = {dev: torch.zeros(slots, dtype=torch.long, device=dev) for dev in per_token}
        self.view.positions.setdefault(self.device, torch.zeros(slots, dtype=torch.long, device=self.device))
        self.pos = self.view.positions[self.device]
        self.cache = slot_cache([slot_layer(self.view, slots, self.window, la.keys, la.values) for la in dyn.layers])
        self.slots = [None] * slots
        self.dtype = dyn.layers[0].keys.dtype
        dev = self.device
        self.ids = torch.zeros((slots, 1), dtype=torch.long, device=dev)
        self.active = torch.zeros(slots, dtype=torch.long, device=dev)
        self.next = torch.zeros(slots, dtype=torch.long, device=dev)
        self.logits = torch.zeros((slots, vocab), dtype=torch.float32, device=dev)
        self.rows = torch.arange(slots, device=dev)
        self.columns = torch.arange(self.window, device=dev)
        self.zero = torch.zeros((), dtype=self.dtype, device=dev)
        self.neg = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=dev)
        self.seen = None if self.penalty is None else torch.zeros((slots, vocab), dtype=torch.bool, device=dev)
        pinned = dev.type == "cuda"  # page-locked, so that the copy of a step's tokens does not wait for the step
        self.host_tokens = [torch.zeros(slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]

    # runner protocol

    def free_slot(self) -> int | None:
        if self.cache is None:
            return 0
        return next((i for i, r in enumerate(self.slots) if r is None), None)

    def admit(self, req: _Request, slot: int) -> int:
        import torch
        from transformers import DynamicCache

        ids = torch.tensor([req.prompt], dtype=torch.long, device=self.device)
        dyn = DynamicCache(config=self.model.config)
        # the same call generate() makes for its prefill, so the first token (and the cache) are the same
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=dyn, use_cache=True)
        if self.cache is None:
            self._allocate(dyn, out.logits.shape[-1])
        assert self.ids is not None and self.pos is not None
        if len(dyn.layers) != len(self.cache.layers):
            raise RuntimeError(f"the prefill filled {len(dyn.layers)} cache layers, expected {len(self.cache.layers)}")
        filled: Any
        for layer, filled in zip(self.cache.layers, dyn.layers, strict=True):
            layer.load(slot, filled.keys, filled.values)
        logits = out.logits[0, -1].float().to(self.device)  # lm_head may sit on another GPU (device_map)
        if self.seen is not None and self.penalty is not None:
            self.seen[slot] = False
            self.seen[slot, ids[0]] = True
            logits = _penalize(logits, self.seen[slot], self.penalty)
        token = _pick(logits, req)
        if self.seen is not None:
            self.seen[slot, token] = True
        self.ids[slot, 0] = token
        self.pos[slot] = len(req.prompt)
        self.active[slot] = 1
        self.slots[slot] = req
        req.slot, req.position = slot, len(req.prompt)
        return int(token)

    def release(self, req: _Request) -> None:
        if req.slot < 0 or self.cache is None or self.slots[req.slot] is not req:
            return
        assert self.ids is not None and self.pos is not None
        self.slots[req.slot] = None
        self.active[req.slot] = 0
        self.pos[req.slot] = 0
        self.ids[req.slot, 0] = 0
        req.slot = -1

    def launch(self, reqs: Sequence[_Request]) -> _Launched:
        """Send one step for ``reqs``; nothing here waits for the device. The step leaves each row's next input
        token and position in the runner's buffers, so the next launch may follow before this one is collected."""
        import torch

        assert self.ids is not None and self.pos is not None
        rows = max(r.slot for r in reqs) + 1
        longest = max(r.position for r in reqs) + 1
        if self.step_fn is not None and not self.step_fn.kernels_checked:
            self._first_fused_step(rows, longest)
        if self.use_graphs:
            rows = min(len(self.slots), 1 << (rows - 1).bit_length())
            length = min(self.window, -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET)
            self._replay(rows, length)
        else:
            self._forward(rows, longest)
        sampled = [r for r in reqs if not r.sampling.greedy]
        if sampled:
            for r in sampled:
                if r.generator is None:
                    r.generator = _new_generator(r.sampling, self.device)
            where = _to_device([r.slot for r in sampled], torch.long, self.device)
            self.next[where] = _sample(
                self.logits[where], [r.sampling for r in sampled], [r.generator for r in sampled]
            )
        self.ids[:rows, 0].copy_(self.next[:rows])
        self.pos[:rows].add_(self.active[:rows])
        if self.seen is not None:
            self.seen[self.rows[:rows], self.next[:rows]] = True
        # two host buffers in turn: the next launch writes one while this step's tokens wait in the other
        tokens = self.host_tokens[self.launches % 2]
        self.launches += 1
        tokens[:rows].copy_(self.next[:rows], non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        for r in reqs:
            r.position += 1
        return _Launched(list(reqs), [r.slot for r in reqs], tokens[:rows], ready)

    def collect(self, launched: _Launched) -> list[int]:
        if launched.ready is not None:
            launched.ready.synchronize()
        tokens = launched.tokens.tolist()
        return [int(tokens[slot]) for slot in launched.slots]

    # the step itself

    def _forward(self, rows: int, length: int) -> None:
        """One decode step for rows [0, rows) over cache columns [0, length): logits and greedy tokens into
        ``self.logits`` / ``self.next``. Only tensor work on fixed buffers, so that it can be captured."""
        import torch

        assert self.ids is not None and self.pos is not None
        self.view.rows, self.view.length = rows, length
        pos = self.pos[:rows]
        for mirror in self.view.positions.values():
            if mirror is not self.pos:  # layers on other GPUs (device_map) read their own copy
                mirror[:rows].copy_(pos)
        mask = torch.where(self.columns[None, :length] <= pos[:, None], self.zero, self.neg).view(rows, 1, 1, length)
        if self.step_fn is not None:
            layers = self.cache.layers
            step_logits = self.step_fn(
                self.ids[:rows], pos[:, None], mask, [la.keys for la in layers], [la.values for la in layers]
            )
            logits = step_logits.float()
        else:
            out = self.model(
                input_ids=self.ids[:rows],
                position_ids=pos[:, None],
                attention_mask=mask,
                past_key_values=self.cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :].float().to(self.device)
        if self.seen is not None and self.penalty is not None:
            logits = _penalize(logits, self.seen[:rows], self.penalty)
        self.logits[:rows].copy_(logits)
        self.next[:rows].copy_(logits.argmax(dim=-1))

    def _first_fused_step(self, rows: int, length: int) -> None:
        """Run the first fused step eagerly: Triton kernels chosen by default that fail to build or run here run
        again without programmatic dependent launch, then are dropped (the step then uses torch operations),
        instead of failing every chat. The step writes the same cache entries again when it runs for real."""
        assert self.step_fn is not None
        while not self.step_fn.kernels_checked:
            try:
                self._forward(rows, length)
            except Exception as exc:  # Triton's build errors share no base class but Exception
                if not self.step_fn.first_step_failed(exc):
                    raise
                instead = "without programmatic dependent launch" if self.step_fn.kernels else "torch operations"
                log.warning("%s: the fused step's Triton kernels failed (%s); using %s", self.name, exc, instead)
            else:
                self.step_fn.kernels_checked = True

    def _replay(self, rows: int, length: int) -> None:
        import torch

        graph = self.graphs.get((rows, length))
        while graph is None:
            try:
                graph = self._capture(rows, length)
            except Exception as exc:  # noqa: BLE001 - graphs are an optimisation: fall back to eager steps
                torch.cuda.synchronize(self.device)
                if self.step_fn is not None and self.step_fn.pdl:
                    # a driver that runs kernels launched with PDL but cannot capture them: graphs matter more
                    log.warning("%s: CUDA graph capture failed (%s); capturing without PDL", self.name, exc)
                    self.step_fn.pdl = False
                    continue
                log.warning("%s: CUDA graph capture failed (%s); decoding without graphs", self.name, exc)
                self.use_graphs = False
                self._forward(rows, length)
                return
        graph.replay()

    def _capture(self, rows: int, length: int) -> Any:
        import torch

        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            self.capture_stream = torch.cuda.Stream(self.device)
        stream = self.capture_stream
        # one eager run first, on the side stream the capture uses, as CUDA graphs require: it sets up cuBLAS and
        # the attention kernels outside the capture (it computes this very step; the replay repeats it exactly)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(rows, length)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # the graphs share one memory pool: each writes its results into the runner's own buffers, so what one
        # leaves in the pool is scratch that the next may overwrite. thread_local: other threads may use CUDA.
        with (
            torch.cuda.device(self.device),
            torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"),
        ):
            self._forward(rows, length)
        self.graphs[(rows, length)] = graph
        self.stats.graphs += 1
        return graph


# --- text ------------------------------------------------------------------------------------------------------


def detokenize(ids: Iterable[int], tokenizer: Any) -> Iterator[str]:
    """Text pieces for a stream of token ids, joined equal to ``tokenizer.decode(all ids, skip_special_tokens=
    True)``. Each step decodes a short window (the previous piece's tokens as context, then the new ones), so the
    cost does not grow with the reply; a piece that would end inside a multi-byte character (U+FFFD from a
    partial UTF-8 sequence) waits for the tokens that complete it."""
    tokens: list[int] = []
    start = emitted = 0  # window start; end of the tokens already turned into text
    head = ""  # decode(tokens[start:emitted])
    for token in ids:
        tokens.append(token)
        text = tokenizer.decode(tokens[start:], skip_special_tokens=True)
        if len(text) > len(head) and not text.endswith("\ufffd"):
            yield text[len(head) :]
            start, emitted = emitted, len(tokens)
            head = tokenizer.decode(tokens[start:emitted], skip_special_tokens=True)
    text = tokenizer.decode(tokens[start:], skip_special_tokens=True)
    if len(text) > len(head):
        yield text[len(head) :]
