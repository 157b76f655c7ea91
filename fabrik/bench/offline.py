"""Offline benchmarks of the engine itself, without HTTP.

``throughput``: every prompt submitted at once to ``fabrik.LLM``; the engine batches as it likes (as
``vllm bench throughput``). ``latency``: a fixed batch stepped through ``LLMEngine`` one step at a time, splitting
prefill (the steps until every sequence has its first token) from decode (every step after).
"""

from __future__ import annotations

import time
from typing import Any

from fabrik.bench.split import StepSplit, summarize_split
from fabrik.bench.stats import summarize
from fabrik.bench.workload import DEFAULT_TOKEN_ID_RANGE, random_token_prompts


def _id_range(vocab_size: int) -> tuple[int, int]:
    """The default prompt id range, clipped to the model's vocabulary (the test models have 512 ids)."""
    low, high = DEFAULT_TOKEN_ID_RANGE
    return min(low, vocab_size // 2), min(high, vocab_size)


def run_throughput(model: str, num_prompts: int, input_len: int, output_len: int, prompt_seed: int = 0,
                   **engine_kwargs: Any) -> dict[str, Any]:
    """Generate ``output_len`` tokens for ``num_prompts`` random prompts of ``input_len`` tokens, all at once.

    Args:
        model: model folder or hub id.
        num_prompts: how many requests.
        input_len: prompt length in tokens (random ids).
        output_len: tokens generated per request (``ignore_eos``, greedy).
        prompt_seed: seed of the random prompts (``seed`` in ``engine_kwargs`` seeds sampling).
        **engine_kwargs: any ``EngineConfig`` field.

    Returns:
        A dict of the settings and figures: elapsed_s, requests_per_s, prompt/output/total tokens per second.
    """
    from fabrik import LLM, SamplingParams

    if output_len < 1:
        raise ValueError(f"output_len ({output_len}) must be >= 1")
    llm = LLM(model, **engine_kwargs)
    prompts = random_token_prompts(num_prompts, input_len, prompt_seed, _id_range(llm.engine.model_config.vocab_size))
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "model": model, "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
        "prompt_seed": prompt_seed, "engine": engine_kwargs, "elapsed_s": elapsed,
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "requests_per_s": num_prompts / elapsed,
        "prompt_tokens_per_s": prompt_tokens / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
    }


def _one_batch(engine, prompts: list[list[int]], params, tag: str, split: StepSplit | None = None) -> dict[str, Any]:
    """Step one batch to completion; returns the prefill time, the decode step times and (with split) where each
    decode step's time went."""
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", ids, params)
    waiting_first = {f"{tag}-{i}" for i in range(len(prompts))}
    prefill_s = 0.0
    prefill_steps = 0
    decode_steps: list[float] = []
    decode_tokens = 0
    decode_split: list[tuple[float, ...]] = []
    while engine.has_unfinished():
        parts = split.read() if split is not None else ()
        start = time.perf_counter()
        updates = engine.step()
        took = time.perf_counter() - start
        if waiting_first:
            # NOTE: the step that finishes the last prefill may also decode earlier sequences; it counts as prefill.
            prefill_s += took
            prefill_steps += 1
            waiting_first.difference_update(u.request_id for u in updates)
        else:
            decode_steps.append(took)
            decode_tokens += sum(len(u.new_token_ids) for u in updates)
            if split is not None:
                decode_split.append((took, *(after - before for after, before in zip(split.read(), parts))))
    return {"prefill_s": prefill_s, "prefill_steps": prefill_steps, "decode_step_s": decode_steps,
            "decode_tokens": decode_tokens, "decode_split": decode_split}


def run_latency(model: str, input_len: int, output_len: int, batch_size: int, num_iters: int = 3,
                warmup: int = 1, prompt_seed: int = 0, split: bool = False, **engine_kwargs: Any) -> dict[str, Any]:
    """Time prefill and decode of one batch of ``batch_size`` random prompts, ``num_iters`` times.

    Each iteration uses fresh prompts, so the prefix cache never serves a prompt. Figures are medians over the
    iterations; the decode step time is summarized over the steps of every iteration.

    With ``split``, the native forward and the LM head are timed too (``fabrik.bench.split``): "decode_split" holds
    the mean milliseconds per decode step of each part over every iteration, and the share outside the matmuls.

    Returns:
        A dict of the settings, per-iteration figures and their medians (prefill tokens/s, decode tokens/s per
        sequence and in total, milliseconds per decode step).

    Raises:
        ValueError: a bad setting, or ``split`` on a model without the native forward.
    """
    from fabrik.config import EngineConfig
    from fabrik.engine.llm_engine import LLMEngine
    from fabrik.sampling.params import SamplingParams

    for name, value in (("batch_size", batch_size), ("num_iters", num_iters), ("output_len", output_len)):
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")
    if warmup < 0:
        raise ValueError(f"warmup ({warmup}) must be >= 0")
    engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
    step_split = StepSplit(engine) if split else None
    id_range = _id_range(engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    iters = []
    all_steps: list[float] = []
    all_split: list[tuple[float, ...]] = []
    for k in range(warmup + num_iters):
        prompts = random_token_prompts(batch_size, input_len, prompt_seed + k, id_range)
        batch = _one_batch(engine, prompts, params, f"it{k}", step_split)
        if k < warmup:
            continue
        steps = batch["decode_step_s"]
        all_steps.extend(steps)
        all_split.extend(batch["decode_split"])
        decode_s = sum(steps)
        iters.append({
            "prefill_s": batch["prefill_s"], "prefill_steps": batch["prefill_steps"],
            "prefill_tokens_per_s": batch_size * input_len / batch["prefill_s"],
            "decode_steps": len(steps), "decode_tokens": batch["decode_tokens"],
            "decode_step_ms": summarize(steps, 1e3),
            "decode_tokens_per_s_total": batch["decode_tokens"] / decode_s if steps else None,
            "decode_tokens_per_s_per_seq": batch["decode_tokens"] / decode_s / batch_size if steps else None,
        })

    def median(key: str) -> float | None:
        values = [it[key] for it in iters if it[key] is not None]
        return summarize(values)["p50"]

    return {
        "model": model, "input_len": input_len, "output_len": output_len, "batch_size": batch_size,
        "num_iters": num_iters, "warmup": warmup, "prompt_seed": prompt_seed, "engine": engine_kwargs,
        "prefill_s": median("prefill_s"),
        "prefill_tokens_per_s": median("prefill_tokens_per_s"),
        "decode_step_ms": summarize(all_steps, 1e3),
        "decode_tokens_per_s_total": median("decode_tokens_per_s_total"),
        "decode_tokens_per_s_per_seq": median("decode_tokens_per_s_per_seq"),
        "decode_split": summarize_split(all_split) if split else None,
        "iterations": iters,
    }
