"""Host memory freed during an erase is kept for reuse instead of going back to the kernel.

An erase frees and allocates the same large buffers every iteration: weight gradients,
convolution workspaces, activations. glibc serves blocks above its mmap threshold (128 KiB,
raised on its own up to 32 MiB) with fresh ``mmap`` calls and unmaps them when freed, so every
iteration the kernel page-faults and zero-fills them again: on this project's 2-core machine a
fresh 59 MB buffer (one SD v1.4 weight gradient) takes 14 ms to fill, a reused one 1.3 ms. With
glibc's mmap off and its trim threshold high, freed blocks stay in the heap and the next
iteration takes them back. Nothing computed changes (same kernels on the same values); only
where buffers come from. Measured in benchmarks/memory.py (README, Performance): SD v1.4 class
mode at 64 px float32, 6.3 -> 3.1 s per iteration side by side, peak within 1%.

glibc only (other C libraries, macOS, Windows: nothing changes), CPU erases only (a GPU run's
large buffers live in CUDA's own caching allocator). The settings are process-wide; on exit they
go back to glibc's defaults (or the ``MALLOC_*_`` environment variables) and the kept memory is
returned with ``malloc_trim``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

import torch

# mallopt parameters (malloc.h) and what the erase sets them to
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEEP = {M_TRIM_THRESHOLD: 2**31 - 1, M_MMAP_MAX: 0}  # mallopt takes a C int
GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}
ENVIRONMENT = {M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", M_MMAP_MAX: "MALLOC_MMAP_MAX_"}


def glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None when the C library is another one."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no confstr name, or no such library
        return None


def _restored() -> dict[int, int]:
    """What the process ran with before: the environment's ``MALLOC_*_`` values, else glibc's."""
    values = dict(GLIBC_DEFAULTS)
    for param, name in ENVIRONMENT.items():
        with contextlib.suppress(KeyError, ValueError):
            values[param] = int(os.environ[name])
    return values


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool, device: torch.device) -> Iterator[bool]:
    """Inside: glibc keeps freed blocks for reuse (CPU erases). Yields whether it is in effect."""
    libc = glibc() if enabled and device.type == "cpu" else None
    if libc is None:
        yield False
        return
    applied = all([libc.mallopt(param, value) == 1 for param, value in KEEP.items()])  # set both
    try:
        yield applied
    finally:
        for param, value in _restored().items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)  # give the kept blocks back once the loop is done
