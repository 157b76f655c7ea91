"""``fabrik bench throughput | latency | serve``: argparse subcommands, readable tables, ``--json`` output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fabrik bench`` and its three subcommands under the ``fabrik`` parser."""
    from fabrik.entrypoints.cli import add_engine_args

    bench = sub.add_parser("bench", help="benchmarks: offline throughput and latency, or load on a server")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    tp = bsub.add_parser("throughput", help="offline throughput: every prompt submitted at once to fabrik.LLM")
    tp.add_argument("--model", required=True, help="Hugging Face model folder or hub id")
    tp.add_argument("--num-prompts", type=int, default=64)
    tp.add_argument("--input-len", type=int, default=128, help="prompt length in tokens (random ids)")
    tp.add_argument("--output-len", type=int, default=128, help="tokens generated per prompt (ignore_eos)")
    tp.add_argument("--prompt-seed", type=int, default=0)
    tp.add_argument("--json", default=None, metavar="FILE", help="write every figure to FILE")
    add_engine_args(tp)
    tp.set_defaults(func=_throughput)

    lat = bsub.add_parser("latency", help="offline prefill and decode speed of one batch, step by step")
    lat.add_argument("--model", required=True, help="Hugging Face model folder or hub id")
    lat.add_argument("--input-len", type=int, default=128, help="prompt length in tokens (random ids)")
    lat.add_argument("--output-len", type=int, default=64, help="tokens generated per sequence (ignore_eos)")
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--num-iters", type=int, default=3)
    lat.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    lat.add_argument("--prompt-seed", type=int, default=0)
    lat.add_argument("--json", default=None, metavar="FILE", help="write every figure to FILE")
    lat.add_argument("--split", action="store_true",
                     help="also time the native forward's parts and the LM head: where a decode step's time goes")
    add_engine_args(lat)
    lat.set_defaults(func=_latency)

    srv = bsub.add_parser("serve", help="load any OpenAI-compatible server with streaming /v1/completions")
    srv.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (…/v1 is accepted too)")
    srv.add_argument("--model", required=True, help="the request's model field")
    srv.add_argument("--concurrency", default="1,4,16", help="comma-separated levels, run in turn")
    srv.add_argument("--num-prompts", type=int, default=32, help="requests per level")
    srv.add_argument("--input-len", type=int, default=128)
    srv.add_argument("--output-len", type=int, default=128)
    srv.add_argument("--prompt-type", choices=["ids", "text"], default="ids",
                     help="token-id prompts (exact length) or random words (about one token each)")
    srv.add_argument("--token-id-range", default="100:10000", metavar="LOW:HIGH",
                     help="prompt ids are drawn from [LOW, HIGH)")
    srv.add_argument("--prompt-seed", type=int, default=0)
    srv.add_argument("--warmup", type=int, default=1, help="requests sent before the first level, not counted")
    srv.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    srv.add_argument("--slo-ttft-ms", type=float, default=None)
    srv.add_argument("--slo-tpot-ms", type=float, default=None)
    srv.add_argument("--api-key", default=None)
    srv.add_argument("--json", default=None, metavar="FILE", help="write every figure to FILE")
    srv.add_argument("--plot", default=None, metavar="FILE.png", help="throughput against latency (needs matplotlib)")
    srv.set_defaults(func=_serve)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from fabrik.entrypoints.cli import engine_config_from_args

    config = engine_config_from_args(args.model, args)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "model"}


def _write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {path}", file=sys.stderr)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        # Small figures (seconds, milliseconds) keep 4 significant digits; large ones (tokens/s) 2 decimals.
        return f"{value:.{digits}f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def _print_pairs(title: str, pairs: list[tuple[str, Any]]) -> None:
    print(title)
    width = max(len(name) for name, _ in pairs)
    for name, value in pairs:
        print(f"  {name:<{width}}  {_fmt(value)}")


def _throughput(args: argparse.Namespace) -> int:
    from fabrik.bench.offline import run_throughput

    r = run_throughput(args.model, args.num_prompts, args.input_len, args.output_len, args.prompt_seed,
                       **_engine_kwargs(args))
    _print_pairs(f"throughput: {r['num_prompts']} prompts x ({r['input_len']} in, {r['output_len']} out)", [
        ("elapsed (s)", r["elapsed_s"]), ("requests/s", r["requests_per_s"]),
        ("prompt tokens/s", r["prompt_tokens_per_s"]), ("output tokens/s", r["output_tokens_per_s"]),
        ("total tokens/s", r["total_tokens_per_s"]), ("output tokens", r["output_tokens"])])
    _write_json(args.json, r)
    return 0


