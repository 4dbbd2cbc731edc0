"""A non-editable install finds its presets, grids, profiles and prompts, and plans and sweeps from them.

The checkout is copied (tracked and new files, as a clone would have them), built into a wheel and installed
with ``pip install --target`` (no dependencies: the running interpreter has them). Then every check runs from
a directory outside the checkout with only the installed copy on the path, so a file read from the source
tree instead of the package would fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECKS = """
import json, sys
from pathlib import Path
import common, configs, engine.presets, planner, profiler.grid, profiler.prompts
site = Path(sys.argv[1]).resolve()
for mod in (common, configs, engine.presets, planner, profiler.grid):
    assert Path(mod.__file__).resolve().is_relative_to(site), mod.__file__
assert "tiny" in engine.presets.list_presets() and "vicuna-7b" in engine.presets.list_presets()
cfg = profiler.grid.load_config(None, gpu=False, overrides={})
assert cfg.model == "tiny", cfg
assert profiler.prompts.SPEC_BENCH.resolve().is_relative_to(site)
assert len(profiler.prompts.load_questions()) == 480
assert (profiler.prompts.SPEC_BENCH.parent / "NOTICE.md").is_file()
print(json.dumps(sorted(p.name for p in configs.PROFILES.glob("*.json"))))
"""


def _copy_checkout(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith("V/"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


@pytest.mark.slow
def test_non_editable_install_runs_from_its_package_data(tmp_path: Path) -> None:
    src, site, work = tmp_path / "src", tmp_path / "site", tmp_path / "work"
    src.mkdir()
    work.mkdir()
    _copy_checkout(src)
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    subprocess.run([*pip, "--target", str(site), str(src)], check=True, capture_output=True, timeout=600)
    assert not (site / "configs" / "__init__.py").is_symlink()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )

    checks = run("-c", CHECKS, str(site))
    assert checks.returncode == 0, checks.stderr
    assert "vicuna-7b-h100-engine.json" in checks.stdout
    profile = site / "configs" / "profiles" / "vicuna-7b-h100-engine.json"
    plan = run(
        "-m", "planner.cli", "plan", "--profile", str(profile), "--itl-ms", "25", "--acceptance", "0.7"
    )
    assert plan.returncode == 0 and "FEASIBLE" in plan.stdout, plan.stdout + plan.stderr
    sweep = run("-m", "profiler.cli", "sweep", "--quick", "--steps", "2", "--no-plots", "--no-progress")
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    assert (work / "runs" / "tiny-engine.json").is_file()
