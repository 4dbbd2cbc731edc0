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
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import metrics as md
from common.methods import SPEC_METHODS
from common.tables import text_table
from planner.profile import Acceptance, AcceptanceSource, Metadata, append_point
from profiler.sweep import engine_metadata


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


@dataclass
class PromptSet:
    """Prompts of one run with their token lengths (chat template applied), ready to batch."""

    prompts: list[Prompt]
    lengths: list[int]
    skipped: int  # prompts too long for the model's context with max_tokens and k on top


def tokenized(
    model: str, prompts: list[Prompt], *, chat: bool, room: int, per_category: int | None = None
) -> PromptSet:
    """Token lengths from the model's own tokenizer; drops prompts that leave less than ``room``
    tokens of the model's context (a KV pool is then sized from the longest kept prompt, not a guess),
    then keeps the first ``per_category`` that fit of each category."""
    from engine.presets import resolve_model
    from engine.tokenizer import load_tokenizer

    source = resolve_model(model, weights="real")
    tok = load_tokenizer(source)
    limit = source.config.max_position_embeddings
    kept, lengths, too_long = [], [], 0
    taken: dict[str, int] = defaultdict(int)
    for p in prompts:
        if per_category is not None and taken[p.category] >= per_category:
            continue
        text = tok.apply_chat_template([{"role": "user", "content": p.text}]) if chat else p.text
        n = len(tok.encode(text))
        if n + room > limit:
            too_long += 1
            continue
        kept.append(p)
        lengths.append(n)
        taken[p.category] += 1
    if not kept:
        raise AcceptanceError(
            f"dataset: every selected prompt is longer than the model's context {limit} - {room}"
        )
    return PromptSet(kept, lengths, too_long)


