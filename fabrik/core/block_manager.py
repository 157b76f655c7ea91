"""Paged KV-cache bookkeeping: which blocks each request holds, and the prefix cache.

Pure Python (no torch). The model runner owns the tensors; this module only hands out
block ids. A request's K/V for token ``t`` lives in block ``block_ids[t // block_size]``
at offset ``t % block_size``::

    request tokens:  [ t0 .. t15 | t16 .. t31 | t32 .. t37 _ _ _ ]
    block table:     [    7      |     2      |      9           ]
                       full,       full,        partial: not hashed
                       hashed      hashed

Prefix caching: once a block is full of computed tokens it gets a hash chained from the
previous block's hash, ``h_i = sha256(h_{i-1} || tokens of block i)``, so equal hashes mean
equal whole prefixes. A new request reuses the longest run of cached blocks that
starts its prompt.

Invariants:
- ``ref_count`` of a block = number of requests holding it.
- A block is in the free queue iff its ``ref_count`` is 0. Free blocks keep their hash
  (and stay findable in the cache) until they are handed out again: that is eviction.
- The free queue is least-recently-freed first. A request's blocks are freed tail first,
  so a sequence's last blocks (least likely to be shared) are evicted before its prefix.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from fabrik.core.request import Request

_ROOT_HASH = b"\x00" * 32


def hash_block(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """Chained hash of one full block: equal hashes mean equal whole prefixes."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


@dataclass(eq=False)
class KVBlock:
    """One block of the paged cache."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


@dataclass(frozen=True)
class PrefixCacheStats:
    """Prefix-cache counters since start, in tokens."""

    queried_tokens: int
    hit_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    """Hands out KV-cache blocks to requests, with reference counts and prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks ({num_blocks}) must be >= 1")
        if block_size < 1:
            raise ValueError(f"block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Ordered least-recently-freed first; values unused (an ordered set with O(1) removal).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self._req_blocks: dict[str, list[int]] = {}
        self._queried_tokens = 0
        self._hit_tokens = 0

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (some may still serve as prefix cache until reused)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._queried_tokens, self._hit_tokens)

    def block_ids(self, request_id: str) -> list[int]:
        return list(self._req_blocks.get(request_id, ()))

    def free_queue(self) -> list[int]:
        """Free block ids, next to be reused first (for tests and metrics)."""
        return list(self._free)

    def cached_block(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache --------------------------------------------------------------------
    def _update_block_hashes(self, request: Request, num_full_blocks: int) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[i - 1] if i else _ROOT_HASH
            hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs]))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of cached blocks that starts this request, and its token count.

        At least one token is always left to compute (its logits are needed to sample),
        so a fully cached prompt reuses all blocks but the last one. Changes no state.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._update_block_hashes(request, max_blocks)
        hits: list[int] = []
        for h in request.block_hashes[:max_blocks]:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    def record_prefix_query(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self._queried_tokens += num_queried_tokens
        self._hit_tokens += num_hit_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        self._update_block_hashes(request, num_full)
        for block_id, h in zip(self._req_blocks.get(request.request_id, ())[:num_full],
                               request.block_hashes[:num_full]):
            block = self.blocks[block_id]
            # A block whose content another block already caches stays unregistered.
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                self._cached[h] = block_id

    # -- allocation ----------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] = ()) -> bool:
        """Make the request hold enough blocks for its computed tokens, the cache hits
        ``computed_blocks`` and ``num_new_tokens`` more. False (and no change) if the
        free blocks do not suffice."""
        held = self._req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        need = self.blocks_needed(num_computed + num_new_tokens) - len(held) - len(computed_blocks)
        # Reviving a free cached block takes it out of the free queue too.
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if need > len(self._free) - revived:
            if not held:
                del self._req_blocks[request.request_id]
            return False
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            held.append(block_id)
        for _ in range(max(need, 0)):
            block_id, _unused = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                # Evict: the block's old content is overwritten from now on.
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            held.append(block_id)
        return True

    def free(self, request: Request) -> None:
        """Release every block the request holds, last block first."""
        for block_id in reversed(self._req_blocks.pop(request.request_id, [])):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks held by requests are unaffected)."""
        for block_id in self._cached.values():
            self.blocks[block_id].block_hash = None
        self._cached.clear()
