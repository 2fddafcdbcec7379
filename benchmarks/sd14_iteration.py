"""Where one exact SD v1.4 erase iteration goes on a CPU: arithmetic, kernels, oneDNN's reorders.

SD v1.4's architecture with random weights (``--model-dir``: a saved copy, else built), class
mode, float32, ``--resolution`` (64). Three measurements, printed and written as JSON:

- ``flops``: ``torch.utils.flop_counter`` over one batch-of-2 forward (the trajectory walk and
  the frozen predictions are one each) and one forward plus backward (the edited predictions),
  and the iteration's total;
- ``profile``: ``torch.profiler``'s self CPU seconds per aten operation over ``--iterations``
  later iterations of a real erase (``kscu.trainer.erase``, default settings), per iteration;
- ``onednn``: ``ONEDNN_VERBOSE``'s execution times of one batch-of-2 forward, in a child process
  with freed memory kept as in the erase: weight reorders, other reorders, convolutions, beside
  the whole forward's milliseconds.

    python benchmarks/sd14_iteration.py --model-dir /tmp/sd14 --json iteration.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from machine import machine

import kscu  # noqa: F401 - before diffusers: the torchvision fix (kscu.torchvision_compat)

CHILD = """
import sys, time, torch
from kscu.allocator import host_memory
from diffusers import UNet2DConditionModel
unet = UNet2DConditionModel.from_pretrained(sys.argv[1]).eval()
size = int(sys.argv[2]) // 8
args = (torch.randn(2, 4, size, size), torch.tensor([500]), torch.randn(2, 77, 768))
with torch.inference_mode(), host_memory(True, torch.device("cpu")):
    for _ in range(3):
        started = time.perf_counter()
        unet(*args)
    print(f"FORWARD {time.perf_counter() - started}")  # the last one, without the log
    print("VERBOSE-START", flush=True)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        unet(*args)
"""


def model_folder(args: argparse.Namespace, scratch: Path) -> Path:
    if args.model_dir and (args.model_dir / "model_index.json").exists():
        return args.model_dir
    folder = args.model_dir or scratch / "sd14"
    from memory import save_sd14  # this script's folder is on sys.path, as for machine

    save_sd14(folder)
    return folder


def flops(unet: torch.nn.Module, resolution: int) -> dict[str, float]:
    """GFLOP of one batch-of-2 forward, and of a forward with backward through every weight."""
    from torch.utils.flop_counter import FlopCounterMode

    size = resolution // 8
    args = (torch.randn(2, 4, size, size), torch.tensor([500]), torch.randn(2, 77, 768))
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        unet(*args)
    with FlopCounterMode(display=False) as trained:
        unet(*args).sample.square().mean().backward()
    unet.zero_grad(set_to_none=True)
    one, both = forward.get_total_flops() / 1e9, trained.get_total_flops() / 1e9
    return {"forward": one, "forward_backward": both, "iteration": 2 * one + both}


def profile(folder: Path, resolution: int, iterations: int) -> dict[str, float]:
    """Self CPU seconds per aten operation and iteration, over later iterations of an erase."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    from kscu.config import EraseConfig
    from kscu.models import load_pipeline
    from kscu.runner import prepare
    from kscu.trainer import erase

    pipe = load_pipeline(str(folder), exact_denoiser=True)
    config = EraseConfig(
        concepts=["church"],
        mode="class",
        resolution=resolution,
        iterations=2 + iterations,
        augment=False,
    )
    cfg = prepare(config, str(folder), pipe)
    prof = profiler(activities=[ProfilerActivity.CPU])

    def callback(i: int, *_) -> None:  # iterations 0 and 1 record and warm up
        if i == 1:
            prof.start()
        elif i == 1 + iterations:
            prof.stop()

    erase(pipe, cfg, progress=False, callback=callback)
    table = {e.key: e.self_cpu_time_total / 1e6 / iterations for e in prof.key_averages()}
    return dict(sorted(table.items(), key=lambda kv: -kv[1])[:12])


def onednn(folder: Path, resolution: int) -> dict[str, float]:
    """Milliseconds oneDNN spends per kind of primitive in one batch-of-2 forward."""
    run = [sys.executable, "-c", CHILD, str(folder / "unet"), str(resolution)]
    out = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    total: Counter = Counter()
    total["forward ms (without the log)"] = 1e3 * float(out.split("FORWARD ", 1)[1].split()[0])
    for line in out.split("VERBOSE-START", 1)[1].splitlines():
        fields = line.split(",")
        if not line.startswith("onednn_verbose") or "exec" not in fields:
            continue
        kind = "convolution" if "convolution" in fields else "reorder"
        dims = fields[-2].split("x")
        if kind == "reorder" and len(dims) == 4 and dims[0] != "2":  # batch 2: activations
            kind = "weight reorder"  # O x I x kH x kW: a weight into oneDNN's blocked layout
        total[kind + " ms"] += float(fields[-1])
        total[kind + " calls"] += 1
    return dict(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder(args, Path(scratch))
        from diffusers import UNet2DConditionModel

        report = {
            **machine(),
            "settings": {"resolution": args.resolution, "iterations": args.iterations},
            "flops_gflop": flops(
                UNet2DConditionModel.from_pretrained(folder / "unet"), args.resolution
            ),
            "onednn_forward": onednn(folder, args.resolution),
            "profile_seconds_per_iteration": profile(folder, args.resolution, args.iterations),
        }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
