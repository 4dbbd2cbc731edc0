"""Environment every process of a tensor-parallel group runs with.

NVLink multicast (NCCL's NVLS algorithms, PyTorch symmetric-memory multicast, NVSHMEM NVLS) is kept
off: on the shared hosts this project measures on, a program using it can put every GPU of the host out
of service. The values are forced, not defaulted, so a caller's environment cannot turn it back on.
"""

from __future__ import annotations

import os

SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def apply_safe_env() -> None:
    """Set the variables in this process (children started afterwards inherit them)."""
    os.environ.update(SAFE_ENV)
