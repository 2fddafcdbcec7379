"""Which (concept, step index) each iteration trains on.

KSCU trains only at the key steps of the denoising trajectory. The table walks the steps
``S .. E-1`` in order, run after run, so consecutive entries are consecutive steps and the
trajectory can be advanced one DDIM step at a time instead of being rebuilt from noise.
Every ``loops`` complete runs the start moves one step later (the late steps get more weight),
up to ``ceil(0.9 * E) - 1``. ESD, the baseline, draws the step uniformly instead.
"""

from __future__ import annotations

import math
import random

Entry = tuple[str, int]


def key_step_table(
    concepts: list[str], start: int, end: int, length: int, loops: int = 8
) -> list[Entry]:
    """The Key Step Table of KSCU_METHOD.md section 3, exactly ``length`` entries long."""
    cap = math.ceil(0.9 * end) - 1
    table: list[Entry] = []
    step_start, runs = start, 0
    while True:
        for concept in concepts:  # one complete run = one pass over all concepts
            for s in range(step_start, end):
                table.append((concept, s))
                if len(table) == length:
                    return table
        runs += 1
        if runs % loops == 0 and step_start < cap:
            step_start += 1


def uniform_table(concepts: list[str], start: int, end: int, length: int, seed: int) -> list[Entry]:
    """ESD's schedule: concepts in turn, each step drawn uniformly from ``start .. end-1``."""
    rng = random.Random(seed)
    return [(concepts[i % len(concepts)], rng.randrange(start, end)) for i in range(length)]
