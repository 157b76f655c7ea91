"""``make bench``: fabrik against llama.cpp and transformers on one random Qwen3-0.6B-shaped checkpoint.

Steps:
  1. Build (or reuse) the checkpoint (``bench/checkpoint.py``), build (or reuse) llama.cpp and convert the checkpoint
     to GGUF BF16 / Q8_0 / Q4_0 (``bench/llamacpp.py``).
  2. Offline, in rounds: every case once per round, in the same order (A, B, C, A, B, C, ...), with a memory
     bandwidth reading (``bench/bandwidth.py``) between consecutive cases. Cases: ``fabrik bench latency`` per fabrik
     weight format at batch 1 and 8, transformers ``generate`` bf16 at batch 1 and 8, ``llama-bench`` per GGUF type.
  3. Served, in rounds too: ``fabrik bench serve`` against ``fabrik serve`` per fabrik format and against
     ``llama-server`` per GGUF type, one concurrency level at a time with 2 x concurrency requests.
  4. Write ``docs/benchmarks.md``, ``docs/bench-decode.png`` and ``docs/bench-serve.png`` (plots need matplotlib), and
     every raw figure to ``<work>/runs/<time>/results.json``.

Every figure carries the bandwidth measured just before and after it (their mean), the bytes of weights read per
decoded token of its format, and so its roofline fraction: the per-sequence decode rate over ``bandwidth / bytes``
(at batch B the weights are read once per step for B sequences, so the per-sequence rate is the one to hold against
the roofline). Ratios between engines are taken within one round, then the median over rounds is reported.

``--quick`` (or ``BENCH_QUICK=1``) runs every step with tiny sizes (2 layers, a few tokens, one round) and writes the
report to ``<work>/quick/`` instead of ``docs/``: a smoke test of the pipeline, its figures mean nothing.

Usage: ``python bench/run_all.py [--quick] [--rounds N] [--out DIR] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import bandwidth
import checkpoint
import llamacpp

REPO = Path(__file__).resolve().parent.parent
THREADS = 2
REFERENCE = ("llama.cpp", "BF16")
"""Every decode figure is also given as a ratio to this engine's batch-1 decode in the same round."""


@dataclasses.dataclass(frozen=True)
class FabrikFormat:
    """One way of running fabrik: the environment and engine options that select it, and what it reads per token."""

    name: str
    """Label in the report."""
    env: dict[str, str]
    """Environment of the fabrik process (e.g. ``FABRIK_KERNELS``)."""
    args: tuple[str, ...]
    """Engine options appended to ``fabrik bench latency`` and ``fabrik serve``."""
    matrix_bytes_per_weight: float
    """Bytes per weight of the projections as stored (scales included)."""
    head_bytes_per_weight: float | None = None
    """Bytes per weight of the LM head, when it is stored differently from the projections."""


FABRIK_FORMATS: tuple[FabrikFormat, ...] = (
    FabrikFormat("bf16 native", {"FABRIK_KERNELS": "native"}, ("--dtype", "bfloat16"), 2.0),
    # int8 in groups of 32 along K with one fp16 scale per group: 32 + 2 bytes per 32 weights (fabrik/kernels/linear.py).
    FabrikFormat("int8 native", {"FABRIK_KERNELS": "native"}, ("--dtype", "bfloat16", "--quantization", "int8"),
                 34 / 32),
    # int4: 16 + 2 bytes per 32 weights; its LM head stays int8.
    FabrikFormat("int4 native", {"FABRIK_KERNELS": "native"}, ("--dtype", "bfloat16", "--quantization", "int4"),
                 18 / 32, 34 / 32),
    # The same weights over the int8 KV cache (fabrik/models/kv_int8.py); compared with LLAMA_KV_VARIANTS below.
    FabrikFormat("int4 native + int8 KV", {"FABRIK_KERNELS": "native"},
                 ("--dtype", "bfloat16", "--quantization", "int4", "--kv-cache-dtype", "int8"), 18 / 32, 34 / 32),
)
"""Every fabrik configuration benchmarked, in the order run; add a line when the engine gains a format. (The torch
reference kernels, ``FABRIK_KERNELS=torch``, are 4-6x slower and left out to keep the run under 45 minutes.)"""

