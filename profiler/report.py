"""Text tables of a profile (``profiler show``) and the sweep's closing summary."""

from __future__ import annotations

from planner.profile import Profile


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def decode_table(profile: Profile) -> str:
    rows = []
    for p in sorted(profile.decode, key=lambda p: p.key):
        if p.ok:
            rows.append([
                p.tp, p.method, p.k, p.concurrency, p.context_len,
                _f(p.draft_ms), _f(p.verify_ms), _f(p.step_ms),
                _f(p.tokens_per_step), _f(p.itl_ms.p50 if p.itl_ms else None),
                _f(p.throughput_per_gpu, ".1f"), _f(p.kv_usage), _f(p.power_w, ".0f"),
            ])  # fmt: skip
        else:
            rows.append([p.tp, p.method, p.k, p.concurrency, p.context_len, "FAILED", (p.error or "")[:60]]
                        + [""] * 6)  # fmt: skip
    header = ["tp", "method", "k", "c", "ctx", "draft_ms", "verify_ms", "step_ms", "tok/step", "ITL p50",
              "tok/s/GPU", "kv", "W"]  # fmt: skip
    return _table(rows, header)


def prefill_table(profile: Profile) -> str:
    rows = [[p.tp, p.input_len, _f(p.ttft_ms), _f(p.prefill_tokens_per_s_per_gpu, ".0f"), p.error or ""]
            for p in sorted(profile.prefill, key=lambda p: p.key)]  # fmt: skip
    return _table(rows, ["tp", "input_len", "TTFT ms", "tok/s/GPU", "error"])


def _settings(a) -> str:
    return " ".join(f"{n}={v}" for n, v in sorted((a.drafter_settings or {}).items())) or "-"


def acceptance_table(profile: Profile) -> str:
    rows = [[a.method, a.k, a.workload or "all", _f(a.draft_coverage),
             " ".join(f"{x:.2f}" for x in a.accepted_per_pos), _f(a.tokens_per_step), a.source.kind,
             _settings(a), (a.source.dataset or a.source.detail or "")[:60]]
            for a in profile.acceptance]  # fmt: skip
    header = ["method", "k", "workload", "coverage", "accepted per pos", "tok/step", "source", "drafter",
              "from"]  # fmt: skip
    return _table(rows, header)


def describe(profile: Profile) -> str:
    m = profile.metadata
    head = (
        f"model {m.model.name} ({m.model.shape.params / 1e6:.0f}M params, weights {m.weights}) on "
        f"{m.hardware.gpu_name} x{m.hardware.gpu_count}, {m.engine.name} {m.engine.version}, "
        f"backend {m.backend}, dtype {m.dtype}\ncommand: {m.command}"
    )
    ok = sum(p.ok for p in profile.decode)
    parts = [head, f"\ndecode points: {ok} ok, {len(profile.decode) - ok} failed", decode_table(profile)]
    if profile.prefill:
        parts += ["\nprefill", prefill_table(profile)]
    if profile.acceptance:
        parts += ["\nacceptance", acceptance_table(profile)]
    return "\n".join(parts)
