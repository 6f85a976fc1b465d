"""`train.tune_malloc`: keep freed activation memory in the process instead of handing it back to the OS.

glibc's malloc serves blocks above a threshold (128 KiB, rising with use up to 32 MiB) with mmap and returns them
at once when freed, and trims the heap top above a threshold; a CPU training step then maps fresh pages for its
activations every step (page faults in the kernel). With `mmap_max = 0` and a high trim threshold the heap keeps
those pages: faster steps on some CPU machines, at a higher resident size that never shrinks. Off by default; set
in-process with `mallopt`, before the model's first large allocation, and only for this process (no restart, no
environment variable for child processes to inherit).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB, the largest it accepts


def keep_freed_memory() -> bool:
    """mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2 GiB) in this process. Returns whether glibc took
    both (False, with a warning, on other C libraries)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.warning("train.tune_malloc: no glibc mallopt in this process (C library %r); left as it is", name)
        return False
    done = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        logger.warning("train.tune_malloc: mallopt refused the settings; malloc left as it is")
    return done
