"""Profile document: round trip, atomic writes, append/upsert, and errors that name file and field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from common.metrics import LatencyStats
from planner.profile import (
    SCHEMA_VERSION,
    Acceptance,
    AcceptanceSource,
    DecodePoint,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    PrefillPoint,
    ProfileError,
    append_point,
    load_profile,
    new_profile,
    now_utc,
    parse_profile,
    save_profile,
)


def _meta() -> Metadata:
    return Metadata(
        model=ModelInfo(
            name="tiny",
            shape=ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, vocab=100, params=1000),
        ),
        hardware=Hardware(gpu_name="cpu", gpu_count=1, gpu_memory_gib=24),
        engine=EngineInfo(name="engine", version="0.1.0"),
        backend="engine",
        dtype="float32",
        block_size=16,
        kv_capacity_blocks_per_gpu=1000,
        weights="random",
        source="measured",
        created_at=now_utc(),
        command="profiler sweep --model tiny",
    )


def _point(c: int = 4, k: int = 0) -> DecodePoint:
    return DecodePoint(
        tp=1,
        method="none" if k == 0 else "ngram",
        k=k,
        concurrency=c,
        context_len=128,
        draft_ms=0.0,
        verify_ms=10.0,
        step_ms=10.0,
        tokens_per_step=1.0,
        itl_ms=LatencyStats(mean=10, p50=10, p90=11, p99=12),
        throughput_per_gpu=400.0,
        kv_usage=0.1,
        samples=20,
    )


def test_round_trip(tmp_path: Path) -> None:
    prof = new_profile(_meta())
    prof.upsert(_point())
    prof.upsert(PrefillPoint(tp=1, input_len=128, ttft_ms=20.0, prefill_tokens_per_s_per_gpu=6400.0))
    prof.upsert(
        Acceptance(
            method="ngram",
            k=2,
            draft_coverage=0.5,
            accepted_per_pos=[0.6, 0.4],
            source=AcceptanceSource(kind="measured", dataset="spec_bench", model="smollm2"),
            samples=100,
        )
    )
    path = tmp_path / "p.json"
    save_profile(prof, path)
    back = load_profile(path)
    assert back == prof
    assert back.schema_version == SCHEMA_VERSION
    assert back.acceptance[0].tokens_per_step == pytest.approx(1 + 0.5 * 1.0)
    assert back.acceptance[0].tokens_per_draft == pytest.approx(2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temp file left behind


def test_append_point_creates_and_upserts(tmp_path: Path) -> None:
    path = tmp_path / "sweep.json"
    with pytest.raises(ProfileError, match="no metadata"):
        append_point(path, _point())
    append_point(path, _point(4), metadata=_meta())
    append_point(path, _point(8))
    failed = DecodePoint(tp=1, method="none", k=0, concurrency=8, context_len=128, error="CapacityError")
    prof = append_point(path, failed)  # same coordinates: replaces the c=8 point
    assert [(p.concurrency, p.ok) for p in prof.decode] == [(4, True), (8, False)]
    assert load_profile(path) == prof


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _good_dict() -> dict:
    prof = new_profile(_meta())
    prof.upsert(_point())
    return json.loads(prof.model_dump_json())


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    data = _good_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError, match=r"bad\.json.*schema_version.*newer"):
        load_profile(path)


def test_truncated_file_names_file(tmp_path: Path) -> None:
    text = json.dumps(_good_dict())
    path = _write(tmp_path, text[: len(text) // 2])
    with pytest.raises(ProfileError, match=r"bad\.json.*truncated"):
        load_profile(path)


def test_missing_field_names_file_and_field(tmp_path: Path) -> None:
    data = _good_dict()
    del data["decode"][0]["step_ms"]
    with pytest.raises(ProfileError, match=r"bad\.json.*decode\[0\].*step_ms"):
        load_profile(_write(tmp_path, data))
    data = _good_dict()
    del data["metadata"]["block_size"]
    with pytest.raises(ProfileError, match=r"bad\.json.*metadata\.block_size"):
        load_profile(_write(tmp_path, data))
    data = _good_dict()
    del data["schema_version"]
    with pytest.raises(ProfileError, match=r"bad\.json.*schema_version.*missing"):
        load_profile(_write(tmp_path, data))


def test_bad_values_are_named(tmp_path: Path) -> None:
    data = _good_dict()
    data["decode"][0]["k"] = 3  # method none with k>0
    with pytest.raises(ProfileError, match=r"decode\[0\].*k is 0 exactly"):
        load_profile(_write(tmp_path, data))
    with pytest.raises(ValueError, match="accepted_per_pos has 1 entries, k is 2"):
        given = AcceptanceSource(kind="given")
        Acceptance(method="ngram", k=2, draft_coverage=1, accepted_per_pos=[0.5], source=given)
    with pytest.raises(ValueError, match="dataset and model"):
        AcceptanceSource(kind="measured")


SYN = Path(__file__).resolve().parents[2] / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json"


def _set(doc: dict, path: tuple, value: object) -> dict:
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("decode", 0, "step_ms"), float("inf"), "decode[0].step_ms"),
        (("decode", 0, "step_ms"), float("nan"), "decode[0].step_ms"),
        (("decode", 0, "itl_ms", "p99"), float("inf"), "decode[0].itl_ms.p99"),
        (("prefill", 0, "ttft_ms"), float("-inf"), "prefill[0].ttft_ms"),
        (("acceptance", 0, "draft_coverage"), float("nan"), "acceptance[0].draft_coverage"),
        (("metadata", "hardware", "gpu_memory_gib"), float("inf"), "metadata.hardware.gpu_memory_gib"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_field(path: tuple, value: float, field: str) -> None:
    """NaN/Infinity used to validate, then serialise as null: the profile was lost on the next load."""
    doc = _set(json.loads(SYN.read_text()), path, value)
    with pytest.raises(ProfileError, match=rf"field '{re.escape(field)}'"):
        parse_profile(doc)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("decode", 0, "concurrency"), 20_000_000, "decode[0].concurrency"),
        (("decode", 0, "concurrency"), 10**12, "decode[0].concurrency"),
        (("decode", 0, "context_len"), 10**30, "decode[0].context_len"),
        (("decode", 0, "step_ms"), 1e308, "decode[0].step_ms"),
        (("decode", 0, "step_ms"), 5e-324, "decode[0].step_ms"),
        (("decode", 0, "tp"), 10**6, "decode[0].tp"),
        (("prefill", 0, "input_len"), 10**30, "prefill[0].input_len"),
        (("prefill", 0, "ttft_ms"), 5e-324, "prefill[0].ttft_ms"),
        (("metadata", "kv_capacity_blocks_by_tp"), {"1": -5}, "metadata.kv_capacity_blocks_by_tp.1"),
        (("metadata", "kv_capacity_blocks_by_tp"), {"0": 5}, "metadata.kv_capacity_blocks_by_tp.0"),
        (("metadata", "kv_capacity_blocks_per_gpu"), 10**30, "metadata.kv_capacity_blocks_per_gpu"),
        (("metadata", "block_size"), 10**30, "metadata.block_size"),
        (("metadata", "model", "name"), "m" * 256, "metadata.model.name"),
        (("metadata", "model", "name"), "a\x00b", "metadata.model.name"),
        (("metadata", "hardware", "gpu_name"), "h\nx", "metadata.hardware.gpu_name"),
    ],
)
def test_out_of_bounds_declarations_are_refused_naming_the_field(
    path: tuple, value: object, field: str
) -> None:
    doc = _set(json.loads(SYN.read_text()), path, value)
    with pytest.raises(ProfileError, match=rf"field '{re.escape(field)}"):
        parse_profile(doc)


def test_bounds_admit_every_shipped_profile() -> None:
    for path in sorted(SYN.parent.glob("*.json")):
        load_profile(path)
