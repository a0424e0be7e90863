"""Run packed batches (:mod:`knowledge.embed_packed`) on the device: their integers in one buffer, one copy, and on
CUDA one graph launch per batch.

A packed batch is the token ids, positions and segments of sequences laid end to end, their offsets, the
attention kernel's table of query blocks, and each sequence's text and weight. All the integers lie in one int64
buffer (:class:`PackedLayout`), filled on the host and copied to the device in one piece; the weights in a
second, float32.

With ``fixed_shapes`` every batch of a padded token count takes the same layout: its rows and query blocks
at their bound (the planner caps rows at ``max_rows``), unused entries inert. One CUDA graph per token count
is then captured at warm-up, and a batch is one copy, one graph launch and one ``index_add_``: ~150 kernel
launches from Python before. Python launching kernels was what held the GPU back on an H200, the more so
while the tokenizer's threads ran beside it (bench/README.md). On a CPU the same layouts run eagerly (the
tests' path). Host buffers on CUDA are pinned, allocated once and reused round-robin: a slot is refilled
only when the GPU has copied it, which also bounds how far the host runs ahead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from knowledge.embed_packed import ATTENTION_BLOCK, blocks_per_sequence, query_blocks

if TYPE_CHECKING:
    import torch

    from knowledge.embed_batches import Tokenised

_log = logging.getLogger(__name__)

# forward(ids, positions, cu_seqlens (int32), max_length, blocks) -> (tokens, hidden)
PackedForward = Callable[[Any, Any, Any, int, Any], Any]
STAGING_SLOTS = 4  # pinned host buffers: batches the host may fill ahead of the GPU
GRAPH_MIN_AGREEMENT = 0.999  # cosine between a graph's output and the eager run's, checked at capture


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class PackedLayout:
    """Where a packed batch's integers lie in its int64 buffer: ids, positions and segments (``tokens`` each),
    the offsets (``rows + 1``), the attention table (2 x ``blocks``), then the rows' text indices (``rows``)."""

    tokens: int
    rows: int
    blocks: int

    @property
    def size(self) -> int:
        return 3 * self.tokens + 2 * self.rows + 1 + 2 * self.blocks

    def views(self, ints: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
        """(ids, positions, segment, cu_seqlens, blocks (2, n), owner) of a numpy array or a tensor."""
        t, r, b = self.tokens, self.rows, self.blocks
        table = 3 * t + r + 1
        return (
            ints[:t],
            ints[t : 2 * t],
            ints[2 * t : 3 * t],
            ints[3 * t : table],
            ints[table : table + 2 * b].reshape(2, b),
            ints[table + 2 * b : table + 2 * b + r],
        )


@dataclass
class PackedPlan:
    """A batch as planned: sequences ``idx`` of ``pool`` (owners: text indices), ``lengths`` the pool's."""

    pool: Tokenised
    idx: np.ndarray
    lengths: np.ndarray
    texts_done: int  # texts whose last sequence is in this batch (for progress)

    @property
    def tokens(self) -> int:
        return int(self.lengths[self.idx].sum())


@dataclass
class _Captured:
    """A fixed layout's device buffers and, on CUDA, its graph (whose output is ``weighted``)."""

    layout: PackedLayout
    ints: torch.Tensor
    weight: torch.Tensor
    graph: Any = None
    weighted: torch.Tensor | None = None


class _Slot:
    def __init__(self, ints: torch.Tensor, weight: torch.Tensor) -> None:
        self.ints = ints
        self.weight = weight
        self.copied: Any = None  # the CUDA event after the copies from this slot


class PackedRunner:
    """Runs :class:`PackedPlan` batches through ``packed`` and adds each row's pooled vector, times its
    weight, into its text's row of ``out``. ``pooling``: mean over each sequence, or its first token."""

    def __init__(
        self,
        packed: PackedForward,
        *,
        device: str,
        pad_id: int,
        pooling: Literal["mean", "cls"],
        token_budget: int,
        token_multiple: int = 1,
        fixed_shapes: bool = False,
        max_rows: int | None = None,
    ) -> None:
        self.packed = packed
        self.device = device
        self.pad_id = pad_id
        self.pooling = pooling
        self.token_budget = token_budget
        self.token_multiple = token_multiple
        self.fixed_shapes = fixed_shapes
        # rows of a fixed layout; sequences average >= 64 tokens before the cap binds (m3e's chunks: 60-330)
        self.max_rows = max_rows or max(1, token_budget // 64)
        self.max_length = 0  # the longest sequence the model takes (the warm-up's): fixed layouts' bound
        self._captured: dict[int, _Captured] = {}
        self._slots: list[_Slot] = []
        self._next_slot = 0
        self._filling: _Slot | None = None  # the slot just handed out, until its copies are queued
        self._lock = threading.Lock()  # encode calls from two threads share the buffers and graphs
        self._segment_mean = _triton_segment_mean() if self.on_cuda else None

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def graphs(self) -> int:
        """Token counts with a captured CUDA graph."""
        return sum(1 for c in self._captured.values() if c.graph is not None)

    def eager_only(self) -> None:
        """Drops the fixed layouts and their graphs: every batch runs eagerly in its exact layout (what an
        attention kernel with a per-batch grid needs)."""
        self.fixed_shapes = False
        self._captured.clear()

    def tokens_of(self, used: int) -> int:
        """The padded token count of a batch of ``used`` tokens."""
        return round_up(used, self.token_multiple)

    def fixed_layout(self, tokens: int) -> PackedLayout:
        """The layout every batch of ``tokens`` (padded) takes: at most ``max_rows`` rows, and so at most
        tokens / block + rows query blocks."""
        return PackedLayout(tokens, self.max_rows, -(-tokens // ATTENTION_BLOCK) + self.max_rows)

    def run(self, plan: PackedPlan, out: torch.Tensor) -> None:
        with self._lock:
            owner, weighted = self._weighted(plan)
            out.index_add_(0, owner, weighted)

    def _weighted(self, plan: PackedPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(each row's text, its pooled vector times its weight) on the device; unused rows have weight 0."""
        rows = len(plan.idx)
        tokens = self.tokens_of(plan.tokens)
        captured = self._captured.get(tokens) if rows <= self.max_rows else None
        if captured is None:
            lengths = plan.lengths[plan.idx]
            layout = PackedLayout(tokens, rows, int(blocks_per_sequence(lengths).sum()))
            ints, weight = self._to_device(*self._fill(layout, plan))
            return layout.views(ints)[5], self._step(layout, ints, weight, int(lengths.max()))
        layout = captured.layout
        self._load(captured, plan)
        owner = layout.views(captured.ints)[5]
        if captured.graph is None:
            return owner, self._step(layout, captured.ints, captured.weight, self.max_length)
        captured.graph.replay()
        assert captured.weighted is not None
        return owner, captured.weighted

    # ---- host buffers ----

    def _fill(self, layout: PackedLayout, plan: PackedPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's int64 and float32 buffers, filled (pinned on CUDA)."""
        ints_t, weight_t = self._host_buffers(layout)
        ints, weight = ints_t.numpy(), weight_t.numpy()
        idx, pool = plan.idx, plan.pool
        lengths = plan.lengths[idx]
        n, used = len(idx), int(lengths.sum())
        ids, positions, segment, cu, blocks, owner = layout.views(ints)
        np.concatenate([pool.ids[k] for k in idx], out=ids[:used], casting="unsafe")
        ids[used:] = self.pad_id
        cu[0] = 0
        np.cumsum(lengths, out=cu[1 : n + 1])
        cu[n + 1 :] = used  # unused rows: empty sequences at the end
        positions[:used] = np.arange(used, dtype=np.int64) - np.repeat(cu[:n], lengths)
        positions[used:] = 0
        segment[:used] = np.repeat(np.arange(n, dtype=np.int64), lengths)
        segment[used:] = layout.rows  # padding tokens pool into one more row, dropped
        blocks[:] = query_blocks(lengths, layout.blocks)
        owner[:n] = pool.owner[idx]
        owner[n:] = 0
        weight[:n] = pool.weight[idx]
        weight[n:] = 0.0  # unused rows add nothing to text 0
        return ints_t, weight_t

    def _host_buffers(self, layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if not self.on_cuda:
            return torch.empty(layout.size, dtype=torch.int64), torch.empty(layout.rows, dtype=torch.float32)
        if not self._slots:
            biggest = self.fixed_layout(self.tokens_of(self.token_budget))
            self._slots = [
                _Slot(
                    torch.empty(biggest.size, dtype=torch.int64, pin_memory=True),
                    torch.empty(biggest.rows, dtype=torch.float32, pin_memory=True),
                )
                for _ in range(STAGING_SLOTS)
            ]
        slot = self._slots[self._next_slot]
        if layout.size > slot.ints.numel() or layout.rows > slot.weight.numel():
            # bigger than a fixed layout: a sequence over the budget, or more rows than max_rows (no fixed shapes)
            return (
                torch.empty(layout.size, dtype=torch.int64, pin_memory=True),
                torch.empty(layout.rows, dtype=torch.float32, pin_memory=True),
            )
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        if slot.copied is not None:
            slot.copied.synchronize()  # the GPU has copied this slot's previous batch
            slot.copied = None
        self._filling = slot
        return slot.ints[: layout.size], slot.weight[: layout.rows]

    def _copied(self) -> None:
        """Marks the slot just filled as in flight: refilled only after the copies queued so far."""
        slot = self._filling
        if self.on_cuda and slot is not None:
            import torch

            # blocking: a thread that waits for it sleeps instead of spinning a core the parsers of an ingest need
            slot.copied = torch.cuda.Event(blocking=True)
            slot.copied.record()
        self._filling = None

    def _load(self, captured: _Captured, plan: PackedPlan) -> None:
        """The batch into a fixed layout's device buffers (what its graph reads)."""
        host_ints, host_weight = self._fill(captured.layout, plan)
        captured.ints.copy_(host_ints, non_blocking=True)
        captured.weight.copy_(host_weight, non_blocking=True)
        self._copied()

    def _to_device(self, ints: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        on_device = ints.to(self.device, non_blocking=True), weight.to(self.device, non_blocking=True)
        self._copied()
        return on_device

    # ---- the device step: forward and pooling, the same ops a graph captures ----

    def _step(self, layout: PackedLayout, ints: torch.Tensor, weight: torch.Tensor, max_length: int) -> torch.Tensor:
        """(layout.rows, hidden) float32: each row's pooled vector times its weight."""
        import torch

        ids, positions, segment, cu, blocks, _ = layout.views(ints)
        hidden = self.packed(ids, positions, cu.to(torch.int32), max_length, blocks)
        rows = layout.rows
        if self.pooling == "cls":
            pooled = hidden[cu[:-1].clamp(max=layout.tokens - 1)].float()
        elif self._segment_mean is not None:
            weighted: torch.Tensor = self._segment_mean(hidden, cu, weight)
            return weighted
        else:  # the mean of each segment, summed in float32 as sentence-transformers does; empty rows: 0
            summed = torch.zeros((rows + 1, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
            lengths = (cu[1:] - cu[:-1]).clamp(min=1).float()
            pooled = summed.index_add_(0, segment, hidden.float())[:rows] / lengths[:, None]
        return pooled * weight[:, None]

    # ---- warm-up and capture ----

    def warm_up(self, max_length: int, seconds: float, plans: Callable[[int, int], PackedPlan]) -> int:
        """Every padded token count up to the budget's, largest first, from ``plans(total, max_length)`` (a
        batch of ``total`` tokens in sequences of ``max_length``); then a batch of short sequences. With
        fixed shapes each count's layout is made, and on CUDA captured as a graph. Stops after ``seconds``;
        returns the number of batches run."""
        import torch

        self.max_length = max(self.max_length, max_length)
        started = time.perf_counter()
        step = self.token_multiple
        if step > 1:
            totals = [min(total, self.token_budget) for total in range(self.tokens_of(self.token_budget), 0, -step)]
        else:  # unpadded: any count may come; one full batch and a short one settle the kernels
            totals = [max(max_length, self.token_budget // max_length * max_length)]
        ran, pool = 0, None
        with self._lock, torch.inference_mode():
            for total in totals:
                plan = plans(total, max_length)
                if self.fixed_shapes and len(plan.idx) <= self.max_rows:
                    try:
                        pool = self._capture(plan, pool)
                    except RuntimeError as err:  # e.g. an op this torch cannot capture: slower, still right
                        _log.warning("embedding: no CUDA graphs, batches run eagerly: %s", err)
                        self.eager_only()
                        self._scratch_run(plan)
                else:
                    self._scratch_run(plan)
                ran += 1
                if time.perf_counter() - started > seconds:
                    return ran
            self._scratch_run(plans(min(64, self.token_budget), min(16, max_length)))
        return ran + 1

    def _scratch_run(self, plan: PackedPlan) -> None:
        import torch

        self._weighted(plan)
        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    def _capture(self, plan: PackedPlan, pool: Any) -> Any:
        """The fixed layout of ``plan``'s token count: its buffers, an eager run, and on CUDA its graph, kept
        only if its output matches the eager run's. Returns the graphs' shared memory pool."""
        import torch

        tokens = self.tokens_of(plan.tokens)
        layout = self.fixed_layout(tokens)
        captured = _Captured(
            layout,
            torch.zeros(layout.size, dtype=torch.int64, device=self.device),
            torch.zeros(layout.rows, dtype=torch.float32, device=self.device),
        )
        self._load(captured, plan)
        eager = self._step(layout, captured.ints, captured.weight, self.max_length)  # compiles, picks kernels
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # one memory pool for all the graphs: they run one at a time, and only their outputs stay live
            with torch.cuda.graph(graph, pool=pool):
                weighted = self._step(layout, captured.ints, captured.weight, self.max_length)
            graph.replay()
            rows = len(plan.idx)
            agreement = float(torch.nn.functional.cosine_similarity(weighted[:rows], eager[:rows], dim=1).min())
            if not agreement >= GRAPH_MIN_AGREEMENT:
                _log.warning("embedding: a CUDA graph disagrees with its eager run (cosine %.4f)", agreement)
                return pool
            captured.graph, captured.weighted = graph, weighted
            pool = graph.pool() if pool is None else pool
        self._captured[tokens] = captured
        return pool


def _triton_segment_mean() -> Any:
    """Mean pooling in one Triton kernel on CUDA, or None without Triton (torch's ops then)."""
    try:
        from knowledge.triton_kernels import segment_mean
    except ImportError:
        return None
    return segment_mean
