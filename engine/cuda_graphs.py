"""CUDA graphs for fixed-shape forward passes (pure decode, and fixed-width speculative verify).

A 7B decode step at batch 1 is ~500 small kernels; launched one by one from Python the GPU idles
between them. Capturing the whole forward once per batch size and replaying it removes that gap.

Interface (what engine/runner.py calls)::

    graphs = DecodeGraphs(runner, max_batch=runner.max_num_seqs)   # nothing captured yet
    hidden = graphs.run(input_ids, positions, meta)   # [T, H] hidden, or None = "run eager"
    out = graphs.run_with_logits(input_ids, positions, meta)   # (hidden, float32 logits of every row)

``run_with_logits`` also replays the LM head (and, with tensor parallelism, its vocabulary all-gather)
inside the graph, for steps that want logits for every row (a decode step's last tokens are all of its
rows; a verify step wants them all): the eager LM head is ~6 more launches per step, and the GPU idles
while the host issues them. Each graph size is captured once with the head and once without, on demand.

``run`` returns None when the step does not fit (wrong shape, batch above ``max_batch``, a context
longer than the captured block-table width); the runner then runs the model eagerly. The first
``run`` of a new batch size captures that size (warm-up + capture, ~0.1-1 s), later ones replay.

Shapes: ``queries_per_seq=1`` (default) serves ``meta.is_pure_decode`` steps. A second instance with
``queries_per_seq=1 + k`` serves chain verification (every sequence carries exactly 1 + k queries),
and one with ``tree=True`` serves Medusa trees (a static ``tree_mask`` buffer is refreshed each run).

Padding: a batch is replayed in the graph of its own exact size unless the runner exposes
``graph_pad_slot`` (a cache slot of a spare block that no sequence owns); then batches are padded up
to buckets (1, 2, 4, 8, 16, 24, 32, ... step 8), so at most ~max_batch/8 graphs exist. Padded rows
write their K/V to that slot and attend to it alone.

The captured metadata uses ``max_seq_len = runner.max_model_len``: the attention kernel fixes its
split-K count from it at capture time and reads each sequence's real length on the device, so one
graph is valid for every context up to max_model_len. Graphs share one memory pool. The returned
hidden (and logits) tensors are copies, so a caller may keep them across steps.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.attention.metadata import AttentionMetadata


class GraphableRunner(Protocol):
    """The part of engine.runner.ModelRunner the graphs use."""

    device: torch.device
    block_size: int
    max_model_len: int
    max_blocks_per_seq: int

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Eager forward over the paged cache -> hidden [T, H]."""
        ...


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch (and max_batch itself)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


