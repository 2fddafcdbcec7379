import ctypes

import pytest
import torch

from kscu.allocator import glibc, reuse_freed_memory

LIBC = glibc()
pytestmark = pytest.mark.skipif(LIBC is None, reason="the setting exists for glibc only")
BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB): mmapped by default


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


if LIBC is not None:
    LIBC.mallinfo2.restype = MallInfo2


def mmapped_bytes() -> int:
    """glibc's count of bytes served by their own mmap (freed straight back to the kernel)."""
    return LIBC.mallinfo2().hblkhd


def big_block_is_mmapped() -> bool:
    before = mmapped_bytes()
    block = torch.empty(BLOCK // 4)
    grew = mmapped_bytes() - before
    del block
    return grew >= BLOCK


def test_freed_blocks_stay_in_the_heap_inside_and_only_inside():
    """Inside, a large block comes from the heap (kept when freed); on exit glibc is as it was,
    also after an error."""
    assert big_block_is_mmapped()
    with reuse_freed_memory(True, torch.device("cpu")) as applied:
        assert applied
        assert not big_block_is_mmapped()
        assert LIBC.mallinfo2().fordblks >= BLOCK  # the freed block is held for the next one
    assert big_block_is_mmapped()
    with pytest.raises(RuntimeError), reuse_freed_memory(True, torch.device("cpu")):
        raise RuntimeError("stop")
    assert big_block_is_mmapped()


@pytest.mark.parametrize("enabled, device", [(False, "cpu"), (True, "meta")])
def test_nothing_changes_when_off_or_off_the_cpu(enabled, device):
    with reuse_freed_memory(enabled, torch.device(device)) as applied:
        assert not applied
        assert big_block_is_mmapped()
