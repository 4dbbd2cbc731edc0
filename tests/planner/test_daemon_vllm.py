"""The correction daemon against a real vLLM server with real counters (fixture ``vllm_server``).

The daemon scrapes the server around a few real completions; the test scrapes the same endpoint itself
and computes the deltas from the raw exposition with prometheus_client's parser, then checks that the
daemon observed exactly those counts, the per-token ITL, and (when the server speculates) live draft
coverage and per-position acceptance with decode steps = generated - accepted - first tokens.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from planner.daemon import CorrectionDaemon, DaemonConfig
from planner.plan import Planner
from planner.synthetic import synthetic_profile

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [
    "Repeat this list exactly: apple, banana, cherry, apple, banana, cherry, apple, banana, cherry,",
    "Count from one to twenty in words: one, two, three, four, five,",
    "Write the alphabet with commas: a, b, c, d, e, f, g,",
    "Say 'the quick brown fox' five times: the quick brown fox, the quick brown fox,",
]


@pytest.fixture(scope="module")
def vllm_url(request: pytest.FixtureRequest) -> str:
    try:
        return str(request.getfixturevalue("vllm_server")).rstrip("/")
    except pytest.FixtureLookupError:
        pytest.skip("the vllm_server fixture (tests/conftest.py) is not available")


def raw(text: str) -> dict[str, float]:
    """Sample name (with position for the per-position counter) -> value summed over other labels."""
    out: dict[str, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name = s.name
            if "position" in s.labels:
                name += f"[{s.labels['position']}]"
            out[name] += s.value
    return out


def test_daemon_observes_real_vllm_counters(vllm_url: str) -> None:
    metrics_url = f"{vllm_url}/metrics"
    model = httpx.get(f"{vllm_url}/v1/models", timeout=30).json()["data"][0]["id"]
    before_raw = raw(httpx.get(metrics_url, timeout=30).text)
    positions = sorted(
        int(n.split("[")[1][:-1])
        for n in before_raw
        if n.startswith("vllm:spec_decode_num_accepted_tokens_per_pos")
    )
    speculating = "vllm:spec_decode_num_drafts_total" in before_raw and bool(positions)
    k = len(positions) if speculating else 0
    method = "ngram" if speculating else "none"
    configs = (("none", 0), ("ngram", k)) if speculating else (("none", 0),)
    planner = Planner(synthetic_profile(configs=configs, tps=(1,)), "synthetic")
    daemon = CorrectionDaemon(
        planner,
        DaemonConfig(metrics_url=metrics_url, itl_ms=1000.0, isl=64, osl=32, tp=1, method=method, k=k,
                     min_tokens=1, timeout_s=30),
    )  # fmt: skip

    async def tick() -> None:
        async with httpx.AsyncClient() as client:
            await daemon.tick(client)

    asyncio.run(tick())
    a = raw(httpx.get(metrics_url, timeout=30).text)

    def complete(prompt: str) -> int:
        body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
        resp = httpx.post(f"{vllm_url}/v1/completions", json=body, timeout=300)
        resp.raise_for_status()
        return int(resp.json()["usage"]["completion_tokens"])

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        completion_tokens = sum(pool.map(complete, PROMPTS))

    asyncio.run(tick())
    b = raw(httpx.get(metrics_url, timeout=30).text)
    d = {name: b.get(name, 0.0) - a.get(name, 0.0) for name in b}

    st = daemon.state
    assert not st.stale and st.scrapes == 2 and st.counter_resets == 0
    gen, first = d["vllm:generation_tokens_total"], d["vllm:time_to_first_token_seconds_count"]
    assert first == len(PROMPTS)
    assert gen == completion_tokens
    assert st.decode_tokens == gen - first
    itl_name = next(
        n
        for n in ("vllm:inter_token_latency_seconds_sum", "vllm:time_per_output_token_seconds_sum")
        if n in d
    )
    assert st.last_window.itl_ms == pytest.approx(1000.0 * d[itl_name] / (gen - first), rel=1e-9)
    if speculating:
        acc, drafts = d["vllm:spec_decode_num_accepted_tokens_total"], d["vllm:spec_decode_num_drafts_total"]
        assert st.acceptance.drafts == drafts
        assert st.acceptance.decode_steps == gen - acc - first
        per_pos = [
            d.get(f"vllm:spec_decode_num_accepted_tokens_per_pos_total[{i}]", 0.0) / drafts for i in range(k)
        ]
        assert st.acceptance.accepted_per_pos == pytest.approx(per_pos)
        assert (
            sum(d.get(f"vllm:spec_decode_num_accepted_tokens_per_pos_total[{i}]", 0.0) for i in range(k))
            == acc
        )
