"""Text tables of a profile (``profiler show``) and the sweep's closing summary."""

from __future__ import annotations

from common.tables import text_table
from planner.profile import DecodePoint, Profile
from planner.surface import point_flags


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _cov(p: DecodePoint) -> str:
    return "-" if p.method == "none" else format(p.coverage, "g")


def _flag_code(msgs: list[str]) -> str:
    return ",".join(sorted({"UNSTABLE" if m.startswith("unstable") else "NON-MONO" for m in msgs}))


def decode_table(profile: Profile) -> str:
    flags = point_flags(profile.decode)
    rows = []
    for p in sorted(profile.decode, key=lambda p: p.key):
        if p.ok:
            rows.append([
                p.tp, p.method, p.k, p.concurrency, p.context_len, _cov(p),
                _f(p.draft_ms), _f(p.verify_ms), _f(p.step_ms),
                "-" if p.step_ms_spread is None else f"{p.step_ms_spread:.0%}",
                _f(p.tokens_per_step), _f(p.itl_ms.p50 if p.itl_ms else None),
                _f(p.throughput_per_gpu, ".1f"), _f(p.kv_usage), _f(p.power_w, ".0f"),
                _flag_code(flags.get(p.key, [])),
            ])  # fmt: skip
        else:  # the reason goes below the table, so a long error does not widen every row
            rows.append([p.tp, p.method, p.k, p.concurrency, p.context_len, _cov(p), "FAILED"] + [""] * 9)
    header = ["tp", "method", "k", "c", "ctx", "cov", "draft_ms", "verify_ms", "step_ms", "spread",
              "tok/step", "ITL p50", "tok/s/GPU", "kv use", "GPU W", "flag"]  # fmt: skip
    return text_table(rows, header) + "\n" + DECODE_LEGEND + _failures(profile)


def _failures(profile: Profile, width: int = 160) -> str:
    """One line per failed decode point: its coordinates and the first line of its error."""
    lines = []
    for p in sorted((p for p in profile.decode if not p.ok), key=lambda p: p.key):
        first = (p.error or "").strip().splitlines()[0] if (p.error or "").strip() else "(no reason recorded)"
        reason = first if len(first) <= width else first[: width - 3] + "..."
        lines.append(f"  tp={p.tp} {p.method} k={p.k} c={p.concurrency} L={p.context_len}: {reason}")
    return "\nfailed:\n" + "\n".join(lines) if lines else ""


DECODE_LEGEND = (
    "c: concurrent sequences; ctx: context tokens; cov: share of sequences verifying a draft;\n"
    "spread: (p90-p10)/median of the timing repeats; ITL p50 in ms; kv use: share of the KV-cache pool\n"
    "the point held; GPU W: mean power of the GPUs during the point (NVML; - when not measured, e.g. on\n"
    "CPU); flag: UNSTABLE timing or NON-MONO(tonic) step time, listed below"
)


def params_text(n: int) -> str:
    """A parameter count a reader can compare: 6.74B, 135M, 2.1M, 820K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def flag_lines(profile: Profile) -> list[str]:
    """One line per doubtful decode point: unstable timing or a step time that falls as c or L grows."""
    by_key = {p.key: p for p in profile.decode}
    out = []
    for key, msgs in sorted(point_flags(profile.decode).items()):
        p = by_key[key]
        cov = "" if p.method == "none" else f" cov={p.coverage:g}"
        out += [f"  tp={p.tp} {p.method} k={p.k} c={p.concurrency} L={p.context_len}{cov}: {m}" for m in msgs]
    return out


def phases_table(profile: Profile) -> str:
    """Median milliseconds per phase of the whole engine step, per point that recorded them."""
    pts = sorted((p for p in profile.decode if p.ok and p.phases_ms), key=lambda p: p.key)
    names = list(dict.fromkeys(n for p in pts for n in p.phases_ms or {}))
    rows = [
        [p.tp, p.method, p.k, p.concurrency, p.context_len, _cov(p)]
        + [_f((p.phases_ms or {}).get(n), ".3f") for n in names]
        for p in pts
    ]
    return text_table(rows, ["tp", "method", "k", "c", "ctx", "cov", *names])


def prefill_table(profile: Profile) -> str:
    rows = [[p.tp, p.input_len, _f(p.ttft_ms), _f(p.prefill_tokens_per_s_per_gpu, ".0f"), p.error or ""]
            for p in sorted(profile.prefill, key=lambda p: p.key)]  # fmt: skip
    return text_table(rows, ["tp", "input_len", "TTFT ms", "tok/s/GPU", "error"])


def _settings(a) -> str:
    return " ".join(f"{n}={v}" for n, v in sorted((a.drafter_settings or {}).items())) or "-"


def acceptance_table(profile: Profile) -> str:
    rows = [[a.method, a.k, a.workload or "all", _f(a.draft_coverage),
             " ".join(f"{x:.2f}" for x in a.accepted_per_pos), _f(a.tokens_per_step), a.source.kind,
             _settings(a), (a.source.dataset or a.source.detail or "")[:60]]
            for a in profile.acceptance]  # fmt: skip
    header = ["method", "k", "workload", "coverage", "accepted per pos", "tok/step", "source", "drafter",
              "from"]  # fmt: skip
    return text_table(rows, header)


def describe(profile: Profile) -> str:
    m = profile.metadata
    head = (
        f"model {m.model.name} ({params_text(m.model.shape.params)} params, weights {m.weights}) on "
        f"{m.hardware.gpu_name} x{m.hardware.gpu_count}, {m.engine.name} {m.engine.version}, "
        f"backend {m.backend}, dtype {m.dtype}\ncommand: {m.command}"
    )
    ok = sum(p.ok for p in profile.decode)
    parts = [head, f"\ndecode points: {ok} ok, {len(profile.decode) - ok} failed", decode_table(profile)]
    flagged = flag_lines(profile)
    if flagged:
        parts += [f"\nflagged decode points ({len(flagged)}): re-measure on an idle machine", *flagged]
    if any(p.phases_ms for p in profile.decode):
        parts += ["\nstep phases (median ms)", phases_table(profile)]
    if profile.prefill:
        parts += ["\nprefill", prefill_table(profile)]
    if profile.acceptance:
        parts += ["\nacceptance", acceptance_table(profile)]
    return "\n".join(parts)
