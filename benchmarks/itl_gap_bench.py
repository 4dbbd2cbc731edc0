"""Where a served request's ITL goes beyond the profiled decode step (issues 13 and 17).

``profiler validate`` compares the planner's ITL (the profiled decode step / tokens per step) with the
ITL a client measures through ``engine serve``. This script runs the same engine in-process, with no
HTTP server, in the same closed loop (``--concurrency`` requests in flight, prompts of ``--isl`` random
tokens, ``--osl`` output tokens, ignore EOS; two waves over the same prompts so the controlled drafter
has recorded continuations for the second, measured one) and splits the client's ITL into:

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
import statistics
import time

import numpy as np

from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.spec.flags import add_spec_arguments, spec_config


def closed_loop(engine: LLMEngine, prompts: list[list[int]], concurrency: int, osl: int, clock=None):
    """Run ``prompts`` with ``concurrency`` in flight; per-step records and per-request token times."""
    params = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
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
            engine.add_request(rid, p, params)
            in_flight.add(rid)
            times[rid] = []
        prefilling = sum(1 for r in in_flight if not times[r])
        decoding = len(in_flight) - prefilling
        eager0 = _eager_executes()
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
        steps.append((ms, prefilling, decoding, tokens, _eager_executes() - eager0, phases))
    return steps, times


COUNTER: GraphCounter | None = None  # set by main; closed_loop records eager executes per step


def _eager_executes() -> int:
    return COUNTER.executes - COUNTER.replays if COUNTER is not None else 0


class GraphCounter:
    """Counts CUDA-graph captures (and their seconds), graph replays and eager runner executes (those
    without a replay) of every runner, target and drafter: a capture or an eager forward inside a
    measured window is a cost the profiled steady-state step does not have."""

    def __init__(self) -> None:
        self.reset()
        self._patch()

    def reset(self) -> None:
        self.captures = self.replays = self.executes = 0
        self.capture_s = 0.0
        self.eager_shapes: dict[tuple[str, int, int, int], int] = {}  # (model, seqs, tokens, max q) -> n

    def _patch(self) -> None:
        from engine.cuda_graphs import DecodeGraphs
        from engine.runner import ModelRunner

        counter = self
        capture, replay = DecodeGraphs.capture, DecodeGraphs._replay
        execute = ModelRunner.execute

        def counted_capture(self, batch: int, *, logits: bool = False) -> None:
            new = (batch, logits) not in self._graphs
            t0 = time.perf_counter()
            capture(self, batch, logits=logits)
            if new:
                counter.captures += 1
                counter.capture_s += time.perf_counter() - t0

        def counted_replay(self, *a, **kw):  # noqa: ANN202
            out = replay(self, *a, **kw)
            counter.replays += out is not None
            return out

        def counted_execute(self, input_ids, positions, meta, *a, **kw):  # noqa: ANN001, ANN202
            counter.executes += 1
            replays = counter.replays
            out = execute(self, input_ids, positions, meta, *a, **kw)
            if counter.replays == replays:  # eager: which model, and the shape no graph took
                shape = (self.config.name, meta.num_seqs, meta.num_tokens, meta.max_query_len)
                counter.eager_shapes[shape] = counter.eager_shapes.get(shape, 0) + 1
            return out

        DecodeGraphs.capture, DecodeGraphs._replay = counted_capture, counted_replay
        ModelRunner.execute = counted_execute

    def summary(self) -> str:
        return f"{self.captures} ({self.capture_s:.1f} s) / {self.replays} / {self.executes - self.replays}"


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
            max_model_len=args.isl + args.osl + 64,
            spec=spec,
        )
    )
    rng = np.random.default_rng(0)
    vocab = engine.runner.config.vocab_size
    label = f"{args.spec} k={args.k or 0}"
    print(f"# {args.model} ({args.weights} weights) {label}, isl {args.isl}, osl {args.osl}")
    print(
        "| method | c | pass | ITL ms (client) | decode step ms (mean / median) | tok/step "
        "| decode-only ITL ms | prefill steps | mean prefill step ms | stall ms per token "
        "| decode steps eager / graphed (n x mean ms) "
        "| graph captures (s) / replays / eager executes | top phases of a decode step (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    global COUNTER
    counter = COUNTER = GraphCounter()
    eager_notes: list[str] = []
    for c in concs:
        n = c * args.requests_per_seq
        prompts = [rng.integers(3, vocab, args.isl).tolist() for _ in range(n)]
        closed_loop(engine, prompts, c, args.osl)  # record pass (controlled drafter) and warm-up
        for measured in range(1, args.passes + 1):
            counter.reset()
            row = measure_pass(engine, prompts, c, args.osl)
            end = " |\n" if measured < args.passes else ""
            print(f"| {label} | {c} | {measured} | {row} | {counter.summary()} |", end=end, flush=True)
            top = sorted(counter.eager_shapes.items(), key=lambda kv: -kv[1])[:6]
            eager_notes.append(f"c={c} pass {measured}: " + ", ".join(f"{k} x{n}" for k, n in top))
        print(" " + phase_breakdown(engine, prompts, c, args.osl) + " |", flush=True)
    print("\neager executes by (model, sequences, tokens, max query length), most frequent first:")
    print("\n".join(eager_notes))


def measure_pass(engine: LLMEngine, prompts: list[list[int]], c: int, osl: int) -> str:
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


def phase_breakdown(engine: LLMEngine, prompts: list[list[int]], c: int, osl: int) -> str:
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
