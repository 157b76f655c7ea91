"""Engine properties: equals transformers; batch equals single; prefix cache, chunking and
preemption change nothing; seeds are batch-independent."""

from __future__ import annotations

import random

import pytest
import torch

from fabrik import LLM, SamplingParams

KIND_FIXTURES = ["qwen3_ckpt", "qwen3_untied_ckpt", "qwen2_ckpt", "llama_ckpt"]
PROMPT_LENGTHS = [1, 7, 33, 300]


def random_prompts(lengths, vocab=500, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def hf_greedy(path, prompts, max_new_tokens, dtype=torch.float32):
    """transformers' own greedy generate, one prompt at a time, eos ignored."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.generation_config.eos_token_id = None
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("fixture", KIND_FIXTURES)
def test_greedy_equals_transformers_float32(fixture, request):
    path = request.getfixturevalue(fixture)
    prompts = random_prompts(PROMPT_LENGTHS)
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    ours = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(64)))
    ref = hf_greedy(path, prompts, 64)
    for n, a, b in zip(PROMPT_LENGTHS, ours, ref):
        assert a == b, f"prompt length {n}: first difference at token {next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)}"


def hf_greedy_with_scores(path, ids, max_new_tokens, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [s[0].float() for s in out.scores]


# bf16 logits carry ~0.1-0.4 of rounding noise: where transformers' own top two logits are closer than this,
# greedy's choice is a coin toss between two equally good tokens, not a bug.
BF16_TIE = 0.25


def test_bfloat16_agrees_with_transformers_bfloat16(qwen3_ckpt, llama_ckpt, capsys):
    report = []
    for path in (qwen3_ckpt, llama_ckpt):
        prompts = random_prompts(PROMPT_LENGTHS, seed=1)
        # The torch reference kernels: the native ones are compared with these in test_kernels.py.
        llm = LLM(str(path), dtype="bfloat16", kv_cache_memory_bytes=8 * 2**20, kernels="torch")
        ours = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(32)))
        for n, ids, a in zip(PROMPT_LENGTHS, prompts, ours):
            ref, scores = hf_greedy_with_scores(path, ids, 32, torch.bfloat16)
            agree = next((i for i, (x, y) in enumerate(zip(a, ref)) if x != y), len(a))
            report.append((path.name, n, agree))
            if agree < 16:
                # An early divergence is only acceptable at a tie within bf16 noise in transformers' own logits.
                gap = (scores[agree].max() - scores[agree][a[agree]]).item()
                assert gap < BF16_TIE, (f"{path.name} prompt length {n}: bf16 diverges at token {agree} where "
                                        f"transformers prefers its token by {gap:.3f}")
    with capsys.disabled():
        print("\nbf16 greedy agreement with transformers bf16 (checkpoint, prompt length, equal tokens of 32):",
              report)
    assert sum(a >= 16 for *_, a in report) >= len(report) - 2


def test_batch_equals_single(qwen3_ckpt):
    prompts = random_prompts([3, 17, 1, 40, 9, 64, 2, 25], seed=2)
    llm = LLM(str(qwen3_ckpt), dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    params = [greedy(20 + 3 * i) for i in range(len(prompts))]
    together = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], params))
    alone = [token_ids(llm.generate([{"prompt_token_ids": p}], q))[0] for p, q in zip(prompts, params)]
    assert together == alone
    assert [len(t) for t in together] == [20 + 3 * i for i in range(len(prompts))]


def test_prefix_cache_on_equals_off_and_counts_hits(qwen3_ckpt):
    shared = random_prompts([70], seed=3)[0]
    tails = random_prompts([5, 9, 1], seed=4)
    prompts = [{"prompt_token_ids": shared + t} for t in tails]
    on = LLM(str(qwen3_ckpt), dtype="float32", block_size=16, kv_cache_memory_bytes=8 * 2**20)
    off = LLM(str(qwen3_ckpt), dtype="float32", block_size=16, kv_cache_memory_bytes=8 * 2**20,
              enable_prefix_caching=False)
    first = on.generate(prompts[:1], greedy(8))  # fills the cache with the shared prefix
    rest = on.generate(prompts[1:], greedy(8))
    assert token_ids(first + rest) == token_ids(off.generate(prompts, greedy(8)))
    # 70 shared tokens = 4 full blocks of 16 (64 tokens) reused by each later prompt.
    assert [o.num_cached_tokens for o in rest] == [64, 64]
    stats = on.engine.block_manager.stats
    assert stats.hit_tokens == 128 and stats.queried_tokens == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert off.engine.block_manager.stats.hit_tokens == 0


def test_preempted_and_recomputed_equals_uninterrupted(qwen3_ckpt):
    prompts = [{"prompt_token_ids": p} for p in random_prompts([30, 12, 45, 7, 20, 33], seed=5)]
    ample = LLM(str(qwen3_ckpt), dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    expected = token_ids(ample.generate(prompts, greedy(40)))
    per_block = 16 * 2 * 2 * 2 * 16 * 4  # tokens * K,V * layers * kv heads * dim * fp32, blocks of 16
    tight = LLM(str(qwen3_ckpt), dtype="float32", kv_cache_memory_bytes=8 * per_block, block_size=16)
    assert tight.engine.num_blocks == 8
    assert token_ids(tight.generate(prompts, greedy(40))) == expected
    assert tight.engine.scheduler.num_preemptions > 0


def test_chunked_prefill_equals_one_shot(qwen3_ckpt):
    prompts = [{"prompt_token_ids": p} for p in random_prompts([100, 37, 5], seed=6)]
    one_shot = LLM(str(qwen3_ckpt), dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    chunked = LLM(str(qwen3_ckpt), dtype="float32", kv_cache_memory_bytes=8 * 2**20, max_num_batched_tokens=16)
    assert token_ids(chunked.generate(prompts, greedy(12))) == token_ids(one_shot.generate(prompts, greedy(12)))


def test_seeded_sampling_is_independent_of_the_batch(qwen3_ckpt):
    llm = LLM(str(qwen3_ckpt), dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    target = {"prompt_token_ids": random_prompts([11], seed=7)[0]}
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = token_ids(llm.generate([target], params))[0]
    others = [{"prompt_token_ids": p} for p in random_prompts([5, 50, 2], seed=8)]
    noisy = SamplingParams(temperature=1.5, max_tokens=30, ignore_eos=True)
    mixed = llm.generate(others[:2] + [target] + others[2:], [noisy, noisy, params, noisy])
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = token_ids(llm.generate([target], SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99,
                                                                 max_tokens=24, ignore_eos=True)))[0]
    assert other_seed != alone


def test_n_sequences_and_finish_reasons(qwen3_ckpt):
    llm = LLM(str(qwen3_ckpt), dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    (out,) = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                          SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True))
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 10 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_eos_and_stop_token_ids_finish_with_stop(qwen3_ckpt):
    llm = LLM(str(qwen3_ckpt), dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    prompt = {"prompt_token_ids": [4, 5, 6]}
    free_run = token_ids(llm.generate([prompt], greedy(10)))[0]
    stop_at = free_run[4]
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]))
    first = free_run.index(stop_at)
    assert out.outputs[0].token_ids == free_run[:first + 1]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop_at)
    # Forcing eos (the last id) with logit_bias ends at once with finish reason stop.
    (eos_out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, logit_bias={511: 100.0}))
    assert eos_out.outputs[0].token_ids == [511] and eos_out.outputs[0].finish_reason == "stop"
    (min_out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, min_tokens=3,
                                                        logit_bias={511: 100.0}))
    assert len(min_out.outputs[0].token_ids) == 4 and min_out.outputs[0].token_ids[-1] == 511


def test_logprobs_and_prompt_logprobs_match_transformers(qwen3_ckpt):
    from transformers import AutoModelForCausalLM

    prompt = random_prompts([9], seed=9)[0]
    llm = LLM(str(qwen3_ckpt), dtype="float32", kv_cache_memory_bytes=8 * 2**20, max_num_batched_tokens=4)
    (out,) = llm.generate([{"prompt_token_ids": prompt}], greedy(5, logprobs=3, prompt_logprobs=2))
    gen = out.outputs[0]
    model = AutoModelForCausalLM.from_pretrained(qwen3_ckpt, dtype=torch.float32)
    with torch.no_grad():
        full = torch.tensor([prompt + gen.token_ids])
        ref = torch.log_softmax(model(full).logits[0].float(), dim=-1)  # (L, V)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp.token_id == prompt[pos]
        assert lp.logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert len(lp.top) == 2
    for i, lp in enumerate(gen.logprobs):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == gen.token_ids[i] and lp.rank == 1
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
        assert lp.logprob == pytest.approx(row.max().item(), abs=1e-4)


def test_bad_requests_raise_value_errors(qwen3_ckpt):
    llm = LLM(str(qwen3_ckpt), dtype="float32", kv_cache_memory_bytes=2**20, max_model_len=64)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([{"prompt_token_ids": [1, 100000]}], greedy(4))
    with pytest.raises(ValueError, match="context length"):
        llm.generate([{"prompt_token_ids": list(range(64))}], greedy(4))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], greedy(4))
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(qwen3_ckpt), max_model_len=10**6)
    # The engine still serves after refusing.
    assert len(token_ids(llm.generate([{"prompt_token_ids": [1, 2]}], greedy(3)))[0]) == 3
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.usage == 0.0


def test_unbounded_max_tokens_fits_the_kv_cache(qwen3_ckpt):
    # 4 blocks of 16 tokens, but a 512-token context: max_tokens=None must stop at the cache, not be refused.
    llm = LLM(str(qwen3_ckpt), dtype="float32", kv_cache_memory_bytes=4 * 8192, block_size=16)
    (out,) = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                          SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 64 - 3 and out.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], greedy(100))


def _threads() -> int:
    """Threads of this process (OpenMP workers included)."""
    import os

    return len(os.listdir("/proc/self/task"))


def _threads_settled(at_most: int) -> int:
    """The thread count once it is at most ``at_most``, or after 10 s (exiting workers take a moment to go)."""
    import time

    deadline = time.monotonic() + 10
    while _threads() > at_most and time.monotonic() < deadline:
        time.sleep(0.01)
    return _threads()


def test_release_openmp_threads_ends_the_callers_pool():
    """The workers a thread's parallel region started end when it releases them (other threads' pools untouched)."""
    import threading

    from fabrik.kernels.native import KernelBuildError, load_library
    from fabrik.kernels.openmp import release_openmp_threads

    try:
        library = load_library()
    except KernelBuildError as exc:
        pytest.skip(f"no native kernels: {exc}")
    data = torch.ones(1 << 20)
    counts = []

    def run():
        counts.append(_threads())
        library.stream_read(data.data_ptr(), data.numel() * 4, 2)  # a region of 2 threads: this thread's pool
        counts.append(_threads())
        counts.append(release_openmp_threads())
        counts.append(_threads_settled(counts[0]))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    before, during, released, after = counts
    assert during > before and released is True and after == before


def test_the_engine_ends_its_loading_threads_openmp_pool(qwen3_ckpt, monkeypatch):
    """An engine built on one thread and stepped on another must not leave the loader's pool behind."""
    import fabrik.engine.llm_engine as llm_engine

    calls = []
    monkeypatch.setattr(llm_engine, "release_openmp_threads", lambda: calls.append(1) or True)
    llm = LLM(str(qwen3_ckpt), dtype="bfloat16")
    assert calls == [1]
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))
    assert len(out[0].outputs[0].token_ids) == 3


def test_generate_leaves_no_openmp_workers_on_its_thread(qwen3_ckpt):
    """LLM.generate may be called from a web server's worker threads: none may keep an OpenMP pool afterwards."""
    import threading

    llm = LLM(str(qwen3_ckpt), dtype="bfloat16", max_num_batched_tokens=64)
    counts = []

    def run():
        before = _threads()
        # a prompt long enough for parallel regions in the prefill
        out = llm.generate([list(range(1, 200))], SamplingParams(temperature=0, max_tokens=4))
        counts.append(len(out[0].outputs[0].token_ids))
        counts.append(_threads_settled(before) - before)

    for _ in range(2):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    assert counts == [4, 0, 4, 0]
