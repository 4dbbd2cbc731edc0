"""Tensor parallelism on two or more GPUs: NCCL + the symmetric-memory all-reduce inside CUDA graphs
(decode and verify) give the same greedy tokens as tp = 1 in float32. Skipped below two GPUs."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA devices", allow_module_level=True)

from engine.llm import LLM  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.spec import SpecConfig  # noqa: E402

PROMPTS = [[256, *([7, 8, 9, 10] * 4)], [256, 65, 66, 67, 65, 66, 67, 65], [256, 1, 2, 3]]


def _generate(tp: int, spec: SpecConfig | None = None) -> tuple[list[list[int]], bool, int]:
    """(tokens, whether the symmetric-memory all-reduce was set up, number of verify steps)."""
    llm = LLM(
        "tiny", tp=tp, device="cuda", dtype="float32", weights="random", max_num_seqs=8, num_gpu_blocks=64,
        spec=spec,
    )  # fmt: skip
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
        symm = bool(getattr(llm.engine.runner, "symm_mem", False))
        stats = llm.engine.spec_stats
        return [o.token_ids for o in outs], symm, stats.num_drafts if stats is not None else 0
    finally:
        llm.engine.runner.close()


@pytest.mark.parametrize("spec", [None, SpecConfig(method="ngram", k=3)], ids=["decode", "ngram-verify"])
def test_tp2_gpu_equals_tp1(spec: SpecConfig | None) -> None:
    ref, _, _ = _generate(1, spec)
    got, symm, drafts = _generate(2, spec)
    assert got == ref
    assert symm, "the symmetric-memory all-reduce was not set up on this machine"
    assert spec is None or drafts > 0
