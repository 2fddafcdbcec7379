"""Heap bytes held by the replay records of an erase's denoiser calls (kscu.tracing).

``kscu erase --plan`` does not count these records: torch's tracer cannot run on the meta tensors
the plan uses. This measures them on a loaded model instead, as glibc counts the heap bytes in
use (``mallinfo2``), read after the record's calls and again once the record is dropped: the
difference is what the record alone holds, whatever the resident set reuses. Each record is
measured after tracing only and after 1 and 3 replays (torch's executor copies the graph on its
first run), at the erase's batch of 2, with and without gradients, and the Python stack text its
graph nodes keep is summed. Linux with glibc >= 2.33 only.

    python benchmarks/record_bytes.py --json docs/results/record-bytes.json [--model DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
from machine import machine

from kscu.allocator import heap_info
from kscu.families.base import cond_cat
from kscu.models import default_model, load_pipeline
from kscu.runner import model_family
from kscu.tracing import TracedDenoiser

MIB = 2**20


def in_use() -> int:
    gc.collect()
    info = heap_info()
    if info is None:
        raise SystemExit("record_bytes.py: needs glibc >= 2.33 (mallinfo2)")
    return info.uordblks + info.hblkhd


def measure(model: str, repeats: int) -> list[dict]:
    family = model_family(model, None)
    pipe = load_pipeline(model, "float32", torch.device("cpu"), family=family.name)
    net = family.denoiser(pipe)
    sampler = family.sampler(pipe, 50)
    x = sampler.noise(0)
    cond = family.meta_cond(pipe, 1)
    cond = {k: torch.randn(v.shape) for k, v in cond.items()}  # the shapes, on the CPU
    rows, both = torch.cat([x, x]), cond_cat(cond, cond)

    def calls(grad: bool, n: int) -> None:
        for _ in range(n):
            with torch.set_grad_enabled(grad):
                out = sampler.raw(net, rows.clone(), 10, both)
                if grad:
                    out.mean().backward()

    results = []
    for grad in (False, True):
        calls(grad, 2)  # torch's first-use caches, before anything is measured
        for replays in (0, 1, 3):
            for repeat in range(repeats):
                sampler.traced = TracedDenoiser(net)
                calls(grad, 1 + replays)
                held = in_use()
                (record,) = [r for r in sampler.traced.records.values() if r is not None]
                nodes = list(record.graph.graph.nodes())
                stack = sum(len(node.sourceRange()) for node in nodes)
                count = len(nodes)
                del record, nodes
                sampler.traced = None
                freed = held - in_use()
                results.append(
                    {
                        "gradients": grad,
                        "replays": replays,
                        "repeat": repeat,
                        "graph_nodes": count,
                        "freed_bytes": freed,
                        "stack_text_bytes": stack,
                    }
                )
                print(
                    f"gradients={grad!s:<5} replays={replays} nodes={count:5d} "
                    f"freed {freed / MIB:6.2f} MiB (stack text {stack / MIB:.2f} MiB)"
                )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a diffusers folder (default: the bundled world)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path("record_bytes.json"))
    args = p.parse_args()
    model = args.model or default_model()
    record = {
        **machine(),
        "model": "bundled world" if args.model is None else args.model,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "records": measure(model, args.repeats),
    }
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
