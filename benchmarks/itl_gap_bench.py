"""Where a served request's ITL goes beyond the profiled decode step (issues 13 and 17).

``profiler validate`` compares the planner's ITL (the profiled decode step / tokens per step) with the
ITL a client measures through ``engine serve``. This script runs the same engine in-process, with no
HTTP server, in the same closed loop (``--concurrency`` requests in flight, prompts of ``--isl`` random
tokens, output lengths spread around ``--osl`` as validate sends them, ignore EOS; a record pass over the
same prompts first, so the controlled drafter has continuations for the measured ones) and splits the
client's ITL into:

- decode steps: the mean wall time of steps that ran no prefill, and the tokens each request got;
- prefill stalls: steps that ran a prefill (a new request's prompt) while others were decoding;
- per-phase GPU time of decode steps (propose, schedule, prepare, forward, sample_verify, ...), from the
  engine's own PhaseClock on a separate pass (the clock synchronises once per step).

The ITL of a request is ``(last token time - first token time) / (tokens - 1)``, as ``profiler
validate`` counts it. Compare the in-process ITL with validate's HTTP ITL at the same point: the
difference is what the server process adds.

    PYTHONPATH=. python3 benchmarks/itl_gap_bench.py --model vicuna-7b --weights random \\
        --spec ngram --k 4 --spec-controlled alpha=0.7,coverage=0.8 --concurrency 2,32 --isl 736 --osl 64
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np

from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.spec.flags import add_spec_arguments, spec_config
from engine.warmup import graph_counters, wants_warm_up, warm_up
from profiler.validate import spread_output_lengths


def closed_loop(engine: LLMEngine, prompts: list[list[int]], concurrency: int, osl: list[int], clock=None):
    """Run ``prompts`` with ``concurrency`` in flight, prompt i for ``osl[i]`` tokens; per-step records and
    per-request token times."""
    todo = list(enumerate(prompts))
    in_flight: set[str] = set()
    times: dict[str, list[float]] = {}
    # (ms, requests still in prefill, requests decoding, tokens, eager executes, phases); a request is in
    # prefill until its first token arrives, so a chunk of a long prompt counts as a prefill step too
    steps: list[tuple[float, int, int, int, int, dict | None]] = []
    while todo or in_flight:
        while todo and len(in_flight) < concurrency:
            i, p = todo.pop(0)
            rid = f"r{i}-{time.monotonic_ns()}"
            engine.add_request(rid, p, SamplingParams(max_tokens=osl[i], temperature=0.0, ignore_eos=True))
            in_flight.add(rid)
            times[rid] = []
        prefilling = sum(1 for r in in_flight if not times[r])
        decoding = len(in_flight) - prefilling
        eager0 = _eager_executes(engine)
        t0 = time.perf_counter()
        outs = engine.step()
        ms = (time.perf_counter() - t0) * 1e3
        phases = clock.stop() if clock is not None and clock._t0 is not None else None
        tokens = 0
        now = time.perf_counter()
        for o in outs:
            if not o.new_token_ids:
                continue
            times[o.request_id].extend([now] * len(o.new_token_ids))
            tokens += len(o.new_token_ids)
            if o.finished:
                in_flight.discard(o.request_id)
        steps.append((ms, prefilling, decoding, tokens, _eager_executes(engine) - eager0, phases))
    return steps, times


class GcTime:
    """Milliseconds the garbage collector ran (and its full collections) since ``reset``: a collection
    inside a step delays every request of that step."""

    def __init__(self) -> None:
        self.reset()
        self._t0 = 0.0
        gc.callbacks.append(self._on_gc)

    def reset(self) -> None:
        self.ms, self.full = 0.0, 0

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._t0) * 1e3
            self.full += info.get("generation") == 2


def _eager_executes(engine: LLMEngine) -> int:
    """Eager forwards so far, target and drafter (``GraphCounters``)."""
    return sum(c.eager_executes for c in graph_counters(engine).values())


def _counters_summary(engine: LLMEngine) -> str:
    """Graph captures (their seconds) / replays / eager forwards since the last reset, every runner."""
    cs = list(graph_counters(engine).values())
    captures, seconds = sum(c.captures for c in cs), sum(c.capture_s for c in cs)
    replays, eager = sum(c.replays for c in cs), sum(c.eager_executes for c in cs)
    return f"{captures} ({seconds:.1f} s) / {replays} / {eager}"


def _top_eager_shapes(engine: LLMEngine, n: int = 6) -> str:
    counters = graph_counters(engine).items()
    shapes = [((name, *shape), m) for name, c in counters for shape, m in c.eager.items()]
    return ", ".join(f"{k} x{m}" for k, m in sorted(shapes, key=lambda kv: -kv[1])[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vicuna-7b")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--concurrency", default="2,32")
    ap.add_argument("--isl", type=int, default=736)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--requests-per-seq", type=int, default=2, help="requests per in-flight slot")
    ap.add_argument("--passes", type=int, default=1, help="measured passes after the warm-up pass")
    ap.add_argument(
        "--spread", action=argparse.BooleanOptionalAction, default=True,
        help="output lengths spread around --osl as profiler validate sends them (default on)",
    )  # fmt: skip
    ap.add_argument(
        "--warm-up", action=argparse.BooleanOptionalAction, default=None,
        help="engine serve's start-up warm-up before the first pass (default: on a GPU, as engine serve)",
    )  # fmt: skip
    add_spec_arguments(ap)
    args = ap.parse_args()
    spec = spec_config(args, "itl_gap_bench")
    concs = [int(c) for c in args.concurrency.split(",")]
    engine = LLMEngine(
        EngineConfig(
            args.model,
            dtype=args.dtype,
            weights=args.weights,
            max_num_seqs=max(concs),
            max_model_len=args.isl + 2 * args.osl + 64,  # spread outputs reach 1.5 x osl
            spec=spec,
            enable_prefix_caching=False,  # as profiler validate's server: every pass prefills its prompts
        )
    )
    if wants_warm_up(args.warm_up, engine):
        print(f"# {warm_up(engine).describe()}")
    gc_time = GcTime()
    rng = np.random.default_rng(0)
    vocab = engine.runner.config.vocab_size
    label = f"{args.spec} k={args.k or 0}"
    print(f"# {args.model} ({args.weights} weights) {label}, isl {args.isl}, osl {args.osl}")
    print(
        "| method | c | pass | ITL ms (client) | decode step ms (mean / median) | tok/step "
        "| decode-only ITL ms | prefill steps | mean prefill step ms | stall ms per token "
        "| decode steps eager / graphed (n x mean ms) "
        "| graph captures (s) / replays / eager executes | GC ms (full collections) "
        "| top phases of a decode step (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    eager_notes: list[str] = []
    for c in concs:
        n = c * args.requests_per_seq
        prompts = [rng.integers(3, vocab, args.isl).tolist() for _ in range(n)]
        # output lengths spread around osl as profiler validate sends them (--no-spread: all osl)
        lengths = spread_output_lengths(args.osl, n) if args.spread else [args.osl] * n
        # record pass (the controlled drafter's continuations, k + 1 past the longest) and warm-up
        closed_loop(engine, prompts, c, [max(lengths) + (args.k or 0) + 1] * n)
        for measured in range(1, args.passes + 1):
            for counters in graph_counters(engine).values():
                counters.reset()
            gc_time.reset()
            row = measure_pass(engine, prompts, c, lengths)
            end = " |\n" if measured < args.passes else ""
            gc_cell = f"{gc_time.ms:.1f} ({gc_time.full})"
            cells = f"| {label} | {c} | {measured} | {row} | {_counters_summary(engine)} | {gc_cell} |"
            print(cells, end=end, flush=True)
            eager_notes.append(f"c={c} pass {measured}: {_top_eager_shapes(engine)}")
        print(" " + phase_breakdown(engine, prompts, c, lengths) + " |", flush=True)
    print("\neager executes by (model, sequences, tokens, max query length), most frequent first:")
    print("\n".join(eager_notes))


def measure_pass(engine: LLMEngine, prompts: list[list[int]], c: int, osl: list[int]) -> str:
    """One closed-loop pass; its row's cells from ITL to stall."""
    steps, times = closed_loop(engine, prompts, c, osl)
    itls = [(t[-1] - t[0]) * 1e3 / (len(t) - 1) for t in times.values() if len(t) > 1]
    decode = [s for s in steps if s[1] == 0 and s[2] > 0]
    prefill = [s for s in steps if s[1] > 0]
    dec = [s[0] for s in decode]
    per_req_tok = sum(s[3] for s in decode) / sum(s[2] for s in decode)  # tokens per decoding request
    # each prefill step holds back the requests decoding in it: ms per output token of one request
    stall = sum(s[0] for s in prefill) / max(1, sum(s[3] for s in steps)) * c
    pre_ms = statistics.mean(s[0] for s in prefill) if prefill else 0.0
    eager = [s[0] for s in decode if s[4]]
    graphed = [s[0] for s in decode if not s[4]]
    split = (
        f"{len(eager)} x {statistics.mean(eager) if eager else 0:.2f} / "
        f"{len(graphed)} x {statistics.mean(graphed) if graphed else 0:.2f}"
    )
    return (
        f"{statistics.mean(itls):.3f} | {statistics.mean(dec):.3f} / {statistics.median(dec):.3f} | "
        f"{per_req_tok:.2f} | {statistics.mean(dec) / per_req_tok:.3f} | {len(prefill)} | {pre_ms:.2f} | "
        f"{stall:.3f} | {split}"
    )


def phase_breakdown(engine: LLMEngine, prompts: list[list[int]], c: int, osl: list[int]) -> str:
    """Median ms per phase of the decode steps of one more pass, timed by the engine's own clock."""
    from engine.phases import PhaseClock

    engine.clock = PhaseClock(engine.runner.device)
    steps, _ = closed_loop(engine, prompts, c, osl, clock=engine.clock)
    engine.clock = None
    acc: dict[str, list[float]] = {}
    for _ms, prefilling, decoding, _tok, _eager, ph in steps:
        if prefilling == 0 and decoding > 0 and ph:
            for k, v in ph.items():
                acc.setdefault(k, []).append(v)
    medians = sorted(((statistics.median(v), k) for k, v in acc.items()), reverse=True)
    return ", ".join(f"{k} {ms:.2f}" for ms, k in medians)


if __name__ == "__main__":
    main()
