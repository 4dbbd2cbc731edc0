"""``profiler acceptance``: measure draft coverage and per-position acceptance with a real model.

Acceptance is a property of (target model, drafter, prompts), not of the hardware, so it is measured
once on a real prompt set (Spec-Bench format: ``question_id``, ``category``, ``turns``) by generating
greedily through ``engine.LLM`` with speculation on, and reading the engine's vLLM-style counters
(``engine.spec.SpecStats``) per category. The result is written into a profile as an ``Acceptance``
entry per (method, k) whose source names the dataset and the model; the planner then combines it with
the step times of any sweep. Random weights are refused: their "acceptance" describes nothing real.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner import metrics_def as md
from planner.profile import (
    Acceptance,
    AcceptanceSource,
    EngineInfo,
    Hardware,
    Metadata,
    ModelInfo,
    ModelShape,
    append_point,
    now_utc,
)

SPEC_METHODS = ("ngram", "draft", "medusa")


class AcceptanceError(ValueError):
    """Bad input for an acceptance run; the message names the field and the value."""


@dataclass
class Prompt:
    question_id: str
    category: str
    text: str


@dataclass
class Counters:
    """The SpecStats counters over one slice of a run (differences of the engine's cumulative ones)."""

    decode_steps: int = 0
    drafts: int = 0
    accepted: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        return md.draft_coverage(self.drafts, self.decode_steps)

    def per_pos(self, k: int) -> list[float]:
        counts = (self.accepted_per_pos + [0] * k)[:k]
        return md.acceptance_given_draft(counts, self.drafts)

    def tokens_per_step(self, k: int) -> float:
        return md.tokens_per_step(self.coverage, self.per_pos(k))


@dataclass
class AcceptanceResult:
    method: str
    k: int
    overall: Counters
    by_category: dict[str, Counters]


def load_prompts(
    path: Path, *, per_category: int | None = None, categories: list[str] | None = None
) -> list[Prompt]:
    """First turn of each question; at most ``per_category`` per category, in file order."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AcceptanceError(f"dataset: cannot read {path}: {exc.strerror or exc}") from None
    taken: dict[str, int] = defaultdict(int)
    out: list[Prompt] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            text = turns[0] if isinstance(turns, list) else turns
            cat = str(row.get("category", "all"))
            qid = str(row.get("question_id", n))
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise AcceptanceError(f"dataset: {path} line {n} is not a Spec-Bench record ({exc!r})") from None
        if not isinstance(text, str) or not text:
            raise AcceptanceError(f"dataset: {path} line {n}: field 'turns' must hold a non-empty string")
        if categories and cat not in categories:
            continue
        if per_category is not None and taken[cat] >= per_category:
            continue
        taken[cat] += 1
        out.append(Prompt(qid, cat, text))
    if not out:
        raise AcceptanceError(f"dataset: no prompts selected from {path} (categories={categories})")
    return out


def _snapshot(stats: Any) -> Counters:
    return Counters(
        stats.num_decode_steps, stats.num_drafts, stats.num_accepted_tokens, list(stats.accepted_per_pos)
    )


def _diff(after: Counters, before: Counters) -> Counters:
    n = max(len(after.accepted_per_pos), len(before.accepted_per_pos))
    a = after.accepted_per_pos + [0] * (n - len(after.accepted_per_pos))
    b = before.accepted_per_pos + [0] * (n - len(before.accepted_per_pos))
    return Counters(
        after.decode_steps - before.decode_steps,
        after.drafts - before.drafts,
        after.accepted - before.accepted,
        [x - y for x, y in zip(a, b, strict=True)],
    )


def check_real_weights(model: str) -> None:
    """Refuse a model whose weights resolve to random: its acceptance would describe nothing."""
    from engine.presets import resolve_model

    if resolve_model(model).weights_label != "real":
        raise AcceptanceError(
            f"model: {model!r} resolves to random weights; acceptance measured with random weights is "
            "meaningless. Use a preset with real weights installed (e.g. smollm2-135m) or a checkpoint path"
        )


def measure(
    model: str,
    method: str,
    k: int,
    prompts: list[Prompt],
    *,
    max_tokens: int = 128,
    chat: bool = True,
    device: str | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    spec_kwargs: dict[str, Any] | None = None,
) -> tuple[AcceptanceResult, Any]:
    """Generate greedily for every prompt with (method, k) and count acceptance per category.

    Categories run one after another on one engine; each category's counters are the difference of the
    engine's cumulative counters around it. Returns the result and the engine (for metadata)."""
    from engine.llm import LLM
    from engine.sampling import SamplingParams
    from engine.spec.config import SpecConfig

    if method not in SPEC_METHODS:
        raise AcceptanceError(f"method: must be one of {', '.join(SPEC_METHODS)}, got {method!r}")
    llm = LLM(
        model,
        spec=SpecConfig(method=method, k=k, **(spec_kwargs or {})),
        weights="real",
        device=device,
        **(engine_kwargs or {}),
    )
    stats = llm.engine.spec_stats
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    by_cat: dict[str, list[Prompt]] = defaultdict(list)
    for p in prompts:
        by_cat[p.category].append(p)
    result: dict[str, Counters] = {}
    for cat, ps in by_cat.items():
        before = _snapshot(stats)
        llm.generate([p.text for p in ps], params, chat=chat)
        result[cat] = _diff(_snapshot(stats), before)
    return AcceptanceResult(method, k, _snapshot(stats), result), llm


def to_acceptance(res: AcceptanceResult, *, dataset: str, model: str, drafter: str | None) -> Acceptance:
    """The profile entry: overall numbers, with the per-category tokens per step in ``source.detail``."""
    cats = ", ".join(f"{c}={v.tokens_per_step(res.k):.3f}" for c, v in sorted(res.by_category.items()))
    return Acceptance(
        method=res.method,  # type: ignore[arg-type]
        k=res.k,
        draft_coverage=res.overall.coverage,
        accepted_per_pos=res.overall.per_pos(res.k),
        source=AcceptanceSource(
            kind="measured",
            dataset=dataset,
            model=model,
            drafter=drafter,
            detail=f"greedy, engine.LLM; tokens per step by category: {cats}",
        ),  # fmt: skip
        samples=res.overall.decode_steps,
    )


def _metadata_from(llm: Any, model: str, command: str) -> Metadata:
    """Metadata for a profile that holds acceptance only (no sweep yet)."""
    cfg = llm.engine.config
    runner = llm.engine.runner
    shape = ModelShape(
        layers=cfg.num_layers, hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, vocab=cfg.vocab_size,
        params=sum(p.numel() for p in runner.model.parameters()),
    )  # fmt: skip
    dev = str(runner.device)
    return Metadata(
        model=ModelInfo(name=model if not Path(model).exists() else cfg.name, shape=shape),
        hardware=Hardware(gpu_name="cpu" if dev == "cpu" else dev, gpu_count=1),
        engine=EngineInfo(name="specplan-engine", version=package_version()),
        backend="engine",
        dtype=str(runner.dtype).removeprefix("torch."),
        block_size=runner.block_size,
        kv_capacity_blocks_per_gpu=runner.num_blocks,
        weights="real",
        source="measured",
        created_at=now_utc(),
        command=command,
        notes="acceptance only: no decode or prefill surface measured in this file yet",
    )


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specplan")
    except PackageNotFoundError:
        return "unknown"


def fmt(rows: list[list[Any]], header: list[str]) -> str:
    """A right-aligned plain-text table."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_ks(value: str) -> list[int]:
    """``"1..8"``, ``"2,4"`` or ``"1..3,6"`` -> sorted unique ints >= 1; errors name field k."""
    out: set[int] = set()
    for part in (p.strip() for p in str(value).split(",") if p.strip()):
        try:
            if ".." in part:
                lo, hi = (int(x) for x in part.split("..", 1))
                if hi < lo:
                    raise AcceptanceError(f"k: range {part!r} is empty")
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise AcceptanceError(f"k: {part!r} is not an integer or a range like 1..8") from None
    if not out or min(out) < 1:
        raise AcceptanceError(f"k: values must be integers >= 1, got {value!r}")
    return sorted(out)


def table(results: list[AcceptanceResult]) -> str:
    """Per (k, category) rows plus an 'all' row: coverage, tokens per draft, tokens per step, per-pos."""
    rows = []
    for r in results:
        for cat, c in [*sorted(r.by_category.items()), ("all", r.overall)]:
            per = c.per_pos(r.k)
            rows.append(
                [
                    r.method,
                    r.k,
                    cat,
                    c.decode_steps,
                    f"{c.coverage:.3f}",
                    f"{1 + sum(per):.3f}",
                    f"{c.tokens_per_step(r.k):.3f}",
                    " ".join(f"{x:.2f}" for x in per),
                ]
            )
    return fmt(
        rows, ["method", "k", "category", "steps", "coverage", "tok/draft", "tok/step", "per position"]
    )


def _kv_blocks(prompts: list[Prompt], llm_tokens: int, k: int, block_size: int = 16) -> int:
    """A KV pool that holds one category's prompts at once, not the 4 GiB CPU default (a k sweep would
    otherwise hold several such pools while the previous engine is collected)."""
    per_seq = -(-(llm_tokens + k + block_size) // block_size)
    return max(64, per_seq * len(prompts) + 8)


def run_acceptance(a: argparse.Namespace) -> int:
    """Entry point of ``profiler acceptance`` (arguments defined in profiler/cli.py)."""
    import gc
    import shlex
    import sys

    from profiler.prompts import SPEC_BENCH

    try:
        ks = parse_ks(a.k)
        max_tokens = int(a.max_tokens)
        if max_tokens < 2:
            raise AcceptanceError(f"max_tokens: must be >= 2, got {max_tokens}")
        limit = getattr(a, "limit", None)
        if limit is not None and limit < 1:
            raise AcceptanceError(f"limit: must be >= 1 prompt per category, got {limit}")
        check_real_weights(a.model)
        dataset = Path(a.dataset) if a.dataset else SPEC_BENCH.resolve()
        prompts = load_prompts(dataset, per_category=limit)
    except (AcceptanceError, ValueError) as exc:
        print(f"profiler acceptance: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["profiler", *sys.argv[1:]])
    draft_model = getattr(a, "draft_model", None)
    out: Path | None = Path(a.out) if getattr(a, "out", None) else None
    largest = max(len(p.text) for p in prompts)  # bytes >= tokens for every tokenizer we ship
    results = []
    for k in ks:
        spec_kwargs = {"draft_model": draft_model} if draft_model else {}
        res, llm = measure(
            a.model, a.method, k, prompts, max_tokens=max_tokens, device=getattr(a, "device", None),
            spec_kwargs=spec_kwargs,
            engine_kwargs={"num_gpu_blocks": _kv_blocks(prompts, largest + max_tokens + 64, k)},
        )  # fmt: skip
        results.append(res)
        if out is not None:
            entry = to_acceptance(
                res,
                dataset=dataset.name,
                model=a.model,
                drafter=draft_model or (None if a.method == "ngram" else a.method),
            )
            append_point(out, entry, None if out.exists() else _metadata_from(llm, a.model, command))
        print(
            f"{a.method} k={k}: coverage {res.overall.coverage:.3f}, tokens/step "
            f"{res.overall.tokens_per_step(k):.3f} over {res.overall.decode_steps} decode steps"
            + (f" -> {out}" if out else ""),
            flush=True,
        )
        del llm
        gc.collect()
    print(table(results))
    return 0
