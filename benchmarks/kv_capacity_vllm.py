"""Where a real vLLM starts to preempt, against kvbm.capacity's prediction (issue: KV capacity).

For each (method, k) one vLLM server runs with an explicit pool (``--num-gpu-blocks-override``,
``--block-size``, prefix caching off so distinct prompts share nothing). Loads:

* k = 0: one wave of ``c`` distinct prompts in ONE completion request (all admitted together, so
  every sequence peaks at the same step), ``ignore_eos``, ``max_tokens = osl``; scanned over ``c``
  around the static prediction at contexts on both sides of a block boundary.
* ngram: ``c`` closed-loop clients, ``waves`` requests each. Coverage and per-position acceptance are
  first measured at a low concurrency (no preemption) from the server's counters; the onset is then
  predicted from them (``kvbm.capacity.dynamic_bound``) and ``c`` is scanned around it.

Preemptions are the delta of ``vllm:num_preemptions_total``. The block size the server really uses is
read from ``vllm:cache_config_info`` and must equal the one asked for. Prints a markdown table and
writes every run to ``--out`` (JSON).

Usage (CPU, vLLM venv in V/, SmolLM2 weights from ``python -m tests.support.smollm2_hf``):
  PYTHONPATH=$PWD python benchmarks/kv_capacity_vllm.py --out benchmarks/results/kv_capacity_vllm.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvbm import capacity
from profiler.backends.http import counter_delta, parse_counters
from profiler.backends.vllm import VllmLaunch, VllmServer

REPO = Path(__file__).resolve().parents[1]
PHRASES = ["red green blue", "one two three four", "north east south west", "alpha beta gamma"]


@dataclass
class Run:
    method: str
    k: int
    isl: int
    osl: int
    concurrency: int
    waves: int
    preemptions: float
    seconds: float
    failed: int = 0


@dataclass
class Case:
    method: str
    k: int
    isl: int
    osl: int
    predicted: int  # k=0: static max concurrency; ngram: predicted onset
    predicted_max: int  # largest concurrency recommended (risk <= max_risk)
    static: int
    old_rule: int  # the former planner bound: ceil((isl + osl + 1 + k) / bs) per sequence, N blocks
    coverage: float | None = None
    accepted_per_pos: list[float] | None = None
    runs: list[Run] = field(default_factory=list)

    def observed_max_ok(self) -> int | None:
        """Largest scanned concurrency without preemption below the first one that preempted."""
        onset = self.observed_onset()
        ok = [
            r.concurrency
            for r in self.runs
            if r.preemptions == 0 and (onset is None or r.concurrency < onset)
        ]
        return max(ok, default=None)

    def observed_onset(self) -> int | None:
        return min((r.concurrency for r in self.runs if r.preemptions > 0), default=None)


def metric_sum(text: str, name: str) -> float:
    """Sum of a metric's samples over labels (``name`` without the ``_total`` suffix works too)."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in (name, f"{name}_total"):
                total += s.value
    return total


def cache_config(text: str) -> dict[str, str]:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("vllm:cache_config_info"):
                return dict(s.labels)
    return {}


def prompt_ids(tokenizer, index: int, isl: int) -> list[int]:
    """A distinct prompt of exactly ``isl`` tokens: a unique head, then a phrase the model repeats."""
    text = f"Request {index}: repeat after me. " + " ".join([PHRASES[index % len(PHRASES)]] * isl)
    ids = tokenizer(text)["input_ids"]
    if len(ids) < isl:
        raise ValueError(f"prompt {index} has {len(ids)} tokens, fewer than isl={isl}")
    return ids[:isl]


def body(model: str, prompt: list[int] | list[list[int]], osl: int) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": osl,
        "min_tokens": osl,
        "ignore_eos": True,
        "temperature": 0.0,
    }


async def one_wave(url: str, model: str, prompts: list[list[int]], osl: int) -> int:
    """All prompts in one request; returns how many completions came back short or failed."""
    async with httpx.AsyncClient(timeout=600) as client:
        r = await client.post(f"{url}/v1/completions", json=body(model, prompts, osl))
    if r.status_code != 200:
        return len(prompts)
    return sum(1 for ch in r.json()["choices"] if ch.get("finish_reason") != "length")


