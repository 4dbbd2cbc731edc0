"""kvbm: a pure-Python KV block manager for paged attention with speculative lookahead slots.

``import kvbm`` never imports torch; :mod:`kvbm.torch_utils` (optional) turns block tables into
tensors. See :class:`kvbm.KVCacheManager` for the token accounting and the lookahead rule.
"""

from kvbm import capacity
from kvbm.errors import (
    CacheBusyError,
    CommitBeyondGrantedError,
    InvalidArgumentError,
    KVBMError,
    OutOfBlocksError,
    SequenceExistsError,
    TokenIdsError,
    UnknownPinError,
    UnknownSequenceError,
)
from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvbm.hashing import block_hashes, hash_block
from kvbm.manager import KVCacheManager
from kvbm.metrics import KVCacheMetrics
from kvbm.slots import slot_ids

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "CacheBusyError",
    "CommitBeyondGrantedError",
    "InvalidArgumentError",
    "KVBMError",
    "KVCacheManager",
    "KVCacheMetrics",
    "KVEvent",
    "OutOfBlocksError",
    "SequenceExistsError",
    "TokenIdsError",
    "UnknownPinError",
    "UnknownSequenceError",
    "block_hashes",
    "capacity",
    "hash_block",
    "slot_ids",
]
