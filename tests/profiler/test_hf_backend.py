"""The hf baseline backend: plain and assisted transformers generate, timed per decoding step."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.profile import DecodePoint
from profiler.backends.hf import HFBackend, HFBackendError
from profiler.grid import PointSpec


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random Llama saved as a Hugging Face directory (shape only; fast on CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, bos_token_id=0,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("tiny-hf")
    LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)


def _check(point: DecodePoint, spec: PointSpec) -> None:
    DecodePoint.model_validate(point.model_dump())
    assert point.ok and point.key == spec.key
    assert point.step_ms > 0 and point.throughput_per_gpu > 0
    assert point.itl_ms.p50 == point.itl_ms.mean  # one generate: all sequences share token times
    assert point.samples == spec.concurrency


def test_plain_generate_at_batch(tiny_hf: str) -> None:
    b = HFBackend(tiny_hf, dtype="float32", device="cpu")
    spec = PointSpec(1, "none", 0, 3, 24)
    point = b.measure(spec, steps=8, warmup=2)
    _check(point, spec)
    assert point.tokens_per_step == 1.0  # one token per sequence per step without speculation
    assert b.info["model_info"]["shape"]["layers"] == 2 and b.info["model_info"]["shape"]["kv_heads"] == 2
    pre = b.measure_prefill(1, 32, repeats=2)
    assert pre.ok and pre.input_len == 32 and pre.ttft_ms > 0
    b.close()


@pytest.mark.parametrize("method,k", [("ngram", 3), ("draft", 2)])
def test_assisted_generation(tiny_hf: str, method: str, k: int) -> None:
    b = HFBackend(tiny_hf, dtype="float32", device="cpu", draft_model=tiny_hf)
    spec = PointSpec(1, method, k, 1, 32)
    point = b.measure(spec, steps=12, warmup=2)
    _check(point, spec)
    if method == "draft":
        # The assistant is the target itself: every drafted token is accepted, k + 1 tokens per step.
        assert point.tokens_per_step > 1.0
    assert 1.0 <= point.tokens_per_step <= k + 1


def test_refusals_name_the_problem(tiny_hf: str, tmp_path: Path) -> None:
    with pytest.raises(HFBackendError, match="config.json"):
        HFBackend(str(tmp_path))
    b = HFBackend(tiny_hf, device="cpu")
    with pytest.raises(HFBackendError, match="tp must be 1"):
        b.configure(2, "none", 0)
    with pytest.raises(HFBackendError, match="method must be one of"):
        b.configure(1, "medusa", 2)
    with pytest.raises(HFBackendError, match="needs draft_model"):
        b.configure(1, "draft", 2)
    with pytest.raises(HFBackendError, match="only at batch size 1"):
        b.measure(PointSpec(1, "ngram", 2, 4, 16), steps=4, warmup=0)
    with pytest.raises(HFBackendError, match="dtype must be one of"):
        HFBackend(tiny_hf, dtype="int3")


@pytest.mark.slow
def test_smollm2_prompt_lookup(smollm2_hf_dir: Path) -> None:
    b = HFBackend(str(smollm2_hf_dir), dtype="float32", device="cpu")
    spec = PointSpec(1, "ngram", 4, 1, 64)
    point = b.measure(spec, steps=12, warmup=2)
    _check(point, spec)
    base = b.measure(PointSpec(1, "none", 0, 1, 64), steps=12, warmup=2)
    _check(base, PointSpec(1, "none", 0, 1, 64))
    assert base.tokens_per_step == 1.0
    assert 1.0 <= point.tokens_per_step <= 5.0
    assert b.info["model_info"]["shape"]["layers"] == 30


def test_sweep_cli_with_the_hf_backend(tiny_hf: str, tmp_path: Path) -> None:
    from planner.profile import load_profile
    from profiler.cli import main

    out = tmp_path / "hf.json"
    argv = ["sweep", "--model", tiny_hf, "--backend", "hf", "--method", "none,ngram", "--k", "0,2",
            "--concurrency", "1,2", "--context", "16", "--steps", "4", "--out", str(out),
            "--no-plots", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    profile = load_profile(out)
    assert profile.metadata.backend == "hf" and profile.metadata.engine.name == "transformers"
    assert profile.metadata.weights == "real" and profile.metadata.model.shape.layers == 2
    by_key = {p.key: p for p in profile.decode}
    assert by_key[(1, "none", 0, 2, 16, 0.0)].ok and by_key[(1, "ngram", 2, 1, 16, 1.0)].ok
    # transformers' assisted generation runs at batch 1 only: recorded as a failed point, sweep goes on
    assert "only at batch size 1" in by_key[(1, "ngram", 2, 2, 16, 1.0)].error
    assert main(["sweep", "--model", "no-such-dir", "--backend", "hf", "--out", str(tmp_path)]) == 2