async def closed_loop(url: str, model: str, prompts: list[list[list[int]]], osl: int) -> int:
    """One client per prompt list, each sending its prompts back to back; returns failures."""
    failures = 0

    async def client_loop(client: httpx.AsyncClient, mine: list[list[int]]) -> None:
        nonlocal failures
        for p in mine:
            r = await client.post(f"{url}/v1/completions", json=body(model, p, osl))
            if r.status_code != 200 or r.json()["choices"][0].get("finish_reason") != "length":
                failures += 1

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, m) for m in prompts))
    return failures


class Probe:
    """One server: runs loads and reads the counters around them."""

    def __init__(self, url: str, tokenizer, method: str, k: int) -> None:
        self.url, self.tok, self.method, self.k = url, tokenizer, method, k
        self.model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        self.next_prompt = 0

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def prompts(self, n: int, isl: int) -> list[list[int]]:
        out = [prompt_ids(self.tok, self.next_prompt + i, isl) for i in range(n)]
        self.next_prompt += n
        return out

    def run(self, isl: int, osl: int, c: int, waves: int) -> tuple[Run, str, str]:
        before = self.metrics()
        t0 = time.monotonic()
        if waves == 1:
            failed = asyncio.run(one_wave(self.url, self.model, self.prompts(c, isl), osl))
        else:
            lists = [self.prompts(waves, isl) for _ in range(c)]
            failed = asyncio.run(closed_loop(self.url, self.model, lists, osl))
        after = self.metrics()
        pre = metric_sum(after, "vllm:num_preemptions") - metric_sum(before, "vllm:num_preemptions")
        run = Run(self.method, self.k, isl, osl, c, waves, pre, time.monotonic() - t0, failed)
        print(
            f"  c={c:3d} waves={waves} preemptions={pre:g} failed={failed} ({run.seconds:.1f} s)", flush=True
        )
        return run, before, after


def old_rule(num_blocks: int, isl: int, osl: int, k: int, bs: int) -> int:
    return capacity.max_concurrency(num_blocks, isl + osl, k, bs)


def scan_static(probe: Probe, num_blocks: int, bs: int, isl: int, osl: int, width: int) -> Case:
    sb = capacity.static_bound("vllm", "none", 0, num_blocks, isl + osl, bs)
    case = Case("none", 0, isl, osl, sb.max_concurrency, sb.max_concurrency, sb.max_concurrency,
                old_rule(num_blocks, isl, osl, 0, bs))  # fmt: skip
    print(
        f"none isl={isl} osl={osl}: predicted max {sb.max_concurrency} (old rule {case.old_rule})", flush=True
    )
    for c in range(max(1, sb.max_concurrency - width), sb.max_concurrency + width + 1):
        case.runs.append(probe.run(isl, osl, c, 1)[0])
    return case


def scan_dynamic(
    probe: Probe,
    num_blocks: int,
    bs: int,
    isl: int,
    osl: int,
    waves: int,
    calib_c: int,
    width: int,
    below: int | None = None,
) -> Case:
    k = probe.k
    _, before, after = probe.run(isl, osl, calib_c, waves)
    spec = counter_delta(parse_counters(before), parse_counters(after), first_tokens=calib_c * waves)
    if spec is None:
        raise RuntimeError("the server exported no speculative-decoding counters")
    cov, acc = spec.draft_coverage, spec.acceptance_per_pos[:k]
    acc += [0.0] * (k - len(acc))
    db = capacity.dynamic_bound("vllm", num_blocks, bs, isl, osl, k, cov, acc, waves=waves)
    sb = capacity.static_bound("vllm", probe.method, k, num_blocks, isl + osl, bs)
    case = Case(probe.method, k, isl, osl, db.onset, db.max_concurrency, sb.max_concurrency,
                old_rule(num_blocks, isl, osl, k, bs), cov, acc)  # fmt: skip
    print(
        f"{probe.method} k={k} isl={isl} osl={osl}: coverage {cov:.2f}, acceptance "
        f"{[round(a, 2) for a in acc]} -> predicted onset {db.onset}, max {db.max_concurrency} "
        f"(static {sb.max_concurrency}, old rule {case.old_rule})",
        flush=True,
    )
    # from the worst case (or ``below`` under the predicted onset) up, until preemption twice running
    start = sb.max_concurrency if below is None else max(sb.max_concurrency, db.onset - below)
    c, streak = max(1, start), 0
    while streak < 2 and c <= db.onset + width:
        run = probe.run(isl, osl, c, waves)[0]
        case.runs.append(run)
        streak = streak + 1 if run.preemptions > 0 else 0
        c += 1
    return case


