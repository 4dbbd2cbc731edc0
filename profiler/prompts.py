"""Prompt text for load generation and acceptance runs: the Spec-Bench questions shipped in
``profiler/data/`` (Apache-2.0, see NOTICE.md there), stretched to roughly a target length."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

# Package data, so a non-editable install finds it too (pyproject.toml lists profiler/data/*.jsonl).
SPEC_BENCH = Path(str(files("profiler").joinpath("data", "spec_bench_question.jsonl")))
CHARS_PER_TOKEN = 4  # English BPE average; the server's usage reports the true prompt length


def load_questions(path: Path | None = None) -> list[dict]:
    """Spec-Bench records (question_id, category, turns); the built-in fallback is one short text."""
    p = Path(path) if path else SPEC_BENCH
    if not p.is_file():
        if path is not None:
            raise FileNotFoundError(f"dataset {p} does not exist")
        return [{"question_id": 0, "category": "fallback", "turns": [FALLBACK]}]
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}:{i}: not valid JSON: {exc.msg}") from None
        if not isinstance(rec.get("turns"), list) or not rec["turns"]:
            raise ValueError(f"{p}:{i}: field 'turns' must be a non-empty list")
        out.append(rec)
    return out


def prompts_of_length(n: int, approx_tokens: int, path: Path | None = None) -> list[str]:
    """``n`` distinct prompts of about ``approx_tokens`` tokens, each starting at another question."""
    texts = [str(r["turns"][0]) for r in load_questions(path)]
    target = max(1, approx_tokens) * CHARS_PER_TOKEN
    out = []
    for i in range(n):
        parts, size, j = [], 0, i
        while size < target:
            t = texts[j % len(texts)]
            parts.append(t)
            size += len(t) + 2
            j += 1
        out.append("\n\n".join(parts)[:target])
    return out


FALLBACK = (
    "Summarize the following: the quick brown fox jumps over the lazy dog while the dog sleeps in the "
    "sun, and the fox runs back into the forest where it lives with its family."
)
