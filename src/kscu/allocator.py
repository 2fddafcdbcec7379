"""Host memory freed during an erase or a sampling walk: kept for reuse or given back.

An erase frees and allocates the same large buffers every iteration (weight gradients,
convolution workspaces, activations), and a sampling walk every step. glibc serves blocks above
its mmap threshold (128 KiB, raised on its own up to 32 MiB) with fresh ``mmap`` calls and
unmaps them when freed, so the kernel page-faults and zero-fills them again each time: on this
project's 2-core machine a fresh 59 MB buffer (one SD v1.4 weight gradient) takes 14 ms to fill,
a reused one 1.3 ms. With glibc's mmap off and its trim threshold high, freed blocks stay in the
heap and the next iteration takes them back. Nothing computed changes (same kernels on the same
values); only where buffers come from. Measured in benchmarks/memory.py (README, Performance):
SD v1.4 class mode at 64 px float32, 6.3 -> 3.1 s per iteration side by side, peak within 1%.

The ``mallopt`` settings are glibc's (other C libraries, macOS, Windows: nothing changes), for
CPU work only (a GPU's buffers are CUDA's caching allocator's); the huge-page request is torch's
and applies wherever the kernel offers them. The settings are process-wide. glibc cannot be put
back exactly afterwards: any ``mallopt`` call ends its dynamic threshold for the process, so on
exit mmap is allowed again above the largest threshold glibc would reach on its own (32 MiB,
trim threshold 64 MiB) unless the ``MALLOC_*_`` environment variables said otherwise, and
``malloc_trim`` returns what was kept. Worker threads' arenas still mmap single blocks over 64 MiB.

Kept blocks can fragment the heap: FLUX.1-width erases (18-90 MB activations and weight copies
between small blocks that live on) measured a resident set 20-40% above the plan. The other
setting, ``reuse=False`` (``--no-reuse-freed-memory``; a FLUX erase's default, the family's
table in ``kscu.families.flux``), fixes glibc's mmap threshold at 1 MiB:
a block that large which the heap cannot serve from what it holds gets its own mapping and goes
back to the system when freed, so the resident set tracks the live tensors (what ``--plan``
counts, and what CUDA's max-allocated reports). Fresh pages cost page faults; with torch's huge
pages for its buffers of 2 MB and more (``torch_huge_pages``) a FLUX.1-width iteration
measured 1.1x-1.4x slower than with kept blocks, SD v1.4 at 64 px 1.36x slower (README),
so SD and SDXL keep freed blocks by default.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
INT_MAX = 2**31 - 1  # mallopt takes a C int; ctypes would silently wrap anything larger
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: INT_MAX}
RETURN_FROM = 2**20  # bytes: new blocks this large get their own mapping (reuse=False)
# the trim threshold at twice the mmap threshold, the ratio glibc's own adjustment keeps
RETURN = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: RETURN_FROM, M_TRIM_THRESHOLD: 2 * RETURN_FROM}
LABELS = {True: "freed blocks kept for reuse", False: "freed blocks of 1 MiB and more returned"}
# afterwards: glibc's own defaults where it has static ones, and where its dynamic threshold
# ends up (which a mallopt call has switched off) for the two thresholds
AFTER = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20}
ENVIRONMENT = {
    M_MMAP_MAX: "MALLOC_MMAP_MAX_",
    M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_",
    M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_",
}
_state: dict = {"depth": 0, "label": None}  # open contexts (nested ones leave it to the outermost)
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")  # "[madvise]": on request only
_MAPPING = re.compile(r"([0-9a-f]+)-([0-9a-f]+) ")  # a mapping's first line in /proc/self/smaps
NO_HUGE_PAGES = (
    "freed memory is returned to the system (a FLUX erase's default on a CPU), but torch gets "
    "4 KB pages: it made a tensor before kscu could ask it for huge pages, and each fresh buffer "
    "then costs more page faults (FLUX-width 1+1: 21-24 s per iteration, 17-19 s with huge "
    "pages); set THP_MEM_ALLOC_ENABLE=1 before importing torch, or pass reuse_freed_memory=True"
)


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc >= 2.33)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None when the C library is another one."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        libc = ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no confstr name, or no such library
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.argtypes, libc.mallinfo2.restype = [], MallInfo2
    return libc


def heap_info() -> MallInfo2 | None:
    """glibc's heap statistics now (``mallinfo2``: all arenas), or None without glibc >= 2.33."""
    libc = glibc()
    return libc.mallinfo2() if libc is not None and hasattr(libc, "mallinfo2") else None


def heap_free_bytes() -> int | None:
    """Bytes glibc's heaps hold free for the next allocations (``fordblks``).

    Freed blocks that glibc keeps count in the resident set without holding any tensor, so a
    CPU erase's peak resident set can exceed its live bytes (what ``--plan`` counts, and what
    CUDA's max-allocated measures on a GPU). Read when the erase loop ends, with fewer tensors
    alive than at the peak, it bounds the heap's share of that excess from above. With freed
    memory kept the free blocks pile up when the heap fragments.
    """
    info = heap_info()
    return None if info is None else int(info.fordblks)


