"""Literature prior for acceptance: published tokens per step turned into per-position acceptance.

A profile made with random weights has step times but no acceptance, and a plan that silently drops
speculation for lack of acceptance hides what the product is for. The prior (configs/priors/
acceptance.yaml, with its citation and the tables it comes from) gives a labelled stand-in: for a
published mean of ``T`` tokens per step at draft length ``K`` the per-position acceptance is geometric,
``alpha^(i+1)``, with ``1 + sum_{i=1..K} alpha^i = T``, and draft coverage 1 (the published mean is over
every step). A workload scales ``T`` by the category's published speed-up over the overall one.

A prior applies to the model it was published for. For another model it is used only when the caller
names the prior's model explicitly (``prior_model``), and then the label says so
("prior for vicuna-7b applied to llama-3-8b"); otherwise the planner refuses and says why.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import brentq

import configs
from planner.profile import Acceptance, AcceptanceSource

PRIORS_FILE = configs.config_path("priors", "acceptance.yaml")
MIX = "mix"  # the default workload: the mean over categories, weighted as the shipped prompt set is


class MethodPrior(BaseModel):
    model_config = ConfigDict(extra="forbid")

    published_name: str
    tokens_per_step: float = Field(gt=1)
    k: int = Field(ge=1)
    drafter: str | None = None
    drafter_settings: dict[str, str | int | float] | None = None
    speedup: dict[str, float]
    plannable: bool = True


class ModelPrior(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hf_id: str
    family: str
    methods: dict[str, MethodPrior]


class PriorTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    citation: str
    source_url: str
    workloads: list[str]
    workload_weights: dict[str, float]
    models: dict[str, ModelPrior]


@lru_cache(maxsize=4)
def load_priors(path: Path = PRIORS_FILE) -> PriorTable:
    """The prior table (validated once per process)."""
    return PriorTable.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


def workloads() -> list[str]:
    """Workload names a plan accepts: the Spec-Bench categories and ``mix``."""
    return [*load_priors().workloads, MIX]


def geometric_alpha(tokens_per_step: float, k: int) -> float:
    """``alpha`` with ``1 + sum_{i=1..k} alpha^i == tokens_per_step`` (capped just below 1)."""
    if tokens_per_step >= k + 1:
        return 1.0
    return float(brentq(lambda a: sum(a**i for i in range(1, k + 1)) + 1.0 - tokens_per_step, 0.0, 1.0))


def workload_tokens_per_step(mp: MethodPrior, workload: str) -> float:
    """Published tokens per step scaled to ``workload``. ``mix`` is the published mean itself: Spec-Bench
    averages over all its questions, 80 per category, the weighting of the shipped prompt set."""
    if workload == MIX:
        return mp.tokens_per_step
    return mp.tokens_per_step * mp.speedup[workload] / mp.speedup["overall"]


def check_workload(workload: str | None) -> str:
    """``workload`` validated (None means the default mix); a ValueError names the accepted values."""
    if workload is None:
        return MIX
    if workload not in workloads():
        raise ValueError(f"workload={workload!r}: not one of {', '.join(workloads())}")
    return workload


def prior_drafter(model: str, method: str) -> str | None:
    """The drafter the published figure for (model, method) used, if any."""
    mprior = load_priors().models.get(model)
    mp = mprior.methods.get(method) if mprior else None
    return mp.drafter if mp else None


def prior_acceptance(
    model: str, method: str, k: int, workload: str | None = None, prior_model: str | None = None
) -> Acceptance | str:
    """The prior's Acceptance of (method, k) for ``model``, or the reason there is none."""
    table = load_priors()
    wl = check_workload(workload)
    source_model = prior_model or model
    mprior = table.models.get(source_model)
    if mprior is None:
        known = ", ".join(sorted(table.models))
        hint = (
            f"; pass prior_model= (one of {known}) to apply another model's prior, labelled" if known else ""
        )
        return f"no literature prior for model {model!r}{hint}"
    mp = mprior.methods.get(method)
    if mp is None or not mp.plannable:
        return f"no literature prior for method={method} on {source_model}"
    alpha = geometric_alpha(workload_tokens_per_step(mp, wl), mp.k)
    applied = (
        f"prior for {source_model} applied to {model}" if source_model != model else f"prior for {model}"
    )
    detail = (
        f"{applied}, {mp.published_name} {mp.tokens_per_step:g} tokens/step at k={mp.k}, "
        f"workload {wl}, geometric alpha={alpha:.3f}, coverage 1.0"
    )
    return Acceptance(
        method=method,  # type: ignore[arg-type]
        k=k,
        draft_coverage=1.0,
        accepted_per_pos=[alpha ** (i + 1) for i in range(k)],
        source=AcceptanceSource(
            kind="prior",
            dataset="Spec-Bench",
            model=source_model,
            drafter=mp.drafter,
            detail=detail,
            citation=table.citation,
        ),  # fmt: skip
        workload=None if wl == MIX else wl,
        drafter_settings=dict(mp.drafter_settings) if mp.drafter_settings else None,
    )
