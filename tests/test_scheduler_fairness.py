"""Scheduler fairness between client requests (groups) and the per-step budget of prompt-logprob positions.

Exact states: which requests run, which are preempted, and how many tokens each chunk carries.
"""

from fabrik.config import SchedulerConfig
from fabrik.core.block_manager import BlockManager
from fabrik.core.request import Request, RequestStatus, StoppingCriteria
from fabrik.core.scheduler import Scheduler


def make(num_blocks=32, block_size=4, budget=64, max_seqs=8, plp_budget=256):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    cfg = SchedulerConfig(max_model_len=1000, max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                          max_prompt_logprob_tokens=plp_budget)
    return Scheduler(cfg, bm)


def req(rid, n, group="", start=0, **kw):
    return Request(rid, list(range(start, start + n)), StoppingCriteria(max_tokens=100), group=group, **kw)


def step(s: Scheduler):
    out = s.schedule()
    s.update(out, {c.request_id: 7 for c in out.chunks if c.sample})
    return out


def running(s: Scheduler) -> list[str]:
    return [r.request_id for r in s.running]


def test_group_defaults_to_the_request_itself():
    assert req("a", 1).group == "a" and req("a", 1, group="g").group == "g"


def test_admission_takes_the_group_with_fewest_running_first():
    s = make(max_seqs=3)
    for i in range(4):
        s.add_request(req(f"g{i}", 2, group="g", start=10 * i))
    s.add_request(req("s0", 2, group="s", start=90))
    step(s)
    # g0 first (oldest); then s has none running and g has one: s0 before g1; then g1.
    assert running(s) == ["g0", "s0", "g1"]
    assert [r.request_id for r in s.waiting] == ["g2", "g3"]


def test_a_starved_group_preempts_the_newest_sequence_of_the_biggest_group():
    s = make(max_seqs=2)
    s.add_request(req("g0", 2, group="g"))
    s.add_request(req("g1", 2, group="g", start=10))
    step(s)
    assert running(s) == ["g0", "g1"]
    s.add_request(req("s0", 3, group="s", start=50))
    out = step(s)
    assert out.preempted_ids == ("g1",)
    assert [(c.request_id, len(c.token_ids)) for c in out.chunks] == [("g0", 1), ("s0", 3)]
    g1 = s.requests["g1"]
    assert g1.status == RequestStatus.WAITING and g1.num_computed_tokens == 0 and g1.num_preemptions == 1
    assert s.block_manager.block_ids("g1") == []
    # g1 runs again as soon as a slot frees; nobody else is preempted meanwhile.
    out = step(s)
    assert out.preempted_ids == () and running(s) == ["g0", "s0"]
    s.abort("g0")
    step(s)
    assert running(s) == ["s0", "g1"]


def test_no_preemption_when_every_group_runs_one_sequence():
    s = make(max_seqs=2)
    s.add_request(req("a", 2))
    s.add_request(req("b", 2, start=10))
    step(s)
    s.add_request(req("c", 2, start=20))
    out = step(s)
    assert out.preempted_ids == () and running(s) == ["a", "b"]


def test_a_group_with_something_running_does_not_preempt():
    s = make(max_seqs=3)
    for i in range(2):
        s.add_request(req(f"g{i}", 2, group="g", start=10 * i))
    s.add_request(req("s0", 2, group="s", start=50))
    step(s)
    assert running(s) == ["g0", "s0", "g1"]
    s.add_request(req("s1", 2, group="s", start=60))
    out = step(s)
    assert out.preempted_ids == () and [r.request_id for r in s.waiting] == ["s1"]


def test_a_starved_group_preempts_for_kv_blocks_too():
    # 6 blocks of 4 tokens: g0 and g1 take 3 each (12-token prompts); s0 has slots but no blocks.
    s = make(num_blocks=6, max_seqs=8)
    s.add_request(req("g0", 12, group="g"))
    s.add_request(req("g1", 12, group="g", start=100))
    step(s)
    s.add_request(req("s0", 4, group="s", start=200))
    out = step(s)
    assert out.preempted_ids[0] == "g1"
    assert "s0" in running(s) and "g0" in running(s)


def test_prompt_logprob_positions_have_their_own_step_budget():
    s = make(budget=64, plp_budget=8)
    s.add_request(req("p", 20, computes_prompt_logprobs=True))
    s.add_request(req("d", 3, start=100))
    chunks = []
    for _ in range(4):
        out = step(s)
        chunks.append([(c.request_id, len(c.token_ids)) for c in out.chunks])
    # 19 positions predict a prompt token: 8 + 8 + 3 of them, then the last prompt token samples; d goes on meanwhile.
    assert chunks == [[("p", 8), ("d", 3)], [("p", 8), ("d", 1)], [("p", 4), ("d", 1)], [("p", 1), ("d", 1)]]
    assert s.requests["p"].num_output_tokens == 2


def test_prompt_logprob_budget_is_shared_across_requests():
    s = make(budget=64, plp_budget=10)
    s.add_request(req("p", 8, computes_prompt_logprobs=True))
    s.add_request(req("q", 8, start=100, computes_prompt_logprobs=True))
    out = step(s)
    # p's 7 positions and its last token fit; q gets the 3 positions left.
    assert [(c.request_id, len(c.token_ids)) for c in out.chunks] == [("p", 8), ("q", 3)]
