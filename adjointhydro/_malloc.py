"""Keep freed memory in the process on Linux (glibc), for the solver's allocation pattern.

A gradient solves its record in chunks: each chunk's replay allocates a few hundred MB
of activations (at 256 basins) and frees them all when its reverse pass ends. glibc
hands such a free block at the top of the heap straight back to the kernel (its trim
threshold is at most 64 MB), so the next chunk gets new pages that the kernel must map
and zero again: about 100,000 page faults and 10-15% of the time of a 256-basin x 1-year
gradient on a CPU (docs/benchmarks.md). Raising the trim threshold keeps those pages
for the next chunk; the peak memory is the same, and the memory stays with the process
after the solve, as it would with jemalloc or tcmalloc.

Applied once per process, on the first :func:`adjointhydro.solve`. It changes the
allocator of the whole process (as ``LD_PRELOAD`` of another allocator would); set the
environment variable ``ADJOINTHYDRO_MALLOC_TUNING=0`` to leave glibc's defaults.
"""
from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest dynamic mmap threshold on 64-bit: blocks above it (big data arrays)
# still go to mmap and are returned to the kernel when freed
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30

_state: dict = {"tried": False, "applied": False}


def tune() -> bool:
    """Raise glibc's trim and mmap thresholds once; whether they are raised (False off glibc or when disabled)."""
    if _state["tried"]:
        return _state["applied"]
    _state["tried"] = True
    if os.environ.get("ADJOINTHYDRO_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # (the mmap threshold first: setting either fixes both, ending glibc's own adjustment)
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _state["applied"] = bool(ok)
    return _state["applied"]
