"""Keep the host memory tensors were freed from, instead of returning it to the kernel after each use.

glibc's malloc hands large freed blocks back (munmap, or trimming the heap top) and page-faults them in
again on the next use; every denoising step and every VAE frame frees and reallocates the same sizes. On
a CPU run of the bench model, fixed thresholds take the page faults from 1.5 to 1.1 million and the
kernel time by a fifth, most of it in the VAE decode. The peak is unchanged; what is freed stays with the
process for reuse. Not for a run whose DiT is sharded: there the blocks FSDP gathers and frees every step
would stay with the process too, and take back most of what sharding saves (README, Memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# The largest glibc takes (HEAP_MAX_SIZE / 2 on 64-bit): blocks below it come from the heap and are reused.
_MMAP_THRESHOLD = 32 * 2**20


def keep_freed_host_memory(*, top_pad: int = 256 * 2**20) -> bool:
    """Apply the thresholds to this process (glibc only; elsewhere a no-op). True when applied."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in (
        # Setting it also stops glibc's own threshold from moving.
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
        # Never trim the heap top: what one step freed, the next one needs.
        (_M_TRIM_THRESHOLD, 2**31 - 1),
        (_M_TOP_PAD, top_pad),
    ))
    if not applied:
        log.debug("mallopt refused a threshold; host memory is returned to the kernel as usual")
    return applied
