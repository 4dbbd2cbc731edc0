"""Chained block hashes for prefix caching.

A full block's hash covers ``(parent_hash, token_ids, extra_keys)``: the parent is the hash of the
previous block of the same sequence (``None`` for the first block), so equal hashes mean equal whole
prefixes, not just equal 16-token windows. ``extra_keys`` (adapter id, cache salt, ...) enter every
block, so two sequences with different keys never share a block.

The hash is SHA-256 over a pickle (protocol 5) of that tuple. Pickling ints, strs, bytes, None and
tuples of them is deterministic and does not depend on ``PYTHONHASHSEED``, so hashes agree across
processes and hosts: a router may compare hashes it received as events from several engines.
Only those value types are accepted in ``extra_keys`` (checked by :func:`check_extra_keys`).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence

from kvbm.errors import InvalidArgumentError

BlockHash = bytes

_ALLOWED_KEY_TYPES = (int, str, bytes, float, type(None))
_dumps = pickle.dumps
_sha256 = hashlib.sha256


def hash_block(parent: BlockHash | None, token_ids: tuple[int, ...], extra_keys: tuple = ()) -> BlockHash:
    """Hash of one full block given its parent's hash (``None`` for a sequence's first block)."""
    return _sha256(_dumps((parent, token_ids, extra_keys), protocol=5)).digest()


def block_hashes(
    token_ids: Sequence[int], block_size: int, extra_keys: tuple = (), parent: BlockHash | None = None
) -> list[BlockHash]:
    """Chained hashes of every *full* block of ``token_ids`` (a trailing partial block is not hashed)."""
    out: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, tuple(token_ids[start : start + block_size]), extra_keys)
        out.append(parent)
    return out


def check_extra_keys(op: str, extra_keys: object) -> tuple:
    """Validate that ``extra_keys`` is a tuple of stably-picklable values (recursively)."""
    if not isinstance(extra_keys, tuple):
        raise InvalidArgumentError(f"{op}: extra_keys must be a tuple, got {type(extra_keys).__name__}")
    for key in extra_keys:
        if isinstance(key, tuple):
            check_extra_keys(op, key)
        elif not isinstance(key, _ALLOWED_KEY_TYPES):
            raise InvalidArgumentError(
                f"{op}: extra_keys may hold int, str, bytes, float, None or tuples of them; "
                f"got {key!r} of type {type(key).__name__}"
            )
    return extra_keys
