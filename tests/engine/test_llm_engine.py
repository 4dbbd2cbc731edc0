"""LLMEngine on the tiny random-weight preset: batching, chunked prefill, preemption, sampling,
stop conditions, abort and input validation (fast; the real-model checks are in test_smollm2_greedy)."""

from __future__ import annotations

import pytest

from engine.engine_config import EngineConfig
from engine.errors import RequestError
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams

PROMPTS = [
    [256, *b"the quick brown fox jumps over the lazy dog"],
    [256, *b"hello"],
    [256, *b"a b a b a b a b a b"],
    [256, *b"speculative decoding verifies drafts in one forward pass" * 2],
    [256, *b"x"],
]


def make_engine(**kw) -> LLMEngine:
    kw.setdefault("device", "cpu")
    kw.setdefault("num_gpu_blocks", 256)
    kw.setdefault("block_size", 4)
    return LLMEngine(EngineConfig("tiny", **kw))


def run(engine: LLMEngine, prompts, params) -> dict[str, list[int]]:
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
        engine.add_request(f"r{i}", list(p), sp)
    done = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        assert steps < 10_000
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks  # no leaked blocks
    return {k: v.token_ids for k, v in done.items()}


GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def alone() -> list[list[int]]:
    outs = []
    for p in PROMPTS:
        outs.append(run(make_engine(), [p], GREEDY)["r0"])
    return outs


def test_batched_equals_alone(alone):
    batched = run(make_engine(), PROMPTS, GREEDY)
    assert [batched[f"r{i}"] for i in range(len(PROMPTS))] == alone
    assert all(len(o) == 24 for o in alone)


def test_chunked_prefill_equals_alone(alone):
    out = run(make_engine(max_num_batched_tokens=7), PROMPTS, GREEDY)
    assert [out[f"r{i}"] for i in range(len(PROMPTS))] == alone


def test_preemption_keeps_output_and_frees_blocks(alone):
    engine = make_engine(num_gpu_blocks=40, enable_prefix_caching=False)
    out = run(engine, PROMPTS, GREEDY)
    assert engine.num_preemptions > 0
    assert [out[f"r{i}"] for i in range(len(PROMPTS))] == alone
    assert not any(engine.kv_manager.has_sequence(f"r{i}") for i in range(len(PROMPTS)))


def test_prefix_cache_reuse_keeps_output(alone):
    engine = make_engine()
    first = run(engine, [PROMPTS[3]], GREEDY)["r0"]
    again = run(engine, [PROMPTS[3]], GREEDY)["r0"]  # reuses the cached prompt blocks
    assert first == again == alone[3]


def test_seeded_sampling_is_reproducible_and_batch_independent():
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    solo = run(make_engine(), [PROMPTS[0]], sp)["r0"]
    others = [SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2)]
    mixed = run(make_engine(), [PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others[0], sp, others[1]])["r1"]
    assert solo == mixed
    different = run(make_engine(), [PROMPTS[0]], SamplingParams(max_tokens=16, temperature=0.9, seed=99))[
        "r0"
    ]
    assert different != solo


def test_stop_token_and_max_tokens(alone):
    target = alone[0][5]
    engine = make_engine()
    engine.add_request(
        "s", PROMPTS[0], SamplingParams(max_tokens=24, stop_token_ids=[target], ignore_eos=True)
    )
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    (out,) = outs
    first = alone[0].index(target)
    assert out.token_ids == alone[0][: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target
    assert len(out.token_times) == len(out.token_ids)
    short = run(make_engine(), [PROMPTS[0]], SamplingParams(max_tokens=3, ignore_eos=True))["r0"]
    assert short == alone[0][:3]


def test_eos_stops_unless_ignored(alone):
    eos = alone[1][4]
    engine = make_engine()
    engine.tokenizer.eos_token_ids = (eos,)
    out = run(engine, [PROMPTS[1]], SamplingParams(max_tokens=24))["r0"]
    assert out == alone[1][: alone[1].index(eos) + 1]


def test_stop_string():
    engine = make_engine()
    text = engine.tokenizer.decode(run(engine, [PROMPTS[0]], GREEDY)["r0"])
    stop = text[6:8]
    if not stop or stop not in text:
        pytest.skip("random tiny model produced no decodable text")
    out = run(make_engine(), [PROMPTS[0]], SamplingParams(max_tokens=24, stop=[stop], ignore_eos=True))["r0"]
    assert stop in engine.tokenizer.decode(out)
    assert stop not in engine.tokenizer.decode(out[:-1])


def test_abort_frees_blocks_at_once():
    engine = make_engine()
    engine.add_request("a", PROMPTS[0], GREEDY)
    engine.add_request("b", PROMPTS[1], GREEDY)
    engine.step()
    assert engine.kv_manager.has_sequence("a")
    engine.abort("a")
    assert not engine.kv_manager.has_sequence("a")
    engine.abort("a")  # unknown / finished ids are ignored
    while engine.has_unfinished():
        engine.step()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_more_requests_than_slots():
    engine = make_engine(max_num_seqs=2)
    out = run(engine, PROMPTS, SamplingParams(max_tokens=4, ignore_eos=True))
    assert sorted(out) == [f"r{i}" for i in range(len(PROMPTS))]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"speculate": "no"}, "speculate"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kwargs).validate()


