"""Every planner/API module (not just the packages) imports on a host without torch or the engine."""

import subprocess
import sys

MODULES = [
    "api.app", "api.dashboard_page", "api.store", "api.plan_response_cache", "api.metrics",
    "planner.cli", "planner.plan", "planner.surface", "planner.synthetic", "planner.render",
    "planner.daemon", "planner.daemon.runner", "planner.daemon.scrape", "planner.daemon.connectors",
]  # fmt: skip


def test_modules_import_without_torch_or_engine() -> None:
    code = "import sys\nsys.modules['torch'] = None\nsys.modules['engine'] = None\n"
    code += "".join(f"import {m}\n" for m in MODULES) + "print('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
