"""Tensor parallelism on CPU (gloo): greedy output with tp > 1 equals tp = 1 token for token in
float32, a tp that does not divide the heads is refused before any process starts, and a dead rank
ends the step with a clear error instead of a hang."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from engine.engine_config import EngineConfig
from engine.errors import ConfigError
from engine.llm import LLM
from engine.presets import ModelSource, resolve_model
from engine.runner import ModelRunner, SeqBatchEntry
from engine.sampling import SamplingParams
from engine.tp import SAFE_ENV, TPExecutor, TPWorkerError, check_tp, valid_tp_sizes

CPU = dict(device="cpu", dtype="float32")
PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 84, 80, 32, 116, 101, 115, 116, 33], [256, 1, 2, 3]]


def _generate(
    tp: int, model: str = "tiny", prompts=PROMPTS, n: int = 16, stats: list | None = None, **kw
) -> list[list[int]]:
    llm = LLM(model, tp=tp, max_num_seqs=8, num_gpu_blocks=kw.pop("num_gpu_blocks", 64), **CPU, **kw)
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
        if stats is not None:
            stats.append(llm.engine.spec_stats)
        return [o.token_ids for o in outs]
    finally:
        close = getattr(llm.engine.runner, "close", None)
        if close is not None:
            close()


def _greedy_runner(runner, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding straight through the ModelRunner interface (for sources LLM cannot name)."""
    table = list(range(-(-(len(prompt) + n) // runner.block_size)))
    toks, out = list(prompt), []
    ids, pos, meta = runner.prepare([SeqBatchEntry(toks, table, 0)])
    for _ in range(n):
        _, logits = runner.execute(ids, pos, meta, runner.logits_indices(meta))
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        ids, pos, meta = runner.prepare([SeqBatchEntry([nxt], table, len(toks))])
        toks.append(nxt)
    return out


# -- refusal (no processes started) -----------------------------------------------------------------
def test_smollm2_refuses_tp2_and_names_the_heads():
    config = resolve_model("smollm2-135m", weights="random").config
    assert (config.num_heads, config.num_kv_heads) == (9, 3)
    with pytest.raises(ConfigError, match=r"num_heads=9 is not divisible by tp=2") as err:
        check_tp(config, 2)
    assert "valid tp for this model: 1, 3" in str(err.value)
    check_tp(config, 3)


def test_kv_heads_replicate_when_fewer_than_ranks():
    tiny = resolve_model("tiny", weights="random").config  # 4 heads, 2 KV heads
    assert valid_tp_sizes(tiny, limit=8) == [1, 2, 4]
    vicuna = resolve_model("vicuna-7b", weights="random").config
    assert valid_tp_sizes(vicuna, limit=8) == [1, 2, 4, 8]


def test_engine_refuses_bad_tp_before_starting_workers():
    with pytest.raises(ConfigError, match="cannot run with tp=3"):
        LLM("tiny", tp=3, weights="random", **CPU)
    assert not dist.is_initialized()


def test_executor_sets_multicast_off():
    ex = TPExecutor(EngineConfig("tiny", tp=2, weights="random", num_gpu_blocks=16, **CPU))
    try:
        for key, value in SAFE_ENV.items():
            assert os.environ[key] == value
        assert len(ex.worker_pids) == 1 and ex.num_blocks == 16 and ex.config.name == "tiny"
    finally:
        ex.close()
    assert not dist.is_initialized()


# -- equality with tp = 1 ---------------------------------------------------------------------------
def test_tiny_tp2_greedy_equals_tp1():
    ref = _generate(1, weights="random")
    assert _generate(2, weights="random") == ref


def test_tiny_tp2_with_prompt_lookup_speculation_equals_tp1():
    """Verify steps (1 + k query tokens per sequence) through the executor stay lossless."""
    from engine.spec import SpecConfig

    prompts = [[256, *([7, 8, 9, 10] * 4)], [256, 65, 66, 67, 65, 66, 67, 65]]
    ref = _generate(1, prompts=prompts, n=20, weights="random")
    spec = SpecConfig(method="ngram", k=3)
    stats: list = []
    assert _generate(2, prompts=prompts, n=20, weights="random", spec=spec, stats=stats) == ref
    assert stats[0].num_drafts > 0  # verify steps really ran through the executor


def test_tiny_tp2_medusa_deep_paths_move_kv_on_every_rank():
    """Medusa heads run on rank 0; an accepted path off the first-child chain moves KV slots, and the
    move must reach every rank's cache shard (else later steps read stale K/V on the other ranks and
    the tokens diverge from tp = 1). An oracle proposer makes such paths certain."""
    from engine.llm_engine import LLMEngine
    from engine.spec import SpecConfig
    from tests.support.medusa_oracle import oracle_propose

    n = 24
    ref = _generate(1, n=n, weights="random")
    tree = [[0], [1], [2], [0, 0], [1, 0], [1, 1], [1, 1, 0], [1, 1, 1]]
    engine = LLMEngine(EngineConfig(
        "tiny", tp=2, spec=SpecConfig(method="medusa", k=3, tree=tree), weights="random",
        max_num_seqs=8, num_gpu_blocks=64, **CPU,
    ))  # fmt: skip
    try:
        truth = {f"q{i}": r for i, r in enumerate(ref)}
        plen = {f"q{i}": len(p) for i, p in enumerate(PROMPTS)}
        engine.proposer.propose = oracle_propose(engine.proposer, truth, plen, engine.config.vocab_size)
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"q{i}", p, SamplingParams(max_tokens=n, ignore_eos=True))
        done: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.token_ids)
        assert [done[f"q{i}"] for i in range(len(PROMPTS))] == ref
        assert engine.spec_stats.acceptance_given_draft > 1.5  # deep paths were accepted
    finally:
        engine.runner.close()


@pytest.mark.parametrize(
    "spec_kw",
    [dict(draft_model="tiny", draft_weights="random"), dict(draft_layers=1)],
    ids=["draft-model", "self-draft"],
)
def test_tiny_tp2_with_a_drafter_on_rank0_equals_tp1(spec_kw):
    """A drafter is a tp=1 runner on rank 0 beside the tensor-parallel target; a self-drafter (the
    target's first layers) reads them from the checkpoint, since rank 0 holds only its shard."""
    from engine.spec import SpecConfig

    ref = _generate(1, n=20, weights="random")
    spec = SpecConfig(method="draft", k=3, **spec_kw)
    stats: list = []
    assert _generate(2, n=20, weights="random", spec=spec, stats=stats) == ref
    assert stats[0].num_drafts > 0


@pytest.mark.slow
def test_tiny_tp4_replicated_kv_heads_equals_tp1():
    ref = _generate(1, weights="random")
    assert _generate(4, weights="random") == ref


def test_tp3_on_a_six_head_model_equals_tp1():
    base = resolve_model("tiny", weights="random")
    config = base.config.replace(name="tiny-6h", hidden_size=192, num_heads=6, num_kv_heads=3, head_dim=0)
    source = ModelSource(config, "random", None, "bytes", None)
    ref = _greedy_runner(ModelRunner(source, num_blocks=16, seed=3, **CPU), [5, 6, 7, 8, 9], 12)
    with TPExecutor(EngineConfig(config.name, tp=3, num_gpu_blocks=16, seed=3, **CPU), source) as ex:
        assert ex.runner.model.layers[0].self_attn.num_kv_heads == 1
        assert _greedy_runner(ex, [5, 6, 7, 8, 9], 12) == ref


@pytest.mark.slow
def test_smollm2_real_weights_tp3_equals_tp1(smollm2_source, spec_bench_chat_prompts, smollm2_tokenizer):
    prompts = [smollm2_tokenizer.encode(p) for p in spec_bench_chat_prompts[:3]]
    kw = dict(weights="real", num_gpu_blocks=256, prompts=prompts, n=24)
    ref = _generate(1, "smollm2-135m", **kw)
    assert _generate(3, "smollm2-135m", **kw) == ref


# -- failures ---------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_dead_rank_raises_clear_error_not_hang():
    ex = TPExecutor(EngineConfig("tiny", tp=2, weights="random", num_gpu_blocks=16, **CPU))
    (pid,) = ex.worker_pids
    ids, pos, meta = ex.prepare([SeqBatchEntry([1, 2, 3], [0], 0)])
    ex.execute(ids, pos, meta, None)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(TPWorkerError, match=r"rank 1 \(pid \d+\) died \(killed by signal SIGKILL\)"):
        for _ in range(50):  # the monitor may notice before this step or during it
            ex.execute(ids, pos, meta, None)
            time.sleep(0.05)
    assert not dist.is_initialized()
    with pytest.raises(TPWorkerError, match="died"):
        ex.execute(ids, pos, meta, None)
    # the process is free for a new group
    with TPExecutor(EngineConfig("tiny", tp=2, weights="random", num_gpu_blocks=16, **CPU)) as again:
        _, logits = again.execute(ids, pos, meta, None)
        assert logits.shape == (3, 320) and torch.isfinite(logits).all()


PARENT_SCRIPT = """
import sys, time
from engine.engine_config import EngineConfig
from engine.tp import TPExecutor

if __name__ == "__main__":
    config = EngineConfig("tiny", tp=2, weights="random", num_gpu_blocks=16, device="cpu", dtype="float32")
    ex = TPExecutor(config)
    print(ex.worker_pids[0], flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_workers_exit_when_rank0_process_is_killed(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "rank0.py"
    script.write_text(PARENT_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())
        assert _alive(worker)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), f"worker {worker} outlived its rank 0"
    finally:
        proc.kill()
