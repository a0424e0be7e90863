"""Run a transformer encoder over many texts fast: the batching and device side shared by the embedders.

- Texts are tokenised a group at a time in a background thread (fast tokenizers release the GIL), so the
  tokeniser works while the device runs the previous group; groups go shortest first. Batches are cut
  and built on the thread that runs them, just before they run.
- Inside a group, sequences are sorted by token length and cut into batches whose padded size (rows x
  padded length) fits a token budget: little padding, and a GPU kept busy by large batches. A group's last,
  part-filled batch waits for the next group's sequences.
- Padded lengths are rounded up to a multiple, so the batch shapes come from a small set that
  :meth:`BatchedEncoder.warm_up` can run once at load (the first pass is then as fast as the next).
- Batches are built in pinned memory and copied with ``non_blocking=True``; pooling and the sum of a text's
  windows run on the device, and only the (n, dim) result comes back.

A text may be several sequences (windows of a long text): each sequence carries the index of its text
and a weight, and a text's vector is the weighted sum of its sequences' pooled vectors, L2-normalised.

With a ``packed`` forward (:mod:`knowledge.embed_packed`) a batch is not padded per sequence: its sequences
are laid end to end, ``token_budget`` tokens in all, with their offsets; pooling runs over each segment. On
CUDA the batch's tokens are padded up to a multiple of ``token_multiple`` (tokens that belong to no
sequence): the matrix products then see a few aligned shapes, all run by :meth:`BatchedEncoder.warm_up`.
torch is imported inside functions: importing this module costs nothing.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from knowledge.packed_runner import PackedForward, PackedPlan, PackedRunner, round_up

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]
Pooling = Literal["mean", "cls"]

# Tokens per batch. A GPU wants large batches. A CPU wants the activations to stay in its caches: on the
# 2-core machine, float32 e5-small over 254 dev chunks ran at 2,142-2,210 tokens/s with 1-2k tokens per
# batch, 1,868 with 4k, 1,532 with 8k (16k: ~20 % slower than 4k); a batch also takes under a second, so
# progress moves.
CUDA_TOKEN_BUDGET = 65536
CPU_TOKEN_BUDGET = 2048


def default_token_budget(device: str) -> int:
    return CUDA_TOKEN_BUDGET if device.startswith("cuda") else CPU_TOKEN_BUDGET


@dataclass
class Tokenised:
    """The sequences of some texts: ``ids[k]`` belongs to text ``owner[k]`` with weight ``weight[k]``."""

    ids: list[np.ndarray]
    owner: np.ndarray  # int64, index into the texts given to the tokeniser
    weight: np.ndarray  # float32

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.ids), dtype=np.int64, count=len(self.ids))


# texts -> their sequences (special tokens included, already truncated or windowed)
Tokenise = Callable[[list[str]], Tokenised]


def one_sequence_each(ids: list[np.ndarray]) -> Tokenised:
    """The common case: one sequence per text, weight 1."""
    return Tokenised(ids, np.arange(len(ids), dtype=np.int64), np.ones(len(ids), dtype=np.float32))


def plan_batches(lengths: np.ndarray, token_budget: int, multiple: int = 1) -> list[np.ndarray]:
    """Indices of ``lengths`` sorted by length and cut so that rows x padded length <= ``token_budget``.

    The padded length is the batch's longest sequence rounded up to ``multiple``. A sequence longer than
    the budget still gets a batch of its own.
    """
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        # sorted ascending, so the longest of a batch is its last; grow while the padded size fits
        end = start + 1
        while end < len(order):
            padded = round_up(int(lengths[order[end]]), multiple)
            if (end - start + 1) * padded > token_budget:
                break
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def plan_packed(lengths: np.ndarray, token_budget: int, max_rows: int | None = None) -> list[np.ndarray]:
    """Indices of ``lengths`` sorted by length and cut so that each batch's tokens sum to <= ``token_budget``
    and it has at most ``max_rows`` sequences (a sequence longer than the budget gets a batch of its own)."""
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, total = 0, 0
    rows = max_rows or len(order)
    for end, k in enumerate(order):
        n = int(lengths[k])
        if end > start and (total + n > token_budget or end - start == rows):
            batches.append(order[start:end])
            start, total = end, 0
        total += n
    if start < len(order):
        batches.append(order[start:])
    return batches


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, 1, length) mask to add to attention scores: 0 where ``mask`` is 1, the dtype's minimum at padding.

    Handed to a transformers model instead of the 2-D mask, which transformers 5 would first test with
    ``mask.all()`` to choose a kernel: a GPU->CPU sync at every batch that stalls the pipeline.
    """
    import torch

    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@dataclass
