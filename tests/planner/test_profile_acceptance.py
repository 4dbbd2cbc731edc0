"""Acceptance entries per workload and drafter settings; vLLM's prompt-lookup window rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.profile import (
    Acceptance,
    AcceptanceSource,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    append_point,
    load_profile,
    ngram_settings,
    now_utc,
    prompt_lookup_window,
)


def _meta() -> Metadata:
    shape = ModelShape(layers=1, hidden=8, heads=1, kv_heads=1, head_dim=8, vocab=8, params=100)
    return Metadata(
        model=ModelInfo(name="m", shape=shape), hardware=Hardware(gpu_name="cpu", gpu_count=1),
        engine=EngineInfo(name="vllm", version="0.32.0"), backend="vllm", dtype="float32", block_size=16,
        kv_capacity_blocks_per_gpu=10, weights="real", source="measured", created_at=now_utc(),
        command="test", served_model="build/smollm2-hf",
    )  # fmt: skip


def _acc(workload: str | None, lookup: tuple[int, int], a: float = 0.5) -> Acceptance:
    return Acceptance(
        method="ngram", k=2, draft_coverage=0.4, accepted_per_pos=[a, a / 2],
        source=AcceptanceSource(kind="measured", dataset="spec_bench", model="m"), samples=10,
        workload=workload, drafter_settings=ngram_settings(*lookup),
    )  # fmt: skip


def test_entries_per_workload_and_settings_are_kept_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    append_point(out, _acc(None, (2, 4)), _meta())
    append_point(out, _acc("summarization", (2, 4)))
    append_point(out, _acc("summarization", (5, 5)))
    append_point(out, _acc("summarization", (2, 4), a=0.9))  # re-measured: replaces its own entry only
    prof = load_profile(out)
    assert prof.metadata.served_model == "build/smollm2-hf"
    assert len(prof.acceptance) == 3
    summ = [a for a in prof.acceptance if a.workload == "summarization"]
    assert {a.drafter_settings["prompt_lookup_min"]: a.accepted_per_pos[0] for a in summ} == {2: 0.9, 5: 0.5}
    assert prof.acceptance_for("ngram", 2).workload is None
    assert prof.acceptance_for("ngram", 2, "coding") is None


@pytest.mark.parametrize(
    "given,window",
    [((None, None), (5, 5)), ((None, 4), (4, 4)), ((2, None), (2, 2)), ((1, 4), (1, 4))],
)
def test_prompt_lookup_window_follows_vllm(given: tuple, window: tuple[int, int]) -> None:
    assert prompt_lookup_window(*given) == window


def test_prompt_lookup_window_refuses_min_above_max() -> None:
    with pytest.raises(ValueError, match="prompt_lookup_min=5 must be <= prompt_lookup_max=3"):
        prompt_lookup_window(5, 3)
