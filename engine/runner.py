"""ModelRunner: one model shard plus its paged KV cache on one device.

The scheduler hands it block tables from kvbm and token chunks; the runner turns them into the
flattened tensors of one forward pass (``prepare``/``build_metadata``), runs the model (through CUDA
graphs for pure-decode batches when ``engine.cuda_graphs`` exists), and returns hidden states and
float32 logits for the rows asked. It knows nothing about requests, sampling or speculation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist

from engine.attention.metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.cuda_graphs import DecodeGraphs, GraphCounters
from engine.errors import CapacityError, ConfigError
from engine.memory import check_weights_fit
from engine.model.allreduce import enable_symm_mem, release_symm_mem
from engine.model.loader import build_model, resolve_device, resolve_dtype
from engine.presets import ModelSource, resolve_model

if TYPE_CHECKING:
    from engine.engine_config import EngineConfig

CPU_KV_BUDGET_BYTES = 4 << 30  # KV pool ceiling on CPU when num_blocks is not given
ACTIVATION_RESERVE_BYTES = 1 << 30  # left free on GPU for activations, logits and graph pools


@dataclass
class SeqBatchEntry:
    """One sequence's part of a step: ``token_ids`` are its query tokens, the first at position
    ``num_computed`` (tokens before it already hold KV); ``block_table`` covers all of them."""

    token_ids: Sequence[int]
    block_table: Sequence[int]
    num_computed: int


@runtime_checkable
class Runner(Protocol):
    """What the engine, its proposers and the step profiler need from a target: ``ModelRunner`` (one
    device) and ``engine.tp.TPExecutor`` (``tp`` ranks) both implement it, so no caller probes for
    optional methods."""

    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    num_blocks: int
    block_size: int
    max_model_len: int
    max_num_seqs: int
    tp_size: int

    def prepare(
        self, entries: Sequence[SeqBatchEntry]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]: ...

    def execute(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def index_tensor(self, rows: Sequence[int]) -> torch.Tensor: ...

    def logits_indices(self, meta: AttentionMetadata) -> torch.Tensor: ...

    def enable_verify_graphs(self, queries_per_seq: int, *, tree: bool = False) -> None: ...

    def has_verify_graphs(self, queries_per_seq: int, *, tree: bool = False) -> bool: ...

    def move_kv_slots(self, moves: Sequence[tuple[int, int]]) -> None: ...

    def fill_kv_random(self, seed: int) -> None: ...

    def close(self) -> None: ...


class ModelRunner:
    def __init__(
        self,
        source: ModelSource | str,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        cuda_graphs: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
        group: dist.ProcessGroup | None = None,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        attn_backend: str = "auto",
        weights: str = "auto",
    ) -> None:
        """Sizes arrive checked: from an ``EngineConfig`` (``from_config``) or, for a drafter, from its
        target's runner."""
        if isinstance(source, str):
            source = resolve_model(source, weights=weights)
        self.source = source
        self.config: ModelConfig = source.config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, source, self.device)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        if self.max_model_len > self.config.max_position_embeddings or self.max_model_len <= 0:
            raise ConfigError(
                f"max_model_len={self.max_model_len} must be in [1, {self.config.max_position_embeddings}] "
                f"(max_position_embeddings of {self.config.name!r})"
            )
        self.max_blocks_per_seq = -(-self.max_model_len // block_size)
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        check_weights_fit(self.config, self.dtype, self.device, tp_size)  # a clear error, not an OOM kill
        self.model = build_model(
            source,
            dtype=self.dtype,
            device=self.device,
            tp_rank=tp_rank,
            tp_size=tp_size,
            group=group,
            seed=seed,
            attn_backend=attn_backend,
        )
        self.num_kv_heads = self.model.num_kv_heads_per_rank
        # small all-reduces over symmetric memory where the GPUs allow it (collective: every rank)
        self.symm_mem = tp_size > 1 and group is not None and enable_symm_mem(group, self.device)
        self.num_blocks = self._decide_num_blocks(num_blocks, gpu_memory_utilization)
        # one spare block past the pool (never handed to kvbm): padded CUDA-graph rows write there
        shape = (self.num_blocks + 1, block_size, self.num_kv_heads, self.config.head_dim)
        self.graph_pad_slot = self.num_blocks * block_size
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.config.num_layers)
        ]
        self._staging: torch.Tensor | None = None  # pinned host buffer for step inputs (CUDA)
        self._staged: torch.cuda.Event | None = None
        self.graph_counters = GraphCounters()  # shared by every DecodeGraphs of this runner
        self.decode_graphs = (
            self._make_decode_graphs() if cuda_graphs and self.device.type == "cuda" else None
        )
        self._verify_widths: set[tuple[int, bool]] = set()  # (queries per sequence, tree) with graphs
        self._verify_graphs: dict[tuple[int, bool], Any] = {}
        self._every_row: torch.Tensor | None = None  # a rows tensor handed out that selects every row

    @classmethod
    def from_config(
        cls,
        source: ModelSource,
        config: EngineConfig,
        *,
        device: str | torch.device | None = None,
        tp_rank: int = 0,
        group: dist.ProcessGroup | None = None,
    ) -> ModelRunner:
        """The runner (one rank's shard when ``config.tp > 1``) of an engine built from ``config``;
        ``device`` overrides ``config.device`` with a tensor-parallel rank's own device."""
        return cls(
            source,
            dtype=config.dtype,
            device=config.device if device is None else device,
            num_blocks=config.num_gpu_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
            cuda_graphs=config.cuda_graphs,
            tp_rank=tp_rank,
            tp_size=config.tp,
            group=group,
            gpu_memory_utilization=config.gpu_memory_utilization,
            seed=config.seed,
        )

    # -- sizing -----------------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.config.num_layers * self.block_size * self.num_kv_heads * self.config.head_dim * elem

    def _decide_num_blocks(self, num_blocks: int | None, utilization: float) -> int:
        if num_blocks is not None:
            return num_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(utilization * total) - (total - free) - ACTIVATION_RESERVE_BYTES
            budget -= self.bytes_per_block  # the spare graph-padding block
        else:
            wanted = self.max_num_seqs * self.max_blocks_per_seq * self.bytes_per_block
            budget = min(wanted, CPU_KV_BUDGET_BYTES)
        blocks = budget // self.bytes_per_block
        if self.tp_size > 1:  # every rank must agree on the pool size: take the smallest
            t = torch.tensor([blocks], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
            blocks = int(t.item())
        if blocks < 1:
            raise CapacityError(
                f"no room for a KV cache on {self.device}: budget {budget / 2**30:.2f} GiB, "
                f"{self.bytes_per_block} bytes per block"
            )
        return int(blocks)

    def _make_decode_graphs(self) -> DecodeGraphs:
        return DecodeGraphs(self, max_batch=self.max_num_seqs, counters=self.graph_counters)

    # -- inputs -----------------------------------------------------------------------------------
    def _upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Host int arrays -> device tensors of the same dtype and shape. On CUDA: one pinned
        staging buffer reused across steps and ONE host-to-device copy per step (the previous
        copy is awaited before the buffer is overwritten); on CPU the arrays are used in place."""
        if self.device.type != "cuda":
            return [torch.from_numpy(a) for a in arrays]
        total = sum(a.size for a in arrays)
        if self._staging is None or self._staging.numel() < total:
            self._staging = torch.empty(
                max(total, 2 * (self._staging.numel() if self._staging is not None else 0)),
                dtype=torch.int64,
                pin_memory=True,
            )
        if self._staged is not None:
            self._staged.synchronize()
        host = self._staging.numpy()
        off = 0
        for a in arrays:
            host[off : off + a.size] = a.ravel()
            off += a.size
        dev = self._staging[:total].to(self.device, non_blocking=True)
        self._staged = torch.cuda.Event()
        self._staged.record()
        out, off = [], 0
        for a in arrays:
            t = dev[off : off + a.size].view(a.shape)
            out.append(t if a.dtype == np.int64 else t.to(torch.int32))
            off += a.size
        return out

    def build_metadata(self, seqs: Sequence[tuple[Sequence[int], int, int]]) -> AttentionMetadata:
        """Metadata for sequences given as (block_table, num_computed, num_query)."""
        host = self._build(seqs)
        return self._meta(host, self._upload(host[:4]))

    def _build(self, seqs: Sequence[tuple[Sequence[int], int, int]]) -> tuple[np.ndarray, ...]:
        """Host arrays (slots, query_start_loc, seq_lens, block_tables, positions) of one step."""
        bs = self.block_size
        num = len(seqs)
        if num == 0:
            raise ValueError("a step needs at least one sequence")
        q_lens = np.fromiter((s[2] for s in seqs), dtype=np.int64, count=num)
        computed = np.fromiter((s[1] for s in seqs), dtype=np.int64, count=num)
        seq_lens = computed + q_lens
        width = max(len(s[0]) for s in seqs)
        tables = np.zeros((num, max(width, 1)), dtype=np.int32)
        for i, (table, _, _) in enumerate(seqs):
            tables[i, : len(table)] = table
        if (-(-seq_lens // bs) > np.fromiter((len(s[0]) for s in seqs), dtype=np.int64, count=num)).any():
            bad = int(np.argmax(-(-seq_lens // bs) > [len(s[0]) for s in seqs]))
            raise ValueError(
                f"sequence {bad}: block table of {len(seqs[bad][0])} blocks cannot hold "
                f"{int(seq_lens[bad])} tokens"
            )
        starts = np.zeros(num + 1, dtype=np.int32)
        np.cumsum(q_lens, out=starts[1:])
        total = int(starts[-1])
        seq_of_tok = np.repeat(np.arange(num), q_lens)
        positions = np.arange(total, dtype=np.int64) - starts[:-1][seq_of_tok] + computed[seq_of_tok]
        slots = tables[seq_of_tok, positions // bs].astype(np.int64) * bs + positions % bs
        return slots, starts, seq_lens.astype(np.int32), tables, positions

    def _meta(self, host: tuple[np.ndarray, ...], dev: Sequence[torch.Tensor]) -> AttentionMetadata:
        starts, seq_lens = host[1], host[2]
        return AttentionMetadata(
            slot_mapping=dev[0],
            query_start_loc=dev[1],
            seq_lens=dev[2],
            block_tables=dev[3],
            max_query_len=int(np.diff(starts).max()),
            max_seq_len=int(seq_lens.max()),
        )

    def prepare(
        self, entries: Sequence[SeqBatchEntry]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids [T], positions [T], metadata) for one flattened step."""
        return self.upload_inputs(self.host_inputs(entries))

    def host_inputs(self, entries: Sequence[SeqBatchEntry]) -> tuple[np.ndarray, ...]:
        """A step's inputs as host arrays (slots, query_start_loc, seq_lens, block_tables, positions,
        input_ids): what a tensor-parallel worker needs to rebuild the step on its own device."""
        host = self._build([(e.block_table, e.num_computed, len(e.token_ids)) for e in entries])
        ids = np.fromiter((t for e in entries for t in e.token_ids), dtype=np.int64, count=len(host[4]))
        return (*host, ids)

    def upload_inputs(
        self, host: tuple[np.ndarray, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """``host_inputs``' arrays -> (input_ids, positions, metadata) on this runner's device."""
        dev = self._upload(host)
        return dev[5], dev[4], self._meta(host, dev)

    # -- execution --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Eager forward over the paged cache -> final-normed hidden [T, H] (what graphs capture)."""
        return self.model(input_ids, positions, self.kv_caches, meta)

    @torch.inference_mode()
    def execute(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one step; logits (float32) for the rows ``logits_indices`` (None = every row)."""
        hidden = None
        if self.decode_graphs is not None:
            graphs = self._graphs_for(meta)
            if graphs is not None and self.selects_every_row(logits_indices, input_ids):
                out = graphs.run_with_logits(input_ids, positions, meta)  # the LM head in the graph too
                if out is not None:
                    return out
            if graphs is not None:
                hidden = graphs.run(input_ids, positions, meta)  # None: no graph for this shape
        if hidden is None:
            self.graph_counters.eager[(meta.num_seqs, meta.num_tokens, meta.max_query_len)] += 1
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        rows = hidden if logits_indices is None else hidden.index_select(0, logits_indices)
        return hidden, self.model.compute_logits(rows)

    def enable_verify_graphs(self, queries_per_seq: int, *, tree: bool = False) -> None:
        """Let steps where every sequence carries exactly ``queries_per_seq`` queries (a speculative
        verify of 1 + k tokens, or a Medusa tree) replay CUDA graphs too. Opt-in per width, so prefill
        chunks of equal length never capture a graph per prompt length."""
        if self.decode_graphs is not None and queries_per_seq > 1:
            self._verify_widths.add((queries_per_seq, tree))

    def has_verify_graphs(self, queries_per_seq: int, *, tree: bool = False) -> bool:
        """Whether a step where every sequence carries ``queries_per_seq`` queries replays a graph."""
        return (queries_per_seq, tree) in self._verify_widths

    def _graphs_for(self, meta: AttentionMetadata) -> DecodeGraphs | None:
        if meta.is_pure_decode:
            return self.decode_graphs
        key = (meta.max_query_len, meta.tree_mask is not None)
        if key not in self._verify_widths or meta.num_tokens != meta.num_seqs * meta.max_query_len:
            return None
        graphs = self._verify_graphs.get(key)
        if graphs is None:
            graphs = DecodeGraphs(
                self, max_batch=self.max_num_seqs, queries_per_seq=key[0], tree=key[1],
                counters=self.graph_counters,
            )  # fmt: skip
            self._verify_graphs[key] = graphs
        return graphs

    def move_kv_slots(self, moves: Sequence[tuple[int, int]]) -> None:
        """Apply KV slot moves (Medusa's path compaction) to this runner's cache."""
        from engine.spec.medusa import move_kv_slots

        move_kv_slots(self.kv_caches, moves)

    def fill_kv_random(self, seed: int) -> None:
        """N(0, 1) in every cache tensor: the step profiler's stand-in for a prefill (attention reads
        what real data looks like; timing depends on shapes only)."""
        from engine.tp.worker import fill_kv_random

        fill_kv_random(self.kv_caches, seed, self.tp_rank)

    def close(self) -> None:
        """Release graphs and caches (a TP executor's close also stops its workers)."""
        self.decode_graphs = None
        self._verify_graphs.clear()
        self.kv_caches = []
        if self.symm_mem:
            release_symm_mem()

    def mark_every_row(self, rows: torch.Tensor | None) -> None:
        """Declare ``rows`` to select every row (a tensor-parallel worker is told so by rank 0, whose
        choice of graph, with or without the LM head, it must mirror: the collectives must match)."""
        if rows is not None:
            self._every_row = rows

    def index_tensor(self, rows: Sequence[int]) -> torch.Tensor:
        """Rows to take logits for, as a device tensor (a TPExecutor also keeps the host list)."""
        rows = list(rows)
        out = torch.tensor(rows, dtype=torch.long, device=self.device)
        if rows == list(range(len(rows))):
            self._every_row = out
        return out

    def logits_indices(self, meta: AttentionMetadata) -> torch.Tensor:
        """Rows of the last query token of each sequence."""
        out = (meta.query_start_loc[1:] - 1).long()
        if meta.num_tokens == meta.num_seqs:  # one query per sequence: its last rows are all rows
            self._every_row = out
        return out

    def selects_every_row(self, logits_indices: torch.Tensor | None, input_ids: torch.Tensor) -> bool:
        """Whether ``logits_indices`` is known (from the host, without a device sync) to be 0..T-1,
        so the LM head can run inside the step's CUDA graph."""
        if logits_indices is None:
            return True
        return logits_indices is self._every_row and logits_indices.numel() == input_ids.numel()