def test_bad_requests_are_rejected():
    engine = make_engine(max_model_len=64)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(RequestError, match=r"prompt_token_ids\[1\]=999"):
        engine.add_request("a", [1, 999], GREEDY)
    with pytest.raises(RequestError, match="max_model_len"):
        engine.add_request("a", [1] * 64, GREEDY)
    with pytest.raises(RequestError, match="request_id"):
        engine.add_request("", [1], GREEDY)
    engine.add_request("a", [1, 2], GREEDY)
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("a", [1, 2], GREEDY)
    small = make_engine(num_gpu_blocks=2)
    with pytest.raises(RequestError, match="KV blocks"):
        small.add_request("big", [1] * 20, GREEDY)


def test_ngram_speculation_is_lossless(alone):
    from engine.spec import SpecConfig

    engine = make_engine(spec=SpecConfig(method="ngram", k=3))
    out = run(engine, PROMPTS, GREEDY)
    assert [out[f"r{i}"] for i in range(len(PROMPTS))] == alone
    stats = engine.spec_stats
    assert stats is not None and stats.num_drafts > 0
    # every output token after the first comes from a decode step: 1 + accepted per step
    assert stats.num_decode_steps + stats.num_accepted_tokens == sum(len(o) - 1 for o in alone)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculation_switched_off_per_request_in_a_mixed_batch(alone, method):
    """Requests with ``speculate=False`` get no drafts while their batch-mates do; all stay lossless."""
    from engine.spec import SpecConfig

    spec = (
        SpecConfig(method="ngram", k=3)
        if method == "ngram"
        else SpecConfig(method="draft", k=3, draft_layers=1)
    )
    engine = make_engine(spec=spec)
    drafted: set[str] = set()
    propose = engine.proposer.propose

    def recording(seqs, k):  # noqa: ANN001, ANN202
        out = propose(seqs, k)
        drafted.update(s.seq_id for s, p in zip(seqs, out, strict=True) if p)
        return out

    engine.proposer.propose = recording
    off = SamplingParams(max_tokens=24, ignore_eos=True, speculate=False)
    params = [GREEDY if i % 2 == 0 else off for i in range(len(PROMPTS))]
    out = run(engine, PROMPTS, params)
    assert [out[f"r{i}"] for i in range(len(PROMPTS))] == alone
    assert drafted and all(int(rid[1:]) % 2 == 0 for rid in drafted)  # only the speculating ones


def test_ngram_speculation_with_preemption_is_lossless(alone):
    from engine.spec import SpecConfig

    # Whether a given pool size preempts depends on how far drafts run ahead; several tight pools
    # make sure preemption happens, and every one of them must stay lossless.
    preemptions = 0
    for num_blocks in (37, 48, 56):
        engine = make_engine(
            num_gpu_blocks=num_blocks, enable_prefix_caching=False, spec=SpecConfig(method="ngram", k=4)
        )
        out = run(engine, PROMPTS, GREEDY)
        assert [out[f"r{i}"] for i in range(len(PROMPTS))] == alone, num_blocks
        preemptions += engine.num_preemptions
    assert preemptions > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_spec_schedule_picks_k_by_running_batch_and_stays_lossless(alone, method):
    """k by running batch size ([[first, last, k], ...]): 5 requests at once draft k=3 (outside every
    range), 3-4 running 1 token, 1-2 running none; the output is the plain greedy one."""
    from engine.spec import SpecConfig

    extra = {"draft_layers": 1} if method == "draft" else {}
    spec = SpecConfig(method=method, k=3, schedule=[[3, 4, 1], [1, 2, 0]], **extra)
    engine = make_engine(spec=spec)
    budgets: dict[int, set[int]] = {}
    propose = engine.proposer.propose

    def recording(seqs, k):  # noqa: ANN001, ANN202
        budgets.setdefault(len(engine.scheduler.running), set()).update(k)
        return propose(seqs, k)

    engine.proposer.propose = recording
    out = run(engine, PROMPTS, GREEDY)
    assert [out[f"r{i}"] for i in range(len(PROMPTS))] == alone
    assert 3 in budgets[5]  # budgets below k only where max_tokens leaves less room
    assert budgets[3] | budgets[4] <= {0, 1} and 1 in budgets[3] | budgets[4]
    assert budgets.get(1, {0}) | budgets.get(2, {0}) == {0}


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        ([[1, 4, 5]], r"0 <= k <= 3"),
        ([[4, 1, 2]], r"1 <= first <= last"),
        ([[1, 4, 2], [4, 8, 1]], r"overlap"),
        ([[1, 4]], r"\[first, last, k\]"),
        ("1-4:2", r"non-empty list"),
    ],
)
def test_bad_spec_schedule_names_the_entry(schedule, match):
    from engine.errors import ConfigError
    from engine.spec import SpecConfig

    with pytest.raises(ConfigError, match=match):
        SpecConfig(method="ngram", k=3, schedule=schedule)
