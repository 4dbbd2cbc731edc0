"""CUDA-graph replay gives the eager forward's result (GPU only)."""

from __future__ import annotations

import pytest
import torch

from engine.cuda_graphs import bucket_sizes

pytestmark = pytest.mark.gpu


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 24, 32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pad", [False, True])
def test_replay_matches_eager(pad):
    from engine.cuda_graphs import DecodeGraphs
    from engine.runner import ModelRunner

    runner = ModelRunner(
        "tiny", dtype="float16", device="cuda", num_blocks=64, cuda_graphs=False, weights="random"
    )
    # the runner keeps one spare block past the kvbm pool for padding rows; without it, graphs are
    # captured per exact batch size
    assert runner.graph_pad_slot == runner.num_blocks * runner.block_size
    if not pad:
        runner.graph_pad_slot = None
    graphs = DecodeGraphs(runner, max_batch=8)
    gen = torch.Generator().manual_seed(0)
    for k, v in runner.kv_caches:
        k.copy_(torch.randn(k.shape, generator=gen))
        v.copy_(torch.randn(v.shape, generator=gen))
    for batch, ctx in ((3, 40), (5, 17), (3, 90)):
        seqs = [(list(range(b * 7, b * 7 + 7)), ctx + b, 1) for b in range(batch)]
        meta = runner.build_metadata(seqs)
        ids = torch.randint(0, runner.config.vocab_size, (batch,), generator=gen).cuda()
        pos = meta.seq_lens.long() - 1
        before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        eager = runner.forward(ids, pos, meta)
        after_eager = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        for (k, v), (k0, v0) in zip(runner.kv_caches, before, strict=True):  # undo eager's KV writes
            k.copy_(k0)
            v.copy_(v0)
        replay = graphs.run(ids, pos, meta)
        assert replay is not None
        # fp16; the graph's attention splits the KV range differently (split count fixed from
        # max_model_len at capture), so rounding differs slightly from the eager run
        torch.testing.assert_close(replay, eager, rtol=2e-2, atol=2e-2)
        # the replay leaves the real blocks as the eager step does (padding writes only the spare block)
        spare = runner.num_blocks
        for (k, v), (ke, ve) in zip(runner.kv_caches, after_eager, strict=True):
            torch.testing.assert_close(k[:spare], ke[:spare], rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(v[:spare], ve[:spare], rtol=2e-2, atol=2e-2)
    assert graphs.captured_sizes == ([4, 8] if pad else [3, 5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lm_head_inside_the_graph_matches_eager():
    """When the rows asked for are every row (a decode step's last tokens), execute() replays the
    graph that includes the LM head; other row choices replay the graph without it."""
    from engine.runner import ModelRunner

    runner = ModelRunner("tiny", dtype="float32", device="cuda", num_blocks=64, weights="random")
    gen = torch.Generator().manual_seed(1)
    for k, v in runner.kv_caches:
        k.copy_(torch.randn(k.shape, generator=gen))
        v.copy_(torch.randn(v.shape, generator=gen))
    seqs = [(list(range(b * 7, b * 7 + 7)), 30 + b, 1) for b in range(3)]
    meta = runner.build_metadata(seqs)
    ids = torch.randint(0, runner.config.vocab_size, (3,), generator=gen).cuda()
    pos = meta.seq_lens.long() - 1
    eager = runner.model.compute_logits(runner.forward(ids, pos, meta))
    _, in_graph = runner.execute(ids, pos, meta, runner.logits_indices(meta))
    torch.testing.assert_close(in_graph, eager, rtol=1e-4, atol=1e-4)
    _, one_row = runner.execute(ids, pos, meta, runner.index_tensor([2]))
    torch.testing.assert_close(one_row, eager[2:], rtol=1e-4, atol=1e-4)
    assert sorted(runner.decode_graphs._graphs) == [(4, False), (4, True)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_partial_draft_coverage_replays_the_verify_graph():
    """One request drafts, the other has speculate=False: the engine pads the latter (pad_drafts
    auto), so the mixed batch replays the 1 + k verify graph; greedy output equals plain decoding."""
    from engine.engine_config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling import SamplingParams
    from engine.spec import SpecConfig

    def run(spec):
        engine = LLMEngine(
            EngineConfig(
                "tiny", dtype="float32", device="cuda", num_gpu_blocks=64, weights="random", spec=spec
            )
        )
        for i in range(2):
            params = SamplingParams(max_tokens=12, ignore_eos=True, speculate=i == 0)
            engine.add_request(f"r{i}", list(range(3 + i, 20 + i)), params)
        out = {}
        while engine.has_unfinished():
            out.update({o.request_id: list(o.token_ids) for o in engine.step() if o.finished})
        return engine, out

    engine, padded = run(SpecConfig(method="draft", k=2, draft_layers=1))
    assert padded == run(None)[1]
    assert engine.spec_stats.num_pad_tokens > 0
    assert engine.runner._verify_graphs[(3, False)].captured_sizes  # the verify graph did replay


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_after_warm_up_serving_captures_nothing_and_decodes_in_graphs(method):
    """engine serve's warm-up steps every batch bucket and width first; then a run whose drafts differ in
    width (requests ending at different max_tokens, one with speculate=False, lookups finding fewer
    tokens) captures no target graph and runs no target decode step eagerly (every decode batch is
    padded to one width), and its greedy output equals plain decoding."""
    from engine.engine_config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling import SamplingParams
    from engine.spec import SpecConfig
    from engine.warmup import warm_up

    def run(spec):
        config = EngineConfig(
            "tiny", dtype="float32", device="cuda", num_gpu_blocks=256, max_num_seqs=4, weights="random",
            spec=spec,
        )  # fmt: skip
        engine = LLMEngine(config)
        if spec is not None:
            assert warm_up(engine, context=32).batch_sizes == [4, 2, 1]
        engine.runner.graph_counters.reset()
        for i in range(4):
            params = SamplingParams(max_tokens=9 + 3 * i, ignore_eos=True, speculate=i != 1)
            engine.add_request(f"r{i}", [5, 6, 7, 8] * 4 + list(range(3 + i, 9 + i)), params)
        out = {}
        while engine.has_unfinished():
            out.update({o.request_id: list(o.token_ids) for o in engine.step() if o.finished})
        return engine, out

    spec = (
        SpecConfig(method="ngram", k=3)
        if method == "ngram"
        else SpecConfig(method="draft", k=2, draft_layers=1)
    )
    engine, out = run(spec)
    assert out == run(None)[1]
    counters = engine.runner.graph_counters
    assert counters.captures == 0 and counters.replays > 0
    decode_eager = {shape: n for shape, n in counters.eager.items() if shape[2] <= 1 + spec.k}
    assert not decode_eager, decode_eager  # only the prompts' prefill step ran eagerly
