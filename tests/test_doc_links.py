"""Every relative link in the docs resolves: the file exists and its ``#anchor`` names a heading or an
``<a name=...>`` in it, so a README headline number always leads to its row in benchmarks/RESULTS.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "benchmarks/RESULTS.md", "benchmarks/HISTORY.md", "docs/DESIGN.md"]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a '#' or a link inside a block is not markdown)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped, each space a hyphen."""
    text = re.sub(r"<[^>]+>", "", heading).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page offers: heading slugs (repeats numbered as GitHub does) and explicit ones."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text()):
        found.update(EXPLICIT_ANCHOR.findall(line))
        heading = re.match(r"^#{1,6}\s+(.*)$", line)
        if heading:
            slug = github_slug(heading.group(1))
            count = seen.get(slug, 0)
            found.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    return found


def relative_links(path: Path) -> list[str]:
    """Links that point into this repository (not http, not mailto)."""
    links = [m for line in prose_lines(path.read_text()) for m in LINK.findall(line)]
    return [link for link in links if not re.match(r"^[a-z]+:", link)]


def test_slug_follows_githubs_rule() -> None:
    assert github_slug("engine: decode speed on one H200 (fused)") == "engine-decode-speed-on-one-h200-fused"
    assert github_slug("`GET /plan` latency, p99") == "get-plan-latency-p99"


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc: str) -> None:
    source = REPO / doc
    broken = []
    for link in relative_links(source):
        target, _, anchor = link.partition("#")
        page = (source.parent / target).resolve() if target else source
        if not page.exists():
            broken.append(f"{link}: no file {page.relative_to(REPO)}")
        elif anchor and page.suffix == ".md" and anchor not in anchors(page):
            broken.append(f"{link}: no anchor #{anchor} in {page.relative_to(REPO)}")
    assert not broken, f"{doc}: " + "; ".join(broken)


def test_readme_headline_numbers_link_to_results_rows() -> None:
    """The 'Measured numbers' section: each headline carries a link to its RESULTS.md row."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Measured numbers", 1)[1].split("\n## ", 1)[0]
    bullets = [b for b in section.split("\n- ")[1:]]
    assert bullets
    for bullet in bullets:
        assert "RESULTS.md#" in bullet, f"headline without a link to its RESULTS.md row: {bullet[:80]!r}"
