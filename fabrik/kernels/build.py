"""Pre-builds the native kernel library into its cache: ``python -m fabrik.kernels.build [--force]``.

The install step runs this so that the first model load does not wait for the compiler. Exits 0 and prints the
library's path, or exits 1 with the compiler's message (the engine then still runs, on the torch kernels).
"""

from __future__ import annotations

import argparse
import sys

from fabrik.kernels.native import KernelBuildError, best_isa, build, cpu_flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached library exists")
    args = parser.parse_args(argv)
    try:
        path = build(force=args.force)
    except KernelBuildError as exc:
        print(f"fabrik: native kernels not built, the torch kernels will be used: {exc}", file=sys.stderr)
        return 1
    isa = {1: "avx512 (bf16, vnni)", 2: "avx2"}.get(best_isa(cpu_flags()), "none: this CPU will use torch")
    print(f"{path} (kernels for this CPU: {isa})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
