"""KVCacheManager: per-sequence block tables over a :class:`~kvbm.block_pool.BlockPool`.

Token accounting of one sequence (counts of tokens from position 0)::

    num_computed  <=  num_reserved  <=  num_granted  <=  len(block_table) * block_size

* ``num_computed``: tokens whose KV is valid (committed).
* ``num_reserved``: ``num_computed`` plus the *new* tokens an ``allocate`` asked room for and that
  have not been committed yet (the rest of a prompt being prefilled in chunks). They stay reserved
  across commits until committed.
* ``num_granted``: ``num_reserved`` plus the *lookahead* slots of the last ``allocate`` (room for
  unverified draft tokens).

Lookahead rule (tested in ``tests/kvbm/test_lookahead.py``): ``allocate(seq, n, k)`` grants room for
``num_computed + n + k`` tokens. ``commit(seq, m)`` makes ``m`` more tokens computed, drops what is
left of the lookahead grant (``num_granted = max(num_computed, num_reserved)``) and, before it
returns, hands every block *wholly past* that point back to the pool: the table keeps exactly
``ceil(max(num_computed, num_reserved) / block_size)`` blocks. The block holding the last committed
token stays even if some of its slots held rejected drafts (they are overwritten by the next step).
Released lookahead blocks never carry a hash, so the pool reuses them before any cached block. The
next decode step allocates again; at most one block per ``block_size`` tokens of lookahead is ever
taken and given back per step, and nothing is held between steps for drafts that were rejected.

``KVCacheManager(..., release_lookahead=False)`` instead keeps those blocks in the table until the
sequence is freed (vLLM's behaviour); later allocations of the same sequence reuse them. It exists so
benchmarks can measure what explicit release saves.

Prefix caching: when a committed block becomes full its chained hash (see :mod:`kvbm.hashing`) is
registered, so a later prompt with the same prefix (and the same ``extra_keys``) reuses it. Only
committed tokens are ever hashed, so draft tokens never are.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Callable, Hashable, Sequence

from kvbm.block_pool import BlockPool
from kvbm.errors import (
    CacheBusyError,
    CommitBeyondGrantedError,
    InvalidArgumentError,
    OutOfBlocksError,
    SequenceExistsError,
    TokenIdsError,
    UnknownPinError,
    UnknownSequenceError,
    as_count,
)
from kvbm.events import BlockStored, Callback, EventBus
from kvbm.hashing import (
    BlockHash,
    block_key,
    check_extra_keys,
    encode_extra_keys,
    token_bytes,
)
from kvbm.metrics import Counters, KVCacheMetrics

_pack = struct.pack
_sha256 = hashlib.sha256
_ROOT = b"\x00"  # block_key()'s markers, inlined on the hot paths
_CHILD = b"\x01"


class _Seq:
    """One sequence's state. ``hashes[i]`` is the chained hash of full committed block ``i``.

    ``token_ids`` is an ``array('q')``: appending validates the ids, and block hashes read its bytes.
    """

    __slots__ = (
        "blocks",
        "num_computed",
        "num_reserved",
        "num_granted",
        "token_ids",
        "hashes",
        "extra_keys",
        "extra_enc",
    )

    def __init__(
        self,
        blocks: list[int],
        num_computed: int,
        num_reserved: int,
        num_granted: int,
        token_ids: array,
        hashes: list[BlockHash],
        extra_keys: tuple,
        extra_enc: bytes,
    ) -> None:
        self.blocks = blocks
        self.num_computed = num_computed
        self.num_reserved = num_reserved
        self.num_granted = num_granted
        self.token_ids = token_ids
        self.hashes = hashes
        self.extra_keys = extra_keys
        self.extra_enc = extra_enc


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgumentError(f"KVCacheManager: {name} must be an int > 0, got {value!r}")
    return value


def _unhashable(op: str, seq_id: object, what: str = "sequence id") -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{op}: {what} must be hashable (a str or an int, say), got {type(seq_id).__name__} {seq_id!r}"
    )


class KVCacheManager:
    """Paged KV block manager with lookahead (speculative) slots and prefix caching.

    Pure Python bookkeeping: block ids are ints ``0 .. num_blocks - 1``; the engine owns the KV
    tensors and asks this object where each token lives. Not thread-safe (one scheduler owns it).
    """

    __slots__ = (
        "_num_blocks",
        "_block_size",
        "_caching",
        "_release_lookahead",
        "_events",
        "_counters",
        "_pool",
        "_seqs",
        "_pins",
    )

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        release_lookahead: bool = True,
    ) -> None:
        self._num_blocks = _check_size("num_blocks", num_blocks)
        self._block_size = _check_size("block_size", block_size)
        self._caching = bool(enable_prefix_caching)
        self._release_lookahead = bool(release_lookahead)
        self._events = EventBus()
        self._counters = Counters()
        self._pool = BlockPool(num_blocks, self._events, self._counters)
        self._seqs: dict[Hashable, _Seq] = {}
        self._pins: dict[Hashable, list[int]] = {}

    # ------------------------------------------------------------------ properties
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def enable_prefix_caching(self) -> bool:
        return self._caching

    @property
    def release_lookahead(self) -> bool:
        return self._release_lookahead

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence or pin holds (cached-but-unreferenced blocks count as free)."""
        pool = self._pool
        return len(pool.uncached) + len(pool.cached_free)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by sequences or pins, 0.0 .. 1.0."""
        return 1.0 - self.num_free_blocks / self._num_blocks

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    # ------------------------------------------------------------------ queries
    def has_sequence(self, seq_id: Hashable) -> bool:
        try:
            return seq_id in self._seqs
        except TypeError:
            raise _unhashable("has_sequence", seq_id) from None

    def _get(self, op: str, seq_id: Hashable) -> _Seq:
        try:
            seq = self._seqs.get(seq_id)
        except TypeError:
            raise _unhashable(op, seq_id) from None
        if seq is None:
            raise UnknownSequenceError(op, seq_id)
        return seq

    def num_computed_tokens(self, seq_id: Hashable) -> int:
        """Tokens of the sequence whose KV is valid (prefix-cache hits included)."""
        return self._get("num_computed_tokens", seq_id).num_computed

    def num_granted_tokens(self, seq_id: Hashable) -> int:
        """Tokens the sequence may hold right now (computed + reserved new + lookahead)."""
        return self._get("num_granted_tokens", seq_id).num_granted

    def block_table(self, seq_id: Hashable) -> list[int]:
        """A copy of the sequence's block ids in order; token ``p`` lives in ``table[p // block_size]``."""
        seq = self._get("block_table", seq_id)
        return seq.blocks[:]

    def token_ids(self, seq_id: Hashable) -> list[int]:
        """The token ids the manager knows for the sequence (prompt plus committed tokens)."""
        return self._get("token_ids", seq_id).token_ids.tolist()

    def metrics(self) -> KVCacheMetrics:
        c = self._counters
        return KVCacheMetrics(
            num_blocks=self._num_blocks,
            num_free_blocks=self.num_free_blocks,
            num_sequences=len(self._seqs),
            num_cached_blocks=self._pool.num_cached,
            prefix_queries=c.prefix_queries,
            prefix_hit_queries=c.prefix_hit_queries,
            prefix_query_tokens=c.prefix_query_tokens,
            prefix_hit_tokens=c.prefix_hit_tokens,
            evictions=c.evictions,
            blocks_stored=c.blocks_stored,
            lookahead_blocks_released=c.lookahead_blocks_released,
        )

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Receive BlockStored / BlockRemoved / AllBlocksCleared events; returns the unsubscribe."""
        return self._events.subscribe(callback)

    # ------------------------------------------------------------------ allocate
    def allocate(
        self,
        seq_id: Hashable,
        num_new_tokens: int,
        num_lookahead_tokens: int = 0,
        *,
        token_ids: Sequence[int] | None = None,
        extra_keys: tuple = (),
    ) -> list[int] | None:
        """Grant room for ``num_computed + num_new_tokens + num_lookahead_tokens`` tokens.

        The first call registers ``seq_id``: ``token_ids`` is then its prompt (``len == num_new_tokens``;
        required with prefix caching on) and the longest cached block-aligned prefix is reused, never
        covering the prompt's last token (its logits are needed), so ``num_computed_tokens`` tells
        where the engine starts computing. ``extra_keys`` (adapter id, cache salt, ...) are fixed then.
        On later calls ``token_ids``, if given, are the ids at positions ``num_computed ..``.

        Returns the block ids appended to the table by this call (on the first call including reused
        cached blocks), ``[]`` if the table already had room, or ``None`` when the pool cannot
        satisfy the request; ``None`` leaves the manager exactly as it was. Never shrinks a table.
        """
        try:
            seq = self._seqs.get(seq_id)
        except TypeError:
            raise _unhashable("allocate", seq_id) from None
        if seq is None:
            return self._register(seq_id, num_new_tokens, num_lookahead_tokens, token_ids, extra_keys)
        if type(num_new_tokens) is not int or num_new_tokens < 0:
            num_new_tokens = as_count("allocate", "num_new_tokens", num_new_tokens, seq_id)
        if type(num_lookahead_tokens) is not int or num_lookahead_tokens < 0:
            num_lookahead_tokens = as_count("allocate", "num_lookahead_tokens", num_lookahead_tokens, seq_id)
        if extra_keys and extra_keys != seq.extra_keys:
            raise InvalidArgumentError(
                f"allocate: sequence {seq_id!r} was registered with extra_keys={seq.extra_keys!r}; "
                f"they cannot change to {extra_keys!r}"
            )
        suffix = None
        if token_ids is not None:
            suffix = self._new_ids("allocate", seq_id, seq, seq.num_computed, num_new_tokens, token_ids)
        reserved = seq.num_computed + num_new_tokens
        granted = reserved + num_lookahead_tokens
        blocks = seq.blocks
        need = -(-granted // self._block_size) - len(blocks)
        if need > 0:
            pool = self._pool
            if need > len(pool.uncached) + len(pool.cached_free):
                return None
            new = pool.allocate(need)
            blocks.extend(new)
        else:
            new = []
        if reserved > seq.num_reserved:
            seq.num_reserved = reserved
        if granted > seq.num_granted:
            seq.num_granted = granted
        if suffix:
            seq.token_ids.extend(suffix)  # validated by _new_ids
        return new

    def _register(
        self,
        seq_id: Hashable,
        num_new_tokens: int,
        num_lookahead_tokens: int,
        token_ids: Sequence[int] | None,
        extra_keys: tuple,
    ) -> list[int] | None:
        n = as_count("allocate", "num_new_tokens", num_new_tokens, seq_id)
        k = as_count("allocate", "num_lookahead_tokens", num_lookahead_tokens, seq_id)
        check_extra_keys("allocate", extra_keys)
        if token_ids is None:
            if self._caching:
                raise TokenIdsError(
                    f"allocate: sequence {seq_id!r} is new, so token_ids (its prompt, {n} tokens) are "
                    f"required with prefix caching on"
                )
            ids = array("q")
        else:
            if len(token_ids) != n:
                raise TokenIdsError(
                    f"allocate: sequence {seq_id!r} is new: len(token_ids) must equal num_new_tokens, "
                    f"got {len(token_ids)} ids for num_new_tokens={n}"
                )
            ids = self._as_array("allocate", seq_id, token_ids)  # validated even when not kept
            if not self._caching:
                ids = array("q")
        extra_enc = encode_extra_keys(extra_keys)
        bs = self._block_size
        pool = self._pool
        hit_blocks: list[int] = []
        hit_hashes: list[BlockHash] = []
        if self._caching and n > 0:
            lookup = pool.key_to_block
            block_hash = pool.block_hash
            data = ids.tobytes()
            step = 8 * bs
            parent: BlockHash | None = None
            for start in range(0, ((n - 1) // bs) * step, step):  # never the prompt's last token
                b = lookup.get(
                    (_CHILD + parent if parent else _ROOT) + extra_enc + data[start : start + step]
                )
                if b is None:
                    break
                parent = block_hash[b]
                hit_blocks.append(b)
                hit_hashes.append(parent)  # type: ignore[arg-type]
        ref_count = pool.ref_count
        revived = sum(1 for b in hit_blocks if ref_count[b] == 0)
        need = -(-(n + k) // bs) - len(hit_blocks)
        if need + revived > pool.num_free:
            return None
        pool.touch(hit_blocks)  # before allocate(): a block hit here cannot be evicted by this call
        new = pool.allocate(need) if need > 0 else []
        num_hit = len(hit_blocks) * bs
        self._seqs[seq_id] = _Seq(hit_blocks + new, num_hit, n, n + k, ids, hit_hashes, extra_keys, extra_enc)
        if self._caching:
            c = self._counters
            c.prefix_queries += 1
            c.prefix_query_tokens += n
            if num_hit:
                c.prefix_hit_queries += 1
                c.prefix_hit_tokens += num_hit
        return hit_blocks + new

    @staticmethod
    def _as_array(op: str, seq_id: Hashable, token_ids: Sequence[int]) -> array:
        """Token ids as an ``array('q')`` (struct.pack converts a list ~3x faster than array())."""
        out = array("q")
        try:
            out.frombytes(_pack(f"{len(token_ids)}q", *token_ids))
        except struct.error as e:
            raise TokenIdsError(
                f"{op}: sequence {seq_id!r}: token_ids must be ints in the int64 range ({e})"
            ) from None
        return out

    def _new_ids(
        self, op: str, seq_id: Hashable, seq: _Seq, start: int, count: int, token_ids: Sequence[int]
    ) -> array:
        """Validate ids for positions ``start .. start+count``; return those the manager lacks."""
        if len(token_ids) != count:
            raise TokenIdsError(
                f"{op}: sequence {seq_id!r}: len(token_ids) must equal the token count, "
                f"got {len(token_ids)} ids for {count} tokens"
            )
        if not self._caching:
            self._as_array(op, seq_id, token_ids)  # validate: a bad id is the caller's bug either way
            return array("q")
        known = seq.token_ids
        nk = len(known)
        if start > nk:
            raise TokenIdsError(
                f"{op}: sequence {seq_id!r}: ids are known for positions < {nk} only, so ids starting "
                f"at position {start} leave a gap"
            )
        given = self._as_array(op, seq_id, token_ids)
        overlap = min(count, nk - start)
        if given[:overlap] != known[start : start + overlap]:
            raise TokenIdsError(
                f"{op}: sequence {seq_id!r}: token_ids for positions {start}..{start + overlap - 1} "
                f"differ from the ids the manager already holds"
            )
        return given[overlap:]

    # ------------------------------------------------------------------ commit
    def commit(self, seq_id: Hashable, num_tokens: int, token_ids: Sequence[int] | None = None) -> None:
        """``num_tokens`` more tokens (after ``num_computed``) now hold valid KV.

        E.g. a prefill chunk, or ``1 + accepted`` after a verify step. ``token_ids`` are those tokens'
        ids when the manager does not know them yet (decode tokens); required with prefix caching on
        for positions past the prompt. Newly full blocks are hashed and registered. Then the lookahead
        rule of the module docstring applies: blocks wholly past ``max(num_computed, num_reserved)``
        go back to the pool before this returns (unless ``release_lookahead=False``).
        """
        seq = self._get("commit", seq_id)
        if type(num_tokens) is not int or num_tokens < 0:
            num_tokens = as_count("commit", "num_tokens", num_tokens, seq_id)
        start = seq.num_computed
        computed = start + num_tokens
        if computed > seq.num_granted:
            raise CommitBeyondGrantedError(seq_id, num_tokens, start, seq.num_granted)
        if self._caching:
            self._record_ids(seq_id, seq, num_tokens, token_ids)
            seq.num_computed = computed
            num_full = computed // self._block_size
            if num_full > len(seq.hashes):
                self._cache_full_blocks(seq, num_full)
        else:
            if token_ids is not None:
                self._check_ids_uncached(seq_id, num_tokens, token_ids)
            seq.num_computed = computed
        keep = computed if computed > seq.num_reserved else seq.num_reserved
        seq.num_reserved = keep
        seq.num_granted = keep
        if self._release_lookahead:
            self._release_past(seq, keep)

    def _record_ids(
        self, seq_id: Hashable, seq: _Seq, num_tokens: int, token_ids: Sequence[int] | None
    ) -> None:
        """With prefix caching, every computed token's id must be known (full blocks are hashed from
        them): append the ids of the ``num_tokens`` being committed, or refuse a commit past the known
        ids when none are given. Called before ``num_computed`` moves."""
        known = seq.token_ids
        start = seq.num_computed
        if token_ids is None:
            if start + num_tokens > len(known):
                raise TokenIdsError(
                    f"commit: sequence {seq_id!r}: ids are known for {len(known)} tokens but "
                    f"{start + num_tokens} would be computed; pass token_ids for the {num_tokens} "
                    "committed tokens"
                )
            return
        if start == len(known) and len(token_ids) == num_tokens:  # the decode fast path
            try:
                known.extend(token_ids)
            except (TypeError, OverflowError):
                del known[start:]  # array.extend may have appended a prefix
                self._as_array("commit", seq_id, token_ids)  # raises the clear error
                raise
        else:
            known.extend(self._new_ids("commit", seq_id, seq, start, num_tokens, token_ids))

    def _check_ids_uncached(self, seq_id: Hashable, num_tokens: int, token_ids: Sequence[int]) -> None:
        """Without prefix caching the ids are not kept, but bad ones are still the caller's bug."""
        if len(token_ids) != num_tokens:
            raise TokenIdsError(
                f"commit: sequence {seq_id!r}: len(token_ids) must equal num_tokens, "
                f"got {len(token_ids)} ids for num_tokens={num_tokens}"
            )
        self._as_array("commit", seq_id, token_ids)

    def _release_past(self, seq: _Seq, keep: int) -> None:
        """The lookahead rule: blocks wholly past ``keep`` tokens go back to the pool, tail first (as
        ``free`` releases), so the next step's allocation takes them back in table order."""
        blocks = seq.blocks
        keep_blocks = -(-keep // self._block_size)
        extra = len(blocks) - keep_blocks
        if extra > 0:
            tail = blocks[keep_blocks:]
            del blocks[keep_blocks:]
            tail.reverse()
            self._pool.release(tail)
            self._counters.lookahead_blocks_released += extra

    def _cache_full_blocks(self, seq: _Seq, num_full: int) -> None:
        """Hash and register the sequence's full committed blocks ``len(seq.hashes) .. num_full``."""
        bs = self._block_size
        hashes = seq.hashes
        ids = seq.token_ids
        blocks = seq.blocks
        extra = seq.extra_enc
        pool = self._pool
        hash_to_block = pool.hash_to_block
        block_hash = pool.block_hash
        publish = self._events.subscribers
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_full):
            toks = ids[i * bs : (i + 1) * bs]
            key = (_CHILD + parent if parent else _ROOT) + extra + toks.tobytes()
            h = _sha256(key).digest()
            b = blocks[i]
            # pool.cache() inlined (hot path). A duplicate of a block cached meanwhile by another
            # sequence is not registered: this block stays unhashed and is reused first when freed.
            if h not in hash_to_block and block_hash[b] is None:
                block_hash[b] = h
                hash_to_block[h] = b
                pool.block_key[b] = key
                pool.key_to_block[key] = b
                pool.counters.blocks_stored += 1
                if publish:
                    self._events.emit(BlockStored(h, parent, tuple(toks), b, seq.extra_keys))
            hashes.append(h)
            parent = h

    # ------------------------------------------------------------------ free / fork
    def free(self, seq_id: Hashable) -> None:
        """Release every block of the sequence, tail first (so a chain's root is evicted last)."""
        try:
            seq = self._seqs.pop(seq_id) if seq_id in self._seqs else None
        except TypeError:
            raise _unhashable("free", seq_id) from None
        if seq is None:
            raise UnknownSequenceError("free", seq_id)
        blocks = seq.blocks
        blocks.reverse()
        self._pool.release(blocks)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> list[tuple[int, int]]:
        """Register ``child_id`` sharing the parent's computed KV; returns ``(src, dst)`` block copies.

        Full computed blocks are shared by reference count (never written again). A partial last
        block gets a fresh block for the child; the engine must copy ``src`` into ``dst``. The child
        starts with ``num_computed`` equal to the parent's and no grant beyond it. Raises
        OutOfBlocksError (changing nothing) when that one block cannot be had.
        """
        parent = self._get("fork", parent_id)
        try:
            exists = child_id in self._seqs
        except TypeError:
            raise _unhashable("fork", child_id, "child sequence id") from None
        if exists:
            raise SequenceExistsError(f"fork: child sequence {child_id!r} already exists")
        bs = self._block_size
        computed = parent.num_computed
        full = computed // bs
        partial = computed % bs != 0
        pool = self._pool
        if partial and pool.num_free < 1:
            raise OutOfBlocksError(
                f"fork: copying the partial last block of {parent_id!r} into {child_id!r} needs 1 free "
                f"block, 0 are free"
            )
        blocks = parent.blocks[:full]
        pool.touch(blocks)
        copies: list[tuple[int, int]] = []
        if partial:
            dst = pool.allocate(1)[0]
            copies.append((parent.blocks[full], dst))
            blocks.append(dst)
        self._seqs[child_id] = _Seq(
            blocks,
            computed,
            computed,
            computed,
            parent.token_ids[:],
            parent.hashes[:full],
            parent.extra_keys,
            parent.extra_enc,
        )
        return copies

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, token_ids: Sequence[int], extra_keys: tuple = ()) -> list[int]:
        """Cached blocks holding the longest block-aligned prefix of ``token_ids`` (read-only).

        Stops at the first full block that is not cached; a trailing partial block never matches.
        Unlike ``allocate`` this may cover the last token (it answers "what is cached", e.g. for a
        router); it changes no counter and no LRU order.
        """
        check_extra_keys("match_prefix", extra_keys)
        out: list[int] = []
        if not self._caching:
            return out
        data = token_bytes(token_ids)
        extra = encode_extra_keys(extra_keys)
        step = 8 * self._block_size
        lookup = self._pool.key_to_block
        block_hash = self._pool.block_hash
        parent: BlockHash | None = None
        for start in range(0, len(data) - step + 1, step):
            b = lookup.get(block_key(parent, extra, data[start : start + step]))
            if b is None:
                break
            parent = block_hash[b]
            out.append(b)
        return out

    def pin(self, name: Hashable, token_ids: Sequence[int], extra_keys: tuple = ()) -> list[int]:
        """Hold the cached blocks of ``token_ids``' prefix (e.g. a system prompt) so none is evicted.

        Pins only what is cached now (compute and commit the prefix first); returns those blocks.
        A pin is a holder like a sequence: ``unpin(name)`` releases it.
        """
        try:
            exists = name in self._pins
        except TypeError:
            raise _unhashable("pin", name, "pin name") from None
        if exists:
            raise SequenceExistsError(f"pin: a pin named {name!r} already exists")
        blocks = self.match_prefix(token_ids, extra_keys)
        self._pool.touch(blocks)
        self._pins[name] = blocks
        return blocks[:]

    def unpin(self, name: Hashable) -> None:
        try:
            blocks = self._pins.pop(name) if name in self._pins else None
        except TypeError:
            raise _unhashable("unpin", name, "pin name") from None
        if blocks is None:
            raise UnknownPinError(name)
        blocks.reverse()
        self._pool.release(blocks)

    @property
    def pins(self) -> dict[Hashable, list[int]]:
        """A copy of the pins: name -> pinned block ids."""
        return {name: blocks[:] for name, blocks in self._pins.items()}

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash; returns how many. Refuses while any block is held."""
        held = self._num_blocks - self.num_free_blocks
        if held:
            raise CacheBusyError(
                f"reset_prefix_cache: {held} blocks are held by {len(self._seqs)} sequences and "
                f"{len(self._pins)} pins; free and unpin them first"
            )
        return self._pool.clear_cache()
