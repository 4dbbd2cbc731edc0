"""What a profile records about the engine and the hardware that measured it, decided in one place.

Two profiles of one setup must say the same thing (a resumed sweep refuses a file whose engine or
hardware differs): the engine is named with this package's version and the torch it ran on, the GPU by
its marketing name (never a device index such as ``cuda:0``), and a CPU run as ``cpu`` with the processor
in the notes.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

ENGINE_NAME = "specplan-engine"


def package_version() -> str:
    try:
        return version("specplan")
    except PackageNotFoundError:
        return "unknown"


def engine_info(torch_version: str) -> dict[str, str]:
    """The embedded engine's name and version (the fields of ``planner.profile.EngineInfo``)."""
    return {"name": ENGINE_NAME, "version": f"{package_version()} (torch {torch_version})"}


def cpu_description(threads: int) -> str:
    """A CPU device's name as a measurement reports it: the processor and the threads it used."""
    return f"cpu ({platform.processor() or platform.machine()}, {threads} threads)"


def is_cpu(device_name: str) -> bool:
    return device_name.lower().startswith("cpu")


def gpu_name(device_name: str) -> str:
    """The hardware name a profile stores: the GPU's name, or ``cpu`` for any CPU run."""
    return "cpu" if is_cpu(device_name) else device_name