LLAMA_KV_VARIANTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Q4_0 + q8_0 KV", "Q4_0", ("-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on")),
)
"""llama.cpp runs beside its default f16 KV cache: (label, GGUF type, options); a quantized V cache needs flash
attention."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run: ``layers`` of the checkpoint (None: 28), offline prompt/output lengths, batch sizes,
    timed and warm-up iterations per case, ``llama-bench`` repetitions, served concurrency levels and lengths,
    offline and served rounds, and the bandwidth reading (array MiB, passes)."""

    layers: int | None
    input_len: int
    output_len: int
    batch_sizes: tuple[int, ...]
    num_iters: int
    warmup: int
    bench_reps: int
    serve_levels: tuple[int, ...]
    serve_input_len: int
    serve_output_len: int
    rounds: int
    serve_rounds: int
    bw_mib: int
    bw_passes: int


# NOTE: one timed iteration per round: the rounds give the repeats, interleaved with the other engines, and the
# whole run stays near 20 minutes.
FULL = Settings(layers=None, input_len=512, output_len=128, batch_sizes=(1, 8), num_iters=1, warmup=1, bench_reps=3,
                serve_levels=(1, 4, 16), serve_input_len=128, serve_output_len=64, rounds=2, serve_rounds=1,
                bw_mib=1024, bw_passes=5)
QUICK = Settings(layers=2, input_len=32, output_len=8, batch_sizes=(1, 8), num_iters=1, warmup=0, bench_reps=1,
                 serve_levels=(1, 4), serve_input_len=16, serve_output_len=4, rounds=1, serve_rounds=1,
                 bw_mib=256, bw_passes=2)


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _fabrik() -> list[str]:
    script = Path(sys.executable).with_name("fabrik")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fabrik.entrypoints.cli"]


