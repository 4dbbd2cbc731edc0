"""Property-based state machine over random allocate / commit / free / match / fork / pin sequences.

After every step: each block is free xor held, reference counts equal holders, free + held == pool
(``kvbm.invariants.check_invariants``); every sequence holds at least the slots it was granted and
its computed count matches a simple model; a failed allocation (``None``) or a read-only call changed
nothing (snapshot equality). At the end of every run, freeing every sequence and pin restores the
initial free count. Settings: 150 runs of up to 60 steps (about 6,000 steps), under 10 s on 2 cores.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import kvbm
from kvbm.invariants import check_invariants, snapshot

# A few shared "system prompts" so prefixes collide and hit; a tiny alphabet so blocks repeat.
SYSTEM_PROMPTS = [[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9, 9, 9], [7] * 12]
tokens = st.lists(st.integers(0, 3), max_size=10)


class Seq:
    """The model of one sequence: what the manager must report for it."""

    def __init__(self, computed: int, granted: int, prompt_len: int) -> None:
        self.computed = computed
        self.reserved = prompt_len  # computed + new tokens asked for (never lookahead)
        self.granted = granted
        self.prompt_len = prompt_len


def _live(self: KVBMMachine) -> bool:
    return bool(self.model)


class KVBMMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mgr: kvbm.KVCacheManager | None = None
        self.model: dict[str, Seq] = {}
        self.pins: set[str] = set()
        self.counter = 0

    @initialize(
        num_blocks=st.integers(4, 64),
        block_size=st.sampled_from([1, 2, 4]),
        caching=st.booleans() | st.just(True),
        release=st.booleans() | st.just(True),
    )
    def setup(self, num_blocks: int, block_size: int, caching: bool, release: bool) -> None:
        self.mgr = kvbm.KVCacheManager(
            num_blocks, block_size, enable_prefix_caching=caching, release_lookahead=release
        )

    def _pick(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.model)), label="seq")

    @rule(system=st.sampled_from(SYSTEM_PROMPTS), tail=tokens, k=st.integers(0, 4))
    def allocate_new(self, system: list[int], tail: list[int], k: int) -> None:
        assert self.mgr is not None
        self.counter += 1
        sid = f"s{self.counter}"
        prompt = system + tail
        before = snapshot(self.mgr)
        free = self.mgr.num_free_blocks
        out = self.mgr.allocate(sid, len(prompt), k, token_ids=prompt)
        bs = self.mgr.block_size
        if out is None:
            assert snapshot(self.mgr) == before
            assert not self.mgr.has_sequence(sid)
            # refused only when the blocks it needs (new ones + cached hits to revive) exceed the free
            hits = self.mgr.match_prefix(prompt)[: max(len(prompt) - 1, 0) // bs]
            revive = sum(1 for b in hits if self.mgr._pool.ref_count[b] == 0)
            assert -(-(len(prompt) + k) // bs) - len(hits) + revive > free
            return
        assert self.mgr.block_table(sid) == out
        assert len(out) == -(-(len(prompt) + k) // bs)
        computed = self.mgr.num_computed_tokens(sid)
        assert computed % bs == 0
        assert computed < len(prompt) or computed == 0  # the last prompt token is always recomputed
        if self.mgr.enable_prefix_caching:
            assert computed == min(len(self.mgr.match_prefix(prompt)), max(len(prompt) - 1, 0) // bs) * bs
        self.model[sid] = Seq(computed, len(prompt) + k, len(prompt))

    @precondition(_live)
    @rule(data=st.data(), n=st.integers(0, 3), k=st.integers(0, 5))
    def allocate_more(self, data: st.DataObject, n: int, k: int) -> None:
        assert self.mgr is not None
        sid = self._pick(data)
        seq = self.model[sid]
        before = snapshot(self.mgr)
        held = len(self.mgr.block_table(sid))
        out = self.mgr.allocate(sid, n, k)
        if out is None:
            assert snapshot(self.mgr) == before
            assert -(-(seq.computed + n + k) // self.mgr.block_size) - held > self.mgr.num_free_blocks
        else:
            seq.reserved = max(seq.reserved, seq.computed + n)
            seq.granted = max(seq.granted, seq.computed + n + k)

    def _commit(self, sid: str, m: int, draw_ids: st.DataObject) -> None:
        assert self.mgr is not None
        seq = self.model[sid]
        known = self.mgr.token_ids(sid)
        ids = known[seq.computed : seq.computed + m]
        ids += draw_ids.draw(st.lists(st.integers(0, 3), min_size=m - len(ids), max_size=m - len(ids)))
        self.mgr.commit(sid, m, token_ids=ids)
        seq.computed += m
        seq.reserved = seq.granted = max(seq.computed, seq.reserved)  # lookahead dropped
        if self.mgr.release_lookahead:
            assert len(self.mgr.block_table(sid)) == -(-seq.granted // self.mgr.block_size)

    @precondition(_live)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        sid = self._pick(data)
        seq = self.model[sid]
        self._commit(sid, data.draw(st.integers(0, seq.granted - seq.computed), label="num_tokens"), data)

    @precondition(_live)
    @rule(data=st.data(), k=st.integers(0, 4))
    def decode_step(self, data: st.DataObject, k: int) -> None:
        """One engine step: every sequence finishes its prompt, or verifies 1 + k drafts."""
        assert self.mgr is not None
        for sid in sorted(self.model):
            seq = self.model[sid]
            if seq.computed < seq.prompt_len:
                self._commit(sid, seq.prompt_len - seq.computed, data)
                continue
            if self.mgr.allocate(sid, 1, k) is None:
                continue  # an engine would preempt; the manager is unchanged
            seq.reserved = max(seq.reserved, seq.computed + 1)
            seq.granted = max(seq.granted, seq.computed + 1 + k)
            self._commit(sid, 1 + data.draw(st.integers(0, k), label="accepted"), data)

    @precondition(_live)
    @rule(data=st.data(), m=st.integers(1, 8))
    def commit_too_much_fails_cleanly(self, data: st.DataObject, m: int) -> None:
        assert self.mgr is not None
        sid = self._pick(data)
        seq = self.model[sid]
        before = snapshot(self.mgr)
        n = seq.granted - seq.computed + m
        try:
            self.mgr.commit(sid, n, token_ids=[0] * n)
        except kvbm.CommitBeyondGrantedError as e:
            assert repr(sid) in str(e)
        else:
            raise AssertionError("commit beyond the grant was accepted")
        assert snapshot(self.mgr) == before

    @precondition(_live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        assert self.mgr is not None
        sid = self._pick(data)
        self.mgr.free(sid)
        del self.model[sid]
        assert not self.mgr.has_sequence(sid)

    @precondition(_live)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        assert self.mgr is not None
        sid = self._pick(data)
        self.counter += 1
        child = f"s{self.counter}"
        before = snapshot(self.mgr)
        try:
            copies = self.mgr.fork(sid, child)
        except kvbm.OutOfBlocksError:
            assert snapshot(self.mgr) == before
            return
        computed = self.model[sid].computed
        bs = self.mgr.block_size
        assert len(copies) == (1 if computed % bs else 0)
        full = computed // bs
        assert self.mgr.block_table(child)[:full] == self.mgr.block_table(sid)[:full]
        self.model[child] = Seq(computed, computed, computed)  # the child continues from here

    @precondition(lambda self: self.mgr is not None and self.mgr.metrics().num_cached_blocks > 0)
    @rule(system=st.sampled_from(SYSTEM_PROMPTS), tail=tokens)
    def match(self, system: list[int], tail: list[int]) -> None:
        assert self.mgr is not None
        before = snapshot(self.mgr)
        blocks = self.mgr.match_prefix(system + tail)
        assert snapshot(self.mgr) == before
        assert len(blocks) <= len(system + tail) // self.mgr.block_size
        assert all(self.mgr._pool.block_hash[b] is not None for b in blocks)

    @precondition(lambda self: self.mgr is not None and self.mgr.metrics().num_cached_blocks > 0)
    @rule(system=st.sampled_from(SYSTEM_PROMPTS))
    def pin(self, system: list[int]) -> None:
        assert self.mgr is not None
        name = f"pin{len(system)}"
        if name in self.pins:
            self.mgr.unpin(name)
            self.pins.discard(name)
        else:
            self.mgr.pin(name, system)
            self.pins.add(name)

    @precondition(
        lambda self: (
            self.mgr is not None and not self.model and not self.pins and self.mgr.metrics().num_cached_blocks
        )
    )
    @rule()
    def reset(self) -> None:
        assert self.mgr is not None
        self.mgr.reset_prefix_cache()
        assert self.mgr.metrics().num_cached_blocks == 0

    @invariant()
    def consistent(self) -> None:
        if self.mgr is None:
            return
        check_invariants(self.mgr)
        bs = self.mgr.block_size
        assert self.mgr.num_sequences == len(self.model)
        for sid, seq in self.model.items():
            assert self.mgr.num_computed_tokens(sid) == seq.computed
            assert self.mgr.num_granted_tokens(sid) == seq.granted
            assert len(self.mgr.block_table(sid)) * bs >= seq.granted

    def teardown(self) -> None:
        if self.mgr is None:
            return
        for sid in list(self.model):
            self.mgr.free(sid)
        for name in list(self.pins):
            self.mgr.unpin(name)
        check_invariants(self.mgr)
        assert self.mgr.num_free_blocks == self.mgr.num_blocks
        assert self.mgr.usage == 0.0


KVBMMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestKVBMStateMachine = KVBMMachine.TestCase
