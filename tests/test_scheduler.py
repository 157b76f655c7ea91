"""Scheduler: token budget, chunked prefill, admission order, preemption, abort."""

import pytest

from fabrik.config import SchedulerConfig
from fabrik.core.block_manager import BlockManager
from fabrik.core.request import Request, RequestStatus, StoppingCriteria
from fabrik.core.scheduler import Scheduler


def make(num_blocks=16, block_size=4, budget=64, max_seqs=8, max_len=1000, caching=True):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    cfg = SchedulerConfig(max_model_len=max_len, max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return Scheduler(cfg, bm)


def req(rid, n, max_tokens=100, start=0, **kw):
    return Request(rid, list(range(start, start + n)), StoppingCriteria(max_tokens=max_tokens, **kw))


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    done = s.update(out, {c.request_id: token for c in out.chunks if c.sample})
    return out, done


def test_prefill_then_decode():
    s = make()
    s.add_request(req("a", 6))
    out, done = step(s, token=99)
    (c,) = out.chunks
    assert (c.request_id, c.token_ids, c.start_position, c.block_ids, c.sample) == ("a", tuple(range(6)), 0, (0, 1), True)
    assert [r.request_id for r in done] == ["a"]
    out, _ = step(s)
    (c,) = out.chunks
    assert (c.token_ids, c.start_position, c.block_ids) == ((99,), 6, (0, 1))


def test_chunked_prefill_under_budget_mixed_with_decode():
    s = make(budget=8)
    s.add_request(req("a", 3))
    s.add_request(req("b", 20, start=100))
    out, _ = step(s)
    assert [(c.request_id, len(c.token_ids), c.sample) for c in out.chunks] == [("a", 3, True), ("b", 5, False)]
    out, _ = step(s)
    # Running first: a decodes (1 token), b continues its prefill with the rest of the budget.
    assert [(c.request_id, len(c.token_ids), c.start_position) for c in out.chunks] == [("a", 1, 3), ("b", 7, 5)]
    out, _ = step(s)
    assert [(c.request_id, len(c.token_ids), c.sample) for c in out.chunks] == [("a", 1, True), ("b", 7, False)]
    out, _ = step(s)
    assert [(c.request_id, len(c.token_ids), c.sample) for c in out.chunks] == [("a", 1, True), ("b", 1, True)]
    assert s.requests["b"].output_token_ids == [7]


def test_max_num_seqs_caps_running():
    s = make(max_seqs=2)
    for rid in "abc":
        s.add_request(req(rid, 2, start=ord(rid) * 10))
    out, _ = step(s)
    assert [c.request_id for c in out.chunks] == ["a", "b"]
    assert s.num_waiting == 1


def test_finish_by_length_and_eos_frees_blocks():
    s = make()
    s.add_request(req("a", 4, max_tokens=2))
    s.add_request(req("b", 4, start=50, eos_token_ids=frozenset({5})))
    out = s.schedule()
    s.update(out, {"a": 1, "b": 5})
    assert s.requests.keys() == {"a"}
    out = s.schedule()
    (done,) = s.update(out, {"a": 1})
    assert done.status == RequestStatus.FINISHED_LENGTH and done.output_token_ids == [1, 1]
    assert not s.has_unfinished()
    assert s.block_manager.num_free_blocks == 16


def test_min_tokens_and_ignore_eos():
    s = make()
    s.add_request(req("a", 2, min_tokens=2, eos_token_ids=frozenset({5})))
    s.add_request(req("b", 2, start=10, ignore_eos=True, max_tokens=3, eos_token_ids=frozenset({5})))
    for expected in ({"a", "b"}, {"b"}, set()):
        out = s.schedule()
        s.update(out, {c.request_id: 5 for c in out.chunks})
        assert set(s.requests) == expected


def test_prefix_cache_hit_skips_computed_tokens():
    s = make()
    s.add_request(req("a", 9))
    step(s)
    s.add_request(req("b", 10))  # shares a's first two full blocks (8 tokens)
    out, _ = step(s)
    c = out.chunks[-1]
    assert (c.request_id, c.start_position, c.token_ids, c.block_ids[:2]) == ("b", 8, (8, 9), (0, 1))
    assert s.requests["b"].num_cached_tokens == 8
    st = s.block_manager.stats
    assert (st.queried_tokens, st.hit_tokens) == (19, 8)


def test_preempt_newest_and_recompute():
    # 4 blocks of 2 tokens: a and b each take 2 blocks, then neither can grow.
    s = make(num_blocks=4, block_size=2, caching=False)
    s.add_request(req("a", 3))
    s.add_request(req("b", 3, start=10))
    step(s)
    step(s)  # both now hold 4 computed tokens in 2 full blocks
    out, _ = step(s)  # a needs a 3rd block: b (newest) is preempted
    assert out.preempted_ids == ("b",)
    assert [c.request_id for c in out.chunks] == ["a"]
    b = s.requests["b"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert list(s.waiting) == [b]
    assert s.block_manager.block_ids("b") == []
    # When a finishes, b is recomputed from all its tokens (prompt + the one it generated).
    s.abort("a")
    out, _ = step(s)
    (c,) = out.chunks
    assert (c.request_id, c.token_ids, c.start_position) == ("b", (10, 11, 12, 7, 7), 0)


def test_request_preempts_itself_when_alone_in_running_order():
    s = make(num_blocks=3, block_size=2, caching=False)
    s.add_request(req("a", 2))
    s.add_request(req("b", 2, start=10))
    step(s)  # a: block 0, b: block 1
    step(s)  # a grows to block 2; b needs a block: b is the newest and preempts itself
    assert s.num_preemptions == 1 and [r.request_id for r in s.running] == ["a"]


def test_abort_frees_everything_at_once():
    s = make()
    s.add_request(req("a", 10))
    s.add_request(req("b", 3, start=40))
    step(s)
    s.add_request(req("c", 3, start=80))
    assert s.abort("a").status == RequestStatus.FINISHED_ABORTED
    assert s.abort("c").status == RequestStatus.FINISHED_ABORTED  # still waiting
    assert s.abort("zzz") is None
    assert s.block_manager.block_ids("a") == []
    assert [r.request_id for r in s.running] == ["b"]
    assert not s.waiting


def test_abort_during_step_is_ignored_by_update():
    s = make()
    s.add_request(req("a", 3))
    out = s.schedule()
    s.abort("a")
    assert s.update(out, {"a": 1}) == []


def test_duplicate_id_and_bad_config():
    s = make()
    s.add_request(req("a", 1))
    with pytest.raises(ValueError, match="'a'"):
        s.add_request(req("a", 1))
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_model_len=10, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_tokens"):
        StoppingCriteria(max_tokens=0)
