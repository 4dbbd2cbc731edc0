"""Plain-text tables of a profile: metadata, decode surface per config, prefill, acceptance."""

from __future__ import annotations

from planner.profile import Profile


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def describe(profile: Profile) -> str:
    m = profile.metadata
    hw = m.hardware
    mem = f", {hw.gpu_memory_gib:.0f} GiB" if hw.gpu_memory_gib else ""
    ok = sum(p.ok for p in profile.decode)
    lines = [
        f"model {m.model.name} ({m.model.shape.params / 1e6:.1f} M params, {m.weights} weights), "
        f"dtype {m.dtype}",
        f"hardware {hw.gpu_name} x{hw.gpu_count}{mem}; backend {m.backend}; engine {m.engine.name} "
        f"{m.engine.version}; source {m.source}; created {m.created_at:%Y-%m-%d %H:%M UTC}",
        f"KV: {m.kv_capacity_blocks_per_gpu} blocks of {m.block_size} tokens per GPU",
        f"decode points: {ok} ok, {len(profile.decode) - ok} failed; prefill points: {len(profile.prefill)}; "
        f"acceptance entries: {len(profile.acceptance)}",
        f"command: {m.command}",
    ]
    if m.notes:
        lines.append(f"notes: {m.notes}")
    return "\n".join(lines)


def decode_table(profile: Profile) -> str:
    """One row per (tp, method, k, context, concurrency), and speed-up over method none at the same
    (tp, context, concurrency) in step time per emitted token."""
    base = {
        (p.tp, p.context_len, p.concurrency): p.step_ms / (p.tokens_per_step or 1.0)
        for p in profile.decode
        if p.ok and p.method == "none" and p.step_ms
    }
    rows = []
    for p in sorted(
        profile.decode, key=lambda p: (p.tp, p.method != "none", p.method, p.k, p.context_len, p.concurrency)
    ):
        if not p.ok:
            rows.append(
                [
                    p.tp,
                    p.method,
                    p.k,
                    p.context_len,
                    p.concurrency,
                    "failed",
                    "",
                    "",
                    "",
                    "",
                    (p.error or "")[:40],
                ]
            )
            continue
        b = base.get((p.tp, p.context_len, p.concurrency))
        per_tok = p.step_ms / (p.tokens_per_step or 1.0)  # type: ignore[operator]
        rows.append(
            [
                p.tp,
                p.method,
                p.k,
                p.context_len,
                p.concurrency,
                _f(p.step_ms),
                _f(p.draft_ms),
                _f(p.verify_ms),
                _f(p.itl_ms.p50 if p.itl_ms else None),
                _f(p.throughput_per_gpu, ".1f"),
                _f(b / per_tok if b else None, ".2f") + ("x" if b else ""),
            ]
        )
    return table(
        rows,
        [
            "tp",
            "method",
            "k",
            "ctx",
            "c",
            "step ms",
            "draft ms",
            "verify ms",
            "ITL p50",
            "tok/s/GPU",
            "vs none",
        ],
    )


def prefill_table(profile: Profile) -> str:
    rows = [
        [p.tp, p.input_len, _f(p.ttft_ms), _f(p.prefill_tokens_per_s_per_gpu, ".0f") if p.ok else p.error]
        for p in sorted(profile.prefill, key=lambda p: p.key)
    ]
    return table(rows, ["tp", "input len", "TTFT ms", "prefill tok/s/GPU"])


def acceptance_table(profile: Profile) -> str:
    rows = []
    for a in sorted(profile.acceptance, key=lambda a: a.key):
        per_pos = " ".join(f"{x:.2f}" for x in a.accepted_per_pos)
        rows.append(
            [
                a.method,
                a.k,
                f"{a.draft_coverage:.2f}",
                f"{a.tokens_per_draft:.2f}",
                f"{a.tokens_per_step:.2f}",
                per_pos,
                a.source.kind,
                a.source.dataset or "-",
            ]
        )
    return table(
        rows,
        ["method", "k", "coverage", "tok/draft", "tok/step", "accepted per position", "source", "dataset"],
    )


def render(profile: Profile) -> str:
    parts = [describe(profile), "", "Decode", decode_table(profile)]
    if profile.prefill:
        parts += ["", "Prefill (one sequence)", prefill_table(profile)]
    if profile.acceptance:
        parts += ["", "Acceptance", acceptance_table(profile)]
    return "\n".join(parts)
