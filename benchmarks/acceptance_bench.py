"""Acceptance of speculative decoding per Spec-Bench category, on CPU with real SmolLM2 weights.

For each category, greedy generation through LLMEngine with speculation on (default: prompt lookup,
k = 4) over the first N questions' first turn (chat template applied), and the engine's SpecStats
counters over that category: decode steps, drafts, draft coverage, acceptance rate per draft
position, acceptance given a draft and tokens per decode step (definitions in engine/spec/stats.py
and common/metrics.py). Prints a markdown table and writes a JSON document.

    python benchmarks/acceptance_bench.py --method ngram --k 4 --num-prompts 10 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.methods import SPEC_METHODS  # noqa: E402
from engine.engine_config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.spec import SpecConfig, SpecStats  # noqa: E402
from profiler.prompts import SPEC_BENCH  # noqa: E402

DATA = SPEC_BENCH
MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


def load_questions(path: Path) -> dict[str, list[str]]:
    """First turns grouped by Spec-Bench category (MT-bench's 8 sub-categories are one)."""
    out: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        q = json.loads(line)
        cat = "mt_bench" if q["category"] in MT_BENCH else q["category"]
        out[cat].append(q["turns"][0])
    return out


def snapshot(s: SpecStats) -> SpecStats:
    return SpecStats(
        s.num_decode_steps, s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, list(s.accepted_per_pos)
    )


def diff(after: SpecStats, before: SpecStats) -> SpecStats:
    n = len(after.accepted_per_pos)
    prev = before.accepted_per_pos + [0] * (n - len(before.accepted_per_pos))
    return SpecStats(
        after.num_decode_steps - before.num_decode_steps,
        after.num_drafts - before.num_drafts,
        after.num_draft_tokens - before.num_draft_tokens,
        after.num_accepted_tokens - before.num_accepted_tokens,
        [a - b for a, b in zip(after.accepted_per_pos, prev, strict=True)],
    )


def run_category(
    engine: LLMEngine, prompts: list[list[int]], max_tokens: int
) -> tuple[SpecStats, int, float]:
    assert engine.spec_stats is not None
    before = snapshot(engine.spec_stats)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", p, params)
    generated = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                generated += len(out.token_ids)
    return diff(engine.spec_stats, before), generated, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="ngram", choices=SPEC_METHODS)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument(
        "--draft-layers", type=int, default=None, help="draft method: target truncated to N layers"
    )
    ap.add_argument("--num-prompts", type=int, default=10, help="questions per category (the first N)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--max-prompt-tokens", type=int, default=3072, help="longer prompts are skipped (counted)"
    )
    ap.add_argument("--max-num-seqs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--categories", nargs="*", default=list(CATEGORIES))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "acceptance_ngram_k4.json")
    # The recorded numbers (RESULTS.md) ran the window 1..4; the engine's own default is now vLLM's (5..5).
    ap.add_argument("--prompt-lookup-min", type=int, default=1)
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec_kwargs: dict = {"method": args.method, "k": args.k}
    if args.method == "ngram":
        spec_kwargs |= {
            "prompt_lookup_min": args.prompt_lookup_min,
            "prompt_lookup_max": args.prompt_lookup_max,
        }
    if args.method == "draft":
        spec_kwargs["draft_layers"] = args.draft_layers or 4
    spec = SpecConfig(**spec_kwargs)
    max_len = args.max_prompt_tokens + args.max_tokens + args.k + 64
    engine = LLMEngine(
        EngineConfig(
            args.model,
            device="cpu",
            dtype="float32",
            weights="real",
            spec=spec,
            max_num_seqs=args.max_num_seqs,
            max_model_len=max_len,
            num_gpu_blocks=args.max_num_seqs * (-(-max_len // 16)) + 64,
        )
    )
    questions = load_questions(args.data)
    tok = engine.tokenizer
    rows = []
    total = SpecStats()
    for cat in args.categories:
        if cat not in questions:
            raise SystemExit(
                f"--categories: {cat!r} is not a Spec-Bench category ({', '.join(sorted(questions))})"
            )
        prompts, skipped = [], 0
        for text in questions[cat][: args.num_prompts]:
            ids = tok.encode(
                tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False
            )
            if len(ids) > args.max_prompt_tokens:
                skipped += 1
                continue
            prompts.append(ids)
        stats, generated, secs = run_category(engine, prompts, args.max_tokens)
        total.merge(stats)
        row = {
            "category": cat,
            "prompts": len(prompts),
            "skipped_long": skipped,
            "mean_prompt_tokens": sum(map(len, prompts)) / max(len(prompts), 1),
            "generated_tokens": generated,
            "wall_s": secs,
            **stats.to_dict(),
        }
        rows.append(row)
        print(
            f"[{cat}] {row['prompts']} prompts, {generated} tokens, {secs:.0f}s", file=sys.stderr, flush=True
        )
    rows.append({"category": "all", **total.to_dict()})
    print(
        "| category | prompts | decode steps | drafts | coverage | accept per pos | acc/draft | tokens/step |"
    )
    print("|" + "---|" * 8)
    for r in rows:
        per_pos = " ".join(f"{x:.2f}" for x in r["acceptance_rate_per_pos"][: args.k])
        print(
            f"| {r['category']} | {r.get('prompts', '')} | {r['num_decode_steps']} | {r['num_drafts']} | "
            f"{r['draft_coverage']:.3f} | {per_pos} | {r['acceptance_given_draft']:.3f} | "
            f"{r['tokens_per_step']:.3f} |"
        )
    doc = {
        "benchmark": "acceptance_bench",
        "command": " ".join(
            ["python benchmarks/acceptance_bench.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "model": args.model,
        "weights": engine.weights_label,
        "spec": {k: v for k, v in spec_kwargs.items()},
        "max_tokens": args.max_tokens,
        "num_prompts_per_category": args.num_prompts,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": torch.get_num_threads(),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
