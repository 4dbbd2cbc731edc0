"""Exceptions raised by kvbm.

Every error names the sequence and the numbers involved, and is raised before any state changes:
a call that raises leaves the manager exactly as it was. Each class also derives from the builtin
exception a caller would naturally catch (``KeyError`` for an unknown sequence, ``ValueError`` for bad
arguments), so code that does not know kvbm still handles them sensibly.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable


class KVBMError(Exception):
    """Base class of every kvbm error."""


class InvalidArgumentError(KVBMError, ValueError):
    """A count, size or id list that can never be valid (negative count, block_size 0, ...)."""


class UnknownSequenceError(KVBMError, KeyError):
    """The sequence id was never allocated, or was already freed."""

    def __init__(self, op: str, seq_id: Hashable) -> None:
        super().__init__(f"{op}: unknown sequence {seq_id!r} (never allocated or already freed)")
        self.seq_id = seq_id

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0])


class SequenceExistsError(KVBMError, ValueError):
    """A fork target (or pin name) that is already in use."""


class UnknownPinError(KVBMError, KeyError):
    """unpin() of a name that holds no pin."""

    def __init__(self, name: Hashable) -> None:
        super().__init__(f"unpin: no pin named {name!r}")
        self.name = name

    def __str__(self) -> str:
        return str(self.args[0])


class TokenIdsError(InvalidArgumentError):
    """token_ids missing, of the wrong length, or contradicting ids the manager already knows."""


class CommitBeyondGrantedError(KVBMError, ValueError):
    """commit() of more tokens than the last allocate() granted room for."""

    def __init__(self, seq_id: Hashable, num_tokens: int, num_computed: int, num_granted: int) -> None:
        super().__init__(
            f"commit: sequence {seq_id!r} cannot commit {num_tokens} tokens: {num_computed} are computed "
            f"and room was granted for {num_granted} (at most {num_granted - num_computed} more); "
            f"call allocate() first"
        )
        self.seq_id = seq_id
        self.num_tokens = num_tokens
        self.num_computed = num_computed
        self.num_granted = num_granted


class OutOfBlocksError(KVBMError, RuntimeError):
    """An operation that cannot return None (fork) found too few free blocks."""


class CacheBusyError(KVBMError, RuntimeError):
    """reset_prefix_cache() while sequences or pins still hold blocks."""


def as_count(op: str, name: str, value: object, seq_id: Hashable | None = None) -> int:
    """Return ``value`` as a non-negative int (numpy ints accepted) or raise InvalidArgumentError.

    Callers on the hot path test ``type(v) is int and v >= 0`` first and only call this otherwise.
    """
    who = f" for sequence {seq_id!r}" if seq_id is not None else ""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{op}: {name} must be a non-negative int{who}, got {value!r}")
    try:
        count = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(f"{op}: {name} must be a non-negative int{who}, got {value!r}") from None
    if count < 0:
        raise InvalidArgumentError(f"{op}: {name} must be >= 0{who}, got {count}")
    return count
