"""Hugging Face transformers ``generate`` as a peer: prefill and decode speed of one batch, like ``fabrik bench latency``.

The prompts are the ones ``fabrik bench latency`` uses (``fabrik.bench.workload.random_token_prompts`` with the
same seeds), greedy, with ``min_new_tokens == max_new_tokens`` so EOS never ends a sequence early.

Timing per iteration: ``generate(max_new_tokens=1)`` is the prefill; a full ``generate(max_new_tokens=N)`` minus
that prefill time is the decode of the N - 1 later tokens. Figures are medians over the iterations; ``--warmup``
iterations (a prefill and one decode step each) run first and are not counted.

Usage: ``python bench/hf_generate.py --model CKPT --input-len 512 --output-len 128 --batch-size 1 --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def run(model_dir: str, input_len: int, output_len: int, batch_size: int, num_iters: int, warmup: int,
        threads: int, prompt_seed: int = 0) -> dict[str, Any]:
    """Times prefill and decode of ``batch_size`` random prompts with ``model.generate`` in bf16."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from fabrik.bench.workload import DEFAULT_TOKEN_ID_RANGE, random_token_prompts

    if output_len < 2:
        raise ValueError(f"output_len ({output_len}) must be >= 2: decode is timed after the first token")
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()

    def generate(ids: torch.Tensor, n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - t0
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} tokens, expected {n}")
        return elapsed

    iters = []
    for k in range(warmup + num_iters):
        prompts = random_token_prompts(batch_size, input_len, prompt_seed + k, DEFAULT_TOKEN_ID_RANGE)
        ids = torch.tensor(prompts, dtype=torch.long)  # (B, T)
        if k < warmup:
            # NOTE: a short warm-up (prefill and one decode step) loads every kernel; a full one would only add time.
            generate(ids, 2)
            continue
        prefill_s = generate(ids, 1)
        total_s = generate(ids, output_len)
        decode_s = max(total_s - prefill_s, 1e-9)
        iters.append({"prefill_s": prefill_s, "total_s": total_s,
                      "prefill_tokens_per_s": batch_size * input_len / prefill_s,
                      "decode_tokens_per_s_total": batch_size * (output_len - 1) / decode_s,
                      "decode_tokens_per_s_per_seq": (output_len - 1) / decode_s})
    return {
        "engine": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
        "model": model_dir, "dtype": "bfloat16", "threads": threads, "input_len": input_len,
        "output_len": output_len, "batch_size": batch_size, "num_iters": num_iters, "warmup": warmup,
        **{key: statistics.median(it[key] for it in iters) for key in iters[0]},
        "iterations": iters,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    if args.num_iters < 1:
        raise SystemExit(f"--num-iters ({args.num_iters}) must be >= 1")
    r = run(args.model, args.input_len, args.output_len, args.batch_size, args.num_iters, args.warmup, args.threads,
            args.prompt_seed)
    print(f"transformers bf16 batch {r['batch_size']}: prefill {r['prefill_tokens_per_s']:.1f} tok/s, decode "
          f"{r['decode_tokens_per_s_total']:.2f} tok/s total ({r['decode_tokens_per_s_per_seq']:.2f} per sequence)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
