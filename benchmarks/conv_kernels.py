"""oneDNN against torch's native convolution on the CPU, where ``--fast-cpu-conv`` decides.

Two probes, each kernel alternately in the same process, medians of ``--repeats``:
- one of SD v1.4's 1280x1280x3x3 layers on the small maps a 64 px erase sees (forward and
  backward, float32, batch 2), with the largest difference of the two kernels' outputs;
- the bundled world's batched generation (``kscu.world.quality.generate``: 64 prompts, CFG, so
  128 rows per UNet call), which ``kscu bench --fast-cpu-conv`` leaves on oneDNN.

    python benchmarks/conv_kernels.py --json conv.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import machine

from kscu.models import cpu_convolution

CPU = torch.device("cpu")


def timed(fn: Callable[[], object], native: bool, repeats: int) -> float:
    """Median seconds of ``fn`` with oneDNN off (``native``) or on."""
    with cpu_convolution(native, CPU):
        fn()  # warm-up: oneDNN builds its primitives on the first call
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def conv_layer(size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    w = torch.randn(1280, 1280, 3, 3, requires_grad=True)
    b = torch.randn(1280, requires_grad=True)
    x = torch.randn(2, 1280, size, size, requires_grad=True)

    def forward():
        with torch.no_grad():
            return F.conv2d(x, w, b, padding=1)

    def backward():
        F.conv2d(x, w, b, padding=1).sum().backward()
        w.grad = b.grad = x.grad = None

    out = {}
    for native in (False, True):
        name = "native" if native else "onednn"
        out[f"{name}_forward_ms"] = 1e3 * timed(forward, native, repeats)
        out[f"{name}_forward_backward_ms"] = 1e3 * timed(backward, native, repeats)
    a = forward()
    with cpu_convolution(True, CPU):
        c = forward()
    out["max_abs_difference"] = float((a - c).abs().max())
    out["max_abs_value"] = float(a.abs().max())
    return out


def world_generation(repeats: int) -> dict:
    from kscu.models import default_model, load_pipeline
    from kscu.world.quality import generate

    pipe = load_pipeline(default_model())
    prompts = ["a red heart"] * 64

    def run():
        generate(pipe, prompts, 0, 10, 7.5)

    return {f"{k}_seconds": timed(run, k == "native", repeats) for k in ("onednn", "native")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path("conv_kernels.json"))
    args = p.parse_args()
    record = {
        **machine(),
        "threads": torch.get_num_threads(),
        "conv_1280_on_1x1": conv_layer(1, args.repeats),
        "conv_1280_on_2x2": conv_layer(2, args.repeats),
        "world_generation_64_prompts_10_steps": world_generation(args.repeats),
    }
    print(json.dumps(record, indent=2))
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
