"""Chained block hashes for prefix caching.

A full block's hash covers ``(parent_hash, extra_keys, token_ids)``: the parent is the hash of the
previous block of the same sequence (none for the first block), so equal hashes mean equal whole
prefixes, not just equal 16-token windows. ``extra_keys`` (adapter id, cache salt, ...) enter every
block, so two sequences with different keys never share a block.

The hash is SHA-256 (a 64-bit hash would make a silent collision, i.e. another prompt's KV, merely
unlikely) over an unambiguous byte string::

    b"\\x00" | b"\\x01" + parent (32 bytes)  +  len(E) (4 bytes, little endian) + E  +  token ids as int64

where ``E`` is the pickle (protocol 5) of ``extra_keys``. Token ids go in as raw native-endian int64
bytes (little-endian on x86 and ARM hosts), sliced from one ``array('q')`` per sequence, so no
per-block pickling. Nothing depends on ``PYTHONHASHSEED``,
so hashes agree across processes and hosts: a router may compare hashes it received as events from
several engines. Only ints, strs, bytes, floats, None and tuples of them are accepted in
``extra_keys`` (checked by :func:`check_extra_keys`), since their pickles are deterministic.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from collections.abc import Sequence

from kvbm.errors import InvalidArgumentError

BlockHash = bytes
# The exact bytes a block's hash is taken over; prefix lookups use it as a dict key directly.
BlockKey = bytes

_ALLOWED_KEY_TYPES = (int, str, bytes, float, type(None))
_sha256 = hashlib.sha256
_ROOT = b"\x00"
_CHILD = b"\x01"


def encode_extra_keys(extra_keys: tuple) -> bytes:
    """The length-prefixed encoding of ``extra_keys`` that enters every block hash."""
    data = pickle.dumps(extra_keys, protocol=5)
    return len(data).to_bytes(4, "little") + data


def block_key(parent: BlockHash | None, encoded_extra: bytes, token_bytes: bytes) -> BlockKey:
    """The unambiguous byte string of one full block (see the module docstring)."""
    return (_CHILD + parent if parent is not None else _ROOT) + encoded_extra + token_bytes


def hash_token_bytes(parent: BlockHash | None, encoded_extra: bytes, token_bytes: bytes) -> BlockHash:
    """Hash of one full block from its parent, encoded extra keys and int64 token bytes."""
    head = _CHILD + parent if parent is not None else _ROOT
    return _sha256(head + encoded_extra + token_bytes).digest()


def hash_key(key: BlockKey) -> BlockHash:
    """SHA-256 of a block key: the block's hash."""
    return _sha256(key).digest()


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as native int64 bytes; raises InvalidArgumentError for non-int64 ids."""
    try:
        return struct.pack(f"{len(token_ids)}q", *token_ids)
    except struct.error as e:
        raise InvalidArgumentError(f"token_ids must be ints in the int64 range: {e}") from None


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> BlockHash:
    """Hash of one full block given its parent's hash (``None`` for a sequence's first block)."""
    return hash_token_bytes(parent, encode_extra_keys(extra_keys), token_bytes(token_ids))


def block_hashes(
    token_ids: Sequence[int], block_size: int, extra_keys: tuple = (), parent: BlockHash | None = None
) -> list[BlockHash]:
    """Chained hashes of every *full* block of ``token_ids`` (a trailing partial block is not hashed)."""
    data = token_bytes(token_ids)
    extra = encode_extra_keys(extra_keys)
    step = 8 * block_size
    out: list[BlockHash] = []
    for start in range(0, (len(token_ids) // block_size) * step, step):
        parent = hash_token_bytes(parent, extra, data[start : start + step])
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
