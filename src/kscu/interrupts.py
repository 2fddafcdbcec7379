"""Signal handlers replaced for a block and put back after it, even if a signal arrives meanwhile.

Python runs signal handlers in the main thread between any two bytecodes, and only the main
thread may set them: elsewhere nothing is replaced (a handler cannot interrupt another thread
anyway). Blocking signals with a thread mask would not do: another thread (OpenMP's, tqdm's) may
receive them for the process. A handler installed outside Python cannot be put back, so its
signal is left alone.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def replaced(handlers: dict[int, Any]) -> Iterator[None]:
    """Inside: ``handlers`` (signal number -> handler, ``signal.SIG_IGN`` too) are in effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    try:
        for s, handler in handlers.items():
            current = signal.getsignal(s)
            if current is None:  # installed outside Python: cannot be put back
                continue
            previous[s] = current  # kept first: the change may end in that handler
            signal.signal(s, handler)
        yield
    finally:
        late = _restore(previous)
        if late is not None:
            raise late


@contextlib.contextmanager
def deferred(*kinds: int) -> Iterator[None]:
    """Signals of ``kinds`` that arrive inside the block take effect when it ends, each kind
    once, with the handlers the caller had: for steps that must not be split (a folder's swap)."""
    arrived: list[int] = []
    try:
        with replaced(dict.fromkeys(kinds, lambda signum, frame: arrived.append(signum))):
            yield
    finally:
        late = None
        for signum in dict.fromkeys(arrived):
            try:
                signal.raise_signal(signum)
            except BaseException as e:  # every kind still gets its turn
                late = late or e
        if late is not None:
            raise late


def _restore(previous: dict[int, Any]) -> BaseException | None:
    """Put every handler back: ``signal.signal`` runs pending handlers before it changes one, so
    a handler already restored may raise (Ctrl-C again); the change is then retried. Returns
    what such a handler raised."""
    late = None
    for s, handler in previous.items():
        while True:
            try:
                signal.signal(s, handler)
                break
            except BaseException as e:
                late = late or e
    return late