class _Batch:
    ids: torch.Tensor  # (rows, padded length) int64, pinned on CUDA
    mask: torch.Tensor  # (rows, padded length) int64
    owner: torch.Tensor  # (rows,) int64, global text index
    weight: torch.Tensor  # (rows,) float32
    texts_done: int  # texts whose last sequence is in this batch (for progress)
    padded: bool  # any row shorter than the batch: the forward needs the mask


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


class BatchedEncoder:
    """Pooled, L2-normalised sentence vectors from ``forward(input_ids, attention_mask) -> hidden states``.

    ``forward`` returns the last hidden states, (rows, length, hidden); its mask is ``None`` for a batch
    without padding (SDPA may then use its flash kernel). ``pooling`` is what the model's
    sentence-transformers config says (mean over the attention mask, or the first token). When ``packed``
    is given, ``packed(ids, positions, cu_seqlens, max_length, blocks) -> (tokens, hidden)`` runs instead
    (:class:`knowledge.packed_runner.PackedRunner`), over unpadded batches (``length_multiple`` is then
    unused), their tokens padded up to a multiple of ``token_multiple`` with tokens of no sequence
    (``cu_seqlens`` ends before them; their hidden states are never read). ``fixed_shapes``: each padded token
    count has one layout, at most ``max_rows`` sequences, captured as a CUDA graph at warm-up on CUDA.
    """

    def __init__(
        self,
        forward: Callable[[Any, Any], Any],
        *,
        device: str,
        pad_id: int,
        pooling: Pooling,
        token_budget: int,
        length_multiple: int = 1,
        first_group: int = 64,
        max_group: int = 512,
        packed: PackedForward | None = None,
        token_multiple: int = 1,
        fixed_shapes: bool = False,
        max_rows: int | None = None,
    ) -> None:
        self.forward = forward
        self.runner = (
            PackedRunner(
                packed,
                device=device,
                pad_id=pad_id,
                pooling=pooling,
                token_budget=token_budget,
                token_multiple=token_multiple,
                fixed_shapes=fixed_shapes,
                max_rows=max_rows,
            )
            if packed
            else None
        )
        self.device = device
        self.pad_id = pad_id
        self.pooling = pooling
        self.token_budget = token_budget
        self.length_multiple = length_multiple
        self.first_group = first_group
        self.max_group = max_group

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def encode(
        self, texts: Sequence[str], tokenise: Tokenise, dim: int, progress: Progress | None = None
    ) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised, in the order of ``texts``."""
        import torch

        n = len(texts)
        if n == 0:
            return np.zeros((0, dim), dtype=np.float32)
        out = torch.zeros((n, dim), dtype=torch.float32, device=self.device)
        stop = threading.Event()
        groups: queue.Queue[object] = queue.Queue(maxsize=4)
        producer = threading.Thread(
            target=self._tokenise_groups,
            args=(texts, tokenise, groups, stop),
            name="zhiku-embed-tokenise",
            daemon=True,
        )
        producer.start()
        reporter = _ProgressReporter(progress, self.on_cuda)
        try:
            with torch.inference_mode():
                for batch in self._batches(_received(groups), n):
                    self._run(batch, out)
                    reporter.launched(batch.texts_done)
                out = torch.nn.functional.normalize(out, dim=1)
                if self.on_cuda:  # through pinned memory: to pageable memory the copy took 9.8 ms of an H200 pass
                    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                    # wait asleep for the pass (a copy's own wait spins a core, which an ingest's parsers need)
                    finished = torch.cuda.Event(blocking=True)
                    finished.record()
                    finished.synchronize()
                    result = host.copy_(out).numpy().copy()
                else:
                    result = out.numpy()
        finally:
            stop.set()
            _drain(groups)
            producer.join()
        reporter.finish()
        return result

    def _run(self, batch: _Batch | PackedPlan, out: torch.Tensor) -> None:
        if isinstance(batch, PackedPlan):
            assert self.runner is not None
            self.runner.run(batch, out)
            return
        ids = batch.ids.to(self.device, non_blocking=True)
        mask = batch.mask.to(self.device, non_blocking=True)
        owner = batch.owner.to(self.device, non_blocking=True)
        weight = batch.weight.to(self.device, non_blocking=True)
        pooled = self.pool(self.forward(ids, mask if batch.padded else None), mask)
        out.index_add_(0, owner, pooled * weight[:, None])

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) float32: sentence-transformers' Pooling, accumulated in float32 as it does."""
        import torch

        if self.pooling == "cls":
            return hidden[:, 0].float()  # right padding: the first token is the first real one
        m = mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * m).sum(dim=1, dtype=torch.float32)
        return summed / torch.clamp(mask.sum(dim=1, keepdim=True, dtype=torch.float32), min=1e-9)

    # ---- the tokenising thread, and the batches the device thread builds from its groups ----

    def _tokenise_groups(
        self, texts: Sequence[str], tokenise: Tokenise, out: queue.Queue[object], stop: threading.Event
    ) -> None:
        try:
            for group in self._groups(texts):
                if not _put(out, (group, tokenise([texts[i] for i in group])), stop):
                    return
            _put(out, _DONE, stop)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread, which re-raises it
            _put(out, _Failed(err), stop)

    def _batches(self, groups: Iterator[tuple[np.ndarray, Tokenised]], n: int) -> Iterator[_Batch | PackedPlan]:
        """The batches of the tokenised groups, each built (and pinned) just before it runs.

        A group's last batch, the one the budget may leave part empty, waits for the next group's sequences
        (longer ones: groups come shortest first) and is planned again with them, so that batches are cut
        where the budget cuts them, not where a group ends. It waits only behind another batch of its
        group: the first small groups run at once, while the device would otherwise be idle.
        """
        remaining = np.zeros(n, dtype=np.int64)  # each text's sequences not yet in a batch
        held = Tokenised([], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))  # owners: text indices
        for item in itertools.chain(groups, [None]):
            if item is None:
                pool = held
            else:
                group, tok = item
                owners = group[tok.owner]
                np.add.at(remaining, owners, 1)
                pool = Tokenised(
                    [*held.ids, *tok.ids],
                    np.concatenate([held.owner, owners]),
                    np.concatenate([held.weight, tok.weight]),
                )
            lengths = pool.lengths()
            plans = (
                plan_packed(lengths, self.token_budget, self.runner.max_rows if self.runner.fixed_shapes else None)
                if self.runner
                else plan_batches(lengths, self.token_budget, self.length_multiple)
            )
            if item is not None and len(plans) > 1:  # never behind an idle device: only behind a batch that runs
                keep = plans.pop()
                held = Tokenised([pool.ids[int(k)] for k in keep], pool.owner[keep], pool.weight[keep])
            for idx in plans:
                np.subtract.at(remaining, pool.owner[idx], 1)
                done = int(np.count_nonzero(remaining[np.unique(pool.owner[idx])] == 0))
                if self.runner:
                    yield PackedPlan(pool, idx, lengths, done)
                else:
                    yield self._build(pool, idx, pool.owner, lengths, done)

    def _groups(self, texts: Sequence[str]) -> Iterator[np.ndarray]:
        """Text indices shortest first (characters: known before tokenising), small groups first so the
        device starts early, then larger ones. They grow by half at a time, up to ``max_group``, so that the
        next group is tokenised while the device runs the last (in a timeline of an H200 pass, the device
        thread waited 2 ms for the first group and never after)."""
        order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
        size, start = self.first_group, 0
        while start < len(order):
            yield order[start : start + size]
            start += size
            size = min(size * 3 // 2, self.max_group)

    def _build(self, tok: Tokenised, idx: np.ndarray, owners: np.ndarray, lengths: np.ndarray, done: int) -> _Batch:
        import torch

        width = round_up(int(lengths[idx].max()), self.length_multiple)
        ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for row, k in enumerate(idx):
            seq = tok.ids[k]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        tensors = [
            torch.from_numpy(ids),
            torch.from_numpy(mask),
            torch.from_numpy(np.ascontiguousarray(owners[idx], dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(tok.weight[idx], dtype=np.float32)),
        ]
        if self.on_cuda:  # pinned: the copies to the GPU are asynchronous and overlap the compute
            tensors = [t.pin_memory() for t in tensors]
        padded = bool(lengths[idx].min() < width)
        return _Batch(
            ids=tensors[0], mask=tensors[1], owner=tensors[2], weight=tensors[3], texts_done=done, padded=padded
        )

    # ---- warm-up ----

    def warm_up(self, max_length: int, seconds: float = 5.0) -> int:
        """Run every bucket shape (padded length x the rows the budget gives it) once, longest first, so
        kernels, cuBLAS heuristics and the allocator's blocks are ready before the first real batch.
        Stops after ``seconds``; returns the number of shapes run."""
        import torch

        if self.runner is not None:
            return self.runner.warm_up(max_length, seconds, self._warm_up_plan)
        started = time.perf_counter()
        widths = list(range(round_up(max_length, self.length_multiple), 0, -self.length_multiple))
        ran = 0
        with torch.inference_mode():
            for width in widths:
                rows = max(1, self.token_budget // width)
                ids = torch.full((rows, width), self.pad_id, dtype=torch.int64, device=self.device)
                mask = torch.ones((rows, width), dtype=torch.int64, device=self.device)
                self.pool(self.forward(ids, mask), mask)
                ran += 1
                if self.on_cuda:
                    torch.cuda.synchronize(self.device)
                if time.perf_counter() - started > seconds:
                    break
        return ran

    def _warm_up_plan(self, total: int, length: int) -> PackedPlan:
        """A batch of ``total`` tokens in sequences of ``length`` (the last one shorter), for the warm-up."""
        lengths = np.full(total // length, length, dtype=np.int64)
        if total % length:
            lengths = np.append(lengths, total % length)
        tok = one_sequence_each([np.full(n, self.pad_id, dtype=np.int64) for n in lengths])
        return PackedPlan(tok, np.arange(len(lengths)), lengths, 0)


class _ProgressReporter:
    """Reports texts as done when the device has finished them, not when their batch was queued."""

    def __init__(self, progress: Progress | None, on_cuda: bool) -> None:
        self.progress = progress
        self.on_cuda = on_cuda
        self.pending: list[tuple[Any, int]] = []

    def launched(self, texts_done: int) -> None:
        if not self.progress:
            return
        if not self.on_cuda:
            if texts_done:
                self.progress(texts_done)
            return
        import torch

        event = torch.cuda.Event()
        event.record()
        self.pending.append((event, texts_done))
        while self.pending and self.pending[0][0].query():  # non-blocking: the GPU keeps its queue
            _, done = self.pending.pop(0)
            if done:
                self.progress(done)

    def finish(self) -> None:
        if self.progress:
            for _, done in self.pending:
                if done:
                    self.progress(done)
        self.pending.clear()


def _received(q: queue.Queue[object]) -> Iterator[tuple[np.ndarray, Tokenised]]:
    """The tokenising thread's groups, until it is done; its error is raised here."""
    while True:
        item = q.get()
        if item is _DONE:
            return
        if isinstance(item, _Failed):
            raise item.error
        assert isinstance(item, tuple)
        yield item


def _put(q: queue.Queue[object], item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _drain(q: queue.Queue[object]) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return
