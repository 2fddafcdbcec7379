"""Splitting work across processes under ``accelerate launch`` (GPUs, or CPU processes).

Shares are round-robin (``i % num_processes == process_index``), so every prompt or image is
handled by exactly one process, whatever the number of processes. ``Workers.map`` sends an
error back like a result, so a failure in one process ends every process at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kscu.errors import KscuError


def process_state():
    """accelerate's PartialState, on the CPU when there is no GPU.

    ``PartialState()`` alone only forms a process group on an accelerator; with CPU processes
    (``accelerate launch --multi_gpu --num_processes 2`` or ``torchrun`` on a machine without a
    GPU) each process would believe it is alone and do all the work. Asking for the CPU when
    no accelerator is there makes them a gloo group that splits the work.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    accel = getattr(torch, "accelerator", None)
    has_accel = accel.is_available() if accel is not None else torch.cuda.is_available()
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accel)


class Workers:
    """This process's share of the work under ``accelerate launch``, and the gather back.

    Without a launcher it is one process holding everything. Shares are round-robin
    (``i % num_processes == process_index``), so every item is handled by exactly one process.
    """

    def __init__(self) -> None:
        self.state = process_state()
        self.rank = self.state.process_index
        self.size = self.state.num_processes
        self.is_main = self.state.is_main_process
        self.device = self.state.device

    def share(self, items: list) -> list:
        return items[self.rank :: self.size]

    def gather(self, items: list) -> list:
        """Every process's list, concatenated (the same on all processes)."""
        if self.size == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def map(self, work: Callable[[list], list], items: list) -> list:
        """``work`` on this process's share; every process gets all results, in ``items`` order.

        Each process sends back its results *or* its error, so a failure in one share (a
        corrupt image) reaches every process at the gather: the failing process re-raises its
        own exception and the others raise the same message as a ``KscuError``, instead of
        waiting in the gather until the process group times out.
        """
        mine = list(range(self.rank, len(items), self.size))
        try:
            results = list(work([items[i] for i in mine]))
            if len(results) != len(mine):
                raise RuntimeError(f"{len(results)} results for {len(mine)} items")
            sent: tuple[str, Any] = ("ok", list(zip(mine, results, strict=True)))
        except Exception as e:  # every error must reach the gather, or the others hang there
            if self.size == 1:
                raise
            failure = e
            sent = ("error", str(e) if isinstance(e, KscuError) else f"{type(e).__name__}: {e}")
        parts = self.gather([(self.rank, *sent)])
        errors = [(rank, payload) for rank, status, payload in parts if status == "error"]
        if errors:
            self.close()
            if any(rank == self.rank for rank, _ in errors):
                raise failure
            raise KscuError(errors[0][1])
        out: list = [None] * len(items)
        for _, _, pairs in parts:
            for i, result in pairs:
                out[i] = result
        return out

    def close(self) -> None:
        """Leave the process group (every process does, after a failure it heard of).

        A gloo group still open when an interpreter exits on an error can abort it ("terminate
        called without an active exception", exit 134) instead of the one-line error's code 2.
        """
        import torch.distributed as dist

        if self.size > 1 and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
