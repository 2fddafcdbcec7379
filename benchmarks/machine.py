"""Which machine a benchmark ran on, for its JSON.

The project's machines change between sessions (the same 2-core slot has been an Intel CPU with
AMX and an AMD EPYC): oneDNN picks other kernels on each, so both speeds and the last bits of
float32 results differ between them. Figures are comparable only within one machine, which the
CPU's model name says and the platform string alone does not.
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """The keys every benchmark's JSON carries: platform, CPU model, logical CPUs."""
    return {"machine": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count()}
