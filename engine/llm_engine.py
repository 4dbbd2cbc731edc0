"""LLMEngine: requests in, tokens out, one ``step()`` at a time.

Each step: (optionally) ask the drafter for up to k tokens per decoding sequence, let the scheduler
pick the batch within the KV pool (kvbm), run ONE flattened forward over prefill chunks, decode
tokens and ``[last_token, *draft]`` verify chunks, sample or verify, commit the accepted tokens to
kvbm, and apply stop conditions. Serving (engine.serve), the offline ``LLM`` and tests drive it.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

import kvbm
from engine.engine_config import EngineConfig
from engine.errors import CapacityError, RequestError
from engine.presets import resolve_model
from engine.request import Request, RequestOutput, Status
from engine.runner import ModelRunner, Runner, SeqBatchEntry
from engine.sampling import SamplingParams, make_generator, sample
from engine.scheduler import ScheduledSeq, Scheduler
from engine.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from engine.phases import PhaseClock
    from engine.spec import SpecConfig, SpecStats

log = logging.getLogger("engine")


@dataclass
class _Batch:
    """One step's flattened forward: inputs, the logits rows asked for, and which sequences complete."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: Any
    rows: list[int]
    row_index: torch.Tensor
    kinds: list[tuple[ScheduledSeq, int, int]]  # (seq, first logits row, n rows) of completing seqs


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        """``config`` holds every option, validated; ``engine.llm.LLM(model, **options)`` builds one
        from keywords."""
        self.engine_config = config
        self.source = resolve_model(config.model, weights=config.weights)
        self.runner = self._make_runner(config)
        self.config = self.runner.config
        self.tokenizer: Tokenizer = load_tokenizer(self.source)
        self.max_model_len = self.runner.max_model_len
        self.kv_manager = kvbm.KVCacheManager(
            self.runner.num_blocks, self.runner.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.kv_manager, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.token_budget
        )
        pool_tokens = self.runner.num_blocks * self.runner.block_size
        if pool_tokens < self.max_model_len:
            log.warning(
                "the KV pool holds %d tokens (%d blocks of %d), fewer than max_model_len=%d: a request "
                "whose prompt + max_tokens needs more is refused at admission",
                pool_tokens,
                self.runner.num_blocks,
                self.runner.block_size,
                self.max_model_len,
            )
        self.seed = config.seed
        self._requests: dict[str, Request] = {}
        self._num_added = 0
        self.spec = config.spec
        self.proposer: Any = None
        self._spec_stats: SpecStats | None = None
        self.clock: PhaseClock | None = None  # set by the step profiler: per-phase step times
        self.pad_drafts = config.pad_drafts
        self._padded: dict[str, int] = {}  # request id -> proposed tokens before its pads, this step
        if config.spec is not None:
            self._init_spec(config.spec)

    # -- construction helpers ----------------------------------------------------------------------
    def _make_runner(self, config: EngineConfig) -> Runner:
        if config.tp == 1:
            return ModelRunner.from_config(self.source, config)
        from engine.tp import build_tp_runner  # the worker machinery loads only for tp > 1

        return build_tp_runner(self.source, config)

    def _init_spec(self, spec: SpecConfig) -> None:
        from engine.spec import SpecStats, build_proposer

        if spec.is_tree:
            from engine.spec.medusa_decoder import MedusaDecoder

            self.proposer = MedusaDecoder(spec, self.runner)  # node tokens ride the chain path
            self._medusa_paths: dict[str, list[int]] = {}  # accepted tree path per request, this step
        else:
            self.proposer = build_proposer(spec, target=self.runner)
        self._spec_stats = SpecStats()
        if spec.is_tree:  # accepted_per_pos counts tree depths, not node slots
            self._spec_stats.max_positions = self.proposer.tree.num_heads
        # a step where every sequence verifies its full draft (or tree) replays a CUDA graph like a
        # plain decode step; mixed widths run eagerly (a TPExecutor tells every rank)
        for width in spec.verify_widths:
            self.runner.enable_verify_graphs(width, tree=spec.is_tree)

    # -- public state ------------------------------------------------------------------------------
    @property
    def weights_label(self) -> str:
        return self.source.weights_label

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_usage(self) -> float:
        return self.kv_manager.usage

    @property
    def spec_stats(self) -> SpecStats | None:
        return self._spec_stats

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def close(self) -> None:
        """Stop tensor-parallel workers and drop the KV cache."""
        self.runner.close()

    # -- requests ----------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request; raises RequestError naming the bad field and value."""
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self._requests:
            raise RequestError(f"request_id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        prompt = self._check_prompt(prompt_token_ids)
        self._check_fits(len(prompt), params)
        gen = None
        if not params.greedy:
            seed = params.seed
            if seed is None:
                seed = self.seed * 1_000_003 + zlib.crc32(request_id.encode()) + self._num_added
            gen = make_generator(seed, self.runner.device)
        req = Request(
            request_id,
            prompt,
            params,
            arrival_time if arrival_time is not None else time.monotonic(),
            generator=gen,
        )
        self._num_added += 1
        self._requests[request_id] = req
        self.scheduler.add(req)

    def add_running_decode(self, request_id: str, token_ids: Sequence[int], params: SamplingParams) -> None:
        """Profiling setup without a prefill: a running request whose first ``len(token_ids) - 1``
        tokens hold KV already (whatever the cache holds there: step time depends on shapes, not
        values) and whose last token is its first output, so the next ``step()`` decodes it (or
        verifies its draft) at context ``len(token_ids)``, exactly as a served request's step."""
        if len(token_ids) < 2:
            raise RequestError(f"add_running_decode: {request_id!r} needs >= 2 tokens, got {len(token_ids)}")
        if request_id in self._requests:
            raise RequestError(f"request_id {request_id!r} is already in use")
        if len(self.scheduler.running) >= self.scheduler.max_num_seqs:
            raise CapacityError(f"add_running_decode: max_num_seqs={self.scheduler.max_num_seqs} already run")
        params.validate()
        prompt = self._check_prompt(list(token_ids[:-1]))
        n = len(prompt)
        kv = self.kv_manager
        if kv.allocate(request_id, n, token_ids=prompt) is None:
            raise CapacityError(f"add_running_decode: no KV room for {request_id!r} ({n} tokens)")
        kv.commit(request_id, n - kv.num_computed_tokens(request_id))
        gen = None if params.greedy else make_generator(self.seed + len(self._requests), self.runner.device)
        req = Request(request_id, prompt, params, time.monotonic(), generator=gen)
        req.output_token_ids.append(int(token_ids[-1]))
        req.token_times.append(time.monotonic())
        req.num_computed = n
        req.status = Status.RUNNING
        self._requests[request_id] = req
        self.scheduler.running.append(req)

    def _check_prompt(self, prompt_token_ids: Sequence[int]) -> list[int]:
        if isinstance(prompt_token_ids, str | bytes) or not isinstance(prompt_token_ids, Sequence):
            raise RequestError(
                f"prompt_token_ids must be a list of ints, got {type(prompt_token_ids).__name__}"
            )
        prompt = list(prompt_token_ids)
        if not prompt:
            raise RequestError("prompt_token_ids must not be empty")
        vocab = self.config.vocab_size
        for i, t in enumerate(prompt):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise RequestError(f"prompt_token_ids[{i}]={t!r} is not a token id in [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"prompt length {len(prompt)} leaves no room to generate within "
                f"max_model_len={self.max_model_len}"
            )
        return prompt

    def _peak_slots(self, prompt_len: int, max_tokens: int, speculate: bool = True) -> int:
        """KV slots the request holds at its last step, by kvbm.capacity's engine rule."""
        spec = self.spec if speculate else None
        method, k = (spec.method, spec.k) if spec is not None else ("none", 0)
        nodes = self.proposer.num_nodes if spec is not None and spec.is_tree else None
        room = min(max_tokens, self.max_model_len - prompt_len)
        return kvbm.capacity.peak_slots("engine", method, k, prompt_len + room, tree_nodes=nodes)

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        """Refuse a request the whole pool could never hold: it would preempt itself forever."""
        bs, pool = self.runner.block_size, self.runner.num_blocks
        slots = self._peak_slots(prompt_len, params.max_tokens, params.speculate)
        need = kvbm.capacity.blocks_for_slots(slots, bs)
        if need > pool:
            room = min(params.max_tokens, self.max_model_len - prompt_len)
            extra = slots - (prompt_len + room - 1)  # slots a Medusa tree adds at the last step
            fit = pool * bs - prompt_len + 1 - extra
            raise RequestError(
                f"prompt of {prompt_len} tokens with max_tokens={params.max_tokens} needs {slots} KV "
                f"slots ({need} KV blocks of {bs}) at its last step, but the whole KV pool holds {pool} "
                f"blocks ({pool * bs} tokens); lower max_tokens (at most {max(0, fit)} fits) or the prompt"
            )

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; unknown or finished ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is None or req.is_finished:
            return
        self._finish(req, "abort")

    def _finish(self, req: Request, reason: str) -> None:
        was_running = req.status is Status.RUNNING
        self.scheduler.finish(req, reason)
        if self.proposer is not None and was_running:
            self.proposer.free(req.request_id)

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; outputs for requests that got tokens or finished.

        The one step pipeline of every method (serving, the offline ``LLM`` and the step profiler all
        run it): propose drafts, schedule, prepare the flattened batch, forward, sample or verify,
        commit to kvbm, update the proposer, emit outputs. ``self.clock`` (a PhaseClock, set by the
        profiler) gets a mark after each phase."""
        if self.clock is not None:
            self.clock.start()
        drafts = self._draft()
        scheduled, finished = self._schedule(drafts)
        if not scheduled:
            return finished
        batch = self._prepare(scheduled)
        self._mark("prepare")
        t0 = time.perf_counter()
        hidden, logits = self._forward(batch)
        self._mark("forward")
        new_tokens = self._sample_or_verify(batch.kinds, logits)
        if self._spec_stats is not None:
            self._spec_stats.verify_time_s += time.perf_counter() - t0
        self._mark("sample_verify")
        accepted = self._commit(scheduled, new_tokens)
        self._mark("commit")
        if self.proposer is not None:
            self._update_proposer(scheduled, accepted, batch, new_tokens, hidden)
            self._mark("proposer_update")
        outputs = self._emit(scheduled, new_tokens)
        self._mark("output")
        return finished + outputs

    def _mark(self, phase: str) -> None:
        if self.clock is not None:
            self.clock.mark(phase)

    def _draft(self) -> dict[str, list[int]]:
        """This step's drafts per request id, padded to one verify width where that replays a graph."""
        self._padded = {}
        if self.proposer is None:
            return {}
        drafts = self._propose()
        self._padded = self._pad_drafts(drafts)
        self._mark("propose")
        return drafts

    def _schedule(self, drafts: dict[str, list[int]]) -> tuple[list[ScheduledSeq], list[RequestOutput]]:
        """The step's batch, and the outputs of requests that can never run (finished as "length");
        the drafter forgets preempted and dropped requests."""
        scheduled, preempted = self.scheduler.schedule(drafts)
        dropped = self.scheduler.take_dropped()
        if self.proposer is not None:
            for req in preempted + dropped:
                self.proposer.free(req.request_id)
        finished: list[RequestOutput] = []
        for req in dropped:
            self._requests.pop(req.request_id, None)
            finished.append(req.output([]))
        self._mark("schedule")
        return scheduled, finished

    def _forward(self, batch: _Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hidden, logits of the requested rows); both None when no row completes this step."""
        out = self.runner.execute(batch.input_ids, batch.positions, batch.meta, batch.row_index)
        return out if batch.rows else (None, None)

    def _prepare(self, scheduled: list[ScheduledSeq]) -> _Batch:
        """The flattened forward of this step: query tokens, KV layout and the logits rows wanted."""
        spec_rows = self.proposer is not None
        entries: list[SeqBatchEntry] = []
        rows: list[int] = []  # logits rows requested, in order
        kinds: list[tuple[ScheduledSeq, int, int]] = []  # (seq, first logits row, n rows) of completing seqs
        offset = 0
        kv = self.kv_manager
        for s in scheduled:
            req = s.request
            start = req.num_computed
            toks = req.token_slice(start, start + s.num_new_tokens) + s.draft
            entries.append(SeqBatchEntry(toks, kv.block_table(req.request_id), start))
            if s.completes:
                n_rows = len(toks) if (spec_rows and self._is_decode(s)) else 1
                kinds.append((s, len(rows), n_rows))
                rows.extend(range(offset + len(toks) - n_rows, offset + len(toks)))
            offset += len(toks)
        input_ids, positions, meta = self.runner.prepare(entries)
        if self.spec is not None and self.spec.is_tree:  # Medusa: tree positions and mask
            tree_nodes = [len(s.draft) if self._is_decode(s) else 0 for s in scheduled]
            self.proposer.apply_tree(meta, positions, tree_nodes)
        return _Batch(input_ids, positions, meta, rows, self.runner.index_tensor(rows), kinds)

    def _commit(self, scheduled: list[ScheduledSeq], new_tokens: dict[str, list[int]]) -> list[int]:
        """Commit each sequence's now valid KV (its real chunk plus accepted drafts) to kvbm; returns
        the accepted draft count per scheduled sequence."""
        kv = self.kv_manager
        accepted_counts: list[int] = []
        for s in scheduled:
            req = s.request
            toks = new_tokens.get(req.request_id)
            accepted = len(toks) - 1 if toks else 0
            n_commit = s.num_new_tokens + accepted
            start = req.num_computed
            known = min(n_commit, req.num_tokens - start)
            committed_ids = req.token_slice(start, start + known) + (toks or [])[: n_commit - known]
            kv.commit(req.request_id, n_commit, token_ids=committed_ids)
            req.num_computed += n_commit
            accepted_counts.append(accepted)
        return accepted_counts

    def _update_proposer(
        self,
        scheduled: list[ScheduledSeq],
        accepted: list[int],
        batch: _Batch,
        new_tokens: dict[str, list[int]],
        hidden: torch.Tensor | None,
    ) -> None:
        """Tell the drafter what verification kept (and refresh Medusa's head state)."""
        assert self._spec_stats is not None
        if self.spec is not None and self.spec.is_tree and hidden is not None:
            self._medusa_observe(batch.kinds, batch.rows, new_tokens, hidden)
        for s, a in zip(scheduled, accepted, strict=True):
            if not self._is_decode(s):
                continue
            real = self._padded.get(s.request.request_id)
            if real is not None:  # the drafter proposed only the first `real` tokens of the draft
                self.proposer.commit(s.request.request_id, a)
                self._spec_stats.record_padded(real, a, len(s.draft) - real)
            else:
                self.proposer.commit(s.request.request_id, a)
                self._spec_stats.record(len(s.draft), a)

    def _emit(self, scheduled: list[ScheduledSeq], new_tokens: dict[str, list[int]]) -> list[RequestOutput]:
        """Append the new tokens, apply stop conditions, build the outputs."""
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        for s in scheduled:
            req = s.request
            toks = new_tokens.get(req.request_id)
            if toks is None:
                continue
            appended = self._append(req, toks, now)
            if req.is_finished:
                self._requests.pop(req.request_id, None)
            outputs.append(req.output(appended))
        return outputs

    @staticmethod
    def _is_decode(s: ScheduledSeq) -> bool:
        return s.num_new_tokens == 1 and bool(s.request.output_token_ids)

    def _propose(self) -> dict[str, list[int]]:
        from engine.spec import SpecSequence

        assert self.spec is not None and self._spec_stats is not None
        cands = self.scheduler.decode_candidates()
        if not cands:
            return {}
        k = self.spec.k_for_batch(len(self.scheduler.running))
        ks = [max(0, min(k, self._draft_room(r))) if r.params.speculate else 0 for r in cands]
        seqs = [
            SpecSequence(r.request_id, r.all_token_ids, r.params.temperature, r.params.top_p, r.generator)
            for r in cands
        ]
        t0 = time.perf_counter()
        proposals = self.proposer.propose(seqs, ks)
        self._spec_stats.draft_time_s += time.perf_counter() - t0
        self._last_spec_seqs = {s.seq_id: s for s in seqs}
        if self.spec.is_tree:  # a tree's node list is not cut to k (k = its depth, checked by propose)
            return {r.request_id: list(p) for r, p in zip(cands, proposals, strict=True) if p}
        return {r.request_id: list(p)[:k] for r, p, k in zip(cands, proposals, ks, strict=True) if p}

    def _draft_room(self, req: Request) -> int:
        """Draft tokens this request can verify this step: it must still have room for the bonus token."""
        return min(req.params.max_tokens - len(req.output_token_ids), self.max_model_len - req.num_tokens) - 1

    def _pad_drafts(self, drafts: dict[str, list[int]]) -> dict[str, int]:
        """Pad every decoding sequence's draft to one width (``_padded_width``), in place; returns the
        padded request ids with the number of proposed tokens before their pads (0: no draft at all).

        Why: a batch mixing widths (1 + k, 1 + a shorter draft, 1 without one: draft coverage < 1, a
        lookup that found fewer tokens, a request near its max_tokens, speculate=False) runs its forward
        eagerly, several times slower on a GPU than the CUDA graph a uniform batch replays. A pad
        repeats the draft's last token (or the sequence's); it is a dummy position, as vLLM pads a batch
        to its graph size: its logits are never read (``_verify_chain`` verifies the proposed part only),
        so the output and the spec-decode counters are exactly those of the unpadded step, and SpecStats
        counts pads apart from drafts. Only when every sequence of the step decodes (a prefill chunk
        would break the graph anyway), a verify graph holds the widest draft (unless ``pad_drafts``
        forces it; never for a Medusa tree), and every sequence has room for the pads within
        max_model_len, the step's token budget and the free KV blocks (a pad never preempts a
        sequence); otherwise nothing is padded."""
        if not drafts or self.pad_drafts is False or self.spec is None or self.spec.is_tree:
            return {}
        width = self._padded_width(max(len(d) for d in drafts.values()))
        if width is None:
            return {}
        sched = self.scheduler
        decoding = sched.decode_candidates()
        if len(decoding) != len(sched.running):
            return {}
        if sched.waiting and len(sched.running) < sched.max_num_seqs:  # a prefill may join this step
            return {}
        short = [r for r in decoding if len(drafts.get(r.request_id, ())) < width]
        if any(self.max_model_len - r.num_tokens - 1 < width for r in short):  # positions for the pads
            return {}
        if len(decoding) * (1 + width) > sched.max_num_batched_tokens:  # pads must not crowd a sequence out
            return {}
        # nor cause a preemption: at most this many new blocks per sequence (a conservative bound)
        per_seq = -(-(1 + width) // self.runner.block_size) + 1
        if self.kv_manager.num_free_blocks < len(decoding) * per_seq:
            return {}
        padded: dict[str, int] = {}
        for r in short:
            real = drafts.get(r.request_id, [])
            fill = real[-1] if real else r.output_token_ids[-1]
            drafts[r.request_id] = real + [fill] * (width - len(real))
            padded[r.request_id] = len(real)
        return padded

    def _padded_width(self, longest: int) -> int | None:
        """The draft width a step pads to: the narrowest with a verify graph that holds the longest
        draft (a lookup that found 2 of k = 4 tokens still replays the 1 + 4 graph, cheaper on a GPU
        than an eager 1 + 2 step); without one, the longest draft where ``pad_drafts`` forces padding."""
        assert self.spec is not None
        graphed = [
            q - 1 for q in self.spec.verify_widths if q - 1 >= longest and self.runner.has_verify_graphs(q)
        ]
        if graphed:
            return min(graphed)
        return longest if self.pad_drafts else None

    def _sample_or_verify(
        self, kinds: list[tuple[ScheduledSeq, int, int]], logits: torch.Tensor | None
    ) -> dict[str, list[int]]:
        """Tokens to append per completing request: one sampled token, or accepted drafts + bonus."""
        out: dict[str, list[int]] = {}
        if logits is None:
            return out
        plain = [
            (s, r) for s, r, n in kinds if n == 1 and not (self.proposer is not None and self._is_decode(s))
        ]
        if plain:
            rows = torch.tensor([r for _, r in plain], device=logits.device)
            reqs = [s.request for s, _ in plain]
            toks = sample(
                logits.index_select(0, rows),
                [q.params.temperature for q in reqs],
                [q.params.top_p for q in reqs],
                [q.generator for q in reqs],
            )
            for q, t in zip(reqs, toks, strict=True):
                out[q.request_id] = [t]
        verify = [(s, r, n) for s, r, n in kinds if self.proposer is not None and self._is_decode(s)]
        if verify and self.spec is not None and self.spec.is_tree:
            self._medusa_verify(verify, logits, out)
        elif verify:
            self._verify_chain(verify, logits, out)
        return out

    def _verify_chain(
        self, verify: list[tuple[ScheduledSeq, int, int]], logits: torch.Tensor, out: dict[str, list[int]]
    ) -> None:
        """Tokens of the sequences that verify a draft: the proposed part only, never the pads after it
        (``_pad_drafts``), so a padded sequence emits what it would emit unpadded."""
        from engine.spec import verify_chain

        reqs = [s.request for s, _, _ in verify]
        real = [
            self._padded.get(q.request_id, len(s.draft)) for q, (s, _, _) in zip(reqs, verify, strict=True)
        ]
        rows = torch.cat([torch.arange(r, r + m + 1) for (_, r, _), m in zip(verify, real, strict=True)])
        draft_probs = None
        if any(not q.params.greedy for q in reqs) and self.spec is not None and self.spec.method == "draft":
            draft_probs = self.proposer.draft_probs([self._last_spec_seqs[q.request_id] for q in reqs])
        res = verify_chain(
            logits.index_select(0, rows.to(logits.device)),
            [s.draft[:m] for (s, _, _), m in zip(verify, real, strict=True)],
            temperatures=[q.params.temperature for q in reqs],
            top_ps=[q.params.top_p for q in reqs],
            generators=[q.generator for q in reqs],
            draft_probs=draft_probs,
        )
        for q, toks in zip(reqs, res.tokens, strict=True):
            out[q.request_id] = list(toks)

    def _medusa_verify(
        self, verify: list[tuple[ScheduledSeq, int, int]], logits: torch.Tensor, out: dict[str, list[int]]
    ) -> None:
        """Walk each decode sequence's Medusa tree; the accepted nodes' KV is moved next to the root
        (before the commit below); the accepted path is remembered for ``_medusa_observe``."""
        from engine.spec import SpecSequence

        reqs = [s.request for s, _, _ in verify]
        seqs = [
            SpecSequence(q.request_id, q.all_token_ids, q.params.temperature, q.params.top_p, q.generator)
            for q in reqs
        ]
        results = self.proposer.accept_batch(
            seqs,
            [s.draft for s, _, _ in verify],
            logits,
            [r for _, r, _ in verify],
            [self.kv_manager.block_table(q.request_id) for q in reqs],
            [q.num_computed for q in reqs],
        )
        self._medusa_paths = {}
        for q, (path, toks) in zip(reqs, results, strict=True):
            self._medusa_paths[q.request_id] = path
            out[q.request_id] = toks

    def _medusa_observe(
        self,
        kinds: list[tuple[ScheduledSeq, int, int]],
        rows: list[int],
        new_tokens: dict[str, list[int]],
        hidden: torch.Tensor,
    ) -> None:
        """Refresh the Medusa heads' state of every sequence that got tokens, from the hidden state
        of its last accepted position (a prefill's last token, a tree's last accepted node)."""
        paths = self._medusa_paths
        ids: list[str] = []
        at: list[int] = []
        for s, r, n in kinds:
            rid = s.request.request_id
            if rid not in new_tokens:
                continue
            path = paths.get(rid)
            ids.append(rid)
            at.append(rows[r + (path[-1] if path else 0)] if n > 1 else rows[r + n - 1])
        self._medusa_paths = {}
        if ids:
            self.proposer.observe(ids, hidden.index_select(0, torch.tensor(at, device=hidden.device)))

    def _append(self, req: Request, tokens: list[int], now: float) -> list[int]:
        """Append tokens one by one, stopping at the first stop condition; returns those appended."""
        p = req.params
        eos = () if p.ignore_eos else self.tokenizer.eos_token_ids
        appended: list[int] = []
        for t in tokens:
            req.output_token_ids.append(t)
            req.token_times.append(now)
            appended.append(t)
            reason = None
            if t in eos:
                reason = "stop"
            elif t in p.stop_token_ids:
                reason, req.stop_reason = "stop", t
            elif p.stop and (hit := self._stop_string(req)) is not None:
                reason, req.stop_reason = "stop", hit
            elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
                reason = "length"
            if reason is not None:
                self._finish(req, reason)
                break
        return appended

    def _stop_string(self, req: Request) -> str | None:
        longest = max(len(s) for s in req.params.stop)
        tail = self.tokenizer.decode(req.output_token_ids[-(longest + 8) :])
        return next((s for s in req.params.stop if s in tail), None)
