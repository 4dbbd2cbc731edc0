"""Tensor parallelism on two or more GPUs: NCCL, and the one-shot symmetric-memory all-reduce, inside
CUDA graphs (decode and verify) give the same greedy tokens as tp = 1 in float32. Skipped below two
GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA devices", allow_module_level=True)

from engine.llm import LLM  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.spec import SpecConfig  # noqa: E402

PROMPTS = [[256, *([7, 8, 9, 10] * 4)], [256, 65, 66, 67, 65, 66, 67, 65], [256, 1, 2, 3]]
REPO = Path(__file__).resolve().parents[3]


def _generate(tp: int, spec: SpecConfig | None = None) -> tuple[list[list[int]], bool, int]:
    """(tokens, whether the one-shot all-reduce was set up, number of verify steps)."""
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
    got, _, drafts = _generate(2, spec)
    assert got == ref
    assert spec is None or drafts > 0


def test_tp2_oneshot_allreduce_equals_tp1() -> None:
    """In a fresh process (symmetric memory serves only a process's first group, engine.model.allreduce)."""
    ref, _, _ = _generate(1, SpecConfig(method="ngram", k=3))
    code = (
        "import json\nfrom tests.engine.gpu.test_tp_gpu import _generate\n"
        "from engine.spec import SpecConfig\n"
        "if __name__ == '__main__':\n    print(json.dumps(_generate(2, SpecConfig(method='ngram', k=3))))"
    )
    env = {**os.environ, "SPECPLAN_TP_ALLREDUCE": "oneshot", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got, symm, drafts = json.loads(out.stdout.strip().splitlines()[-1])
    assert symm, "the one-shot all-reduce was not set up (no symmetric memory on these GPUs?)"
    assert got == ref and drafts > 0
