"""The allowed-imports table of docs/DESIGN.md, checked against every import of every module.

The table is read from the document (one home for the rule); imports inside functions count, and so do
``from . import x`` forms. Only ``if TYPE_CHECKING:`` blocks are exempt: they never run.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "DESIGN.md"
PACKAGES = ("configs", "common", "kvbm", "engine", "planner", "api", "profiler")
TRACKED = (*PACKAGES, "torch", "triton")  # what the table speaks about; other third-party imports are free


@dataclass(frozen=True)
class Rule:
    anywhere: frozenset[str]
    in_functions: frozenset[str]
    forbidden: tuple[str, ...]


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted
    in_function: bool
    line: int


def _names(cell: str) -> list[str]:
    return re.findall(r"`([A-Za-z0-9_.]+)`", cell)


def load_rules(text: str) -> dict[str, Rule]:
    """Rows of the table under the heading 'Layering': ``| module | may import | only inside functions |
    must not import |``."""
    section = text.split("## Layering", 1)[1].split("\n## ", 1)[0]
    rules = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        (module,) = _names(cells[0])
        rules[module] = Rule(
            frozenset(_names(cells[1])), frozenset(_names(cells[2])), tuple(_names(cells[3]))
        )
    return rules


def rule_for(module: str, rules: dict[str, Rule]) -> Rule:
    """The most specific row: the longest table entry that is the module or one of its parents."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        hit = rules.get(".".join(parts[:n]))
        if hit is not None:
            return hit
    raise KeyError(module)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (module ``module``), with whether it sits inside a function."""
    out: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, in_function)
                continue
            if isinstance(child, ast.Import):
                out.extend(Import(module, a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against the importing package
                    up = package.split(".")
                    base = ".".join(
                        [*up[: len(up) - (child.level - 1)], *([child.module] if child.module else [])]
                    )
                # ``from x import y`` may import the submodule x.y: record it so rules on submodules apply
                out.extend(
                    Import(module, f"{base}.{a.name}" if base else a.name, in_function, child.lineno)
                    for a in child.names
                )
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(ast.parse(source), False)
    return out


def violations(imp: Import, rule: Rule) -> str | None:
    top = imp.target.split(".")[0]
    own = imp.module.split(".")[0]
    for banned in rule.forbidden:
        if imp.target == banned or imp.target.startswith(banned + "."):
            return f"must not import {banned}"
    if top not in TRACKED or top == own:
        return None
    if top in rule.anywhere:
        return None
    if top in rule.in_functions:
        return None if imp.in_function else f"may import {top} only inside a function"
    return f"may not import {top}"


def _modules() -> list[tuple[str, Path]]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


RULES = load_rules(DESIGN.read_text())


def test_the_table_names_every_package() -> None:
    assert set(PACKAGES) <= set(RULES), f"docs/DESIGN.md's layering table lacks {set(PACKAGES) - set(RULES)}"


@pytest.mark.parametrize("module,path", _modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_module_imports_follow_the_table(module: str, path: Path) -> None:
    rule = rule_for(module, RULES)
    found = imports_of(path.read_text(), module, path.name == "__init__.py")
    bad = [
        f"{path.relative_to(REPO)}:{i.line}: {i.target}: {why}" for i in found if (why := violations(i, rule))
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "module,source,expected",
    [
        ("planner.plan", "import torch\n", "may not import torch"),
        ("planner.plan", "def f():\n    from engine.llm import LLM\n", "may not import engine"),
        ("planner.cli", "from api.app import create_app\n", "may import api only inside a function"),
        ("planner.cli", "def serve():\n    from api.app import create_app\n", None),
        ("profiler.sweep", "import torch\n", "may import torch only inside a function"),
        ("profiler.sweep", "def f():\n    import torch\n", None),
        (
            "engine.sampling",
            "def f():\n    from engine.spec.verify import x\n",
            "must not import engine.spec",
        ),
        ("api.page", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import engine\n", None),
        ("kvbm.manager", "from . import torch_utils\n", None),
        ("common.metrics", "import torch\n", "may not import torch"),
        ("common.presets", "def f():\n    from planner.profile import Profile\n", "may not import planner"),
        ("engine.cli", "from common.cli_help import use_everywhere\n", None),
        ("api.page", "from .. import engine\n", "may not import engine"),
    ],
)
def test_the_checker_catches_what_the_table_forbids(module: str, source: str, expected: str | None) -> None:
    found = imports_of(source, module)
    why = [v for i in found if (v := violations(i, rule_for(module, RULES)))]
    assert why == ([expected] if expected else [])
