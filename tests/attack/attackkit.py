"""Helpers of the attack tests: a small attack's flags, one CPU thread, the CLI in-process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kscu.cli import main

# A small attack: 6 prompts, 2 rounds of 8 steps, 20 sampling steps (seconds, not minutes).
SMALL = ["--samples", "6", "--rounds", "2", "--iterations", "8", "--steps", "20", "--quiet"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err
