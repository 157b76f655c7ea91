"""Ending the calling thread's OpenMP worker pool.

libgomp (torch's copy, which the native kernels share: the process loads one ``libgomp.so.1``) keeps one pool of
workers per thread that has run a parallel region, and once it manages more threads than there are CPUs it lets idle
workers spin only ~100 times (~2.5 us here) before they sleep. A model loaded on one thread and stepped on another
leaves the loader's pool beside the stepping thread's, and the stepping thread's workers then sleep and wake at every
parallel region of every step (docs/kernels.md, NOTE under Build).
"""

from __future__ import annotations

import ctypes
import os

_OMP_PAUSE_SOFT = 1


def release_openmp_threads() -> bool:
    """Ends the OpenMP workers the calling thread started (``omp_pause_resource_all``); a later parallel region on
    this thread starts new ones. Returns False when no libgomp is loaded or it refused (called inside a region)."""
    try:
        libgomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)  # only the copy already loaded: that is the one used
    except OSError:
        return False
    return libgomp.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
