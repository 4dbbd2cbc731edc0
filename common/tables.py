"""The plain-text table every command prints (``planner plan``, ``profiler show``, acceptance, validate)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def text_table(rows: Sequence[Sequence[Any]], header: Sequence[str], *, left: int = 0) -> str:
    """Cells padded to their column's widest, two spaces apart, a dashed rule under the header.

    Numbers read best right-aligned; the first ``left`` columns (labels) are left-aligned.
    """
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        pairs = enumerate(zip(r, widths, strict=True))
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])])
