"""A corpus of hostile profile documents: the shipped synthetic profile, each bent in one way.

Every entry is a JSON document a client could POST (or leave in the profiles directory). Some are
schema-valid edge cases the planner must answer for (bounds, zero KV, one point); the rest must be
refused with a 422 naming the field. Used by tests/api/test_hostile_profiles.py and
benchmarks/api_reliability_bench.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

from planner.profile import (
    MAX_BLOCK_SIZE,
    MAX_CONCURRENCY,
    MAX_CONTEXT,
    MAX_INT,
    MAX_K,
    MAX_KV_BLOCKS,
    MAX_MS,
    MAX_NAME,
    MAX_TP,
    MIN_MS,
)

SYN = Path(__file__).resolve().parents[2] / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json"


def _decode(field: str, value: object, *, all_points: bool = True) -> Callable[[dict], object]:
    def bend(doc: dict) -> dict:
        points = doc["decode"] if all_points else doc["decode"][:1]
        for p in points:
            if p.get("error") is None:
                p[field] = value
        return doc

    return bend


def _prefill(field: str, value: object) -> Callable[[dict], object]:
    def bend(doc: dict) -> dict:
        for p in doc["prefill"]:
            p[field] = value
        return doc

    return bend


def _meta(*path: str, value: object) -> Callable[[dict], object]:
    def bend(doc: dict) -> dict:
        node = doc["metadata"]
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        return doc

    return bend


def _name(value: str) -> Callable[[dict], object]:
    return _meta("model", "name", value=value)


def _scale_concurrency(doc: dict) -> dict:
    scale = MAX_CONCURRENCY // max(p["concurrency"] for p in doc["decode"])
    for p in doc["decode"]:
        p["concurrency"] *= scale
    return doc


def _one_point(doc: dict) -> dict:
    doc["decode"] = [next(p for p in doc["decode"] if p.get("error") is None and p["method"] == "none")]
    doc["prefill"] = doc["prefill"][:1]
    return doc


def _all_failed(doc: dict) -> dict:
    for p in doc["decode"]:
        p["error"] = "out of memory"
    return doc


def _duplicate_points(doc: dict) -> dict:
    twin = copy.deepcopy(doc["decode"][0])
    twin["step_ms"] = (twin.get("step_ms") or 1.0) * 3
    doc["decode"].append(twin)
    return doc


def _descending_steps(doc: dict) -> dict:
    for p in doc["decode"]:
        if p.get("step_ms") is not None:
            p["step_ms"] = 1000.0 / p["concurrency"]
    return doc


def _acceptance(value: float, coverage: float) -> Callable[[dict], object]:
    def bend(doc: dict) -> dict:
        for a in doc["acceptance"]:
            a["accepted_per_pos"] = [value] * a["k"]
            a["draft_coverage"] = coverage
        return doc

    return bend


def _no_prefill(doc: dict) -> dict:
    doc["prefill"] = []
    return doc


def _no_acceptance(doc: dict) -> dict:
    doc["acceptance"] = []
    return doc


def _tp_everywhere(tp: int) -> Callable[[dict], object]:
    def bend(doc: dict) -> dict:
        for p in doc["decode"] + doc["prefill"]:
            p["tp"] = tp
        # points that now share coordinates: keep the first of each
        seen, kept = set(), []
        for p in doc["decode"]:
            key = (p["tp"], p["method"], p["k"], p["concurrency"], p["context_len"])
            if key not in seen:
                seen.add(key)
                kept.append(p)
        doc["decode"] = kept
        doc["prefill"] = list({p["input_len"]: p for p in doc["prefill"]}.values())
        doc["metadata"]["kv_capacity_blocks_by_tp"] = None
        return doc

    return bend


def _replace(value: object) -> Callable[[dict], object]:
    return lambda _doc: value


CORPUS: dict[str, Callable[[dict], object]] = {
    # from the field reports
    "kv_by_tp_negative": _meta("kv_capacity_blocks_by_tp", value={"1": -5}),
    "step_ms_1e308": _decode("step_ms", 1e308),
    "step_ms_5e-324": _decode("step_ms", 5e-324),
    "model_name_256": _name("m" * 256),
    "model_name_mathtext": _name("$\\frac{$"),
    "context_len_1e30": _decode("context_len", 10**30, all_points=False),
    "concurrency_2e7": _decode("concurrency", 20_000_000, all_points=False),
    "concurrency_1e12": _decode("concurrency", 10**12, all_points=False),
    "step_ms_infinity": _decode("step_ms", float("inf"), all_points=False),
    "step_ms_nan": _decode("step_ms", float("nan"), all_points=False),
    "itl_p99_nan": _decode("itl_ms", {"mean": 1.0, "p50": 1.0, "p90": 1.0, "p99": float("nan")}),
    # at the bounds: schema-valid, must plan
    "step_ms_max": _decode("step_ms", MAX_MS),
    "step_ms_min": _decode("step_ms", MIN_MS),
    "ttft_ms_max": _prefill("ttft_ms", MAX_MS),
    "ttft_ms_min": _prefill("ttft_ms", MIN_MS),
    "prefill_rate_tiny": _prefill("prefill_tokens_per_s_per_gpu", 1e-300),
    "input_len_max": lambda d: {
        **d,
        "prefill": [*d["prefill"][:-1], {**d["prefill"][-1], "input_len": MAX_CONTEXT}],
    },
    "concurrency_bool": _decode("concurrency", True, all_points=False),  # read as 1, written back as 1
    "context_len_max": _decode("context_len", MAX_CONTEXT, all_points=False),
    "concurrency_max": _scale_concurrency,
    "tokens_per_step_max": _decode("tokens_per_step", 1.0 + MAX_K),
    "model_name_max": _name("m" * MAX_NAME),
    "model_name_markup": _name("<script>alert(1)</script>&amp;"),
    "model_name_path": _name("../../../etc/passwd"),
    "model_name_unicode": _name("模型-🚀-\u202e"),
    "model_name_dollars": _name("$x$ $$ \\$ {}%s"),
    "kv_zero": _meta("kv_capacity_blocks_by_tp", value={"1": 0, "2": 0}),
    "kv_per_gpu_zero": lambda d: _meta("kv_capacity_blocks_by_tp", value=None)(
        _meta("kv_capacity_blocks_per_gpu", value=0)(d)
    ),
    "kv_max": lambda d: _meta("kv_capacity_blocks_by_tp", value=None)(
        _meta("kv_capacity_blocks_per_gpu", value=MAX_KV_BLOCKS)(d)
    ),
    "block_size_1": _meta("block_size", value=1),
    "block_size_max": _meta("block_size", value=MAX_BLOCK_SIZE),
    "gpu_count_max": _meta("hardware", "gpu_count", value=MAX_INT),
    "params_max": _meta("model", "shape", "params", value=MAX_INT),
    "tp_max": _tp_everywhere(MAX_TP),
    "acceptance_all": _acceptance(1.0, 1.0),
    "acceptance_none": _acceptance(0.0, 0.0),
    "no_acceptance": _no_acceptance,
    "no_prefill": _no_prefill,
    "one_point": _one_point,
    "duplicate_points": _duplicate_points,
    "descending_steps": _descending_steps,
    "itl_stats_huge": _decode("itl_ms", {"mean": 1e300, "p50": 1e300, "p90": 1e300, "p99": 1e300}),
    "throughput_zero": _decode("throughput_per_gpu", 0.0),
    "notes_1mb": _meta("notes", value="n" * 2**20),
    "created_at_year_1": _meta("created_at", value="0001-01-01T00:00:00Z"),
    # past the bounds or malformed: must be a 422
    "tp_over": _tp_everywhere(MAX_TP + 1),
    "block_size_over": _meta("block_size", value=MAX_BLOCK_SIZE + 1),
    "kv_by_tp_key_zero": _meta("kv_capacity_blocks_by_tp", value={"0": 10}),
    "kv_by_tp_key_text": _meta("kv_capacity_blocks_by_tp", value={"one": 10}),
    "gpu_count_over": _meta("hardware", "gpu_count", value=MAX_INT + 1),
    "model_name_nul": _name("a\x00b"),
    "model_name_empty": _name(""),
    "model_name_number": _name(7),
    "tokens_per_step_huge": _decode("tokens_per_step", 1e300),
    "concurrency_float": _decode("concurrency", 1.5, all_points=False),
    "prefill_same_input_len": _prefill("input_len", 512),
    "all_failed": _all_failed,
    "no_decode": lambda d: {**d, "decode": []},
    "schema_version_zero": lambda d: {**d, "schema_version": 0},
    "schema_version_true": lambda d: {**d, "schema_version": True},
    "extra_field": lambda d: {**d, "surprise": 1},
    "created_at_garbage": _meta("created_at", value="yesterday"),
    "top_level_list": _replace([1, 2, 3]),
    "top_level_null": _replace(None),
    "top_level_string": _replace("profile"),
    "deep_nesting": _meta("notes", value=json.loads("[" * 200 + "]" * 200)),
}


def follow_ups(pid: str) -> list[str]:
    """What a client asks about a profile: plans at the edges of every query bound, capacity, page."""
    return [
        f"/plan?itl_ms=30&profile={pid}",
        f"/plan?itl_ms=30&request_rate=10&ttft_ms=500&profile={pid}",
        f"/plan?itl_ms=0.001&request_rate=1e9&max_gpus=1&profile={pid}",
        f"/plan?itl_ms=1e9&isl=10000000&osl=10000000&request_rate=1e9&profile={pid}",
        f"/plan?itl_ms=30&acceptance=1&draft_coverage=1&isl=1&osl=1&profile={pid}",
        f"/capacity?tp=1&context=0&profile={pid}",
        f"/capacity?tp=1024&k=64&context=10000000&profile={pid}",
        f"/profiles/{pid}",
        f"/?itl_ms=30&isl=1000000&profile={pid}",
    ]


def hostile_documents() -> dict[str, object]:
    """Name -> document, each from a fresh copy of the synthetic profile."""
    base = json.loads(SYN.read_text())
    return {name: bend(copy.deepcopy(base)) for name, bend in CORPUS.items()}


def as_json(doc: object) -> str:
    """JSON text as a client would send it (NaN and Infinity written as JavaScript literals)."""
    return json.dumps(doc, allow_nan=True)