def pool_blocks(longest: int, max_tokens: int, k: int, batch: int, block_size: int = 16) -> int:
    """KV blocks for ``batch`` running sequences of the longest prompt plus output and lookahead: the
    pool holds the running batch, not the whole prompt set (which took 13 GB with --limit 10)."""
    per_seq = -(-(longest + max_tokens + k + 1) // block_size)
    return batch * per_seq + 1  # + the engine's null block


def measure(
    model: str,
    spec: dict[str, Any],
    prompts: PromptSet,
    *,
    max_tokens: int = 128,
    batch: int = 8,
    chat: bool = True,
    device: str | None = None,
    progress: bool = True,
) -> tuple[AcceptanceResult, Any]:
    """Generate greedily for every prompt under ``spec`` (SpecConfig fields) and count acceptance per
    category, ``batch`` prompts at a time on one engine whose KV pool holds one such batch.

    Each category's counters are the difference of the engine's cumulative counters around it. Returns
    the result and the engine (for metadata and the resolved drafter settings)."""
    from tqdm import tqdm

    from engine.llm import LLM
    from engine.sampling import SamplingParams
    from engine.spec.config import SpecConfig

    method, k = spec["method"], spec["k"]
    if method not in SPEC_METHODS:
        raise AcceptanceError(f"method: must be one of {', '.join(SPEC_METHODS)}, got {method!r}")
    if batch < 1:
        raise AcceptanceError(f"batch: must be >= 1, got {batch}")
    cfg = SpecConfig(**spec)
    blocks = pool_blocks(max(prompts.lengths), max_tokens, cfg.num_lookahead_tokens, batch)
    llm = LLM(model, spec=cfg, weights="real", device=device, max_num_seqs=batch, num_gpu_blocks=blocks)
    stats = llm.engine.spec_stats
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    by_cat: dict[str, list[Prompt]] = defaultdict(list)
    for p in prompts.prompts:
        by_cat[p.category].append(p)
    result: dict[str, Counters] = {}
    bar = tqdm(total=len(prompts.prompts), unit="prompt", disable=not progress, file=sys.stderr,
               desc=f"{method} k={k}", dynamic_ncols=True)  # fmt: skip
    try:
        for cat, ps in by_cat.items():
            bar.set_postfix_str(cat)
            before = _snapshot(stats)
            for i in range(0, len(ps), batch):
                chunk = ps[i : i + batch]
                llm.generate([p.text for p in chunk], params, chat=chat)
                bar.update(len(chunk))
            result[cat] = _diff(_snapshot(stats), before)
    finally:
        bar.close()
    return AcceptanceResult(method, k, _snapshot(stats), result), llm


def to_acceptance(
    res: AcceptanceResult,
    *,
    dataset: str,
    model: str,
    drafter: str | None,
    settings: dict[str, str | int | float] | None,
) -> list[Acceptance]:
    """Profile entries: the whole mix first (workload None), then one per category that decoded."""
    cats = ", ".join(f"{c}={v.tokens_per_step(res.k):.3f}" for c, v in sorted(res.by_category.items()))
    source = AcceptanceSource(
        kind="measured", dataset=dataset, model=model, drafter=drafter,
        detail=f"greedy, engine.LLM; tokens per step by category: {cats}",
    )  # fmt: skip
    out = []
    for workload, c in [(None, res.overall), *sorted(res.by_category.items())]:
        if c.decode_steps <= 0:
            continue
        out.append(
            Acceptance(
                method=res.method,  # type: ignore[arg-type]
                k=res.k,
                draft_coverage=c.coverage,
                accepted_per_pos=c.per_pos(res.k),
                source=source,
                samples=c.decode_steps,
                workload=workload,
                drafter_settings=settings,
            )
        )
    return out


def _metadata_from(llm: Any, model: str, command: str) -> Metadata:
    """Metadata for a profile that holds acceptance only (no sweep yet): the same a sweep of this model
    on this device records, so a later sweep appends to the file."""
    from engine.step_profiler import describe_device

    cfg = llm.engine.config
    runner = llm.engine.runner
    info = {
        "model_info": {
            "name": model if not Path(model).exists() else cfg.name,
            "shape": cfg.shape_dict(),
            "weights": llm.weights_label,  # real: random weights are refused before any run
        },
        "device_name": describe_device(runner.device),
        "dtype": str(runner.dtype).removeprefix("torch."),
        "block_size": runner.block_size,
        "kv_capacity_blocks": runner.num_blocks,
    }
    return engine_metadata(
        model, 1, info, command, "acceptance only: no decode or prefill surface measured in this file yet"
    )


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
    return text_table(
        rows, ["method", "k", "category", "steps", "coverage", "tok/draft", "tok/step", "per position"]
    )


def spec_fields(method: str, k: int, a: Any) -> dict[str, Any]:
    """SpecConfig fields for (method, k) from the drafter options on ``a`` (CLI args or a sweep config)."""
    spec: dict[str, Any] = {"method": method, "k": k}
    if method == "ngram":
        spec["prompt_lookup_min"] = getattr(a, "prompt_lookup_min", None)
        spec["prompt_lookup_max"] = getattr(a, "prompt_lookup_max", None)
    elif method == "draft":
        if getattr(a, "draft_model", None):
            spec["draft_model"] = a.draft_model
        else:
            spec["draft_layers"] = getattr(a, "draft_layers", None) or 1
    return spec


def measure_entries(
    model: str,
    spec: dict[str, Any],
    prompts: PromptSet,
    *,
    dataset: str,
    max_tokens: int,
    batch: int,
    device: str | None = None,
    progress: bool = True,
) -> tuple[AcceptanceResult, list[Acceptance], Any]:
    """One measuring pass and its profile entries, with the drafter's resolved settings recorded."""
    res, llm = measure(model, spec, prompts, max_tokens=max_tokens, batch=batch, device=device,
                       progress=progress)  # fmt: skip
    settings = llm.engine.spec.drafter_settings()  # the window the engine ran, defaults resolved
    drafter = spec.get("draft_model") or (None if spec["method"] == "ngram" else spec["method"])
    entries = to_acceptance(res, dataset=dataset, model=model, drafter=drafter, settings=settings)
    return res, entries, llm


def run_acceptance(a: argparse.Namespace) -> int:
    """Entry point of ``profiler acceptance`` (arguments defined in profiler/cli.py)."""
    import shlex

    try:
        run = _checked_run(a)
    except (AcceptanceError, ValueError) as exc:
        print(f"profiler acceptance: {exc}", file=sys.stderr)
        return 2
    skipped = run.prompts.skipped
    if skipped:
        print(f"acceptance: passed over {skipped} prompt(s) longer than the model's context allows",
              file=sys.stderr)  # fmt: skip
    command = shlex.join(["profiler", *sys.argv[1:]])
    out: Path | None = Path(a.out) if getattr(a, "out", None) else None
    results = [_measure_k(a, run, k, out, command) for k in run.ks]
    print(table(results))
    return 0


@dataclass
class _AcceptanceRun:
    """The checked arguments of one ``profiler acceptance`` run."""

    ks: list[int]
    max_tokens: int
    batch: int
    dataset: Path
    prompts: PromptSet


def _checked_run(a: argparse.Namespace) -> _AcceptanceRun:
    """Every argument checked, and the prompts tokenized, before the first model loads (an
    AcceptanceError or ValueError names the bad one)."""
    from profiler.prompts import SPEC_BENCH

    ks = parse_ks(a.k)
    max_tokens = int(a.max_tokens)
    if max_tokens < 2:
        raise AcceptanceError(f"max_tokens: must be >= 2, got {max_tokens}")
    limit = getattr(a, "limit", None)
    if limit is not None and limit < 1:
        raise AcceptanceError(f"limit: must be >= 1 prompt per category, got {limit}")
    batch = int(getattr(a, "batch", 8))
    if batch < 1:
        raise AcceptanceError(f"batch: must be >= 1, got {batch}")
    check_real_weights(a.model)
    dataset = Path(a.dataset) if a.dataset else SPEC_BENCH
    categories = getattr(a, "categories", None) or None
    if categories:
        _check_categories(dataset, categories)
    prompts = tokenized(
        a.model, load_prompts(dataset, categories=categories), chat=True, room=max_tokens + max(ks) + 1,
        per_category=limit,
    )  # fmt: skip
    _check_drafter(a, ks)
    return _AcceptanceRun(ks, max_tokens, batch, dataset, prompts)


def _check_categories(dataset: Path, categories: list[str]) -> None:
    """Categories the dataset does not have would measure nothing."""
    known = {p.category for p in load_prompts(dataset)}
    unknown = sorted(set(categories) - known)
    if unknown:
        raise AcceptanceError(f"categories: {unknown} not in {dataset.name} (has {sorted(known)})")


def _check_drafter(a: argparse.Namespace, ks: list[int]) -> None:
    """The method and its drafter options, through SpecConfig for every k."""
    from engine.spec.config import SpecConfig

    if a.method not in SPEC_METHODS:
        raise AcceptanceError(f"method: must be one of {', '.join(SPEC_METHODS)}, got {a.method!r}")
    for k in ks:
        SpecConfig(**spec_fields(a.method, k, a))


def _measure_k(
    a: argparse.Namespace, run: _AcceptanceRun, k: int, out: Path | None, command: str
) -> AcceptanceResult:
    """Measure one k, append its entries to ``out`` (the file's first entry brings the metadata) and
    print its line; the engine is released before the next k loads its own."""
    import gc

    res, entries, llm = measure_entries(
        a.model, spec_fields(a.method, k, a), run.prompts, dataset=run.dataset.name,
        max_tokens=run.max_tokens, batch=run.batch, device=getattr(a, "device", None),
        progress=not getattr(a, "no_progress", False),
    )  # fmt: skip
    if out is not None:
        for entry in entries:
            append_point(out, entry, None if out.exists() else _metadata_from(llm, a.model, command))
    settings = entries[0].drafter_settings if entries else None
    print(
        f"{a.method} k={k} {settings or ''}: coverage {res.overall.coverage:.3f}, tokens/step "
        f"{res.overall.tokens_per_step(k):.3f} over {res.overall.decode_steps} decode steps"
        + (f" -> {out} ({len(entries)} entries)" if out else ""),
        flush=True,
    )
    del llm
    gc.collect()
    return res


def given_acceptance(method: str, k: int, alpha: float, why: str) -> Acceptance:
    """A user-given per-position acceptance (``alpha`` at position i is ``alpha ** (i + 1)``, every
    step drafting), stored so the sweep's closing plan and ``planner plan`` on the file agree."""
    return Acceptance(
        method=method,  # type: ignore[arg-type]
        k=k,
        draft_coverage=1.0,
        accepted_per_pos=[alpha ** (i + 1) for i in range(k)],
        source=AcceptanceSource(
            kind="given", detail=f"alpha={alpha} per position, coverage 1.0 assumed; {why}"
        ),
    )


def _skip_reason(method: str, cfg: Any) -> str | None:
    """Why (method) cannot be measured with this sweep's drafter, or None."""
    from engine.presets import resolve_model

    if method not in SPEC_METHODS:
        return f"method {method!r} has no drafter in the engine"
    if method == "medusa":
        return "the engine's Medusa heads are random here: their acceptance would describe nothing"
    if method == "draft" and cfg.draft_model and resolve_model(cfg.draft_model).weights_label != "real":
        return f"drafter {cfg.draft_model!r} has random weights: its acceptance would describe nothing"
    return None


def sweep_acceptance(
    cfg: Any, out: Path, weights: str, *, in_process: bool = True, progress: bool = True
) -> list[Acceptance]:
    """Acceptance for every speculative (method, k) of a sweep grid, written into its profile.

    Real weights: measured on the shipped Spec-Bench prompts (``cfg.acceptance_prompts`` per category),
    one entry for the mix and one per category, unless ``cfg.measure_acceptance`` is off (``in_process``
    False: a server backend, whose counters gave it already). Random weights: none measured (said so);
    the grid's given ``acceptance`` is stored as a ``given`` entry instead."""
    import gc

    from profiler.prompts import SPEC_BENCH

    keys = sorted({(p.method, p.k) for p in cfg.points() if p.method != "none"})
    if not keys or not out.exists():
        return []
    written: list[Acceptance] = []
    if weights != "real":
        if cfg.acceptance is None:
            print(f"acceptance: none recorded ({weights} weights give no meaningful acceptance; plans "
                  "use --acceptance or a literature prior)", file=sys.stderr)  # fmt: skip
            return []
        why = f"the sweep's grid ({weights} weights measure none)"
        written = [given_acceptance(m, k, float(cfg.acceptance), why) for m, k in keys]
        for entry in written:
            append_point(out, entry)
        print(f"acceptance: {weights} weights measure none; stored the grid's given alpha={cfg.acceptance:g} "
              f"for {len(written)} (method, k)", file=sys.stderr)  # fmt: skip
        return written
    if not in_process:
        return []
    if not cfg.measure_acceptance:
        print("acceptance: not measured (--no-acceptance)", file=sys.stderr)
        return []
    room = cfg.max_tokens + max(k for _, k in keys) + 1
    prompts = tokenized(
        cfg.model, load_prompts(SPEC_BENCH, categories=cfg.categories), chat=True, room=room,
        per_category=cfg.acceptance_prompts,
    )  # fmt: skip
    for method, k in keys:
        why = _skip_reason(method, cfg)
        if why:
            print(f"acceptance: {method} k={k} not measured: {why}", file=sys.stderr)
            continue
        print(f"acceptance: {method} k={k} on {len(prompts.prompts)} Spec-Bench prompts", file=sys.stderr)
        try:
            _, entries, llm = measure_entries(
                cfg.model, spec_fields(method, k, cfg), prompts, dataset=SPEC_BENCH.name,
                max_tokens=cfg.max_tokens, batch=cfg.acceptance_batch, progress=progress,
            )  # fmt: skip
        except (KeyboardInterrupt, AcceptanceError):
            raise
        except Exception as exc:  # noqa: BLE001 - the sweep's surfaces stand; this (method, k) says why
            print(f"acceptance: {method} k={k} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        for entry in entries:
            append_point(out, entry)
        written += entries
        del llm
        gc.collect()
    return written
