"""Heap bytes held by the replay records of an erase's denoiser calls (kscu.tracing).

Torch's tracer cannot run on the meta tensors ``kscu erase --plan`` uses, so the plan computes
these records from the operations its meta trace runs (``kscu.memory.RECORD_BYTES_PER_OPERATION``).
This measures them on a loaded model instead, as glibc counts the heap bytes in use
(``mallinfo2``), read after the record's calls and again once the record is dropped: the
difference is what the record alone holds, whatever the resident set reuses. Each record is
measured after tracing only and after 1 and 3 replays (torch's executor copies the graph on its
first run), at the erase's batch of 2, with and without gradients, and the Python stack text its
graph nodes keep is summed. Linux with glibc >= 2.33 only.

``--per-operation``: both records of an erase together, as it holds them (each replayed once),
on a CPU copy of the network with zero weights built from the folder's configs (a folder of
configs alone will do, as for ``--plan``), against the operations the plan counts: the source of
``RECORD_BYTES_PER_OPERATION``.

    python benchmarks/record_bytes.py --json docs/results/record-bytes.json [--model DIR]
    python benchmarks/record_bytes.py --per-operation --model DIR [--model DIR2] --json out.json
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


def per_operation(model: str) -> dict:
    """Both records of an erase (no gradients, then gradients; 2 rows at the start step), after
    a first set has paid torch's first-use costs, against the plan's count of operations."""
    from kscu.config import EraseConfig, resolve
    from kscu.memory import RECORD_BYTES_PER_OPERATION, meta_pipeline, plan
    from kscu.scope import trainable_names

    family = model_family(model, None)
    cfg = resolve(EraseConfig(concepts=["x"], device="cpu", dtype="float32"), family=family)
    planned = plan(model, cfg, family)["bytes"]["replay_records"]
    pipe = meta_pipeline(model, family)
    net = family.denoiser(pipe).to_empty(device="cpu")
    trainable = set(trainable_names(net, cfg.scope, family))
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.zero_().requires_grad_(name in trainable)
        for b in net.buffers():
            b.zero_()
    sampler = family.sampler(pipe, cfg.num_steps, None, cfg.loss_space)
    x = sampler.noise(0)
    cond = family.meta_cond(pipe, 1, cfg.max_sequence_length)
    cond = {k: torch.zeros(v.shape) for k, v in cond.items()}
    rows, both = torch.cat([x, x]), cond_cat(cond, cond)

    def records() -> TracedDenoiser:
        sampler.traced = TracedDenoiser(net)
        for grad in (False, True):
            for _ in range(2):  # recorded, then replayed once (checked against the eager call)
                with torch.set_grad_enabled(grad):
                    sampler.raw(net, rows.clone(), cfg.start_step, both)
        return sampler.traced

    records()
    sampler.traced = None  # the first set goes
    before = in_use()
    held = records()
    measured = in_use() - before
    assert held.recorded == 2 and not held.dropped, held.summary()
    operations = planned // RECORD_BYTES_PER_OPERATION
    result = {
        "model": model,
        "operations": operations,
        "records_bytes": measured,
        "bytes_per_operation": round(measured / operations, 1),
        "plan_replay_records_bytes": planned,
        "plan_over_measured": round(planned / measured, 4),
    }
    print(
        f"{model}: {measured / MIB:.2f} MiB for {operations} operations, "
        f"{measured / operations:.0f} bytes each; plan {planned / MIB:.2f} MiB "
        f"({planned / measured:.3f})"
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", action="append", help="a diffusers folder (default: the bundled world)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--per-operation", action="store_true", help="the plan's coefficient")
    p.add_argument("--json", type=Path, default=Path("record_bytes.json"))
    args = p.parse_args()
    models = args.model or [default_model()]
    record = {**machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.per_operation:
        record["per_operation"] = [per_operation(m) for m in models]
    else:
        if len(models) > 1:
            p.error("one --model at a time, unless --per-operation")
        (model,) = models
        record["model"] = "bundled world" if args.model is None else model
        record["records"] = measure(model, args.repeats)
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
