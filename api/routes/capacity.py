"""``GET /capacity``: how many sequences the KV pool of one replica holds at a context (kvbm.capacity)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.errors import ERRORS
from api.state import Server

router = APIRouter()


class CapacityAnswer(BaseModel):
    profile: str
    tp: int
    k: int
    context: int
    block_size: int
    blocks_per_replica: int
    blocks_per_sequence: int
    max_concurrency: int


@router.get("/capacity", response_model=CapacityAnswer, responses=ERRORS)
def get_capacity(
    state: Server,
    tp: Annotated[int, Query(ge=1, le=1024)],
    context: Annotated[
        int, Query(ge=2, le=10_000_000, description="tokens per sequence at its peak (isl + osl, >= 2)")
    ],
    k: Annotated[int, Query(ge=0, le=64, description="lookahead (speculative) slots")] = 0,
    profile: Annotated[str | None, Query(max_length=100)] = None,
) -> CapacityAnswer:
    pid, planner = state.planner_for(profile)
    kv = planner.kv_bound(tp, k, context)
    return CapacityAnswer(
        profile=pid,
        tp=tp,
        k=k,
        context=context,
        block_size=kv.block_size,
        blocks_per_replica=kv.blocks_per_replica,
        blocks_per_sequence=kv.blocks_per_sequence,
        max_concurrency=kv.max_concurrency,
    )