def table(cases: list[Case]) -> str:
    rows = [
        "| method | k | isl | osl | old planner | static (new) | predicted onset | predicted max "
        "| observed max without preemption | observed onset | coverage |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        cov = f"{c.coverage:.2f}" if c.coverage is not None else "-"
        onset = c.predicted if c.k else c.predicted + 1
        rows.append(
            f"| {c.method} | {c.k} | {c.isl} | {c.osl} | {c.old_rule} | {c.static} | {onset} | "
            f"{c.predicted_max} | {c.observed_max_ok()} | {c.observed_onset()} | {cov} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="build/smollm2-hf")
    ap.add_argument("--python", default=str(REPO / "V" / "bin" / "python"), help="python that imports vllm")
    ap.add_argument("--num-blocks", type=int, default=16)
    ap.add_argument("--ngram-blocks", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--contexts", default="20:45,20:46,20:77,20:78", help="isl:osl pairs for k=0")
    ap.add_argument("--ngram-contexts", default="20:77", help="isl:osl pairs for ngram")
    ap.add_argument("--ks", default="4,8", help="ngram k values")
    ap.add_argument("--waves", type=int, default=2)
    ap.add_argument("--width", type=int, default=1, help="k=0: concurrencies scanned each side of the rule")
    ap.add_argument(
        "--ngram-below",
        type=int,
        default=None,
        help="ngram scan starts this far below the predicted onset (default: at the worst case)",
    )
    ap.add_argument("--skip-static", action="store_true")
    ap.add_argument("--skip-ngram", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(
            f"--model {model_dir}: no config.json; run python -m tests.support.smollm2_hf --out {model_dir}"
        )
        return 2
    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = lambda s: [tuple(int(x) for x in p.split(":")) for p in s.split(",") if p]  # noqa: E731
    plans: list[tuple[str, int, int]] = []
    if not args.skip_static:
        plans.append(("none", 0, args.num_blocks))
    if not args.skip_ngram:
        plans += [("ngram", int(k), args.ngram_blocks) for k in args.ks.split(",")]
    cases: list[Case] = []
    for method, k, blocks in plans:
        launch = VllmLaunch(
            model=str(model_dir), method=method, k=k, max_num_seqs=256, max_model_len=256,
            prompt_lookup_max=4, prompt_lookup_min=1, python=args.python,
            extra_args=["--num-gpu-blocks-override", str(blocks), "--block-size", str(args.block_size),
                        "--no-enable-prefix-caching", "--max-num-batched-tokens", "4096", "--enforce-eager"],
            env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        )  # fmt: skip
        server = VllmServer(launch, log_path=REPO / "build" / f"kv_capacity_vllm_{method}{k}.log", cwd=REPO)
        print(f"starting {launch.vllm_serve_line()}", flush=True)
        server.start()
        try:
            server.wait_healthy(1800)
            probe = Probe(server.base_url, tok, method, k)
            info = cache_config(probe.metrics())
            if (
                int(info.get("block_size", -1)) != args.block_size
                or int(info.get("num_gpu_blocks", -1)) != blocks
            ):
                raise RuntimeError(
                    f"server reports cache config {info}, asked for {blocks} x {args.block_size}"
                )
            if method == "none":
                for isl, osl in pairs(args.contexts):
                    cases.append(scan_static(probe, blocks, args.block_size, isl, osl, args.width))
                    save(args, cases)
            else:
                for isl, osl in pairs(args.ngram_contexts):
                    cases.append(
                        scan_dynamic(
                            probe, blocks, args.block_size, isl, osl, args.waves, 2, 3, args.ngram_below
                        )
                    )
                    save(args, cases)
        finally:
            server.stop()
    print(table(cases))
    return 0


def save(args: argparse.Namespace, cases: list[Case]) -> None:
    """Write every case so far (an interrupted run keeps what it measured)."""
    if not args.out:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "where": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "vllm_python": args.python,
        "model": args.model,
        "command": " ".join(sys.argv),
        "cases": [asdict(c) for c in cases],
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
