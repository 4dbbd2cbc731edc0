"""Mean GPU power over a measured window via NVML (``nvidia-ml-py``), sampled on a thread.

Optional: ``PowerSampler.create()`` returns None without a GPU or without the package.
"""

from __future__ import annotations

import threading


class PowerSampler:
    def __init__(self, nvml, handles: list, interval_s: float = 0.02) -> None:
        self._nvml, self._handles, self._interval = nvml, handles, interval_s
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def create(cls, device_indices: list[int] | None = None) -> PowerSampler | None:
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            n = pynvml.nvmlDeviceGetCount()
        except Exception:  # no package, no driver, no GPU
            return None
        idx = device_indices if device_indices is not None else [0]
        return cls(pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in idx if i < n])

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1000.0
            self._samples.append(total)
            self._stop.wait(self._interval)

    def start(self) -> None:
        self._samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        """Mean watts over the window, summed over the sampled GPUs."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return sum(self._samples) / len(self._samples) if self._samples else None
