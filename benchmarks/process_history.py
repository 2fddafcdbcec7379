"""How a CPU erase's measured peak depends on what its process ran before, against ``--plan``.

On a CPU, ``kscu.json``'s ``peak_memory_bytes`` is the growth of the process's peak resident set,
counted from before the model loaded (``kscu erase``) or, for a pipeline passed in loaded, from
the erase's start (``peak_memory_start`` says which; ``peak_memory_planned_bytes`` is the plan for
that span: without the weights in the second case). What is not the erase's tensors can move
the growth:

- library code run for the first time (file-backed pages; ``peak_memory_file_backed_bytes``)
  and what torch sets up on first use (the tracer's state, oneDNN's, caches): since stop 37 paid
  before the first measurement in a process (``kscu.memory.pay_first_use``), outside the span,
  and since stop 39 for the preview's batch shapes too;
- weights read for the first time: safetensors' weights are mapped from the file, so pages the
  load did not touch join the resident set when the erase first reads them (inside the span
  either way when it starts before the load);
- glibc's heap: the replay records are many small blocks, which a later erase puts in the holes
  the earlier one's records left in pages that are still resident (9.6 MiB of records on the
  world since stop 39's smaller records, 23.4 MiB before; benchmarks/record_bytes.py).

Each case is a fresh process that loads the bundled world and erases ``--erases`` times in a
row (``erase_to_folder``, as ``kscu erase`` runs it), on the same pipeline or on one loaded again
for each erase, with or without the "before" preview and the replayed calls:

    python benchmarks/process_history.py --iterations 20 --json process-history.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from machine import machine

MIB = 2**20
CASES = {  # name: (preview before each erase, replayed denoiser calls, loaded for each erase)
    "no preview": (False, True, False),
    "preview before each erase (README command 1)": (True, True, False),
    "no preview, eager calls (--no-trace-denoiser)": (False, False, False),
    "no preview, the world loaded again for each erase": (False, True, True),
}


def child(case: str, erases: int, iterations: int) -> list[dict]:
    """``erases`` erases of the world's circle in this process, as the CLI measures each."""
    from kscu.config import EraseConfig
    from kscu.preview import world_prompts
    from kscu.runner import erase_to_folder

    preview, traced, reload = CASES[case]
    cfg = EraseConfig(
        concepts=["circle"], mode="class", iterations=iterations, trace_denoiser=traced
    )
    prompts = world_prompts("circle") if preview else None
    runs, pipe = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(erases):
            out = Path(tmp) / f"run{k}"
            _, pipe = erase_to_folder(cfg, None, out, False, pipe, preview_prompts=prompts)
            pipe = None if reload else pipe
            meta = json.loads((out / "kscu.json").read_text())
            runs.append(
                {
                    "measured_bytes": meta["peak_memory_bytes"],
                    "file_backed_bytes": meta["peak_memory_file_backed_bytes"],
                    "plan_bytes": meta["memory_plan"]["total_bytes"],
                    "plan_components": meta["memory_plan"]["bytes"],
                    # the plan for the span measured: without the weights of a pipeline passed in
                    "planned_bytes": meta["peak_memory_planned_bytes"],
                    "start": meta["peak_memory_start"],
                }
            )
    return runs


def measure(case: str, erases: int, iterations: int) -> dict:
    args = [sys.executable, __file__, "--child", case, str(erases), str(iterations)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"process_history.py: {case!r} failed:\n{out.stderr[-2000:]}")
    runs = json.loads(out.stdout.splitlines()[-1])
    print(f"{case}:")
    for k, run in enumerate(runs, 1):
        run["plan_over_measured"] = round(run["planned_bytes"] / run["measured_bytes"], 3)
        print(
            f"  erase {k}: measured {run['measured_bytes'] / MIB:5.1f} MiB (file-backed "
            f"{run['file_backed_bytes'] / MIB:4.1f}), planned {run['planned_bytes'] / MIB:5.1f} "
            f"MiB, plan / measured {run['plan_over_measured']:.3f}; {run['start']}"
        )
    return {"case": case, "erases": runs}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        case, erases, iterations = sys.argv[2:5]
        print(json.dumps(child(case, int(erases), int(iterations))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--erases", type=int, default=3, help="erases in a row in each process")
    p.add_argument("--iterations", type=int, default=20, help="iterations of each erase")
    p.add_argument("--json", type=Path, default=Path("process_history.json"))
    args = p.parse_args()
    record = {**machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    record.update(erases=args.erases, iterations=args.iterations)
    record["cases"] = [measure(case, args.erases, args.iterations) for case in CASES]
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
