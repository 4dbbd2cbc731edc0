"""Tensor parallelism for the embedded engine: one process per device, started by the engine.

``TPExecutor(engine_config)`` (also ``build_tp_runner``, the hook LLMEngine calls when
``engine_config.tp > 1``) behaves like a :class:`engine.runner.ModelRunner`. Rank 0 is the caller's
process: it owns scheduling, kvbm and sampling and broadcasts each step's batch; ranks 1..tp-1 are spawned
(``torch.multiprocessing``, spawn start method), replay each step on their shard of the weights and of
the paged KV cache (one kvbm block table serves all ranks), and join its all-reduces. NCCL on GPUs,
gloo on CPU. The layers are Megatron-style (``engine.model.parallel``): column-parallel fused QKV and
gate/up, row-parallel o/down with one all-reduce each, vocabulary-parallel embedding and LM head. KV
heads split across ranks, or are replicated when there are fewer KV heads than ranks; a tp that does
not divide the heads is refused before any process starts (``check_tp``).

Scripts that build a tensor-parallel engine at import time must guard it with
``if __name__ == "__main__":`` (spawned workers import the main module, as with any spawn-based
multiprocessing).

Speculative decoding with tp > 1: the target model runs tensor-parallel; the drafter runs on rank 0
alone. A draft model (tens to hundreds of millions of parameters) is a tp=1 ``ModelRunner`` on rank 0's
device: its step is launch-bound, so splitting it would add two all-reduces per layer for no saved
time, and rank 0 already holds the tokens it drafts from. Medusa heads read the target's final hidden
state, which every rank holds whole after the last all-reduce, so they also run on rank 0; the one
thing that touches every rank is the KV compaction after a tree walk, which ``TPExecutor.move_kv_slots``
applies on all shards. Prompt lookup (ngram) needs no model. A self-drafter (the target's first layers)
reads those layers from the checkpoint: rank 0's copy of the target is only a shard.

Every process the engine starts runs with NVLink multicast off (``engine.tp.env``).
"""

from engine.tp.env import SAFE_ENV, apply_safe_env
from engine.tp.executor import TPExecutor, TPWorkerError, build_tp_runner
from engine.tp.sizes import check_tp, valid_tp_sizes

__all__ = [
    "SAFE_ENV",
    "TPExecutor",
    "TPWorkerError",
    "apply_safe_env",
    "build_tp_runner",
    "check_tp",
    "valid_tp_sizes",
]