class Runner:
    """Runs commands with the benchmark's thread settings, logs each one, and reads bandwidth between cases."""

    def __init__(self, run_dir: Path, settings: Settings) -> None:
        self.run_dir = run_dir
        self.settings = settings
        self.commands: list[str] = []
        self.last_bw: dict[str, Any] | None = None
        self.record = True
        self.env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONUNBUFFERED": "1"}

    def bandwidth(self) -> dict[str, Any]:
        self.last_bw = bandwidth.measure(THREADS, self.settings.bw_mib, self.settings.bw_passes)
        return self.last_bw

    def run(self, command: list[str], log_name: str, env: dict[str, str] | None = None,
            timeout: float = 3600.0, check: bool = True) -> None:
        self.note(command, env)
        with open(self.run_dir / f"{log_name}.log", "w") as log:
            subprocess.run(command, check=check, stdout=log, stderr=subprocess.STDOUT,
                           env={**self.env, **(env or {})}, timeout=timeout)

    def note(self, command: list[str], env: dict[str, str] | None = None) -> None:
        """Records a command for the report (the first round's only: later rounds repeat them)."""
        if self.record:
            prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
            self.commands.append(f"{prefix} {' '.join(_short(c) for c in command)}".strip())

    def beside(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Runs one case between two bandwidth readings; the figure gets their mean."""
        before = self.last_bw or self.bandwidth()
        figure = fn()
        after = self.bandwidth()
        figure["bw_gbps"] = (before["gbps"] + after["gbps"]) / 2
        figure["bw_readings"] = [before["gbps"], after["gbps"]]
        return figure


def _short(arg: str) -> str:
    """Paths in recorded commands, relative to the cache or the repository so they read the same on every machine."""
    arg = os.path.normpath(arg) if arg.startswith("/") else arg
    for root, name in ((str(REPO), "."), (str(Path.home()), "~")):
        if arg.startswith(root):
            return name + arg[len(root):]
    return arg


# ---- offline cases ------------------------------------------------------------------------------------------------

def fabrik_latency(r: Runner, ckpt: Path, fmt: FabrikFormat, batch: int, tag: str) -> dict[str, Any]:
    s = r.settings
    out = r.run_dir / f"{tag}.json"
    r.run([*_fabrik(), "bench", "latency", "--model", str(ckpt), "--input-len", str(s.input_len), "--output-len",
           str(s.output_len), "--batch-size", str(batch), "--num-iters", str(s.num_iters), "--warmup", str(s.warmup),
           "--split", *fmt.args, "--json", str(out)], tag, fmt.env)
    raw = json.loads(out.read_text())
    return {"engine": "fabrik", "format": fmt.name, "batch": batch, "prefill_tps": raw["prefill_tokens_per_s"],
            "decode_tps_total": raw["decode_tokens_per_s_total"], "decode_tps_seq": raw["decode_tokens_per_s_per_seq"],
            "split": raw["decode_split"]}


def hf_latency(r: Runner, ckpt: Path, batch: int, tag: str) -> dict[str, Any]:
    s = r.settings
    out = r.run_dir / f"{tag}.json"
    r.run([sys.executable, str(REPO / "bench" / "hf_generate.py"), "--model", str(ckpt), "--input-len",
           str(s.input_len), "--output-len", str(s.output_len), "--batch-size", str(batch), "--num-iters",
           str(s.num_iters), "--warmup", str(s.warmup), "--threads", str(THREADS), "--json", str(out)], tag)
    raw = json.loads(out.read_text())
    return {"engine": "transformers", "format": "bf16", "batch": batch, "prefill_tps": raw["prefill_tokens_per_s"],
            "decode_tps_total": raw["decode_tokens_per_s_total"], "decode_tps_seq": raw["decode_tokens_per_s_per_seq"]}


def llama_bench(r: Runner, gguf: Path, qtype: str, tag: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    s = r.settings
    res = llamacpp.run_bench(gguf, THREADS, s.input_len, s.output_len, s.bench_reps, extra=extra)
    r.note(res["command"])
    (r.run_dir / f"{tag}.json").write_text(json.dumps(res, indent=2))
    return {"engine": "llama.cpp", "format": qtype, "batch": 1, "prefill_tps": res["pp_tokens_per_s"],
            "decode_tps_total": res["tg_tokens_per_s"], "decode_tps_seq": res["tg_tokens_per_s"],
            "decode_tps_empty_cache": res.get("tg_depth0_tokens_per_s")}


# ---- served cases -------------------------------------------------------------------------------------------------

def serve_levels(r: Runner, url: str, model: str, tag: str) -> list[dict[str, Any]]:
    """``fabrik bench serve`` once per concurrency level (2 x concurrency requests each)."""
    s = r.settings
    levels = []
    for i, c in enumerate(s.serve_levels):
        out = r.run_dir / f"{tag}-c{c}.json"
        r.run([*_fabrik(), "bench", "serve", "--base-url", url, "--model", model, "--concurrency", str(c),
               "--num-prompts", str(2 * c), "--input-len", str(s.serve_input_len), "--output-len",
               str(s.serve_output_len), "--warmup", "1" if i == 0 else "0", "--timeout", "900",
               "--json", str(out)], f"{tag}-c{c}", timeout=3600, check=False)
        # NOTE: exit code 1 only says a level completed no request; the JSON has the failures, and the report shows them.
        levels.extend(json.loads(out.read_text())["levels"])
    return levels


def _serve_figure(engine: str, fmt: str, levels: list[dict[str, Any]]) -> dict[str, Any]:
    return {"engine": engine, "format": fmt, "levels": [
        {"concurrency": lv["concurrency"], "completed": lv["completed"], "failed": lv["failed"],
         "output_tps": lv["output_throughput"], "ttft_ms_p50": lv["ttft_ms"]["p50"],
         "tpot_ms_p50": lv["tpot_ms"]["p50"]} for lv in levels]}


def fabrik_serve(r: Runner, ckpt: Path, fmt: FabrikFormat, tag: str) -> dict[str, Any]:
    port = llamacpp.free_port()
    max_seqs = max(16, *r.settings.serve_levels)
    command = [*_fabrik(), "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port), "--served-model-name",
               "bench", *fmt.args, "--max-num-seqs", str(max_seqs)]
    r.note(command, fmt.env)
    with llamacpp.Server(command, port, r.run_dir / f"{tag}-server.log", {**r.env, **fmt.env}) as srv:
        levels = serve_levels(r, srv.url, "bench", tag)
    return _serve_figure("fabrik", fmt.name, levels)


def llama_serve(r: Runner, gguf: Path, qtype: str, tag: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    s = r.settings
    ctx = s.serve_input_len + s.serve_output_len + 64
    srv = llamacpp.server(gguf, THREADS, max(s.serve_levels), ctx, r.run_dir / f"{tag}-server.log", extra=extra)
    r.note(srv.command)
    with srv:
        levels = serve_levels(r, srv.url, "bench", tag)
    return _serve_figure("llama.cpp", qtype, levels)


# ---- the run ------------------------------------------------------------------------------------------------------

def roofline(figures: list[dict[str, Any]], bytes_per_token: dict[tuple[str, str], int]) -> None:
    """Adds bytes per token, the roofline per-sequence decode rate and the fraction reached to every figure."""
    for f in figures:
        nbytes = bytes_per_token[(f["engine"], f["format"])]
        f["bytes_per_token"] = nbytes
        f["roofline_tps_seq"] = f["bw_gbps"] * 1e9 / nbytes
        if "levels" in f:
            for lv in f["levels"]:
                tpot = lv["tpot_ms_p50"]
                lv["roofline_fraction"] = 1e3 / tpot / f["roofline_tps_seq"] if tpot else None
        elif f["decode_tps_seq"] is not None:
            f["roofline_fraction"] = f["decode_tps_seq"] / f["roofline_tps_seq"]


def same_round_ratios(figures: list[dict[str, Any]]) -> None:
    """``vs_reference``: per-sequence decode rate over the reference's batch-1 decode rate of the same round."""
    ref = {f["round"]: f["decode_tps_seq"] for f in figures
           if (f["engine"], f["format"]) == REFERENCE and f["batch"] == 1}
    for f in figures:
        base = ref.get(f["round"])
        f["vs_reference"] = f["decode_tps_seq"] / base if base and f["decode_tps_seq"] else None


def _check_tools() -> None:
    """The converter's Python packages and gcc must be present; ``make bench`` installs the packages."""
    import importlib.util
    import shutil

    missing = [m for m in ("gguf", "sentencepiece") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"missing Python packages {missing}: run `make bench`, or pip install sentencepiece and "
                         f"\"$(python bench/llamacpp.py source)/gguf-py\"")
    for tool in ("gcc", "cmake"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed to build the bandwidth test and llama.cpp")


def run(settings: Settings, work: Path, out_dir: Path, quick: bool) -> Path:
    _check_tools()
    t_start = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = work / "runs" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    r = Runner(run_dir, settings)
    _log(f"work folder {run_dir}")

    name = "qwen3-0.6b-random" + (f"-{settings.layers}l" if settings.layers else "")
    ckpt = checkpoint.build(work / name, settings.layers)
    config = json.loads((ckpt / "config.json").read_text())
    counts = checkpoint.weight_counts(config)
    _log(f"checkpoint {ckpt}: {counts['matrix'] / 1e6:.0f}M matrix weights")
    t_build = time.monotonic()
    llamacpp.build()
    build_s = time.monotonic() - t_build
    ggufs = llamacpp.convert(ckpt, work / f"{name}-gguf")

    bytes_per_token: dict[tuple[str, str], int] = {("transformers", "bf16"): 2 * (counts["matrix"] + counts["vector"])}
    head = config["vocab_size"] * config["hidden_size"]
    for fmt in FABRIK_FORMATS:
        head_bytes = fmt.matrix_bytes_per_weight if fmt.head_bytes_per_weight is None else fmt.head_bytes_per_weight
        bytes_per_token[("fabrik", fmt.name)] = int(fmt.matrix_bytes_per_weight * (counts["matrix"] - head)
                                                    + head_bytes * head + 2 * counts["vector"])
    for qtype, path in ggufs.items():
        bytes_per_token[("llama.cpp", qtype)] = llamacpp.gguf_weight_bytes(path)
    # (label, GGUF, options) of every llama.cpp configuration: each GGUF as it is, then the KV cache variants.
    llama_runs = [(qtype, path, ()) for qtype, path in ggufs.items()]
    for label, qtype, extra in LLAMA_KV_VARIANTS:
        if qtype in ggufs:
            llama_runs.append((label, ggufs[qtype], extra))
            bytes_per_token[("llama.cpp", label)] = bytes_per_token[("llama.cpp", qtype)]

    offline: list[tuple[str, Callable[[str], dict[str, Any]]]] = []
    for fmt in FABRIK_FORMATS:
        for b in settings.batch_sizes:
            offline.append((f"fabrik-{fmt.name}-b{b}", lambda tag, fmt=fmt, b=b: fabrik_latency(r, ckpt, fmt, b, tag)))
    for label, path, extra in llama_runs:
        offline.append((f"llama-bench-{label}", lambda tag, p=path, q=label, x=extra: llama_bench(r, p, q, tag, x)))
    for b in settings.batch_sizes:
        offline.append((f"hf-b{b}", lambda tag, b=b: hf_latency(r, ckpt, b, tag)))
    served: list[tuple[str, Callable[[str], dict[str, Any]]]] = []
    for fmt in FABRIK_FORMATS:
        served.append((f"serve-fabrik-{fmt.name}", lambda tag, fmt=fmt: fabrik_serve(r, ckpt, fmt, tag)))
    for label, path, extra in llama_runs:
        served.append((f"serve-llama-{label}", lambda tag, p=path, q=label, x=extra: llama_serve(r, p, q, tag, x)))

    figures: list[dict[str, Any]] = []
    serve_figures: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for rounds, cases, sink in ((settings.rounds, offline, figures), (settings.serve_rounds, served, serve_figures)):
        for k in range(rounds):
            r.record = k == 0
            for label, case in cases:
                tag = f"r{k}-{label}".replace(" ", "_")
                _log(f"round {k + 1}/{rounds}: {label}")
                try:
                    figure = r.beside(lambda: case(tag))
                except (subprocess.SubprocessError, RuntimeError, OSError, ValueError, KeyError) as exc:
                    # NOTE: one broken case (say a new fabrik format) must not void the other figures of the run.
                    _log(f"{label} failed: {exc!r}; logs in {run_dir}/{tag}*")
                    failures.append({"case": label, "round": k, "error": repr(exc), "logs": f"{tag}*"})
                    continue
                figure["round"] = k
                sink.append(figure)
                (run_dir / "results.json").write_text(json.dumps(
                    {"offline": figures, "serve": serve_figures, "failures": failures}, indent=2))
    roofline(figures + serve_figures, bytes_per_token)
    same_round_ratios(figures)

    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "quick": quick, "settings": dataclasses.asdict(settings),
            "threads": THREADS, "machine": machine(), "versions": versions(), "commands": r.commands,
            "bytes_per_token": {f"{e} {f}": n for (e, f), n in bytes_per_token.items()},
            "checkpoint": {"layers": config["num_hidden_layers"], **counts},
            "llama_build": llamacpp.build_info(), "llama_build_seconds_this_run": round(build_s, 1),
            "run_dir": _short(str(run_dir)), "elapsed_s": None}
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    results = {"meta": meta, "offline": figures, "serve": serve_figures, "failures": failures}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out_dir)
    report = out_dir / "benchmarks.md"
    report.write_text(render(results, plots))
    _log(f"wrote {report} and {', '.join(p.name for p in plots) or 'no plots (matplotlib missing)'} "
         f"in {meta['elapsed_s'] / 60:.1f} min")
    return report


