"""KV capacity as each serving engine counts it: the concurrency at which preemption really starts.

The planner and the engine both read these rules, so a plan and the engine that serves it agree. Token
accounting common to every engine: a request of ``isl`` prompt tokens that generates ``osl`` tokens
computes KV for ``isl + osl - 1`` tokens; the last sampled token is returned to the client and never
fed back, so its KV is never written. At its last decode step a sequence holds ``isl + osl - 1``
tokens (``peak_context - 1`` with ``peak_context = isl + osl``) plus whatever that step reserves for
speculation.

``engine`` (this project: engine/scheduler.py over kvbm.KVCacheManager)
  - every one of the pool's N blocks is usable (kvbm keeps no null block);
  - a step allocates ``num_tokens + len(draft)`` slots (``allocate(n, num_lookahead_tokens=len(draft))``)
    and gives unused lookahead blocks back at commit;
  - drafts are cut to the room left before ``max_tokens`` (engine/llm_engine.py ``_propose``: at most
    ``max_tokens - outputs - 1``), so a chain drafter (ngram, draft model) never pushes a sequence past
    ``isl + osl - 1`` slots; a Medusa tree is not cut (its node count is counted as ``k``, its depth).

``vllm`` (vLLM 0.32, v1 engine; files under site-packages/vllm)
  - v1/core/block_pool.py ``BlockPool.__init__`` pops one block as ``null_block``: N - 1 are usable;
  - v1/core/sched/scheduler.py ``schedule``: ``num_new_tokens = num_tokens_with_spec - num_computed``
    (the pending token plus the drafts proposed for this step), passed to
    v1/core/kv_cache_manager.py ``allocate_slots`` with ``num_lookahead_tokens``, which reserves
    ``computed + new + lookahead`` slots; blocks stay with the request until it finishes;
  - config/vllm.py ``VllmConfig.num_lookahead_tokens``: ``k`` for EAGLE, EAGLE-3, MTP and draft models
    (the drafter writes KV past the verified range), 0 for ngram and Medusa; drafts are capped by
    ``max_model_len`` only, not by ``max_tokens`` (v1/spec_decode/ngram_proposer.py);
  - ngram proposes only when the prompt-lookup finds a match, so its drafts take room only then;
  - the block size is what the server reports in ``vllm:cache_config_info``: on CPU vLLM forces 128
    unless ``--block-size`` is given (platforms/cpu.py ``check_and_update_config``);
  - ``SchedulerConfig.watermark`` defaults to 0 (no blocks held back at admission);
  - v1/core/kv_cache_utils.py refuses to start when the usable pool is smaller than ``max_model_len``
    (the engine starts with a warning and refuses such requests at admission instead).

A static bound (``static_bound``) assumes every sequence peaks at once with every draft present: exact
without speculation and for methods that draft at every step. For ngram, where drafts come and go and
sequences that accept more finish earlier, ``dynamic_bound`` simulates the closed loop from the measured
draft coverage and per-position acceptance and gives the preemption onset and its probability.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Literal

CapacityModel = Literal["engine", "vllm"]
CAPACITY_MODELS: tuple[CapacityModel, ...] = ("engine", "vllm")

# vLLM's VllmConfig.num_lookahead_tokens: methods whose drafter writes KV beyond the verified tokens.
_VLLM_LOOKAHEAD_METHODS = frozenset({"draft", "eagle", "eagle3", "mtp"})
# Methods whose drafts come and go with the text (ngram: only when the prompt lookup matches).
DYNAMIC_METHODS = frozenset({"ngram"})

# Preemption probability above which a concurrency counts as preempting (the onset) and the largest
# probability a recommended concurrency may carry.
ONSET_PROBABILITY = 0.5
DEFAULT_MAX_RISK = 0.05


def _as_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; floats, bools and strings are refused, not truncated."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def _check_model(model: object) -> CapacityModel:
    if model not in CAPACITY_MODELS:
        raise ValueError(f"capacity model must be one of {', '.join(CAPACITY_MODELS)}, got {model!r}")
    return model  # type: ignore[return-value]


def blocks_for_slots(num_slots: int, block_size: int) -> int:
    """Blocks that hold ``num_slots`` tokens (integer ceiling division: exact at any size)."""
    n = _as_int("num_slots", num_slots, 0)
    bs = _as_int("block_size", block_size, 1)
    return -(-n // bs)


def blocks_per_sequence(context_len: int, num_lookahead_tokens: int, block_size: int) -> int:
    """Blocks one sequence holds during a decode step at ``context_len`` tokens already in the cache:
    those, the pending token being fed, and ``num_lookahead_tokens`` draft slots."""
    ctx = _as_int("context_len", context_len, 0)
    k = _as_int("num_lookahead_tokens", num_lookahead_tokens, 0)
    return blocks_for_slots(ctx + 1 + k, block_size)


def blocks_needed(concurrency: int, context_len: int, num_lookahead_tokens: int, block_size: int) -> int:
    """Blocks that ``concurrency`` sequences need together for one step (no prefix sharing)."""
    c = _as_int("concurrency", concurrency, 0)
    return c * blocks_per_sequence(context_len, num_lookahead_tokens, block_size)


def max_concurrency(num_blocks: int, context_len: int, num_lookahead_tokens: int, block_size: int) -> int:
    """Largest number of sequences that ``num_blocks`` admit for one step at ``context_len`` with
    ``num_lookahead_tokens`` (every block usable)."""
    n = _as_int("num_blocks", num_blocks, 0)
    return n // blocks_per_sequence(context_len, num_lookahead_tokens, block_size)


def usable_blocks(model: CapacityModel, num_blocks: int) -> int:
    """Blocks sequences can hold: vLLM keeps one null block out of its pool; kvbm keeps none."""
    n = _as_int("num_blocks", num_blocks, 0)
    return max(0, n - 1) if _check_model(model) == "vllm" else n


def reserved_lookahead(model: CapacityModel, method: str, k: int) -> int:
    """Slots reserved at every step beyond the tokens scheduled for it (vLLM's num_lookahead_tokens)."""
    k = _as_int("k", k, 0)
    if _check_model(model) == "vllm" and method in _VLLM_LOOKAHEAD_METHODS:
        return k
    return 0


def max_draft_slots(model: CapacityModel, method: str, k: int, tree_nodes: int | None = None) -> int:
    """Draft tokens a sequence may carry at its last decode step (the worst case).

    A Medusa tree verifies ``tree_nodes`` candidate tokens at once (``k`` when the tree is unknown)."""
    k = _as_int("k", k, 0)
    if method == "none" or k == 0:
        return 0
    width = k if tree_nodes is None or method != "medusa" else _as_int("tree_nodes", tree_nodes, 0)
    if _check_model(model) == "engine":
        return width if method == "medusa" else 0  # chain drafts are cut to the room before max_tokens
    return width


def peak_slots(
    model: CapacityModel, method: str, k: int, peak_context: int, tree_nodes: int | None = None
) -> int:
    """Slots one sequence of ``isl + osl = peak_context`` holds at its last step, every draft present."""
    ctx = _as_int("peak_context", peak_context, 1)
    drafts = max_draft_slots(model, method, k, tree_nodes)
    return ctx - 1 + drafts + reserved_lookahead(model, method, k)


def describe_rule(model: CapacityModel, method: str, k: int) -> str:
    """The capacity rule in words, for plans and reports."""
    if _check_model(model) == "vllm":
        parts = ["vLLM 0.32: N-1 blocks (one null block)", "isl+osl-1 slots at the last step"]
        if method != "none" and k:
            parts.append(f"+{k} draft slots when drafted")
            if reserved_lookahead(model, method, k):
                parts.append(f"+{k} lookahead reserved every step")
    else:
        parts = ["engine (kvbm): all N blocks", "isl+osl-1 slots at the last step"]
        if method == "medusa" and k:
            parts.append(f"+{k} tree slots")
        elif method != "none" and k:
            parts.append("drafts cut to the room before max_tokens")
    if method in DYNAMIC_METHODS and k:
        parts.append("onset simulated from draft coverage and acceptance")
    return "; ".join(parts)


@dataclass(frozen=True)
class StaticBound:
    """Every sequence at its peak at once: the largest concurrency that can never preempt."""

    model: CapacityModel
    usable_blocks: int
    blocks_per_sequence: int
    max_concurrency: int


def static_bound(
    model: CapacityModel, method: str, k: int, num_blocks: int, peak_context: int, block_size: int
) -> StaticBound:
    """Worst case: ``c`` sequences all at their last step with every draft and lookahead slot."""
    usable = usable_blocks(model, num_blocks)
    per_seq = blocks_for_slots(peak_slots(model, method, k, peak_context), block_size)
    return StaticBound(model, usable, per_seq, usable // per_seq)


@dataclass(frozen=True)
class DynamicBound:
    """Preemption risk of a closed loop of ``c`` clients, simulated (see ``preemption_probability``)."""

    onset: int = field(metadata={"doc": "smallest concurrency with probability >= ONSET_PROBABILITY"})
    max_concurrency: int = field(metadata={"doc": "largest concurrency with probability <= max_risk"})
    max_risk: float
    probabilities: dict[int, float] = field(default_factory=dict)  # evaluated concurrencies only
    waves: int = 0
    trials: int = 0

    def probability(self, concurrency: int) -> float:
        """Preemption probability at ``concurrency`` (0 below the evaluated range, 1 above it)."""
        if concurrency in self.probabilities:
            return self.probabilities[concurrency]
        below = [c for c in self.probabilities if c < concurrency]
        return self.probabilities[max(below)] if below else 0.0


def preemption_probability(
    model: CapacityModel,
    num_blocks: int,
    block_size: int,
    isl: int,
    osl: int,
    k: int,
    coverage: float,
    accepted_per_pos: list[float],
    concurrency: int,
    *,
    method: str = "ngram",
    waves: int = 4,
    trials: int = 48,
    seed: int = 0,
) -> float:
    """Share of simulated runs in which ``concurrency`` closed-loop clients preempt at least once.

    Each client sends ``waves`` requests of ``isl`` prompt and ``osl`` output tokens back to back, all
    starting together (the worst start a burst can give). At every decode step a sequence carries a
    k-token draft with probability ``coverage``; the accepted prefix length follows
    ``accepted_per_pos`` (position i accepted in that share of drafts); it then advances by
    ``1 + accepted``. The step preempts when the blocks it needs exceed the usable pool under the
    engine's rule (module docstring): vLLM keeps each request's high-water mark of blocks until it
    finishes; kvbm gives unused lookahead back at commit. A finished request's client is admitted again
    on the next step when its prompt fits (as vLLM's full-prompt admission and the engine's do).
    """
    import numpy as np  # the simulation is the only numerical code here; kvbm's hot path needs none

    model = _check_model(model)
    usable = usable_blocks(model, num_blocks)
    bs = _as_int("block_size", block_size, 1)
    isl = _as_int("isl", isl, 1)
    osl = _as_int("osl", osl, 1)
    k = _as_int("k", k, 0)
    c = _as_int("concurrency", concurrency, 1)
    waves = _as_int("waves", waves, 1)
    trials = _as_int("trials", trials, 1)
    _check_acceptance(k, coverage, accepted_per_pos)
    cum = np.minimum.accumulate(np.asarray(accepted_per_pos, dtype=float)) if k else np.zeros(0)
    look = reserved_lookahead(model, method, k)
    prompt_blocks = -(-(isl + look) // bs)
    if c * prompt_blocks > usable:
        return 1.0  # the prompts alone do not fit: c sequences can never run together
    vllm = model == "vllm"
    rng = np.random.default_rng(seed)
    shape = (trials, c)
    out = np.ones(shape, dtype=np.int64)  # the prefill step sampled each request's first token
    held = np.full(shape, prompt_blocks, dtype=np.int64)
    active = np.ones(shape, dtype=bool)
    waiting = np.zeros(shape, dtype=bool)
    sent = np.ones(shape, dtype=np.int64)
    preempted = np.zeros(trials, dtype=bool)
    for _ in range(waves * (osl + 2) + 2):
        if not (active.any() or waiting.any()):
            break
        num_tokens = isl + out
        if k:
            draft = np.where(rng.random(shape) < coverage, k, 0)
            if not vllm:
                draft = np.minimum(draft, np.maximum(osl - out - 1, 0))  # cut to the room left
        else:
            draft = np.zeros(shape, dtype=np.int64)
        need = -(-(num_tokens + draft + look) // bs)
        step_blocks = np.maximum(held, need) if vllm else need
        step_blocks = np.where(active, step_blocks, 0)
        preempted |= step_blocks.sum(axis=1) > usable
        # admit waiting clients whose prompt fits next to this step's allocations
        free = usable - step_blocks.sum(axis=1)
        admit_n = np.minimum(waiting.sum(axis=1), np.maximum(free, 0) // prompt_blocks)
        admit = waiting & (np.cumsum(waiting, axis=1) <= admit_n[:, None])
        # verify: accepted prefix length of each draft, then advance
        if k:
            accepted = (rng.random(shape)[..., None] < cum).sum(axis=-1)
            accepted = np.minimum(accepted, draft)
        else:
            accepted = 0
        committed = -(-(num_tokens + accepted) // bs)
        held = np.where(active, step_blocks if vllm else committed, held)
        out = np.where(active, out + 1 + accepted, out)
        finished = active & (out >= osl)
        active &= ~finished
        held = np.where(finished, 0, held)
        out = np.where(admit, 1, out)
        held = np.where(admit, prompt_blocks, held)
        sent = np.where(admit, sent + 1, sent)
        active |= admit
        waiting = (waiting & ~admit) | (finished & (sent < waves))
    return float(preempted.mean())


def client_occupancy(
    model: CapacityModel,
    block_size: int,
    isl: int,
    osl: int,
    k: int,
    coverage: float,
    accepted_per_pos: list[float],
    *,
    method: str = "ngram",
    steps: int,
) -> tuple[list[float], list[float]]:
    """Mean and variance of the blocks ONE closed-loop client holds at each of ``steps`` steps.

    A Markov chain over (tokens generated, how far a past draft's blocks reach beyond them): every
    client starts together after its prefill; at each step it carries a k-token draft with probability
    ``coverage``, accepts a prefix distributed as ``accepted_per_pos`` and advances by ``1 + accepted``;
    a finished request is replaced by the next one (prompt blocks during its prefill step). vLLM keeps
    the high-water mark of a request's blocks; kvbm gives unused lookahead back at commit (module
    docstring). Exact for one client; clients are independent until the pool runs out.
    """
    import numpy as np  # the model is the only numerical code here; kvbm's hot path needs none

    model = _check_model(model)
    bs = _as_int("block_size", block_size, 1)
    isl, osl, k = _as_int("isl", isl, 1), _as_int("osl", osl, 1), _as_int("k", k, 0)
    _check_acceptance(k, coverage, accepted_per_pos)
    look = reserved_lookahead(model, method, k)
    vllm = model == "vllm"
    reach_max = k + look + 1 if vllm else 1  # high-water offsets 0 .. k + look
    prompt_blocks = -(-(isl + look) // bs)
    cum = [1.0, *np.minimum.accumulate(np.asarray(accepted_per_pos, dtype=float)).tolist()] if k else [1.0]
    o = np.arange(osl + 1)[:, None]  # tokens generated so far (rows 1 .. osl-1 are decoding)
    h = np.arange(reach_max)[None, :]
    prob = np.zeros((osl + 1, reach_max))
    prob[min(1, osl), 0] = 1.0
    admitting = 0.0
    if osl == 1:  # the prefill's token was the last: every step admits the next request
        prob[:] = 0.0
        admitting = 1.0
    drafts = [(0, 1.0 - coverage), (k, coverage)] if k and coverage > 0 else [(0, 1.0)]
    # Per (draft, accepted) move, fixed over time: blocks held, the acceptance share (per row for the
    # engine, whose drafts are cut near the end) and the map to the new high-water offset column.
    moves = []
    for d, pd in drafts:
        dd = np.full(o.shape, d) if vllm else np.minimum(d, np.maximum(osl - o - 1, 0))
        reach = np.maximum(h, dd + look)  # slots past isl + o this step reserves or still holds
        blocks = (-(-(isl + o + reach) // bs)).astype(float)
        shares = []
        for a in range(d + 1):
            tail = cum[a + 1] if a + 1 < len(cum) else 0.0
            pa = np.where(a < dd, cum[a] - tail, np.where(a == dd, cum[min(a, len(cum) - 1)], 0.0))
            shift = 1 + a
            regroup = np.zeros((reach_max, reach_max))
            regroup[np.arange(reach_max), np.clip(reach[0] - shift, 0, reach_max - 1)] = 1.0
            shares.append((shift, pd * pa, regroup))
        moves.append((pd * blocks, pd * blocks**2, shares))
    means: list[float] = []
    variances: list[float] = []
    for _ in range(steps):
        nxt = np.zeros_like(prob)
        finished = 0.0
        eb = admitting * prompt_blocks
        eb2 = admitting * prompt_blocks**2
        for wb, wb2, shares in moves:
            eb += float((prob * wb).sum())
            eb2 += float((prob * wb2).sum())
            for shift, pa, regroup in shares:
                spread = (prob * pa) @ regroup
                finished += float(spread[max(0, osl - shift) :].sum())
                if osl - shift > 0:
                    nxt[shift:osl] += spread[: osl - shift]
        means.append(eb)
        variances.append(max(0.0, eb2 - eb * eb))
        nxt[1, 0] += admitting  # last step's admissions decode from here on
        prob, admitting = nxt, finished
    return means, variances


def _check_acceptance(k: int, coverage: float, accepted_per_pos: list[float]) -> None:
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be in [0, 1], got {coverage!r}")
    if len(accepted_per_pos) != k or any(not 0.0 <= a <= 1.0 for a in accepted_per_pos):
        raise ValueError(f"accepted_per_pos must hold k={k} shares in [0, 1], got {accepted_per_pos!r}")


def _step_risk(usable: int, concurrency: int, means: list[float], variances: list[float]) -> float:
    """Largest per-step probability that ``concurrency`` independent clients need more than
    ``usable`` blocks (normal approximation of their sum, with continuity correction)."""
    from statistics import NormalDist

    worst = 0.0
    unit = NormalDist()
    for m, v in zip(means, variances, strict=True):
        excess = concurrency * m - (usable + 0.5)
        p = unit.cdf(excess / (concurrency * v) ** 0.5) if v > 1e-12 else float(excess > 0)
        worst = max(worst, p)
    return worst


def dynamic_bound(
    model: CapacityModel,
    num_blocks: int,
    block_size: int,
    isl: int,
    osl: int,
    k: int,
    coverage: float,
    accepted_per_pos: list[float],
    *,
    method: str = "ngram",
    max_risk: float = DEFAULT_MAX_RISK,
    waves: int = 2,
    up_to: int | None = None,
) -> DynamicBound:
    """Preemption onset (expected occupancy of the busiest step exceeds the pool) and the largest
    concurrency whose per-step preemption risk stays within ``max_risk``, for a burst of closed-loop
    clients over ``waves`` request lengths (``client_occupancy``; ``preemption_probability`` is the
    Monte Carlo cross-check). Never below the static bound, which cannot preempt. ``up_to``: the
    largest concurrency the caller can use (a planner's measured range); the search stops there, so a
    huge pool costs no more than a small one (the onset is then reported as beyond ``up_to``)."""
    if not 0.0 <= max_risk < ONSET_PROBABILITY:
        raise ValueError(f"max_risk must be in [0, {ONSET_PROBABILITY}), got {max_risk!r}")
    usable = usable_blocks(model, num_blocks)
    floor = static_bound(model, method, k, num_blocks, isl + osl, block_size).max_concurrency
    steps = _as_int("waves", waves, 1) * (osl + 2)
    means, variances = client_occupancy(
        model, block_size, isl, osl, k, coverage, accepted_per_pos, method=method, steps=steps
    )
    prompt_blocks = blocks_for_slots(isl + reserved_lookahead(model, method, k), block_size)
    ceiling = usable // max(1, prompt_blocks)  # beyond this the prompts alone do not fit
    if up_to is not None:
        ceiling = min(ceiling, max(floor, _as_int("up_to", up_to, 1)))
    probs: dict[int, float] = {}
    c = floor + 1
    while c <= ceiling:
        probs[c] = _step_risk(usable, c, means, variances)
        if probs[c] >= ONSET_PROBABILITY:
            break
        c += 1
    onset = min((c for c, p in probs.items() if p >= ONSET_PROBABILITY), default=ceiling + 1)
    best = max((c for c, p in probs.items() if p <= max_risk), default=floor)
    return DynamicBound(
        onset=onset, max_concurrency=max(best, floor), max_risk=max_risk, probabilities=probs, waves=waves
    )
