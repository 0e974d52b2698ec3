"""Host memory: keep freed tensor memory in the process for reuse instead of handing it back to the OS.

PyTorch's CPU tensors come from the C library's malloc. glibc serves large blocks (above a threshold
that adapts up to 32 MB) with fresh `mmap` pages and unmaps them on free, and trims the heap when its free
top grows, so a training step that allocates the same large activations every step page-faults on each
first touch of them: ~1,500 faults per V-MoE block's forward and backward at the Fashion-MNIST recipes'
shapes, about 1 ms. The MoE block's buffers hold K x cf times the tokens of a dense MLP, so it pays
more of this than its dense twin. Turning off mmap and trimming makes the heap keep what was freed
(jemalloc and tcmalloc behave so by default); the cost is that the process keeps its peak size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
KEEP = 2**31 - 1  # the largest trim threshold mallopt takes (an int): free heap top up to 2 GiB is kept


def keep_freed_memory() -> bool:
    """Have glibc serve every block from its heap and keep freed memory; False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP))
