"""fabrik against llama.cpp on one instruction set, interleaved: batch-1 decode (tg128 after a 512-token prompt) and
prefill (pp512), 2 threads, with the memory bandwidth read beside every figure.

Made for measuring the AVX2 path on an AVX-512 machine (issue #27): ``--no-avx512`` compiles fabrik's native library
with ``-march=native -mno-avx512f`` (a compiler wrapper and a kernel cache of its own), so that the code outside the
linear kernels (attention, row ops: compiled for the build machine) is AVX2 too, and ``--kernels native-avx2`` picks
the AVX2 linear kernels. The llama.cpp peer must be built the same way, e.g. into ``~/.cache/fabrik-avx2``::

    cmake flags: -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                 -DGGML_AVX512=OFF (and every AVX512_*, AVX_VNNI, AMX_* OFF)

Each ``--trees`` entry is one fabrik source tree (``LABEL=PATH``, imported through PYTHONPATH), so the same script
A/B-tests two branches (``--trees new=/work/wt/x,main=/work/main --kernels native-avx512 --llama ''``).

Usage::

    python bench/isa_peers.py --model CKPT --gguf-dir DIR --llama-bin BIN_DIR --no-avx512 --kernels native-avx2 \
        [--formats int4,int8] [--llama Q4_0,Q8_0] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import bandwidth  # noqa: E402

THREADS = 2
INPUT_LEN = 512
OUTPUT_LEN = 128
PEER = {"int4": "Q4_0", "int8": "Q8_0", "bf16": "BF16"}
"""fabrik format -> the llama.cpp format it is compared with."""


def _compiler_without_avx512(folder: Path) -> Path:
    """A gcc wrapper that drops AVX-512 after fabrik's ``-march=native`` (the last -m flag wins)."""
    path = folder / "gcc-no-avx512"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text('#!/bin/sh\nexec gcc "$@" -mno-avx512f\n')
        path.chmod(0o755)
    return path


def fabrik_case(tree: Path, fmt: str, kernels: str, model: str, env: dict[str, str], out: Path) -> dict[str, Any]:
    quant = () if fmt == "bf16" else ("--quantization", fmt)
    command = [sys.executable, "-m", "fabrik.entrypoints.cli", "bench", "latency", "--model", model, "--input-len",
               str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--batch-size", "1", "--num-iters", "1", "--warmup",
               "1", "--dtype", "bfloat16", *quant, "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=tree,
                   env={**env, "PYTHONPATH": str(tree), "FABRIK_KERNELS": kernels})
    raw = json.loads(out.read_text())
    return {"tg": raw["decode_tokens_per_s_total"], "pp": raw["prefill_tokens_per_s"]}


def llama_case(bin_dir: Path, gguf: Path) -> dict[str, Any]:
    command = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(THREADS), "-p", str(INPUT_LEN), "-n",
               str(OUTPUT_LEN), "-d", f"0,{INPUT_LEN}", "-r", "2", "-o", "json"]
    rows = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    tg = [r["avg_ts"] for r in rows if r["n_gen"] > 0 and r.get("n_depth", 0) == INPUT_LEN]
    pp = [r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0 and r.get("n_depth", 0) == 0]
    return {"tg": tg[0], "pp": pp[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder (the GGUFs' source)")
    p.add_argument("--gguf-dir", type=Path, help="folder with model-<TYPE>.gguf")
    p.add_argument("--llama-bin", type=Path, help="folder with llama-bench")
    p.add_argument("--trees", default=f"fabrik={Path(__file__).parents[1]}", help="LABEL=PATH[,LABEL=PATH]")
    p.add_argument("--kernels", default="native-avx2", help="FABRIK_KERNELS of every fabrik case")
    p.add_argument("--no-avx512", action="store_true", help="compile fabrik's library with -mno-avx512f")
    p.add_argument("--formats", default="int4,int8", help="fabrik formats (bf16, int8, int4, int4-g128, ...)")
    p.add_argument("--llama", default="Q4_0,Q8_0", help="llama.cpp GGUF types ('' for none)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fabrik-isa-peers")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    # NOTE: no .pyc files written into the trees compared (they may be other people's checkouts).
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    variant = "no-avx512" if args.no_avx512 else "native"
    env["FABRIK_KERNEL_CACHE"] = str(args.cache / f"kernels-{variant}")
    if args.no_avx512:
        env["CC"] = str(_compiler_without_avx512(args.cache))
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    cases: list[tuple[str, Any]] = []
    for label, tree in trees.items():
        for fmt in filter(None, args.formats.split(",")):
            cases.append((f"fabrik[{label}] {fmt}", lambda out, t=Path(tree), f=fmt:
                          fabrik_case(t, f, args.kernels, args.model, env, out)))
    for qtype in filter(None, args.llama.split(",")):
        cases.append((f"llama.cpp {qtype}", lambda out, q=qtype: llama_case(args.llama_bin,
                                                                            args.gguf_dir / f"model-{q}.gguf")))
    figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for name, fn in cases:
                before = bandwidth.measure(THREADS, 1024, 3)["gbps"]
                fig = fn(Path(tmp) / "out.json")
                after = bandwidth.measure(THREADS, 1024, 3)["gbps"]
                fig.update(case=name, round=rnd, bw=(before + after) / 2)
                figures.append(fig)
                print(f"round {rnd} {name:28s} tg128 {fig['tg']:7.1f}  pp512 {fig['pp']:7.1f}  "
                      f"bw {fig['bw']:5.1f} GB/s", flush=True)
    print(f"\n{'case':28s} {'tg128 median':>12s} {'pp512 median':>12s}  rounds")
    for name, _ in cases:
        mine = [f for f in figures if f["case"] == name]
        print(f"{name:28s} {statistics.median(f['tg'] for f in mine):12.1f} "
              f"{statistics.median(f['pp'] for f in mine):12.1f}  "
              + " / ".join(f"{f['tg']:.1f}" for f in mine))
    for name, _ in cases:  # same-round ratios of each fabrik format to its llama.cpp peer
        if not name.startswith("fabrik"):
            continue
        peer = f"llama.cpp {PEER.get(name.split()[-1].split('-')[0], '')}"
        for key in ("tg", "pp"):
            ratios = [a[key] / b[key] for a in figures if a["case"] == name
                      for b in figures if b["case"] == peer and b["round"] == a["round"]]
            if ratios:
                print(f"{name} / {peer} {key}: " + " / ".join(f"{r:.2f}" for r in ratios)
                      + f"  (median {statistics.median(ratios):.2f})")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"gguf_dir": str(args.gguf_dir),
                                                                "llama_bin": str(args.llama_bin),
                                                                "cache": str(args.cache), "json": str(args.json)},
                                         "cpu": subprocess.run(["lscpu"], capture_output=True, text=True).stdout,
                                         "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
