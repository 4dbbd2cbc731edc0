"""An acceptance run and a sweep of one model on one device record one identity: one file takes both."""

from __future__ import annotations

import pytest
import torch

from common.metadata import ENGINE_NAME, package_version
from engine.llm import LLM
from planner.profile import check_same_identity
from profiler.acceptance import _metadata_from
from profiler.backends.engine import EngineBackend
from profiler.sweep import engine_metadata


def test_acceptance_and_sweep_metadata_agree() -> None:
    llm = LLM("tiny", weights="random", max_num_seqs=2)
    try:
        acc = _metadata_from(llm, "tiny", "profiler acceptance")
    finally:
        llm.engine.close()
    backend = EngineBackend("tiny")
    backend.configure(1, "none", 0)
    sweep = engine_metadata("tiny", 1, backend.info, "profiler sweep")
    check_same_identity(acc, sweep, "profile.json")  # raises on any difference in model, shape, hardware ...
    for meta in (acc, sweep):
        assert meta.hardware.gpu_name == "cpu"  # never a device index such as "cuda:0" or "cpu"
        assert meta.engine.name == ENGINE_NAME
        assert meta.engine.version.startswith(package_version()) and "(torch " in meta.engine.version
    assert acc.model.shape.params == sweep.model.shape.params
    assert acc.notes and acc.notes.startswith("acceptance only") and "CPU run" in acc.notes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_acceptance_on_a_gpu_records_its_name_not_its_index() -> None:
    llm = LLM("tiny", weights="random", max_num_seqs=2, device="cuda")
    try:
        meta = _metadata_from(llm, "tiny", "profiler acceptance")
    finally:
        llm.engine.close()
    assert meta.hardware.gpu_name == torch.cuda.get_device_name(0) != "cuda:0"
