"""Block manager: exact block ids, reference counts, hashes and eviction order."""

import subprocess
import sys

import pytest

from fabrik.core.block_manager import BlockManager, hash_block
from fabrik.core.request import Request, StoppingCriteria

ROOT = b"\x00" * 32


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, StoppingCriteria(max_tokens=100))


def admit(bm: BlockManager, r: Request) -> int:
    """Admit like the scheduler: reuse cache hits, allocate the rest, compute it all."""
    hits, num_cached = bm.get_computed_blocks(r)
    assert bm.allocate_slots(r, r.num_tokens - num_cached, hits)
    r.num_computed_tokens = r.num_tokens
    bm.cache_full_blocks(r)
    return num_cached


def test_core_does_not_import_torch():
    # Other tests import torch in this process: check in a fresh interpreter.
    code = ("import sys, fabrik.core.scheduler, fabrik.core.block_manager, fabrik.config;"
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_allocation_order_and_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req("a", list(range(10)))  # 3 blocks
    assert bm.allocate_slots(a, 10)
    assert bm.block_ids("a") == [0, 1, 2]
    assert [bm.blocks[i].ref_count for i in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert bm.free_queue() == [3, 4, 5, 6, 7]
    # Growing within the last block needs nothing; crossing a boundary takes the next free one.
    a.num_computed_tokens = 10
    assert bm.allocate_slots(a, 2)
    assert bm.block_ids("a") == [0, 1, 2]
    assert bm.allocate_slots(a, 3)
    assert bm.block_ids("a") == [0, 1, 2, 3]
    assert bm.usage == pytest.approx(4 / 8)


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = req("a", list(range(12)))
    assert bm.allocate_slots(a, 12)
    b = req("b", list(range(100, 108)))
    assert not bm.allocate_slots(b, 8)
    assert bm.block_ids("b") == []
    assert bm.free_queue() == [3]
    assert bm.allocate_slots(b, 4)
    assert bm.block_ids("b") == [3]


def test_full_blocks_get_chained_hashes():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req("a", list(range(10)))
    admit(bm, a)
    h0 = hash_block(ROOT, [0, 1, 2, 3])
    h1 = hash_block(h0, [4, 5, 6, 7])
    assert a.block_hashes == [h0, h1]
    assert bm.blocks[0].block_hash == h0 and bm.blocks[1].block_hash == h1
    assert bm.blocks[2].block_hash is None  # partial block: not cached
    assert bm.cached_block(h0) == 0 and bm.cached_block(h1) == 1
    # The same tokens after a different prefix hash differently.
    assert hash_block(ROOT, [4, 5, 6, 7]) != h1


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req("a", list(range(10)))
    admit(bm, a)
    b = req("b", list(range(8)) + [50, 51, 52])
    assert admit(bm, b) == 8
    assert bm.block_ids("b") == [0, 1, 3]
    assert [bm.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    assert bm.stats.queried_tokens == 0  # the scheduler records queries, not the block manager
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in range(4)] == [1, 1, 0, 1]
    assert bm.free_queue() == [4, 5, 6, 7, 2]


def test_fully_cached_prompt_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req("a", list(range(8)))
    admit(bm, a)
    b = req("b", list(range(8)))
    hits, n = bm.get_computed_blocks(b)
    assert hits == [0] and n == 4  # block 1 must be recomputed: the last token's logits are needed


def test_free_tail_first_and_lru_eviction_order():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = req("a", [1, 2, 3, 4, 5, 6])  # blocks 0,1,2 all full
    admit(bm, a)
    b = req("b", [7, 8, 9, 10])  # blocks 3,4
    admit(bm, b)
    assert bm.free_queue() == [5]
    bm.free(a)
    assert bm.free_queue() == [5, 2, 1, 0]  # tail first
    bm.free(b)
    assert bm.free_queue() == [5, 2, 1, 0, 4, 3]
    # Freed blocks keep their hashes: a's prefix is still found.
    c = req("c", [1, 2, 3, 4, 99])
    assert admit(bm, c) == 4
    assert bm.block_ids("c") == [0, 1, 5]  # hits revive 0 and 1; the new block is the LRU one (5)
    assert bm.free_queue() == [2, 4, 3]
    # Next allocation evicts block 2 (a's third block): its hash disappears.
    h2 = a.block_hashes[2]
    assert bm.cached_block(h2) == 2
    d = req("d", [42])
    admit(bm, d)
    assert bm.block_ids("d") == [2]
    assert bm.cached_block(h2) is None and bm.blocks[2].block_hash is None
    assert bm.free_queue() == [4, 3]


def test_hit_on_free_block_counts_against_capacity():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = req("a", [1, 2, 3, 4])
    admit(bm, a)
    bm.free(a)
    assert bm.free_queue() == [2, 1, 0]
    # b hits blocks 0 and 1 (both free) and needs one more: all three free blocks are used.
    b = req("b", [1, 2, 3, 4, 5])
    hits, n = bm.get_computed_blocks(b)
    assert hits == [0, 1] and n == 4
    assert bm.allocate_slots(b, 1, hits)
    assert bm.block_ids("b") == [0, 1, 2]
    assert bm.free_queue() == []
    # c would need its hits revived plus a new block: refused without side effects.
    bm.free(b)
    c = req("c", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    hits, n = bm.get_computed_blocks(c)
    assert hits == [0, 1]
    assert not bm.allocate_slots(c, 5, hits)
    assert [blk.ref_count for blk in bm.blocks] == [0, 0, 0]


def test_duplicate_content_is_not_registered_twice():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = req("a", [1, 2, 3])
    b = req("b", [1, 2, 3])
    # Both allocated before either is computed: no hit for b, two blocks hold [1, 2].
    assert bm.allocate_slots(a, 3) and bm.allocate_slots(b, 3)
    for r in (a, b):
        r.num_computed_tokens = 3
        bm.cache_full_blocks(r)
    assert bm.cached_block(a.block_hashes[0]) == 0
    assert bm.blocks[2].block_hash is None


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = req("a", [1, 2, 3])
    admit(bm, a)
    assert bm.blocks[0].block_hash is None
    b = req("b", [1, 2, 3])
    assert bm.get_computed_blocks(b) == ([], 0)


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
