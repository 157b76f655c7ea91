"""The ``fabrik`` command line: ``fabrik generate`` (and the subcommands other modules add)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that starts an engine (defaults: EngineConfig's)."""
    from fabrik.config import DTYPES, KERNEL_BACKENDS, KV_CACHE_DTYPES, QUANTIZATIONS, EngineConfig

    parser.add_argument("--dtype", default=EngineConfig.dtype, choices=list(DTYPES))
    parser.add_argument("--revision", default=None, help="hub revision when the model is a hub id")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    parser.add_argument("--block-size", type=int, default=EngineConfig.block_size)
    parser.add_argument("--kv-cache-memory", default=None, help="KV cache budget, e.g. 4GiB or 512MB")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--seed", type=int, default=EngineConfig.seed)
    parser.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                        help="quantize the weights at load (groups of 32 unless -g64 / -g128; int4 keeps an int8 LM head)")
    parser.add_argument("--kv-cache-dtype", default=EngineConfig.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
                        help="KV cache rows: the model's dtype (auto) or int8 with one scale per token and head")
    parser.add_argument("--kernels", default=None, choices=list(KERNEL_BACKENDS),
                        help="kernel backend (default: $FABRIK_KERNELS, else auto)")


def engine_config_from_args(model: str, args: argparse.Namespace):
    from fabrik.config import EngineConfig, parse_bytes

    return EngineConfig(
        model=model, dtype=args.dtype, revision=args.revision, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory_bytes=parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None,
        enable_prefix_caching=not args.no_prefix_caching, seed=args.seed, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype, kernels=args.kernels)


def _generate(args: argparse.Namespace) -> int:
    from fabrik.engine.llm_engine import LLMEngine
    from fabrik.sampling.params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.sampling_seed, stop=args.stop or None, ignore_eos=args.ignore_eos)
    engine = LLMEngine(engine_config_from_args(args.model, args))
    if args.chat:
        if engine.tokenizer is None:
            raise ValueError("--chat needs a model with a tokenizer and chat template")
        kwargs = {"enable_thinking": not args.no_thinking}
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                    chat_template_kwargs=kwargs)
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    else:
        prompt = args.prompt
    engine.add_request("cli", prompt, params)
    finish = None
    while engine.has_unfinished():
        for update in engine.step():
            sys.stdout.write(update.new_text if engine.tokenizer else f"{update.new_token_ids[0]} ")
            sys.stdout.flush()
            finish = update.finish_reason or finish
    sys.stdout.write("\n")
    print(f"[finish_reason: {finish}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fabrik.bench.cli import add_bench_parser

    from fabrik import __version__

    parser = argparse.ArgumentParser(prog="fabrik", description="LLM inference engine and OpenAI-compatible server")
    parser.add_argument("--version", action="version", version=f"fabrik {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    gen.add_argument("--model", required=True, help="Hugging Face model folder or hub id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--no-thinking", action="store_true", help="with --chat: enable_thinking=False")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    try:
        from fabrik.server.cli import add_serve_parser
    except ImportError as exc:  # the server's optional dependencies are missing
        # NOTE: takes any arguments (--help included), so that every `fabrik serve ...` says what to install instead
        # of "unrecognized arguments".
        serve = sub.add_parser("serve", help="OpenAI-compatible server (needs: pip install 'fabrik[server]')",
                               add_help=False, prefix_chars="\0")
        serve.add_argument("arguments", nargs="*")
        serve.set_defaults(func=lambda _args, _exc=exc: _missing_server(_exc))
    else:
        add_serve_parser(sub)
    add_bench_parser(sub)
    return parser


def _missing_server(exc: ImportError) -> int:
    print(f"fabrik serve needs the server extras: pip install 'fabrik[server]' ({exc})", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
