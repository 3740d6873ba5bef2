"""The C allocator of a training process: on Linux, keep freed memory for reuse.

torch's CPU tensors come from malloc, and glibc hands every freed block above a threshold back
to the system; the next tensor of that size is then faulted in again, page by page. On a CPU the
faults cost more than the work written into the memory: at B = 128, filling a new 94 MB tensor
took 25 ms against 6 ms for refilling an existing one. Told to keep freed blocks of up to 1 GiB,
glibc reuses them: on a 2-core CPU a bare training step at B = 128 ran 1004-1034 ms against
1131-1249 ms by default, and the training command's epochs 5-15% faster (docs/PERF.md,
2026-11-30). The price: the process's resident memory stays near its peak between steps
instead of shrinking back.
"""

import ctypes
import os
import sys

__all__ = ["USER_SETTINGS", "keep_freed_memory"]

# mallopt's parameters (malloc.h): the free space at the top of the heap that is kept rather than
# returned, and the size from which a block gets its own mapping (returned whole when freed).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30
# The user's own allocator settings, which win.
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_memory():
    """Set glibc's malloc to keep freed blocks of up to 1 GiB for reuse; True if it did.

    Does nothing (False) off Linux, without glibc's mallopt, or where the environment already
    chooses the allocator or its thresholds (the variables in USER_SETTINGS)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt                     # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES))
