"""Bad calls raise a clear error naming the sequence and the numbers, and change nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import kvbm
from kvbm.invariants import check_invariants, snapshot


@pytest.fixture
def mgr() -> kvbm.KVCacheManager:
    m = kvbm.KVCacheManager(8, 4)
    m.allocate("a", 6, 2, token_ids=list(range(6)))
    m.commit("a", 6)
    m.allocate("a", 1, 2)
    return m


@pytest.mark.parametrize("value", [0, -1, 1.5, "4", True, None])
def test_bad_sizes_name_the_field_and_value(value: object) -> None:
    with pytest.raises(kvbm.InvalidArgumentError, match=f"block_size must be an int > 0, got {value!r}"):
        kvbm.KVCacheManager(8, value)  # type: ignore[arg-type]
    with pytest.raises(kvbm.InvalidArgumentError, match=f"num_blocks must be an int > 0, got {value!r}"):
        kvbm.KVCacheManager(value, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m.free("zz"), kvbm.UnknownSequenceError, "free: unknown sequence 'zz'"),
        (lambda m: m.commit("zz", 1), kvbm.UnknownSequenceError, "commit: unknown sequence 'zz'"),
        (lambda m: m.block_table("zz"), kvbm.UnknownSequenceError, "block_table: unknown sequence 'zz'"),
        (lambda m: m.num_computed_tokens("zz"), kvbm.UnknownSequenceError, "unknown sequence 'zz'"),
        (lambda m: m.fork("zz", "b"), kvbm.UnknownSequenceError, "fork: unknown sequence 'zz'"),
        (lambda m: m.fork("a", "a"), kvbm.SequenceExistsError, "child sequence 'a' already exists"),
        (
            lambda m: m.commit("a", 4, token_ids=[1, 2, 3, 4]),
            kvbm.CommitBeyondGrantedError,
            "sequence 'a' cannot commit 4 tokens: 6 are computed and room was granted for 9",
        ),
        (
            lambda m: m.commit("a", -1),
            kvbm.InvalidArgumentError,
            "num_tokens must be >= 0 for sequence 'a', got -1",
        ),
        (
            lambda m: m.allocate("a", -2),
            kvbm.InvalidArgumentError,
            "num_new_tokens must be >= 0 for sequence 'a', got -2",
        ),
        (
            lambda m: m.allocate("a", 1, -3),
            kvbm.InvalidArgumentError,
            "num_lookahead_tokens must be >= 0 for sequence 'a', got -3",
        ),
        (
            lambda m: m.allocate("n", -1, token_ids=[]),
            kvbm.InvalidArgumentError,
            "num_new_tokens must be >= 0 for sequence 'n', got -1",
        ),
        (lambda m: m.allocate("n", 2.0, token_ids=[1, 2]), kvbm.InvalidArgumentError, "got 2.0"),
        (lambda m: m.allocate("n", 3), kvbm.TokenIdsError, "sequence 'n' is new, so token_ids"),
        (
            lambda m: m.allocate("n", 3, token_ids=[1, 2]),
            kvbm.TokenIdsError,
            "got 2 ids for num_new_tokens=3",
        ),
        (
            lambda m: m.allocate("a", 1, extra_keys=("x",)),
            kvbm.InvalidArgumentError,
            "sequence 'a' was registered with extra_keys=()",
        ),
        (lambda m: m.unpin("p"), kvbm.UnknownPinError, "no pin named 'p'"),
    ],
)
def test_errors_are_clear_and_leave_state_unchanged(
    mgr: kvbm.KVCacheManager, call: Callable[[kvbm.KVCacheManager], object], error: type, message: str
) -> None:
    before = snapshot(mgr)
    with pytest.raises(error) as info:
        call(mgr)
    assert message in str(info.value)
    assert isinstance(info.value, kvbm.KVBMError)
    assert snapshot(mgr) == before
    check_invariants(mgr)


def test_errors_derive_from_the_builtin_a_caller_would_catch() -> None:
    mgr = kvbm.KVCacheManager(4, 4)
    with pytest.raises(KeyError):
        mgr.free("missing")
    with pytest.raises(ValueError):
        mgr.allocate("s", -1, token_ids=[])


def test_numpy_style_ints_are_accepted() -> None:
    class Index:  # anything with __index__, like numpy.int64
        def __index__(self) -> int:
            return 3

    mgr = kvbm.KVCacheManager(4, 4)
    assert mgr.allocate("s", Index(), token_ids=[1, 2, 3]) is not None  # type: ignore[arg-type]
    mgr.commit("s", Index())  # type: ignore[arg-type]
    assert mgr.num_computed_tokens("s") == 3


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("bad", [[1, 2.5], [1, "x"], [1, 2**63], [1, None]])
def test_token_ids_are_validated_with_or_without_prefix_caching(caching: bool, bad: list) -> None:
    m = kvbm.KVCacheManager(8, 4, enable_prefix_caching=caching)
    before = snapshot(m)
    with pytest.raises(kvbm.TokenIdsError, match="token_ids must be ints in the int64 range"):
        m.allocate("s", 2, token_ids=bad)
    assert snapshot(m) == before and not m.has_sequence("s")
    m.allocate("s", 2, 1, token_ids=[1, 2])
    with pytest.raises(kvbm.TokenIdsError, match="sequence 's': token_ids must be ints"):
        m.commit("s", 2, token_ids=bad)
    m.commit("s", 2, token_ids=[1, 2])
    with pytest.raises(kvbm.TokenIdsError, match="sequence 's': token_ids must be ints"):
        m.allocate("s", 2, token_ids=bad)
    check_invariants(m)


@pytest.mark.parametrize(
    ("call", "op"),
    [
        (lambda m, bad: m.allocate(bad, 1, token_ids=[1]), "allocate"),
        (lambda m, bad: m.commit(bad, 1), "commit"),
        (lambda m, bad: m.free(bad), "free"),
        (lambda m, bad: m.block_table(bad), "block_table"),
        (lambda m, bad: m.num_computed_tokens(bad), "num_computed_tokens"),
        (lambda m, bad: m.has_sequence(bad), "has_sequence"),
        (lambda m, bad: m.fork(bad, "c"), "fork"),
        (lambda m, bad: m.fork("a", bad), "fork"),
        (lambda m, bad: m.pin(bad, [1, 2, 3, 4]), "pin"),
        (lambda m, bad: m.unpin(bad), "unpin"),
    ],
)
def test_unhashable_ids_give_a_kvbm_error(mgr: kvbm.KVCacheManager, call: Callable, op: str) -> None:
    before = snapshot(mgr)
    with pytest.raises(kvbm.InvalidArgumentError, match=rf"{op}: .* must be hashable .*got list \['x'\]"):
        call(mgr, ["x"])
    assert snapshot(mgr) == before
