"""The method names, written once, are the ones the engine flags, the sweep grid, the profile schema, the
vLLM launcher and the planner's commands accept and translate."""

from __future__ import annotations

import argparse
import json

import pytest

from common.methods import DRAFTER_METHODS, METHODS, PROFILE_METHODS, SPEC_METHODS, WEIGHT_CHOICES
from engine.spec.flags import add_spec_arguments
from planner.commands import vllm_spec_config
from planner.profile import Acceptance, AcceptanceSource
from profiler.backends.vllm import VllmLaunch


def test_the_engine_flag_offers_exactly_the_engine_methods() -> None:
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser)
    (spec,) = [a for a in parser._actions if a.dest == "spec"]
    assert tuple(spec.choices) == METHODS == ("none", *SPEC_METHODS)
    assert WEIGHT_CHOICES == ("auto", "real", "random")


@pytest.mark.parametrize("method", PROFILE_METHODS[1:])
def test_every_profile_method_launches_on_vllm_with_a_drafter_exactly_when_it_needs_one(method: str) -> None:
    given = AcceptanceSource(kind="given", detail="test")
    Acceptance(method=method, k=2, draft_coverage=1, accepted_per_pos=[0.5, 0.2], source=given)  # valid
    if method in DRAFTER_METHODS:
        with pytest.raises(ValueError, match="needs draft_model"):
            VllmLaunch(model="m", method=method, k=2, python="p")
        launch = VllmLaunch(model="m", method=method, k=2, draft_model="d", python="p")
        assert launch.speculative_config()["model"] == "d"
    else:
        launch = VllmLaunch(model="m", method=method, k=2, python="p")
        assert "model" not in (launch.speculative_config() or {})


def test_a_draft_model_is_draft_model_to_vllm_in_both_the_launcher_and_the_plan() -> None:
    launch = VllmLaunch(model="m", method="draft", k=3, draft_model="d", python="p")
    planned = json.loads(vllm_spec_config("draft", 3, "d", None, None))
    assert launch.speculative_config()["method"] == planned["method"] == "draft_model"