def _latency(args: argparse.Namespace) -> int:
    from fabrik.bench.offline import run_latency

    r = run_latency(args.model, args.input_len, args.output_len, args.batch_size, args.num_iters, args.warmup,
                    args.prompt_seed, split=args.split, **_engine_kwargs(args))
    step = r["decode_step_ms"]
    _print_pairs(f"latency: batch {r['batch_size']} x ({r['input_len']} in, {r['output_len']} out), "
                 f"median of {r['num_iters']} iterations", [
        ("prefill (s)", r["prefill_s"]), ("prefill tokens/s", r["prefill_tokens_per_s"]),
        ("decode step ms p50", step["p50"]), ("decode step ms p90", step["p90"]),
        ("decode step ms p99", step["p99"]),
        ("decode tokens/s total", r["decode_tokens_per_s_total"]),
        ("decode tokens/s per seq", r["decode_tokens_per_s_per_seq"])])
    split = r["decode_split"]
    if split is not None:
        _print_pairs("per decode step (mean ms): the matmuls, the attention, the rest", [
            ("step", split["step_ms"]), ("linears", split["linears_ms"]), ("LM head", split["lm_head_ms"]),
            ("attention (with norms, rotary, K/V stores)", split["attention_ms"]),
            ("other native forward", split["forward_other_ms"]),
            ("outside the forward (scheduler, sampling, Python)", split["outside_forward_ms"]),
            ("outside the matmuls (%)", 100 * split["outside_matmuls_fraction"])])
    _write_json(args.json, r)
    return 0


def _parse_levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated integers, got {text!r}") from None


def _parse_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--token-id-range must be LOW:HIGH, got {text!r}") from None
    return low, high


def print_serve_table(result: dict[str, Any]) -> None:
    """One row per concurrency level; latencies in milliseconds."""
    columns = [("conc", lambda lv: lv["concurrency"]), ("ok", lambda lv: lv["completed"]),
               ("fail", lambda lv: lv["failed"]), ("req/s", lambda lv: lv["request_throughput"]),
               ("out tok/s", lambda lv: lv["output_throughput"]), ("goodput", lambda lv: lv["goodput"])]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        for q in ("p50", "p90", "p99"):
            columns.append((f"{name} {q}", lambda lv, key=key, q=q: lv[key][q]))
    rows = [[_fmt(get(lv), 1) for _, get in columns] for lv in result["levels"]]
    widths = [max(len(name), *(len(row[i]) for row in rows)) for i, (name, _) in enumerate(columns)]
    print("  ".join(name.rjust(w) for (name, _), w in zip(columns, widths)))
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print("latencies in ms; goodput in req/s meeting every SLO ('-' when no SLO is given)")
    for lv in result["levels"]:
        for error in lv["errors"]:
            print(f"  concurrency {lv['concurrency']} error: {error}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    try:
        import httpx  # noqa: F401
    except ImportError as exc:
        print(f"fabrik bench serve needs httpx: pip install httpx ({exc})", file=sys.stderr)
        return 2
    from fabrik.bench.serve import ServeConfig, plot_levels, run_serve

    config = ServeConfig(
        base_url=args.base_url, model=args.model, concurrency=_parse_levels(args.concurrency),
        num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
        prompt_type=args.prompt_type, token_id_range=_parse_range(args.token_id_range), seed=args.prompt_seed,
        warmup=args.warmup, timeout_s=args.timeout, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
        api_key=args.api_key)
    result = run_serve(config)
    print(f"serve: {config.url}, model {config.model}, {config.num_prompts} requests per level, "
          f"{config.input_len} in / {config.output_len} out")
    print_serve_table(result)
    _write_json(args.json, result)
    if args.plot:
        if plot_levels(result, args.plot):
            print(f"wrote {args.plot}", file=sys.stderr)
        else:
            print("--plot needs matplotlib, which is not installed (pip install matplotlib); no plot written",
                  file=sys.stderr)
    return 0 if all(lv["completed"] for lv in result["levels"]) else 1
