"""Speculation in every plan: prior acceptance on a random-weight profile, why a method lost or was
excluded, workloads, the k schedule in the emitted commands, and headlines that name the binding limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.cli import main
from planner.plan import PlanInputError, Planner
from planner.profile import Acceptance, AcceptanceSource, load_profile
from planner.render import render_plan
from planner.schedule import k_at

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "configs" / "profiles" / "vicuna-7b-h100-engine.json"  # random weights, acceptance: []


@pytest.fixture(scope="module")
def gpu() -> Planner:
    prof = load_profile(GPU)
    assert prof.metadata.weights == "random" and prof.acceptance == []
    return Planner(prof, GPU.stem)


def test_random_weight_profile_plans_speculation_with_the_prior(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plan", "--profile", str(GPU), "--itl-ms", "30", "--isl", "512", "--osl", "256"])
    out = capsys.readouterr().out
    assert rc == 0
    spec = out[out.index("speculation:") :]
    for method in ("ngram", "draft"):
        assert f"  {method} " in spec
    assert spec.count("acceptance source: literature prior (Xia et al.") == 2
    res = Planner(load_profile(GPU), GPU.stem).plan(30, isl=512, osl=256)
    assert res.choice.method != "none" and res.choice.acceptance_kind == "prior"
    assert "literature prior" in res.choice.acceptance_source
    assert not any(r.limit == "acceptance" for r in res.rejected)


def test_text_says_why_a_method_was_excluded(gpu: Planner) -> None:
    # at 5.5 ms only draft at low concurrency meets the SLA; ngram's best ITL does not
    res = gpu.plan(5.5, isl=512, osl=256)
    text = render_plan(res)
    by = {m.method: m for m in res.speculation}
    assert by["draft"].status == "chosen"
    assert by["ngram"].status == "excluded" and "exceeds itl_ms=5.5" in by["ngram"].reason
    assert f"ngram excluded tp=1 k={by['ngram'].k}" in text and "exceeds itl_ms=5.5" in text
    lost = gpu.plan(30.0, isl=512, osl=256, workload="translation")
    ngram = next(m for m in lost.speculation if m.method == "ngram")
    assert ngram.status == "lost" and "lost to draft" in ngram.reason and "lost to draft" in render_plan(lost)


def test_workload_changes_acceptance_and_is_named(gpu: Planner) -> None:
    for wl in ("summarization", "translation", None):
        res = gpu.plan(30.0, isl=512, osl=256, workload=wl)
        ng = next(m for m in res.speculation if m.method == "ngram")
        assert f"workload {wl or 'mix'}" in ng.acceptance_source
        assert res.inputs.workload == (wl or "mix")
    with pytest.raises(PlanInputError, match="workload"):
        gpu.plan(30.0, workload="poetry")


def test_measured_acceptance_beats_the_prior_and_sets_the_lookup_window(gpu: Planner) -> None:
    prof = gpu.profile.model_copy(deep=True)
    prof.acceptance = [
        Acceptance(
            method="ngram", k=4, draft_coverage=0.5, accepted_per_pos=[0.9, 0.8, 0.7, 0.6],
            source=AcceptanceSource(kind="measured", dataset="spec_bench", model="vicuna-7b"),
            workload="summarization", drafter_settings={"prompt_lookup_min": 2, "prompt_lookup_max": 4},
        )
    ]  # fmt: skip
    pl = Planner(prof, "p")
    res = pl.plan(30.0, isl=512, osl=256, workload="summarization", alternatives=20)
    ng = next(ch for ch in [res.choice, *res.alternatives] if ch.method == "ngram" and ch.k == 4)
    assert ng.acceptance_kind == "measured" and ng.predicted.tokens_per_step == pytest.approx(2.5)
    other = pl.plan(30.0, isl=512, osl=256, workload="translation", alternatives=20)
    assert all(
        ch.acceptance_kind == "prior" for ch in [other.choice, *other.alternatives] if ch.method != "none"
    )
    ng_summary = next(
        m for m in pl.plan(8.0, isl=512, osl=256, workload="summarization").speculation if m.method == "ngram"
    )
    assert "measured" in (ng_summary.acceptance_source or "")


def test_commands_follow_the_profiled_backend_and_state_drafter_settings(gpu: Planner) -> None:
    res = gpu.plan(30.0, isl=512, osl=256, alternatives=20)
    chs = [res.choice, *res.alternatives]
    draft = next(ch for ch in chs if ch.method == "draft")
    assert draft.serve_backend == "engine" and draft.serve_command.startswith(
        "engine serve --model vicuna-7b"
    )
    assert "--draft-model double7/vicuna-68m" in draft.serve_command
    spec = json.loads(draft.vllm_serve_args[draft.vllm_serve_args.index("--speculative-config") + 1])
    assert spec["method"] == "draft_model" and spec["model"] == "double7/vicuna-68m"
    assert any("translation" in f for f in draft.flags)
    ngram = next(ch for ch in chs if ch.method == "ngram")
    assert "--prompt-lookup-min 1 --prompt-lookup-max 3" in ngram.serve_command  # the prior's PLD window
    ng = json.loads(ngram.vllm_serve_args[ngram.vllm_serve_args.index("--speculative-config") + 1])
    assert (ng["prompt_lookup_min"], ng["prompt_lookup_max"]) == (1, 3)


def test_k_schedule_is_emitted_for_both_backends(gpu: Planner) -> None:
    res = gpu.plan(10.0, isl=512, osl=256, workload="summarization")  # ngram wins at 10 ms
    ch = res.choice
    assert ch.k_schedule is not None and ch.k_schedule[0][0] == 1
    assert ch.k_schedule[-1][1] == ch.max_concurrency
    flag = ch.serve_command.split("--spec-schedule ")[1].strip("'")
    assert json.loads(flag) == ch.k_schedule
    spec = json.loads(ch.vllm_serve_args[ch.vllm_serve_args.index("--speculative-config") + 1])
    assert spec["num_speculative_tokens_per_batch_size"] == ch.k_schedule
    assert spec["num_speculative_tokens"] == max(b[2] for b in ch.k_schedule)
    assert any("piecewise" in f for f in ch.flags)
    # the schedule's k at each concurrency is the lowest-ITL k there (within the switching margin)
    evals = gpu.evaluations(res.inputs)
    for c in (1, ch.max_concurrency):
        k = k_at(ch.k_schedule, c)
        itl = {kk: ev.itl[c - int(ev.c[0])] for (tp, m, kk), ev in evals.items() if m in (ch.method, "none")}
        assert itl[k] <= min(itl.values()) * 1.02 + 1e-9


def test_context_beyond_the_model_is_infeasible(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plan", "--profile", str(GPU), "--itl-ms", "30", "--isl", "100000", "--osl", "256"])
    out = capsys.readouterr().out
    assert rc == 3
    assert (
        "INFEASIBLE: infeasible (context): context isl+osl=100256 exceeds vicuna-7b's maximum of 2048" in out
    )
    assert "serve:" not in out or "serve: none" in out
    assert "vllm serve" not in out and "engine serve" not in out and "--max-model-len" not in out


def test_infeasible_headline_names_ttft_and_max_gpus_and_prints_no_command(gpu: Planner) -> None:
    res = gpu.plan(30.0, ttft_ms=1.0, isl=512, osl=256, request_rate=5)
    assert not res.feasible and res.binding == "ttft"
    assert res.message.startswith("infeasible (TTFT)") and "lowest achievable" not in res.message
    assert res.choice.serve_command is None and res.choice.vllm_serve_command is None
    assert res.choice.replicas is None
    text = render_plan(res)
    assert "serve: none (the plan is infeasible)" in text and "req/s: decode" not in text
    gpus = gpu.plan(30.0, isl=512, osl=256, request_rate=1000, max_gpus=1)
    assert not gpus.feasible and gpus.binding == "max_gpus" and "max_gpus=1" in gpus.message
    sla = gpu.plan(0.5, isl=512, osl=256)
    assert sla.binding == "sla" and "lowest achievable ITL" in sla.message


def test_feasible_headline_names_what_bounds_concurrency(gpu: Planner) -> None:
    res = gpu.plan(30.0, isl=512, osl=256)
    assert res.binding == res.choice.limited_by and "(concurrency bound: " in res.message


def test_unknown_prior_model_is_a_named_input_error(gpu: Planner) -> None:
    with pytest.raises(PlanInputError, match="prior_model"):
        gpu.plan(30.0, prior_model="gpt-9")


def test_a_vllm_profile_gets_a_vllm_command_and_an_unrecorded_window_is_flagged(gpu: Planner) -> None:
    prof = gpu.profile.model_copy(deep=True)
    prof.metadata.backend = "vllm"
    prof.acceptance = [
        Acceptance(
            method="ngram", k=k, draft_coverage=0.6, accepted_per_pos=[0.5] * k,
            source=AcceptanceSource(kind="measured", dataset="spec_bench", model="vicuna-7b"),
        )
        for k in range(1, 6)
    ]  # fmt: skip
    res = Planner(prof, "v").plan(30.0, isl=512, osl=256, alternatives=20)
    ng = next(ch for ch in [res.choice, *res.alternatives] if ch.method == "ngram")
    assert ng.serve_backend == "vllm" and ng.serve_command == ng.vllm_serve_command
    assert ng.serve_command.startswith("vllm serve lmsys/vicuna-7b-v1.3 ")
    assert not any("translation" in f for f in ng.flags)
    assert any("records no lookup window" in f for f in ng.flags)
    spec = json.loads(ng.vllm_serve_args[ng.vllm_serve_args.index("--speculative-config") + 1])
    assert (spec["prompt_lookup_min"], spec["prompt_lookup_max"]) == (1, 4)  # stated, not left to vLLM
