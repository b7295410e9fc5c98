"""Process memory settings that make memory come back after a large frame.

glibc's malloc serves an allocation above its mmap threshold with a fresh mapping and
unmaps it on free, so that memory returns to the system at once; smaller ones come from
the heap, which keeps what is freed for reuse. The threshold starts at 128 KiB but is
*dynamic*: each time a mapped block is freed, the threshold rises to that block's size
(up to 32 MiB). One large frame therefore teaches malloc to serve every later block of
that size from the heap, where freed memory stays: a server that decoded a few large
images kept gigabytes resident afterwards.

:func:`pin_malloc_thresholds` fixes the threshold (which turns the dynamic adjustment off)
and the heap's trim threshold. Blocks of a decoded frame or larger (``MMAP_THRESHOLD``)
are then always mapped and returned on free; the many smaller temporaries of face work
keep coming from the heap, where reuse costs no page faults. Called once at start-up by
``facesvc serve`` in every worker process. No-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 20
"""Blocks of 1 MiB and more are mapped: every decoded frame (640x480 RGB is 0.9 MB), the
detector's inputs and the decoder's buffers; smaller ones reuse the heap."""
TRIM_THRESHOLD = 8 << 20
"""Free memory at the top of the heap beyond this is given back to the system."""


def pin_malloc_thresholds(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True when they were set
    (False where the C library is not glibc or refuses the values, logged)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.warning("no glibc mallopt: memory after large frames may stay resident")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success and 0 on error.
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1)
    ok = bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1) and ok
    if not ok:
        log.warning("mallopt refused the malloc thresholds; memory may stay resident")
    return ok