@dataclass
class GraphCounters:
    """What a runner's forwards did: graph captures (and their seconds), replays, and eager forwards by
    shape. A capture or an eager forward inside a served window is a cost the profiled steady-state
    step does not have; the start-up warm-up and ``benchmarks/itl_gap_bench.py`` read these."""

    captures: int = 0
    capture_s: float = 0.0
    replays: int = 0
    eager: Counter[tuple[int, int, int]] = field(default_factory=Counter)  # (seqs, tokens, max q) -> n

    @property
    def eager_executes(self) -> int:
        return sum(self.eager.values())

    def reset(self) -> None:
        self.captures, self.capture_s, self.replays = 0, 0.0, 0
        self.eager.clear()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    hidden: torch.Tensor
    logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(
        self,
        runner: GraphableRunner,
        *,
        max_batch: int,
        queries_per_seq: int = 1,
        tree: bool = False,
        max_graphs: int = 64,
        counters: GraphCounters | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if queries_per_seq < 1:
            raise ValueError(f"queries_per_seq must be >= 1, got {queries_per_seq}")
        if runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {runner.device}")
        self.runner = runner
        self.max_batch = max_batch
        self.q = queries_per_seq
        self.tree = tree
        self.max_graphs = max_graphs
        self.pad_slot: int | None = getattr(runner, "graph_pad_slot", None)
        self.buckets = bucket_sizes(max_batch) if self.pad_slot is not None else None
        self._graphs: dict[tuple[int, bool], _Graph] = {}  # (graph batch, with logits)
        self._pool = torch.cuda.graph_pool_handle()
        self.counters = counters if counters is not None else GraphCounters()

    # -- shape logic --------------------------------------------------------------------------------
    def _graph_batch(self, batch: int) -> int:
        if self.buckets is None:
            return batch
        return next(b for b in self.buckets if b >= batch)

    def fits(self, meta: AttentionMetadata) -> bool:
        """Whether a step of this metadata can replay a graph (no device sync needed)."""
        batch = meta.num_seqs
        if batch < 1 or batch > self.max_batch:
            return False
        # all q_lens <= max_query_len and they sum to batch * q  =>  every sequence has exactly q
        if meta.max_query_len != self.q or meta.num_tokens != batch * self.q:
            return False
        if (meta.tree_mask is not None) != self.tree:
            return False
        if meta.max_seq_len > self.runner.max_model_len:
            return False
        if meta.block_tables.shape[1] > self.runner.max_blocks_per_seq:
            return False
        gb = self._graph_batch(batch)
        return any((gb, lg) in self._graphs for lg in (False, True)) or len(self._graphs) < self.max_graphs

    # -- capture ------------------------------------------------------------------------------------
    def _static(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev, q = self.runner.device, self.q
        tokens = batch * q
        bs = self.runner.block_size
        # Until the first real step fills them, every row points at slot `pad` of block pad // bs,
        # with length 1: a valid, harmless shape to capture (and the padding rows' steady state).
        pad = self.pad_slot if self.pad_slot is not None else 0
        tables = torch.full((batch, self.runner.max_blocks_per_seq), pad // bs, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.full((tokens,), pad, dtype=torch.int64, device=dev),
            query_start_loc=torch.arange(0, tokens + 1, q, dtype=torch.int32, device=dev),
            seq_lens=torch.full((batch,), q, dtype=torch.int32, device=dev),
            block_tables=tables,
            max_query_len=q,
            max_seq_len=self.runner.max_model_len,
            tree_mask=(
                torch.tril(torch.ones(batch, q, q, dtype=torch.bool, device=dev)) if self.tree else None
            ),
        )
        ids = torch.zeros(tokens, dtype=torch.int64, device=dev)
        positions = torch.arange(q, dtype=torch.int64, device=dev).repeat(batch)
        return ids, positions, meta

    @torch.inference_mode()
    def capture(self, batch: int, *, logits: bool = False) -> None:
        """Capture the graph for graph batch size ``batch``, with the LM head when ``logits``
        (idempotent)."""
        if (batch, logits) in self._graphs:
            return
        t0 = time.perf_counter()
        if self.pad_slot is None:
            # Without a spare slot the capture-time writes would land in a real block: point them at
            # slot 0 but first save and afterwards restore the block's contents.
            saved = self._save_block0()
        ids, positions, meta = self._static(batch)
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile Triton kernels and warm allocators outside the capture
                self._forward(ids, positions, meta, logits)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden, head = self._forward(ids, positions, meta, logits)
        torch.cuda.synchronize(self.runner.device)
        if self.pad_slot is None:
            self._restore_block0(saved)
        self._graphs[(batch, logits)] = _Graph(graph, ids, positions, meta, hidden, head)
        self.counters.captures += 1
        self.counters.capture_s += time.perf_counter() - t0

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, logits: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.runner.forward(ids, positions, meta)
        return hidden, self.runner.model.compute_logits(hidden) if logits else None

    def _save_block0(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        caches = getattr(self.runner, "kv_caches", [])
        return [(k[0].clone(), v[0].clone()) for k, v in caches]

    def _restore_block0(self, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for (k, v), (sk, sv) in zip(getattr(self.runner, "kv_caches", []), saved, strict=True):
            k[0].copy_(sk)
            v[0].copy_(sv)

    # -- replay -------------------------------------------------------------------------------------
    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor | None:
        """Replay the graph for this step's batch; None when the step does not fit any graph."""
        out = self._replay(input_ids, positions, meta, logits=False)
        return None if out is None else out[0]

    def run_with_logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden, float32 logits) of every row from one replay; None when the step does not fit."""
        out = self._replay(input_ids, positions, meta, logits=True)
        return None if out is None else (out[0], out[1])

    @torch.inference_mode()
    def _replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, *, logits: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if not self.fits(meta):
            return None
        batch = meta.num_seqs
        gb = self._graph_batch(batch)
        if (gb, logits) not in self._graphs:
            self.capture(gb, logits=logits)
        g = self._graphs[(gb, logits)]
        tokens = batch * self.q
        width = meta.block_tables.shape[1]
        g.input_ids[:tokens].copy_(input_ids, non_blocking=True)
        g.positions[:tokens].copy_(positions, non_blocking=True)
        g.meta.slot_mapping[:tokens].copy_(meta.slot_mapping, non_blocking=True)
        g.meta.seq_lens[:batch].copy_(meta.seq_lens, non_blocking=True)
        g.meta.block_tables[:batch, :width].copy_(meta.block_tables, non_blocking=True)
        if gb > batch:  # padding rows may hold a previous, larger batch's slots: point them back
            g.meta.slot_mapping[tokens:].fill_(self.pad_slot)
            g.meta.seq_lens[batch:].fill_(self.q)
            g.meta.block_tables[batch:].fill_(self.pad_slot // self.runner.block_size)
        if self.tree:
            assert meta.tree_mask is not None
            g.meta.tree_mask[:batch].copy_(meta.tree_mask, non_blocking=True)
        g.graph.replay()
        self.counters.replays += 1
        head = g.logits[:tokens].clone() if g.logits is not None else None
        return g.hidden[:tokens].clone(), head

    @property
    def captured_sizes(self) -> list[int]:
        return sorted({gb for gb, _ in self._graphs})
