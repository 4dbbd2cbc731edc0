"""Padded drafts (LLMEngine._pad_drafts): a sequence without a draft, or with a shorter one, verifies a
repeat of its last token after its draft so the batch keeps one verify width. Forced on CPU
(``pad_drafts=True``): output stays the target's (greedy, seeded sampling, speculate=False), and the
spec-decode counters count the proposer's drafts only, exactly as without padding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine import llm_engine
from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.presets import resolve_model
from engine.sampling import SamplingParams
from engine.spec import SpecConfig

BLOCK = 8
N_NEW = 24


@pytest.fixture
def v16(monkeypatch) -> None:
    """The tiny preset with a 16-token vocabulary: its greedy choice often repeats the last token, so a
    pad (a repeat of the last token) often equals the target's next token, and the test shows it is
    still never emitted."""
    base = resolve_model("tiny", weights="random")
    src = dataclasses.replace(base, config=base.config.replace(name="tiny-v16", vocab_size=16))
    monkeypatch.setattr(llm_engine, "resolve_model", lambda *a, **kw: src)


def _engine(spec: SpecConfig | None, pad: bool | None = None) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            "tiny-v16", device="cpu", num_gpu_blocks=256, block_size=BLOCK, spec=spec, pad_drafts=pad
        )
    )


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    out = []
    for n in (5, 9, 13, 20):
        base = rng.integers(0, 16, size=n).tolist()
        out.append(base + base[: n // 2])
    return out


def _params(i: int) -> SamplingParams:
    """Requests 0, 1 speculate greedily; 2 is greedy with speculate=False; 3 samples with a seed,
    speculate=False."""
    if i == 3:
        return SamplingParams(max_tokens=N_NEW, ignore_eos=True, temperature=1.0, seed=7, speculate=False)
    return SamplingParams(max_tokens=N_NEW, ignore_eos=True, speculate=i < 2)


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    for i, p in enumerate(_prompts()):
        engine.add_request(f"s{i}", p, _params(i))
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = list(o.token_ids)
    assert engine.scheduler.kv.num_free_blocks == 256
    return done


@pytest.mark.parametrize(
    "make", [lambda: SpecConfig(method="ngram", k=3), lambda: SpecConfig(method="draft", k=2, draft_layers=1)]
)
def test_padding_is_lossless(v16, make) -> None:
    plain = _run(_engine(None))
    padded = _engine(make(), pad=True)
    assert _run(padded) == plain
    st = padded.spec_stats
    assert st.num_pad_tokens > 0


def _mixed_width_decode_steps(engine: LLMEngine) -> int:
    """Forwards of the target whose sequences carried drafts of different widths and no prefill chunk
    (on the CPU every forward is eager, so the runner's counters see each step's shape)."""
    widest = 1 + engine.spec.k
    shapes = engine.runner.graph_counters.eager.items()
    return sum(n for (seqs, tokens, q), n in shapes if q <= widest and tokens != seqs * q)


@pytest.mark.parametrize(
    "make", [lambda: SpecConfig(method="ngram", k=3), lambda: SpecConfig(method="draft", k=2, draft_layers=1)]
)
def test_padding_leaves_no_mixed_width_decode_step(v16, make) -> None:
    """Shorter drafts (a lookup that found fewer tokens, a request near max_tokens) are padded at their
    tail, so a decode batch verifies one width, the shape a CUDA graph replays."""
    off, on = _engine(make(), pad=False), _engine(make(), pad=True)
    assert _run(off) == _run(on)
    assert _mixed_width_decode_steps(off) > 0
    assert _mixed_width_decode_steps(on) == 0


def test_counters_count_the_proposers_drafts_only(v16) -> None:
    """Pads are dummy positions: every counter (decode steps included, so tokens per step) equals the
    unpadded run's, although with a 16-token vocabulary many pads equal the target's next token."""
    spec = SpecConfig(method="draft", k=2, draft_layers=1)
    off, on = _engine(spec, pad=False), _engine(spec, pad=True)
    assert _run(off) == _run(on)
    a, b = off.spec_stats, on.spec_stats
    assert a.num_pad_tokens == 0 and b.num_pad_tokens > 0
    for name in (
        "num_decode_steps",
        "num_drafts",
        "num_draft_tokens",
        "num_accepted_tokens",
        "accepted_per_pos",
    ):
        assert getattr(b, name) == getattr(a, name), name


@pytest.mark.parametrize("graph_width", [None, 3, 4])
def test_auto_pads_only_where_a_verify_graph_replays(v16, graph_width) -> None:
    """pad_drafts=None pads only when the runner replays a graph for 1 + the drafts' width (k=2: 3);
    on CPU no width has one."""
    engine = _engine(SpecConfig(method="draft", k=2, draft_layers=1))
    if graph_width is not None:
        engine.runner.has_verify_graphs = lambda q, tree=False: q == graph_width
    _run(engine)
    assert (engine.spec_stats.num_pad_tokens > 0) == (graph_width == 3)


def test_pads_never_take_a_sequences_place(v16) -> None:
    """Pads that would not fit the step's token budget or the free KV blocks are not given (they would
    push a sequence out of the step or preempt one): the run stays as without padding."""
    spec = SpecConfig(method="draft", k=2, draft_layers=1)
    plain = _run(_engine(spec, pad=False))
    tight_budget = LLMEngine(
        EngineConfig(
            "tiny-v16",
            device="cpu",
            num_gpu_blocks=256,
            block_size=BLOCK,
            spec=spec,
            pad_drafts=True,
            max_num_batched_tokens=2 * 3 - 1,
        )
    )  # fmt: skip  (a padded step holds >= 2 sequences of 1 + 2 tokens)
    assert _run(tight_budget) == plain and tight_budget.spec_stats.num_pad_tokens == 0
    full_pool = _engine(spec, pad=True)
    full_pool.kv_manager = _NoFreeBlocks(full_pool.kv_manager)  # what _pad_drafts reads; kvbm itself runs
    assert _run(full_pool) == plain and full_pool.spec_stats.num_pad_tokens == 0


class _NoFreeBlocks:
    """A view of the engine's kvbm manager that reports a full pool."""

    def __init__(self, inner) -> None:
        self.inner = inner

    num_free_blocks = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_short_lookups_pad_up_to_the_graphed_width(v16) -> None:
    """Where only the 1 + k verify graph exists, a step whose lookups all found fewer than k tokens is
    padded to k (one graph replay) rather than left at its own, ungraphed width."""
    plain = _run(_engine(None))
    engine = _engine(SpecConfig(method="ngram", k=3))  # pad_drafts auto: only where a graph replays
    engine.runner.has_verify_graphs = lambda q, tree=False: q == 4
    assert _run(engine) == plain
    shapes = engine.runner.graph_counters.eager
    verify = {shape for shape in shapes if 1 < shape[2] <= 4}
    assert verify and all(q == 4 and tokens == seqs * 4 for seqs, tokens, q in verify), sorted(verify)