def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if re.search(rf"\b{f}\b", flags)]
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "memory_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "os": _os_name()}


def _os_name() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return platform.system()
    match = re.search(r'^PRETTY_NAME="?([^"\n]+)', text, re.M)
    return match.group(1) if match else platform.system()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import torch
    import transformers

    fabrik_version = version("fabrik")

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return {"fabrik": f"{fabrik_version} {commit}{dirty}", "torch": torch.__version__,
            "transformers": transformers.__version__, "llama.cpp": llamacpp.version_string(),
            "llama-cpp-python sdist": llamacpp.VERSION, "python": platform.python_version(), "gcc": gcc}


# ---- report -------------------------------------------------------------------------------------------------------

def _med(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _groups(figures: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for f in figures:
        groups.setdefault(tuple(f[k] for k in keys), []).append(f)
    return groups


def render(results: dict[str, Any], plots: list[Path]) -> str:
    meta, s = results["meta"], results["meta"]["settings"]
    m, v = meta["machine"], meta["versions"]
    lines = ["# Benchmarks", ""]
    if meta["quick"]:
        lines += ["> **QUICK MODE** (`--quick`): tiny sizes, one round, a 2-layer model. A smoke test of the",
                  "> pipeline; these figures mean nothing.", ""]
    lines += [
        f"Generated by `make bench` (`bench/run_all.py`) on {meta['date']} in {meta['elapsed_s'] / 60:.1f} minutes. "
        "Re-run `make bench` to regenerate this page and its plots; raw figures went to "
        f"`{meta['run_dir']}/results.json`.",
        "",
        f"Model: random weights in the Qwen3-0.6B shape ({meta['checkpoint']['layers']} layers, hidden 1024, 16/8 "
        "heads, head_dim 128, FFN 3072, vocab 151,936, tied embeddings) with the real Qwen3 tokenizer, bf16 "
        f"safetensors; {meta['checkpoint']['matrix'] / 1e6:.0f}M matrix weights. Random weights give garbage text, "
        "so every engine ignores EOS and generates exactly the requested number of tokens. "
        f"Every engine runs with {meta['threads']} threads.",
        "",
        "## Machine", "",
        f"- CPU: {m['cpu']}, {m['cores']} cores ({', '.join(m['isa'])}), {m['memory_gib']} GiB",
        f"- OS: {m['os']}, kernel {m['kernel']}",
        "",
        "## Versions", "",
        *[f"- {k}: {val}" for k, val in v.items()],
        "",
        "## Roofline", "",
        "Decoding reads every weight once per step, so a step cannot be faster than `bytes of weights / memory read "
        f"bandwidth`. The bandwidth is a 2-thread streaming read of a {s['bw_mib']} MiB array (`bench/bandwidth.py`, "
        f"best of {s['bw_passes']} passes), taken just before and just after each figure; the figure gets their mean "
        "(it swings ~1.6x within minutes on these machines). The *roofline fraction* of a decode figure is its "
        "per-sequence rate over `bandwidth / bytes per token`: at batch B one step serves B sequences for one read "
        "of the weights. The KV cache read (~114,688 bytes per context token in bf16) is not counted, so fractions "
        "slightly understate long contexts.",
        "",
        "| weights | bytes per token (GB) |", "|---|---|",
        *[f"| {k} | {n / 1e9:.3f} |" for k, n in meta["bytes_per_token"].items()],
        "",
        "## Offline", "",
        f"Prompt {s['input_len']} tokens, {s['output_len']} generated; {s['rounds']} round(s), the cases interleaved "
        "within each round; medians over the rounds. llama.cpp: `llama-bench` "
        f"pp{s['input_len']} on an empty cache / tg{s['output_len']} after {s['input_len']} tokens of context "
        f"(`-d {s['input_len']}`: every engine decodes after its {s['input_len']}-token prompt; llama.cpp's "
        "empty-cache tg is in the run's results.json as `decode_tps_empty_cache`) (batch 1 only). "
        "fabrik: `fabrik bench latency`. transformers: "
        "`bench/hf_generate.py` (`generate`, prefill timed as a 1-token generate). "
        f"*vs {' '.join(REFERENCE)}*: per-sequence decode rate over {' '.join(REFERENCE)} tg in the same round.",
        "",
        "| engine | weights | batch | prefill tok/s | decode tok/s total | decode tok/s per seq | GB/s beside "
        f"| roofline tok/s per seq | roofline fraction | vs {' '.join(REFERENCE)} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (engine, fmt, batch), fs in _groups(results["offline"], ("engine", "format", "batch")).items():
        lines.append(
            f"| {engine} | {fmt} | {batch} | {_f(_med([f['prefill_tps'] for f in fs]))} "
            f"| {_f(_med([f['decode_tps_total'] for f in fs]))} | {_f(_med([f['decode_tps_seq'] for f in fs]))} "
            f"| {_f(_med([f['bw_gbps'] for f in fs]))} | {_f(_med([f['roofline_tps_seq'] for f in fs]))} "
            f"| {_pct(_med([f.get('roofline_fraction') for f in fs]))} "
            f"| {_f(_med([f.get('vs_reference') for f in fs]), 2)} |")
    lines += ["", "Every figure, in the order measured:", "",
              "| round | engine | weights | batch | decode tok/s per seq | GB/s before, after | roofline fraction |",
              "|---|---|---|---|---|---|---|"]
    for f in results["offline"]:
        lines.append(f"| {f['round'] + 1} | {f['engine']} | {f['format']} | {f['batch']} | {_f(f['decode_tps_seq'])} "
                     f"| {_f(f['bw_readings'][0])}, {_f(f['bw_readings'][1])} | {_pct(f.get('roofline_fraction'))} |")
    split_rows = [f for f in results["offline"] if f.get("split")]
    if split_rows:
        lines += [
            "", "### Where a fabrik decode step goes", "",
            "`fabrik bench latency --split` (the same runs): mean milliseconds per decode step, from the native "
            "forward's own timers (the LM head runs in the same call). *Outside the matmuls* = step less the linears "
            "and the LM head (attention with its per-head norms, rotary and K/V stores; RMSNorms, SiLU-and-multiply; "
            "the engine's Python and sampling).", "",
            "| round | weights | batch | step | linears | LM head | attention | other forward | outside the forward "
            "| outside the matmuls |",
            "|---|---|---|---|---|---|---|---|---|---|"]
        for f in split_rows:
            x = f["split"]
            lines.append(f"| {f['round'] + 1} | {f['format']} | {f['batch']} | {_f(x['step_ms'])} "
                         f"| {_f(x['linears_ms'])} | {_f(x['lm_head_ms'])} | {_f(x['attention_ms'], 2)} "
                         f"| {_f(x['forward_other_ms'], 2)} | {_f(x['outside_forward_ms'], 2)} "
                         f"| {100 * x['outside_matmuls_fraction']:.1f}% |")
    lines += [
        "", "## Served", "",
        f"`fabrik bench serve` (streaming `/v1/completions`, token-id prompts of {s['serve_input_len']} tokens, "
        f"{s['serve_output_len']} generated, `ignore_eos`) at concurrency {', '.join(map(str, s['serve_levels']))} "
        "with 2 x concurrency requests per level, against `fabrik serve` and against `llama-server` with as many "
        "slots as the highest concurrency. Decode rate per sequence = 1000 / median TPOT.",
        "",
        "| engine | weights | concurrency | ok / failed | output tok/s | TTFT p50 ms | TPOT p50 ms | GB/s beside "
        "| roofline fraction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in results["serve"]:
        for lv in f["levels"]:
            lines.append(f"| {f['engine']} | {f['format']} | {lv['concurrency']} | {lv['completed']} / {lv['failed']} "
                         f"| {_f(lv['output_tps'])} | {_f(lv['ttft_ms_p50'])} | {_f(lv['tpot_ms_p50'])} "
                         f"| {_f(f['bw_gbps'])} | {_pct(lv['roofline_fraction'])} |")
    if results["failures"]:
        lines += ["", "## Failed cases", "", "Logs are in the run folder (`results.json` names it).", "",
                  *[f"- round {f['round'] + 1}, {f['case']}: `{f['error']}` (logs `{f['logs']}`)"
                    for f in results["failures"]]]
    if plots:
        lines += ["", "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots]]
    build = meta["llama_build"] or {}
    lines += [
        "", "## Commands", "",
        "Reproduce with `make bench` (full) or `BENCH_QUICK=1 make bench` (smoke test). llama.cpp is built from the "
        f"llama-cpp-python {v['llama-cpp-python sdist']} source distribution (PyPI) with "
        f"`cmake {' '.join(build.get('cmake_flags', []))}` into `~/.cache/fabrik/llama.cpp/` "
        f"(built in {_f(build.get('build_seconds'), 0)} s, reused afterwards); GGUFs come from its "
        "`convert_hf_to_gguf.py --outtype bf16` then `llama-quantize`. The commands of the first round, in order "
        "(later rounds repeat them with other output files):", "", "```",
        *meta["commands"], "```", ""]
    return "\n".join(lines)


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Decode rate against roofline per engine, and served output tokens/s per concurrency; none without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = _groups(results["offline"], ("engine", "format", "batch"))
    labels = [f"{e}\n{f} b{b}" for e, f, b in groups]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 4.5))
    xs = range(len(labels))
    ax.bar(xs, [_med([f["decode_tps_seq"] for f in fs]) or 0 for fs in groups.values()], label="measured")
    ax.scatter(xs, [_med([f["roofline_tps_seq"] for f in fs]) for fs in groups.values()], marker="_", s=600,
               color="black", label="roofline (bandwidth / bytes per token)")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("decode tokens/s per sequence")
    ax.set_title("Decode speed against the memory roofline (2 threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "bench-decode.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if results["serve"]:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for f in results["serve"]:
            levels = f["levels"]
            ax.plot([lv["concurrency"] for lv in levels], [lv["output_tps"] for lv in levels], marker="o",
                    label=f"{f['engine']} {f['format']}" + (f" (round {f['round'] + 1})" if f["round"] else ""))
        ax.set_xscale("log", base=2)
        levels = results["meta"]["settings"]["serve_levels"]
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens/s")
        ax.set_title("Served throughput (streaming /v1/completions)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "bench-serve.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
                        help="tiny sizes, one round: a smoke test (also BENCH_QUICK=1)")
    parser.add_argument("--rounds", type=int, default=None, help="offline rounds (default 2; quick 1)")
    parser.add_argument("--work", default=str(bandwidth.CACHE_DIR), help="checkpoints, GGUFs and raw results")
    parser.add_argument("--out", default=None, help="report folder (default docs/; quick: WORK/quick)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            raise SystemExit(f"--rounds ({args.rounds}) must be >= 1")
        settings = dataclasses.replace(settings, rounds=args.rounds)
    work = Path(args.work)
    out = Path(args.out) if args.out else (work / "quick" if args.quick else REPO / "docs")
    run(settings, work, out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
