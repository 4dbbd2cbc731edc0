"""The planner's KV bound against a real vLLM (CPU): without speculation, its max concurrency is the
largest at which vLLM does not preempt, exactly, on both sides of a block boundary.

A small pool (16 blocks of 32 tokens, one of them vLLM's null block) keeps it to a few minutes: one
wave of distinct prompts in a single request (so all peak together), ignore_eos, preemptions from
``vllm:num_preemptions_total``. The full table (ngram too) is benchmarks/kv_capacity_vllm.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.kv_capacity_vllm import Probe, cache_config
from planner.plan import Planner
from planner.synthetic import synthetic_profile
from profiler.backends.vllm import VllmLaunch, VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BLOCKS, BLOCK_SIZE = 16, 32


@pytest.fixture(scope="module")
def probe(smollm2_hf_dir: Path):
    from transformers import AutoTokenizer

    python = REPO / "V" / "bin" / "python"
    launch = VllmLaunch(
        model=str(smollm2_hf_dir), max_num_seqs=64, max_model_len=256, python=str(python),
        extra_args=["--num-gpu-blocks-override", str(BLOCKS), "--block-size", str(BLOCK_SIZE),
                    "--no-enable-prefix-caching", "--enforce-eager"],
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )  # fmt: skip
    server = VllmServer(launch, log_path=REPO / "build" / "vllm_kv_capacity_test.log", cwd=REPO)
    server.start()
    try:
        server.wait_healthy(1200)
        yield Probe(server.base_url, AutoTokenizer.from_pretrained(smollm2_hf_dir), "none", 0)
    finally:
        server.stop()


def vllm_planner() -> Planner:
    prof = synthetic_profile()
    meta = prof.metadata.model_copy(
        update={"backend": "vllm", "block_size": BLOCK_SIZE, "kv_capacity_blocks_by_tp": {1: BLOCKS}}
    )
    return Planner(prof.model_copy(update={"metadata": meta}), "vllm-cpu")


def test_the_server_uses_the_pool_it_was_given(probe: Probe) -> None:
    info = cache_config(probe.metrics())
    assert int(info["block_size"]) == BLOCK_SIZE and int(info["num_gpu_blocks"]) == BLOCKS


# isl + osl - 1 = 64 | 69 slots: 2 | 3 blocks per sequence, the 3rd one needed 5 steps before the end.
# (At 65 slots the 3rd block is needed only at the very last step: a request that joined the burst one
# step late has not reached it when the others finish, so vLLM need not preempt; RESULTS.md shows it.)
@pytest.mark.parametrize(("isl", "osl"), [(20, 45), (20, 50)])
def test_k0_max_concurrency_is_where_vllm_starts_to_preempt(probe: Probe, isl: int, osl: int) -> None:
    kv = vllm_planner().kv_bound(1, 0, isl + osl)
    assert kv.model == "vllm"
    ok, _, _ = probe.run(isl, osl, kv.max_concurrency, 1)
    over, _, _ = probe.run(isl, osl, kv.max_concurrency + 1, 1)
    assert (ok.failed, over.failed) == (0, 0)
    assert ok.preemptions == 0, f"vLLM preempted at the planned {kv.max_concurrency}"
    assert over.preemptions > 0, f"vLLM ran {kv.max_concurrency + 1} without preempting"
