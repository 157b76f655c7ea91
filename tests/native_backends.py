"""The native kernel sets this CPU runs, by backend name: both on an AVX-512 machine (the AVX2 kernels are compiled
into the same library and forced with ``native-avx2``), so the AVX2 path is tested there too (issue #27)."""

from __future__ import annotations

from fabrik.kernels.native import ISA_AVX2, ISA_AVX512, best_isa, cpu_flags

BEST_ISA = best_isa(cpu_flags())
NATIVE_NAMES = [name for name, isa in (("native-avx512", ISA_AVX512), ("native-avx2", ISA_AVX2))
                if BEST_ISA is not None and (BEST_ISA == ISA_AVX512 or isa == ISA_AVX2)]
