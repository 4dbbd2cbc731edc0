"""Which tensor-parallel sizes a model admits, checked before any process starts."""

from __future__ import annotations

from engine.config import ModelConfig
from engine.errors import ConfigError


def _problems(config: ModelConfig, tp: int) -> list[str]:
    if tp == 1:
        return []
    problems = []
    if config.num_heads % tp:
        problems.append(f"num_heads={config.num_heads} is not divisible by tp={tp}")
    kv = config.num_kv_heads
    if kv % tp and tp % kv:
        problems.append(f"num_kv_heads={kv} neither divides nor is divided by tp={tp}")
    if config.intermediate_size % tp:
        problems.append(f"intermediate_size={config.intermediate_size} is not divisible by tp={tp}")
    return problems


def valid_tp_sizes(config: ModelConfig, limit: int = 64) -> list[int]:
    """Every tp in [1, limit] that :func:`check_tp` accepts (for error messages and sweeps)."""
    return [tp for tp in range(1, limit + 1) if not _problems(config, tp)]


def check_tp(config: ModelConfig, tp: int) -> None:
    """Raise ConfigError naming the field when ``tp`` cannot shard ``config``.

    Query heads and the MLP width must split evenly. KV heads split when ``tp`` divides them and are
    replicated (each rank keeps the one KV head its query heads use) when ``tp`` is a multiple of
    them, as with GQA at tp 8. The vocabulary need not divide: the last shard is padded.
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"tp must be an int >= 1, got {tp!r}")
    problems = _problems(config, tp)
    if problems:
        ok = ", ".join(str(t) for t in valid_tp_sizes(config, limit=max(8, tp)))
        raise ConfigError(
            f"model {config.name!r} cannot run with tp={tp}: {'; '.join(problems)} "
            f"(valid tp for this model: {ok})"
        )
