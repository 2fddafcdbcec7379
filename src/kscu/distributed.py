"""Splitting work across processes under ``accelerate launch`` (GPUs, or CPU processes).

Shares are round-robin (``i % num_processes == process_index``), so every prompt or image is
handled by exactly one process, whatever the number of processes.
"""

from __future__ import annotations


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
