"""The start-up warm-up steps every graph batch size through the engine's own step, for every method, and
leaves the engine as it found it: idle, every KV block (target and drafter) free, outputs unchanged."""

from __future__ import annotations

import pytest

from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.spec import SpecConfig
from engine.spec.medusa import default_tree
from engine.warmup import graph_counters, model_runners, warm_up

PROMPTS = [[256, *b"a b a b a b a b"], [256, *b"the quick brown fox"], [256, *b"x y z x y z x y z"]]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)

SPECS = {
    "none": lambda: None,
    "ngram": lambda: SpecConfig(method="ngram", k=3),
    "draft": lambda: SpecConfig(method="draft", k=2, draft_layers=1),
    "medusa": lambda: SpecConfig(method="medusa", k=2, tree=default_tree(2, num_nodes=4)),
}


def _engine(spec: SpecConfig | None) -> LLMEngine:
    return LLMEngine(
        EngineConfig("tiny", device="cpu", num_gpu_blocks=256, block_size=4, max_num_seqs=9, spec=spec)
    )


def _generate(engine: LLMEngine) -> dict[str, list[int]]:
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", list(p), GREEDY)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return done


@pytest.mark.parametrize("method", list(SPECS))
def test_warm_up_steps_every_bucket_and_leaves_engine_clean(method: str) -> None:
    cold = _generate(_engine(SPECS[method]()))
    engine = _engine(SPECS[method]())
    report = warm_up(engine, context=24)
    assert report.batch_sizes == [9, 8, 4, 2, 1]  # bucket_sizes(9), largest first
    assert report.skipped == []
    assert not engine.has_unfinished()
    for name, runner in model_runners(engine).items():
        assert name in ("target", "drafter")
        assert runner.graph_counters.eager_executes > 0  # on the CPU every forward is eager
    assert ("drafter" in model_runners(engine)) == (method == "draft")
    kv = engine.kv_manager
    assert kv.num_free_blocks == kv.num_blocks
    drafter_kv = getattr(engine.proposer, "kv", None)
    if drafter_kv is not None:
        assert drafter_kv.num_free_blocks == drafter_kv.num_blocks
    assert _generate(engine) == cold  # greedy outputs do not depend on a warm-up


def test_warm_up_records_the_batch_shapes_it_ran() -> None:
    engine = _engine(SpecConfig(method="ngram", k=3))
    warm_up(engine, context=24)
    shapes = graph_counters(engine)["target"].eager
    # each decode batch size verified full drafts (1 + k queries per sequence) and decoded without any
    for size in (9, 8, 4, 2, 1):
        assert shapes[(size, size * 4, 4)] >= 1, sorted(shapes)
        assert shapes[(size, size, 1)] >= 1, sorted(shapes)


def test_warm_up_skips_sizes_the_pool_cannot_hold() -> None:
    engine = LLMEngine(EngineConfig("tiny", device="cpu", num_gpu_blocks=40, block_size=4, max_num_seqs=9))
    report = warm_up(engine, context=24)
    assert report.skipped and min(report.skipped) > max(report.batch_sizes)
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_warm_up_refuses_a_busy_engine() -> None:
    engine = _engine(None)
    engine.add_request("r", [256, 1, 2], GREEDY)
    with pytest.raises(RuntimeError, match="idle engine"):
        warm_up(engine)
