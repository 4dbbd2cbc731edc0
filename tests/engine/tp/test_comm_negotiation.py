"""The symmetric-memory setup is all-or-nothing and never leaves a rank out of a collective.

It once did: rank 0 of a second executor remembered an earlier setup and returned early, while its
freshly spawned worker ran the consensus all-reduce and waited for it; a profiler sweep hung. The
negotiation runs here with gloo on CPU and a fake setup, in two real processes."""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, port: int, case: str, out: str) -> None:
    from engine.model import allreduce

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=20))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=20))
    try:
        group = dist.group.WORLD
        if case == "rank0-set-up-before":
            allreduce._symm_mem_tried = rank == 0
            allreduce._symm_handles[group.group_name] = ("stale", None) if rank == 0 else None
            allreduce._symm_handles = {k: v for k, v in allreduce._symm_handles.items() if v is not None}
        fails_here = case == "setup-fails-on-rank1" and rank == 1
        ok = allreduce._negotiate(
            group, torch.device("cpu"), lambda g, d: None if fails_here else ("buf", "h")
        )
        # a collective after the negotiation: it would time out if the ranks had fallen out of step
        t = torch.ones(1)
        dist.all_reduce(t, group=group)
        result = {"ok": ok, "registered": group.group_name in allreduce._symm_handles, "after": t.item()}
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    # spawned children import _rank from this module: they get the parent's sys.path, which under a
    # plain `pytest` need not hold the repository root
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[3]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, case, str(tmp_path)), nprocs=2, join=True)
    return [json.loads(Path(tmp_path, f"{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize(
    ("case", "expected"),
    [("both-fresh", True), ("setup-fails-on-rank1", False), ("rank0-set-up-before", False)],
)
def test_negotiation_is_all_or_nothing_and_keeps_ranks_in_step(
    case: str, expected: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    results = _run(case, tmp_path, monkeypatch)
    assert [r["ok"] for r in results] == [expected, expected]
    assert [r["registered"] for r in results] == [expected, expected]  # no stale entry survives
    assert [r["after"] for r in results] == [2.0, 2.0]
