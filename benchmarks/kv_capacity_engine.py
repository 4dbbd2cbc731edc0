"""Where this project's engine starts to preempt, against kvbm.capacity's "engine" rule (CPU, tiny preset).

k = 0: one wave of ``c`` distinct prompts, all admitted together, scanned around the static bound at
contexts on both sides of a block boundary. ngram: coverage and per-position acceptance measured at a low
concurrency (the engine's own counters), the onset predicted from them (``kvbm.capacity.dynamic_bound``),
then ``c`` closed-loop clients (``waves`` requests each) scanned from the worst case up. Preemptions are
``scheduler.num_preemptions``. Prints a markdown table.

Usage: PYTHONPATH=$PWD python benchmarks/kv_capacity_engine.py [--blocks 40 --block-size 8]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform

from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.spec.config import SpecConfig
from kvbm import capacity


def make_engine(num_blocks: int, block_size: int, k: int = 0) -> LLMEngine:
    # a 1..3-token lookup window: vLLM's default (5..5) rarely matches in these short repeating prompts
    spec = SpecConfig(method="ngram", k=k, prompt_lookup_min=1, prompt_lookup_max=3) if k else None
    return LLMEngine(EngineConfig(
        "tiny", device="cpu", num_gpu_blocks=num_blocks, block_size=block_size, spec=spec,
        cuda_graphs=False, max_num_seqs=256,
    ))  # fmt: skip


def prompt(i: int, isl: int) -> list[int]:
    """A distinct prompt (no shared prefix block) that repeats, so prompt lookup finds matches."""
    return [256, *f"r{i} ".encode(), *(b"ab cd ef " * 40)][:isl]


def closed_loop(engine: LLMEngine, c: int, waves: int, isl: int, osl: int) -> int:
    """``c`` clients send ``waves`` requests each back to back (all start together); preemptions seen."""
    params = SamplingParams(max_tokens=osl, ignore_eos=True)
    sent: dict[str, int] = {}
    count = 0
    for _ in range(c):
        engine.add_request(f"q{count}", prompt(count, isl), params)
        sent[f"q{count}"] = 1
        count += 1
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                if out.finish_reason != "length" or len(out.token_ids) != osl:
                    raise RuntimeError(
                        f"{out.request_id} ended with {out.finish_reason} after {len(out.token_ids)}"
                    )
                wave = sent.pop(out.request_id)
                if wave < waves:
                    engine.add_request(f"q{count}", prompt(count, isl), params)
                    sent[f"q{count}"] = wave + 1
                    count += 1
        steps += 1
        if steps > 20 * waves * (osl + 2):
            raise RuntimeError("the engine stopped making progress")
    if engine.kv_manager.num_free_blocks != engine.kv_manager.num_blocks:
        raise RuntimeError("blocks leaked")
    return engine.scheduler.num_preemptions


def measured_acceptance(engine: LLMEngine, k: int) -> tuple[float, list[float]]:
    st = engine._spec_stats
    if st is None or st.num_drafts == 0:
        raise RuntimeError("the calibration run carried no draft")
    acc = [a / st.num_drafts for a in st.accepted_per_pos[:k]]
    return st.num_drafts / st.num_decode_steps, acc + [0.0] * (k - len(acc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--contexts", default="10:15,10:16,10:23,10:24", help="isl:osl pairs for k=0")
    ap.add_argument("--ngram-context", default="10:15")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--waves", type=int, default=3)
    args = ap.parse_args(argv)
    logging.getLogger("engine").setLevel(logging.ERROR)  # the small pool is the point here
    n, bs = args.blocks, args.block_size
    print(f"# {platform.node()}, {os.cpu_count()} CPUs; engine 'tiny' random weights; {n} blocks of {bs}")
    print(
        "| method | k | isl | osl | old planner | rule / predicted onset | observed max without preemption "
        "| observed onset | coverage |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for pair in args.contexts.split(","):
        isl, osl = (int(x) for x in pair.split(":"))
        rule = capacity.static_bound("engine", "none", 0, n, isl + osl, bs).max_concurrency
        seen = {c: closed_loop(make_engine(n, bs), c, 1, isl, osl) for c in range(max(1, rule - 1), rule + 2)}
        onset = min((c for c, p in seen.items() if p), default=None)
        ok = max((c for c, p in seen.items() if not p and (onset is None or c < onset)), default=None)
        old = capacity.max_concurrency(n, isl + osl, 0, bs)
        print(f"| none | 0 | {isl} | {osl} | {old} | {rule} (max) | {ok} | {onset} | - |", flush=True)
    isl, osl = (int(x) for x in args.ngram_context.split(":"))
    for k in (int(x) for x in args.ks.split(",")):
        calib = make_engine(n, bs, k)
        closed_loop(calib, 2, args.waves, isl, osl)
        cov, acc = measured_acceptance(calib, k)
        pred = capacity.dynamic_bound("engine", n, bs, isl, osl, k, cov, acc, waves=args.waves)
        worst = capacity.static_bound("engine", "ngram", k, n, isl + osl, bs).max_concurrency
        seen, c = {}, max(1, worst)
        while c <= pred.onset + 3 and sum(1 for p in list(seen.values())[-2:] if p) < 2:
            seen[c] = closed_loop(make_engine(n, bs, k), c, args.waves, isl, osl)
            c += 1
        onset = min((c for c, p in seen.items() if p), default=None)
        ok = max((c for c, p in seen.items() if not p and (onset is None or c < onset)), default=None)
        old = capacity.max_concurrency(n, isl + osl, k, bs)
        print(
            f"| ngram | {k} | {isl} | {osl} | {old} | {pred.onset} (max {pred.max_concurrency}) | {ok} "
            f"| {onset} | {cov:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
