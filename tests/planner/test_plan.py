"""plan() against a known analytic cost model: the planner must pick what the closed form says is best."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kvbm import capacity
from planner.plan import PlanInputError, Planner
from planner.render import render_plan
from planner.synthetic import AnalyticModel, synthetic_profile

M = AnalyticModel()


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner(synthetic_profile(M), "analytic")


def analytic_ranking(planner: Planner, itl_ms: float, isl: int, osl: int) -> list[tuple[float, tuple, int]]:
    """(throughput/GPU, config, c) of every config at its best feasible integer c, by the closed form.

    Searches the same measured concurrency range the profile covers (the planner never extrapolates
    concurrency) and the same KV bound (kvbm.capacity at the peak context with k lookahead).
    """
    ctx, peak = isl + osl / 2, isl + osl
    out = []
    for (tp, method, k), surf in planner.surfaces.decode.items():
        lo, hi = surf.concurrency_bounds(ctx)
        c_kv = planner.kv_bound(tp, k, peak, method, isl).max_concurrency
        best = None
        for c in range(lo, min(hi, c_kv) + 1):
            if M.served_itl_ms(tp, method, k, c, isl, osl) <= itl_ms:
                thr = M.served_throughput_per_gpu(tp, method, k, c, isl, osl)
                if best is None or thr >= best[0]:
                    best = (thr, (tp, method, k), c)
        if best:
            out.append(best)
    return sorted(out, reverse=True)


@pytest.mark.parametrize("itl_ms", [4.0, 6.0, 8.0, 12.0, 20.0, 30.0, 60.0])
@pytest.mark.parametrize(("isl", "osl"), [(512, 256), (256, 128), (1024, 512)])
def test_picks_the_analytic_optimum(planner: Planner, itl_ms: float, isl: int, osl: int) -> None:
    ranking = analytic_ranking(planner, itl_ms, isl, osl)
    res = planner.plan(itl_ms, isl=isl, osl=osl)
    assert res.feasible == bool(ranking)
    if not ranking:
        return
    ch = res.choice
    assert ch is not None
    best_thr, best_cfg, best_c = ranking[0]
    margin = (best_thr - ranking[1][0]) / best_thr if len(ranking) > 1 else 1.0
    chosen_true_thr = next(t for t, cfg, _ in ranking if cfg == (ch.tp, ch.method, ch.k))
    if margin > 0.03:  # a clear winner must be found exactly
        assert (ch.tp, ch.method, ch.k) == best_cfg
        assert abs(ch.max_concurrency - best_c) <= max(2, 0.05 * best_c)
    # in a near-tie the choice must still be within interpolation error of the optimum
    assert chosen_true_thr >= 0.97 * best_thr
    # the prediction itself is close to the closed form at the chosen point
    true_itl = M.served_itl_ms(ch.tp, ch.method, ch.k, ch.max_concurrency, isl, osl)
    assert ch.predicted.itl_ms == pytest.approx(true_itl, rel=0.03)
    assert ch.predicted.itl_ms <= itl_ms


def test_alternatives_are_the_next_best_and_distinct(planner: Planner) -> None:
    res = planner.plan(15.0, isl=512, osl=256)
    configs = [(a.tp, a.method, a.k) for a in [res.choice, *res.alternatives]]
    assert len(res.alternatives) == 3
    assert len(set(configs)) == 4
    thr = [a.predicted.throughput_per_gpu for a in [res.choice, *res.alternatives]]
    assert thr == sorted(thr, reverse=True)


def test_infeasible_reports_lowest_itl_and_its_config(planner: Planner) -> None:
    res = planner.plan(1.0, isl=512, osl=256)
    assert not res.feasible
    ctx = 512 + 128
    truth = min(
        (M.served_itl_ms(tp, m, k, surf.concurrency_bounds(ctx)[0], 512, 256), (tp, m, k))
        for (tp, m, k), surf in planner.surfaces.decode.items()
    )
    assert res.lowest_achievable_itl_ms == pytest.approx(truth[0], rel=0.01)
    assert (res.choice.tp, res.choice.method, res.choice.k) == truth[1]
    assert "infeasible" in res.message and f"{truth[0]:.2f}" in res.message


def test_kv_capacity_with_lookahead_bounds_concurrency(planner: Planner) -> None:
    isl, osl = 1400, 400  # long sequences: KV, not the SLA, binds at tp=1
    res = planner.plan(200.0, isl=isl, osl=osl, max_gpus=1)
    ch = res.choice
    assert ch.tp == 1
    blocks = M.kv_blocks_per_replica(1)
    assert ch.kv.blocks_per_replica == blocks
    worst = capacity.static_bound("engine", ch.method, ch.k, blocks, isl + osl, M.block_size)
    assert ch.kv.model == "engine"  # the synthetic profile's backend
    assert ch.kv.blocks_per_sequence == worst.blocks_per_sequence
    assert ch.kv.worst_case_concurrency == worst.max_concurrency <= ch.kv.max_concurrency
    assert ch.max_concurrency <= ch.kv.max_concurrency
    assert ch.limited_by in {"kv", "measured_range"}


def test_context_outside_measured_range_is_flagged(planner: Planner) -> None:
    res = planner.plan(60.0, isl=1800, osl=200)  # decode context 1900 > largest measured 1536
    flags = [f for ch in [res.choice, *res.alternatives] for f in ch.flags]
    assert any("outside measured" in f and "extrapolated" in f for f in flags)
    inside = planner.plan(60.0, isl=512, osl=256)
    assert not any("outside measured" in f for f in inside.choice.flags)


def test_ttft_and_gpu_budget_constraints(planner: Planner) -> None:
    res = planner.plan(30.0, ttft_ms=50.0, isl=1024, osl=256)  # tp=1 prefills 1024 tokens too slowly
    assert res.feasible and res.choice.tp == 2
    assert res.choice.predicted.ttft_ms == pytest.approx(M.ttft_ms(2, 1024), rel=0.01)
    assert all(r.tp == 1 and "TTFT" in r.reason for r in res.rejected)
    one = planner.plan(30.0, max_gpus=1, isl=512, osl=256)
    assert all(ch.tp == 1 for ch in [one.choice, *one.alternatives])


def test_replicas_follow_littles_law(planner: Planner) -> None:
    rate, isl, osl = 40.0, 512, 256
    res = planner.plan(20.0, isl=isl, osl=osl, request_rate=rate)
    ch, r = res.choice, res.choice.replicas
    per_replica = ch.max_concurrency / (osl * ch.predicted.itl_ms / 1000)
    assert r.decode_requests_per_s_per_replica == pytest.approx(per_replica)
    assert r.decode_replicas == math.ceil(rate / per_replica)
    prefill_tps = isl / (M.ttft_ms(ch.tp, isl) / 1000) / ch.tp
    assert r.prefill_tokens_per_s_per_gpu == pytest.approx(prefill_tps, rel=0.02)
    assert r.prefill_replicas == math.ceil(rate * isl / (r.prefill_tokens_per_s_per_gpu * ch.tp))
    assert r.gpus_total == ch.tp * (r.decode_replicas + r.prefill_replicas)
    capped = planner.plan(20.0, isl=isl, osl=osl, request_rate=rate * 100, max_gpus=4)
    assert any("max_gpus" in x.reason for x in capped.rejected)


def test_speculation_breakeven_matches_the_closed_form(planner: Planner) -> None:
    ctx = 512 + 128
    inp = planner.resolve_inputs(30.0, None, 512, 256, None, None, 1.0)
    evals = planner.evaluations(inp)
    b = planner.breakeven(1, "ngram", 2, evals)
    truth = next(
        c for c in range(1, 513) if M.itl_ms(1, "ngram", 2, c, ctx) >= M.itl_ms(1, "none", 0, c, ctx)
    )
    assert b.concurrency is not None
    assert abs(b.concurrency - truth) <= max(2, 0.05 * truth)
    draft = planner.breakeven(2, "draft", 2, evals)
    assert draft.concurrency is None  # the draft model pays over the whole measured range


def test_acceptance_override_and_vllm_args(planner: Planner) -> None:
    res = planner.plan(30.0, isl=512, osl=256, acceptance=0.5, draft_coverage=1.0)
    for ch in [res.choice, *res.alternatives]:
        if ch.method != "none":
            assert ch.predicted.tokens_per_step == pytest.approx(1 + sum(0.5 ** (i + 1) for i in range(ch.k)))
            assert "given" in ch.acceptance_source
            args = ch.vllm_serve_args
            spec = json.loads(args[args.index("--speculative-config") + 1])
            sched = ch.k_schedule
            assert spec["num_speculative_tokens"] == (max(b[2] for b in sched) if sched else ch.k)
            assert spec.get("num_speculative_tokens_per_batch_size") == sched
            assert spec["method"] == {"draft": "draft_model"}.get(ch.method, ch.method)
        assert ch.vllm_serve_args[:4] == ["--tensor-parallel-size", str(ch.tp), "--max-num-seqs",
                                          str(ch.max_concurrency)]  # fmt: skip
        # the preset name resolves to its Hugging Face id from configs/models/vicuna-7b.yaml
        assert ch.vllm_serve_command.startswith("vllm serve lmsys/vicuna-7b-v1.3 --tensor-parallel-size")


def test_synthetic_profile_is_labelled(planner: Planner) -> None:
    res = planner.plan(30.0)
    assert res.source == "synthetic" and "synthetic" in res.warning
    assert any("isl not given" in a for a in res.inputs.assumptions)


def test_acceptance_derived_from_larger_k_and_missing_acceptance() -> None:
    prof = synthetic_profile(M, configs=(("none", 0), ("ngram", 2), ("draft", 2)), tps=(1,))
    prof.acceptance = [a for a in prof.acceptance if a.method == "ngram"]
    big = synthetic_profile(M, configs=(("ngram", 4),), tps=(1,)).acceptance[0]
    prof.acceptance = [big]  # only k=4 known: k=2 uses its first two positions
    prof.metadata.model.name = "model-without-prior"  # else the literature prior fills draft in
    pl = Planner(prof, "p")
    res = pl.plan(30.0, isl=512, osl=256)
    ng = next(ch for ch in [res.choice, *res.alternatives] if ch.method == "ngram")
    assert "first 2 positions of k=4" in ng.acceptance_source
    assert ng.predicted.tokens_per_step == pytest.approx(M.tokens_per_step("ngram", 2))
    assert any(r.method == "draft" and "no acceptance" in r.reason for r in res.rejected)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"itl_ms": 0}, "itl_ms"),
        ({"itl_ms": float("nan")}, "itl_ms"),
        ({"itl_ms": 30, "isl": 0}, "isl"),
        ({"itl_ms": 30, "request_rate": -1}, "request_rate"),
        ({"itl_ms": 30, "acceptance": 1.5}, "acceptance"),
        ({"itl_ms": 30, "draft_coverage": -0.1}, "draft_coverage"),
        ({"itl_ms": 30, "max_gpus": 0}, "max_gpus"),
    ],
)
def test_bad_inputs_name_the_field(planner: Planner, kwargs: dict, field: str) -> None:
    with pytest.raises(PlanInputError) as err:
        planner.plan(**kwargs)
    assert err.value.field == field and field in str(err.value)


def test_correction_factor_scales_predictions(planner: Planner) -> None:
    base = planner.plan(30.0, isl=512, osl=256)
    slow = planner.plan(30.0, isl=512, osl=256, itl_correction=2.0)
    ch = base.choice
    # the same point predicted twice as slow; the SLA now admits less concurrency
    assert slow.choice.max_concurrency < ch.max_concurrency or slow.choice.tp != ch.tp
    assert np.isclose(slow.inputs.itl_correction, 2.0)


def test_decode_points_never_stand_in_for_acceptance() -> None:
    """A real-weights sweep's decode points decode from random tokens at a forced draft coverage: their
    tokens per step is no acceptance. Without an acceptance entry the plan takes the prior, or rejects."""
    prof = synthetic_profile(M, configs=(("none", 0), ("ngram", 2)), tps=(1,))
    prof.acceptance = []
    prof.metadata.weights = "real"
    for i, p in enumerate(prof.decode):
        if p.ok and p.method == "ngram":
            prof.decode[i] = p.model_copy(update={"tokens_per_step": 2.9, "samples": 10})
    prof.metadata.model.name = "model-without-prior"
    assert any("no acceptance" in r.reason for r in Planner(prof, "p").plan(30.0).rejected)
    prof.metadata.model.name = "vicuna-7b"  # a model the literature prior covers
    res = Planner(prof, "p").plan(30.0, isl=512, osl=256)
    ng = next(ch for ch in [res.choice, *res.alternatives] if ch.method == "ngram")
    assert ng.predicted.tokens_per_step != pytest.approx(2.9)
    assert ng.acceptance_source.startswith("literature prior")


def test_itl_is_predicted_at_the_workloads_draft_coverage() -> None:
    """Step time is read at the coverage of the acceptance the plan uses (or the given one), and a
    choice that interpolates from an unstable point says so."""
    from planner.profile import Acceptance, AcceptanceSource
    from tests.planner.test_surface import _coverage_points, _point

    prof = synthetic_profile(M, configs=(("none", 0), ("ngram", 2)), tps=(1,))
    prof.decode = [
        _point("none", 0, c, 128, 10 * c**0.5, stable=c != 4, repeats=3) for c in (1, 4, 16)
    ] + _coverage_points()
    prof.prefill = []  # no prefill stall: ITL is the decode step's alone
    src = AcceptanceSource(kind="measured", dataset="spec-bench", model="m")
    prof.acceptance = [
        Acceptance(method="ngram", k=2, draft_coverage=0.25, accepted_per_pos=[0.9, 0.8], source=src)
    ]
    planner = Planner(prof)
    surf = planner.surfaces.decode[(1, "ngram", 2)]
    res = planner.plan(1e4, isl=100, osl=56)  # decode context 128
    by_method = {ch.method: ch for ch in [res.choice, *res.alternatives]}
    ng = by_method["ngram"]
    assert ng.predicted.step_ms == pytest.approx(surf.step_ms(ng.max_concurrency, 128, 0.25)[0])
    assert ng.predicted.step_ms == pytest.approx(10 * ng.max_concurrency**0.5 * 1.25)
    given = planner.plan(1e4, isl=100, osl=56, draft_coverage=1.0)
    ng1 = {ch.method: ch for ch in [given.choice, *given.alternatives]}["ngram"]
    assert ng1.predicted.step_ms == pytest.approx(10 * ng1.max_concurrency**0.5 * 2.0)
    assert not any("doubtful" in f for f in by_method["none"].flags)  # c=16: far from the c=4 point
    low = planner.plan(18.0, isl=100, osl=56)  # plain decode at c=3 (10 * 3**0.5 ms), next to c=4
    plain = next(ch for ch in [low.choice, *low.alternatives] if ch.method == "none")
    assert plain.max_concurrency == 3
    assert any("relies on a doubtful point (c=4 L=128: unstable timing" in f for f in plain.flags)


def test_itl_includes_the_prefills_of_arriving_requests(planner: Planner) -> None:
    """In aggregated serving each of c requests in flight arrives once per osl tokens of the others, and
    its prefill holds every decoding request back for about its TTFT: c * ttft / osl per output token."""
    isl, osl = 1024, 128
    res = planner.plan(30.0, isl=isl, osl=osl)
    ch = res.choice
    c = ch.max_concurrency
    stall = c * M.ttft_ms(ch.tp, isl) / osl
    assert stall > 1.0  # large enough that leaving it out would fail the checks below
    assert ch.predicted.prefill_stall_ms == pytest.approx(stall, rel=0.02)
    decode_itl = M.itl_ms(ch.tp, ch.method, ch.k, c, isl + osl / 2)
    assert ch.predicted.itl_ms == pytest.approx(decode_itl + stall, rel=0.03)
    assert ch.predicted.throughput_per_gpu == pytest.approx(
        c / (ch.predicted.itl_ms / 1000) / ch.tp, rel=1e-6
    )
    assert f"prefill stall {ch.predicted.prefill_stall_ms:.2f} ms ({c} in flight" in render_plan(res)


def test_a_non_monotonic_prefill_surface_is_flagged_on_the_plan() -> None:
    """A longer prompt measured faster than a shorter one is noise, as is a point whose samples spread, and
    the prefill stall every plan adds inherits it: the answer says so (a clean surface says nothing)."""
    from planner.profile import PrefillPoint

    prof = synthetic_profile(M, configs=(("none", 0),), tps=(1,))
    clean = Planner(prof).plan(1e4, isl=512, osl=64).choice
    assert not any("prefill non-monotonic" in f for f in clean.flags)
    prof.prefill = [
        PrefillPoint(tp=1, input_len=n, ttft_ms=ms, prefill_tokens_per_s_per_gpu=n / ms * 1e3, samples=3)
        for n, ms in ((128, 25.6), (512, 15.4), (2048, 49.2))
    ]
    prof.prefill[2] = prof.prefill[2].model_copy(update={"ttft_ms_spread": 0.4, "stable": False})
    res = Planner(prof).plan(1e4, isl=512, osl=64)
    unstable = "prefill for tp=1 at 2048 tokens: unstable timing (3 samples, spread 40%)"
    assert any(unstable in f for f in res.choice.flags), res.choice.flags
    want = "prefill non-monotonic for tp=1: TTFT 15.4 ms at 512 tokens below 25.6 ms at 128"
    assert any(want in f for f in res.choice.flags), res.choice.flags
    assert want in render_plan(res)
