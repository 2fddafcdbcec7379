import os
from pathlib import Path

import pytest
import torch

from kscu.allocator import (
    ENVIRONMENT,
    LABELS,
    glibc,
    heap_free_bytes,
    heap_info,
    host_memory,
    proc_bytes,
    torch_gets_huge_pages,
    torch_huge_pages,
)

LIBC = glibc()
pytestmark = pytest.mark.skipif(
    LIBC is None
    or not hasattr(LIBC, "mallinfo2")  # glibc >= 2.33
    or any(name in os.environ for name in ENVIRONMENT.values()),  # the test's premises
    reason="needs glibc >= 2.33 at its default malloc settings",
)
MIB = 2**20


def resident_bytes() -> int:
    return proc_bytes("status", "VmRSS")


def is_mmapped(size: int) -> bool:
    """Whether a block of ``size`` bytes gets its own mmap (unmapped again when freed)."""
    before = heap_info().hblkhd
    block = torch.empty(size // 4)
    grew = heap_info().hblkhd - before
    del block
    return grew >= size


def beyond_free(mib: int) -> int:
    """A size no free chunk of the heap can serve: glibc must grow the heap or mmap it."""
    return heap_info().fordblks + mib * MIB


def test_freed_blocks_stay_in_the_heap_inside_and_are_returned_after():
    """Inside, a large block comes from the heap and stays there when freed; on exit mmap is
    back above 32 MiB, the kept memory is trimmed, also after an error."""
    assert is_mmapped(beyond_free(64))  # glibc's default: above its largest threshold
    with host_memory(True, torch.device("cpu")) as applied:
        assert applied == LABELS[True]
        assert not is_mmapped(beyond_free(64))
        block = torch.ones(64 * MIB // 4)  # touched: resident
        del block
        assert heap_info().fordblks >= 64 * MIB  # the freed block, held for the next allocation
        kept = resident_bytes()
    assert resident_bytes() < kept - 32 * MIB  # malloc_trim gave its pages back
    assert is_mmapped(beyond_free(64)) and not is_mmapped(16 * MIB)  # 32 MiB threshold
    with pytest.raises(RuntimeError), host_memory(True, torch.device("cpu")):
        raise RuntimeError("stop")
    assert is_mmapped(beyond_free(64))


@pytest.mark.parametrize("reuse", [True, False])
def test_nothing_changes_off_the_cpu(reuse):
    with host_memory(reuse, torch.device("meta")) as applied:
        assert applied is None
        assert is_mmapped(beyond_free(64))


def test_without_reuse_large_blocks_go_back_when_freed():
    """The resident set then tracks the live tensors (what --plan counts): a block of 1 MiB or
    more that the heap cannot serve from what it holds gets its own mapping (kept blocks: from
    the heap), and touched then freed it leaves the resident set at once; smaller blocks still
    come from the heap. Afterwards as after the reuse setting."""
    with host_memory(False, torch.device("cpu")) as applied:
        assert applied == LABELS[False]
        assert is_mmapped(beyond_free(2)) and not is_mmapped(MIB // 2)
        before = resident_bytes()
        block = torch.ones(beyond_free(64) // 4)
        assert resident_bytes() > before + 32 * MIB
        del block
        assert resident_bytes() < before + 8 * MIB
    with host_memory(True, torch.device("cpu")):
        assert not is_mmapped(beyond_free(2))
    assert is_mmapped(beyond_free(64)) and not is_mmapped(16 * MIB)  # 32 MiB threshold again


def test_huge_pages_are_asked_for_unless_the_environment_says(monkeypatch):
    """Asked for while inside, where freed memory will be returned, removed again on exit
    (child processes see the environment as it was), and an explicit value is left alone."""
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    cpu = torch.device("cpu")
    with torch_huge_pages(False, cpu):
        assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    for reuse, device in [(True, cpu), (False, torch.device("meta"))]:  # nothing returned there
        with torch_huge_pages(reuse, device):
            assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    with torch_huge_pages(False, cpu):
        assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_a_nested_user_leaves_the_setting_to_the_outermost():
    """A sampling walk inside an erase (e.g. a preview from its callback) must not hand the
    erase's remaining iterations back to glibc's defaults."""
    cpu = torch.device("cpu")
    with host_memory(True, cpu):
        with host_memory(True, cpu) as inner:
            assert inner == LABELS[True]
        assert not is_mmapped(beyond_free(64))  # still kept after the inner one ended
    assert is_mmapped(beyond_free(64))


def test_a_walk_inside_an_erase_that_returns_memory_returns_it_too():
    """A preview's sampling walk (which asks to keep freed memory) inside a
    --no-reuse-freed-memory erase runs under the erase's setting, and says so."""
    cpu = torch.device("cpu")
    with host_memory(False, cpu):
        with host_memory(True, cpu) as inner:
            assert inner == LABELS[False]
            assert is_mmapped(beyond_free(2))
        assert is_mmapped(beyond_free(2))


def test_heap_free_bytes_counts_what_the_heap_keeps():
    """A freed block that glibc keeps is counted as free heap bytes (what kscu.json records)."""
    with host_memory(True, torch.device("cpu")):
        before = heap_free_bytes()
        block = torch.ones(beyond_free(64) // 4)
        assert heap_free_bytes() < before + MIB  # taken from the heap (grown, not free)
        del block
        kept = heap_free_bytes()
        assert kept >= before + 64 * MIB


def test_a_partly_applied_setting_is_recorded_as_such(monkeypatch):
    """glibc refusing one ``mallopt`` call leaves the others in effect: the label says so."""
    import kscu.allocator

    class Libc:
        def mallopt(self, param, value):
            return 0 if param == kscu.allocator.M_MMAP_THRESHOLD else 1

        def malloc_trim(self, pad):
            return 0

    monkeypatch.setattr(kscu.allocator, "glibc", Libc)
    with host_memory(False, torch.device("cpu")) as label:
        assert label == f"{LABELS[False]}, partly (2 of 3 settings)"
    with host_memory(True, torch.device("cpu")) as label:
        assert label == LABELS[True]  # KEEP sets no threshold


@pytest.mark.parametrize(
    "reuse, on_request, granted, warned",
    [(False, True, False, True), (False, True, True, False), (False, False, False, False)]
    + [(True, True, False, False), (False, True, None, False)],
)
def test_returning_without_huge_pages_says_how_to_get_them(
    monkeypatch, recwarn, reuse, on_request, granted, warned
):
    """torch reads its huge-page switch once: a caller whose process made a tensor before it
    was set returns freed memory with 4 KB pages; told once where the kernel grants them on
    request (with kept memory, or where the answer cannot be read, nothing to say)."""
    import kscu.allocator

    monkeypatch.setattr(kscu.allocator, "huge_pages_on_request", lambda: on_request)
    monkeypatch.setattr(kscu.allocator, "torch_gets_huge_pages", lambda: granted)
    with host_memory(reuse, torch.device("cpu")):
        pass
    messages = [str(w.message) for w in recwarn]
    assert messages == ([kscu.allocator.NO_HUGE_PAGES] if warned else [])
    assert "THP_MEM_ALLOC_ENABLE=1" in kscu.allocator.NO_HUGE_PAGES


def test_a_buffer_of_this_process_is_found_in_its_mappings():
    """The answer is read, not None: on Linux a fresh buffer lies in one of the process's
    mappings, whose ``THPeligible`` line the kernel writes (since 5.x)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists() or "THPeligible" not in smaps.read_text():
        pytest.skip("no /proc/self/smaps with THPeligible here")
    assert torch_gets_huge_pages() in (True, False)