def proc_bytes(name: str, field: str) -> int | None:
    """A ``field:  N kB`` line of ``/proc/self/<name>`` in bytes (Linux), or None."""
    try:
        for line in Path("/proc/self", name).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def huge_page_bytes() -> int | None:
    """Bytes of this process's anonymous memory in transparent huge pages now (Linux), or None.

    Whether torch's request (``torch_huge_pages``) took effect shows only here: torch
    reads it once, and the kernel grants huge pages as its mode and free memory allow.
    """
    return proc_bytes("smaps_rollup", "AnonHugePages")


def torch_gets_huge_pages() -> bool | None:
    """Whether torch's new CPU buffers of 2 MB and more may get transparent huge pages (Linux),
    or None where that cannot be read.

    torch reads its switch once (``torch_huge_pages``), at its first CPU allocation, so a
    process that made a tensor before it was set gets 4 KB pages without a word. The kernel
    says it for a fresh 4 MiB buffer: its mapping's ``THPeligible`` in ``/proc/self/smaps`` is 1
    when torch asked for huge pages there, or when the kernel gives them to every mapping.
    """
    probe = torch.empty(4 * 2**20, dtype=torch.uint8)
    address, inside = probe.data_ptr(), False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        span = _MAPPING.match(line)
        if span:
            inside = int(span[1], 16) <= address < int(span[2], 16)
        elif inside and line.startswith("THPeligible:"):
            return line.split()[1] == "1"
    return None


def huge_pages_on_request() -> bool:
    """The kernel gives huge pages to mappings that ask (its ``madvise`` mode): asking matters."""
    try:
        return "[madvise]" in THP_MODE.read_text()
    except OSError:
        return False


def _after() -> dict[int, int]:
    """The settings to leave behind: the environment's ``MALLOC_*_`` values, else ``AFTER``."""
    values = dict(AFTER)
    for param, name in ENVIRONMENT.items():
        with contextlib.suppress(KeyError, ValueError):
            values[param] = min(max(int(os.environ[name], 0), 0), INT_MAX)
    return values


@contextlib.contextmanager
def torch_huge_pages(reuse: bool, device: torch.device) -> Iterator[None]:
    """Inside, where ``host_memory(reuse, device)`` will return freed memory (a CPU, glibc),
    torch requests transparent huge pages for its CPU buffers of 2 MB and more.

    With freed blocks returned (``reuse=False``), every large buffer is a fresh mapping whose
    pages the kernel faults in and zero-fills; 2 MB pages make that about twice as fast (a 59 MB
    buffer: 21.6 -> 10.0 ms here). torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first CPU
    allocation of any size, so the model's load must run inside (the runner's does; in Python,
    after a tensor exists it silently changes nothing). An explicit value in the environment is
    kept; one set here is removed on exit, so child processes and later code see the
    environment as it was. Where the kernel's huge pages are off, nothing changes.
    """
    returned = not reuse and device.type == "cpu" and glibc() is not None
    asked = returned and "THP_MEM_ALLOC_ENABLE" not in os.environ
    if asked:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    try:
        yield
    finally:
        if asked:
            os.environ.pop("THP_MEM_ALLOC_ENABLE", None)


def _label(reuse: bool, applied: int, settings: int) -> str | None:
    """What the record says: a refused ``mallopt`` call leaves the others in effect, so a
    partly applied setting is named as such rather than as glibc's defaults."""
    if applied == settings:
        return LABELS[reuse]
    return f"{LABELS[reuse]}, partly ({applied} of {settings} settings)" if applied else None


@contextlib.contextmanager
def host_memory(reuse: bool, device: torch.device) -> Iterator[str | None]:
    """Inside, on a CPU: with ``reuse``, freed blocks stay in glibc's heap for the next iteration
    or step, where page faults on fresh buffers would otherwise cost more than the arithmetic;
    without, new blocks of ``RETURN_FROM`` bytes and more get their own mappings, returned to
    the system when freed, so the resident set tracks the live tensors. Yields the setting in
    effect (``LABELS``), or None where nothing was set (another C library, a GPU)."""
    libc = glibc() if device.type == "cpu" else None
    if libc is None:
        yield None
        return
    if _state["depth"] == 0:  # nested (a sampling walk in an erase's callback): the outer one sets
        settings = KEEP if reuse else RETURN
        applied = [libc.mallopt(p, v) == 1 for p, v in settings.items()]  # try every one
        _state["label"] = _label(reuse, sum(applied), len(applied))
        if not reuse and huge_pages_on_request() and torch_gets_huge_pages() is False:
            warnings.warn(NO_HUGE_PAGES, stacklevel=3)
    _state["depth"] += 1
    try:
        yield _state["label"]
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:  # only the outermost gives the kept blocks back
            for param, value in _after().items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)
