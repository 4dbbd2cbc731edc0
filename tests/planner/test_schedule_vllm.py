"""A k schedule the planner made, served by the real vLLM (CPU, SmolLM2-135M, ngram): vLLM accepts the
emitted ``--speculative-config`` and drafts per step follow the schedule at concurrency 1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from planner.commands import vllm_args
from planner.daemon.scrape import parse_metrics
from planner.plan import Planner
from planner.profile import load_profile
from planner.schedule import k_at

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "configs" / "profiles" / "vicuna-7b-h100-engine.json"
PROMPT = "alpha beta gamma delta epsilon zeta eta theta " * 12  # repeats: prompt lookup always matches


def planner_schedule() -> tuple[list[list[int]], list[str]]:
    """The ngram schedule the planner computes on the committed GPU profile (literature prior), and the
    vLLM arguments it emits for it."""
    pl = Planner(load_profile(GPU), GPU.stem)
    res = pl.plan(30.0, isl=512, osl=256)
    ngram = next(m for m in res.speculation if m.method == "ngram")
    sched = ngram.k_schedule
    assert sched is not None and len({b[2] for b in sched}) > 1
    k_max = max(b[2] for b in sched)
    args = vllm_args(1, sched[-1][1], 2048, "ngram", k_max, None, None, sched)
    return sched, args


def test_vllm_serves_the_planned_schedule() -> None:
    from profiler.backends.vllm import VllmLaunch, VllmServer, VllmServerError
    from tests.conftest import VLLM_START_TIMEOUT_S, ensure_smollm2_hf, ensure_vllm_venv

    sched, args = planner_schedule()
    k1, k_max = k_at(sched, 1), max(b[2] for b in sched)
    assert 0 < k1 < k_max  # else concurrency 1 could not tell the schedule from a fixed k
    python = ensure_vllm_venv()
    model = ensure_smollm2_hf()
    launch = VllmLaunch(
        # the launcher sets tp itself; eager mode skips a CPU compile warm-up that has nothing to do with k
        model=str(model), python=python, extra_args=[*args[2:], "--enforce-eager"],
        env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")},
    )  # fmt: skip
    server = VllmServer(launch, log_path=REPO / "build" / "vllm_schedule.log", cwd=REPO)
    try:
        server.start()
        try:
            server.wait_healthy(VLLM_START_TIMEOUT_S)
        except VllmServerError as exc:
            pytest.fail(str(exc), pytrace=False)
        log = server.log_path.read_text(errors="replace")
        assert json.dumps(sched, separators=(",", ":")) in log.splitlines()[0]  # the emitted config
        url = server.base_url
        name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        before = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
        body = {"model": name, "prompt": PROMPT, "max_tokens": 48, "temperature": 0.0, "ignore_eos": True}
        for _ in range(2):  # one request at a time: every step runs at batch size 1
            httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()
        after = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
    finally:
        server.stop()
    drafts = (after.drafts or 0.0) - (before.drafts or 0.0)
    tokens = (after.draft_tokens or 0.0) - (before.draft_tokens or 0.0)
    accepted = {
        i: after.accepted_per_pos.get(i, 0.0) - before.accepted_per_pos.get(i, 0.0) for i in range(k_max)
    }
    assert drafts > 0, "prompt lookup never drafted"
    why = f"schedule {sched}: k at batch size 1 is {k1}, num_speculative_tokens {k_max}"
    # prompt lookup drafts up to k tokens (fewer when the matched continuation is shorter): the mean
    # draft length is at most the scheduled k and most drafts are full; nothing beyond position k1
    # was ever drafted, so nothing there was accepted, while the last scheduled position was
    assert k1 - 1 < tokens / drafts <= k1, why
    assert accepted[k1 - 1] > 0 and all(accepted[i] == 0 for i in range(k1, k_max)), (why, accepted)
