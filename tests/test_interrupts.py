"""kscu.interrupts: handlers replaced for a block and put back (the deferral itself is tested
through a folder's swap in tests/test_fileio.py)."""

import signal
import threading

import pytest

from kscu import interrupts


def test_replaced_handlers_are_put_back_even_when_the_block_raises():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError), interrupts.replaced({signal.SIGINT: signal.SIG_IGN}):
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        raise RuntimeError
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_nothing_is_replaced():
    seen = []

    def worker():
        with interrupts.replaced({signal.SIGINT: signal.SIG_IGN}):
            seen.append(signal.getsignal(signal.SIGINT))

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before] and signal.getsignal(signal.SIGINT) is before
