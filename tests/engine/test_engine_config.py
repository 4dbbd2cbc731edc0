"""EngineConfig: defaults, validation that names the field and the value, pickling (tensor-parallel
workers receive it), and the one mapping from command-line flags."""

from __future__ import annotations

import argparse
import pickle

import pytest

from engine.engine_config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig, add_engine_args
from engine.errors import ConfigError
from engine.spec import SpecConfig


def test_defaults_and_token_budget() -> None:
    config = EngineConfig("tiny")
    assert (config.max_num_seqs, config.block_size, config.tp, config.weights) == (64, 16, 1, "auto")
    assert config.token_budget == DEFAULT_MAX_NUM_BATCHED_TOKENS
    assert EngineConfig("tiny", max_num_batched_tokens=7).token_budget == 7


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("tp", 0, "tp must be an int >= 1, got 0"),
        ("max_num_seqs", 0, "max_num_seqs must be an int >= 1, got 0"),
        ("block_size", "16", "block_size must be an int >= 1, got '16'"),
        ("num_gpu_blocks", 0, "num_gpu_blocks must be an int >= 1 or None, got 0"),
        ("max_num_batched_tokens", 0, "max_num_batched_tokens must be an int >= 1 or None, got 0"),
        ("gpu_memory_utilization", 1.5, "gpu_memory_utilization must be in (0, 1], got 1.5"),
        ("pad_drafts", "yes", "pad_drafts must be None, True or False, got 'yes'"),
        ("weights", "fake", "weights must be one of"),
    ],
)
def test_bad_values_name_the_field(field: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        EngineConfig("tiny", **{field: value})
    assert needle in str(err.value)


def test_pickles_with_its_spec() -> None:
    config = EngineConfig("tiny", tp=2, spec=SpecConfig(method="ngram", k=3), num_gpu_blocks=16)
    assert pickle.loads(pickle.dumps(config)) == config


def test_flags_map_to_fields() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    argv = ["--model", "tiny", "--tensor-parallel-size", "2", "--num-gpu-blocks", "32"]
    args = parser.parse_args([*argv, "--no-enable-prefix-caching", "--spec", "ngram", "--k", "3"])
    config = EngineConfig.from_args(args, "test", seed=5)
    assert (config.tp, config.num_gpu_blocks, config.enable_prefix_caching, config.seed) == (2, 32, False, 5)
    assert config.spec is not None and (config.spec.method, config.spec.k) == ("ngram", 3)
    assert EngineConfig.from_args(parser.parse_args(["--model", "tiny"]), "test") == EngineConfig("tiny")
