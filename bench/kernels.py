"""Micro-benchmark of the linear kernels on the Qwen3-0.6B projection shapes and its LM head.

For each (N, K) it times, interleaved in the same process (A, B, C, A, B, C, ...), with weights cold (several copies
rotated so that their total exceeds the 32 MB L3):

    stream   a plain 2-thread sequential read of the same number of bytes as the bf16 weight (the roofline)
    torch    F.linear(x, w) on the bf16 weight (torch's own kernel)
    native   the native bf16 kernel
    int8     the native int8 kernel (GB/s counted on its own bytes: 1.0625 per weight)
    int4     the native int4 kernel (groups of 32; its own bytes: 0.5625 per weight)

and prints GB/s (median over repeats), native / stream, and the GOP/s of the three native kernels (2 M N K per call:
what decides at batch sizes where the weights are no longer the bottleneck). Run:

    .venv/bin/python bench/kernels.py [--batch 1] [--repeats 30] [--threads 2] [--kernels native-avx2]

With ``--model PATH`` it measures a whole checkpoint instead, through ``fabrik.LLM``: batch-1 greedy decode tok/s
on the torch, native bf16, int8, int4 and int4-g128 paths (interleaved rounds), then their accuracy against bf16:
the largest logit difference over a 64-token prompt (teacher-forced, all positions) and the greedy tokens shared
over 64.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fabrik.kernels import NativeBackend, select_backend
from fabrik.kernels.native import load_library

SHAPES = {
    "q_proj": (2048, 1024),
    "k_proj/v_proj": (1024, 1024),
    "o_proj": (1024, 2048),
    "gate/up_proj": (3072, 1024),
    "down_proj": (1024, 3072),
    "lm_head": (151936, 1024),
}
COLD_BYTES = 256 * 2**20
"""Total bytes of the rotated copies of one weight: 8x the L3, so every call reads from memory."""


def _median_seconds(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up (and first touch of outputs)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _rotating(items: list, call) -> callable:
    state = [0]

    def run() -> None:
        call(items[state[0] % len(items)])
        state[0] += 1

    return run


def _load(path: str, backend: str, quantization: str | None):
    from fabrik.kernels import apply_kernels
    from fabrik.loader import load_model
    from fabrik.model_config import load_model_config

    config = load_model_config(path)
    return config, apply_kernels(load_model(path, config, torch.bfloat16), backend, quantization)


def _prompt_logits(config, model, ids: list[int]) -> torch.Tensor:
    """(T, vocab) float32 logits of every position of one prompt, run as a single prefill."""
    from fabrik.models.attention import AttentionMetadata, kv_cache_shape

    block_size, n = 16, len(ids)
    num_blocks = (n + block_size - 1) // block_size
    caches = [torch.zeros(kv_cache_shape(config, num_blocks, block_size), dtype=torch.bfloat16)
              for _ in range(config.num_hidden_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(n), query_start_loc=(0, n), seq_lens=(n,),
                             block_tables=torch.arange(num_blocks)[None], block_size=block_size)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(n), caches, meta)  # (T, hidden)
        return model.compute_logits(hidden)  # (T, vocab)


def bench_model(path: str, rounds: int) -> None:
    from fabrik import LLM, SamplingParams

    variants = {"torch bf16": ("torch", None), "native bf16": ("native", None), "native int8": ("native", "int8"),
                "native int4": ("native", "int4"), "native int4-g128": ("native", "int4-g128")}
    ids = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    llms, tokens = {}, {}
    for name, (backend, quantization) in variants.items():
        llms[name] = LLM(path, dtype="bfloat16", max_model_len=512, kernels=backend, quantization=quantization)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds + 1):  # the first round warms up and is not counted
        for name, llm in llms.items():
            t0 = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": ids[:16]}], params)
            timings[name].append(time.perf_counter() - t0)
            tokens[name] = out[0].outputs[0].token_ids
    print(f"{path}: batch-1 greedy decode, 16-token prompt + 64 tokens, median of {rounds} interleaved rounds")
    for name, ts in timings.items():
        print(f"  {name:<16} {64 / statistics.median(ts[1:]):6.1f} tok/s")
    del llms
    logits = {}
    for name, (backend, quantization) in variants.items():
        config, model = _load(path, backend, quantization)
        logits[name] = _prompt_logits(config, model, ids)  # (64, vocab)
        del model
    reference = logits["native bf16"]
    print(f"  accuracy over a 64-token prompt (teacher-forced), against native bf16 (logit std "
          f"{reference.std().item():.3f}):")
    for name in ("torch bf16", "native int8", "native int4", "native int4-g128"):
        diff = (logits[name] - reference).abs().max().item()
        top1 = (logits[name].argmax(-1) == reference.argmax(-1)).float().mean().item()
        same = next((i for i, (a, b) in enumerate(zip(tokens[name], tokens["native bf16"])) if a != b), 64)
        print(f"  {name:<16} max |logit diff| {diff:.3f}, top-1 agreement {top1:.1%}, greedy: first {same} of 64 "
              f"tokens equal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="rows of x (1 = decode)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--kernels", default="native", help="native, native-avx512 or native-avx2")
    parser.add_argument("--model", help="a checkpoint folder: measure whole-model decode and int8 / int4 accuracy "
                                        "instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        bench_model(args.model, max(1, args.repeats // 10))
        return
    library = load_library()
    backend = select_backend(args.kernels)
    if not isinstance(backend, NativeBackend):
        raise SystemExit("native kernels unavailable")
    backend = NativeBackend(backend.isa, args.threads)
    print(f"backend {backend.name}, threads {args.threads}, batch {args.batch}, repeats {args.repeats} "
          f"(median), library {library.path}")
    print(f"{'shape':<14} {'N x K':>13} {'stream':>8} {'torch':>8} {'native':>8} {'int8':>8} {'int4':>8} "
          f"{'nat/str':>8} {'tor/str':>8}   GOP/s: {'bf16':>6} {'int8':>6} {'int4':>6}   (GB/s on each one's bytes)")
    torch.manual_seed(0)
    for label in args.shapes:
        n, k = SHAPES[label]
        nbytes = n * k * 2
        copies = max(2, COLD_BYTES // nbytes)
        weights = [torch.randn(n, k).to(torch.bfloat16) for _ in range(copies)]
        layers = {fmt: [backend.linear(w, None, q) for w in weights]
                  for fmt, q in (("native", None), ("int8", "int8"), ("int4", "int4"))}
        reads = [torch.ones(nbytes, dtype=torch.uint8) for _ in range(copies)]
        x = torch.randn(args.batch, k).to(torch.bfloat16)
        with torch.inference_mode():
            t = _median_seconds({
                "stream": _rotating(reads, lambda b: library.stream_read(b.data_ptr(), b.numel(), args.threads)),
                "torch": _rotating(weights, lambda w: F.linear(x, w)),
                **{fmt: _rotating(mods, lambda m: m(x)) for fmt, mods in layers.items()},
            }, args.repeats)
        gbs = {name: nbytes / 1e9 / s for name, s in t.items()}
        for fmt in ("int8", "int4"):
            gbs[fmt] = layers[fmt][0].packed.numel() / 1e9 / t[fmt]
        gops = {fmt: 2 * args.batch * n * k / 1e9 / t[fmt] for fmt in layers}
        print(f"{label:<14} {f'{n}x{k}':>13} {gbs['stream']:8.1f} {gbs['torch']:8.1f} {gbs['native']:8.1f} "
              f"{gbs['int8']:8.1f} {gbs['int4']:8.1f} {gbs['native'] / gbs['stream']:8.2f} "
              f"{gbs['torch'] / gbs['stream']:8.2f}          {gops['native']:6.0f} {gops['int8']:6.0f} "
              f"{gops['int4']:6.0f}")
        del weights, layers, reads


if __name__ == "__main__":
    main()
