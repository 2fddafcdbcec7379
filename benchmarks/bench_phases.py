"""Where ``kscu bench``'s wall time goes: each erase, the images scored, the first-use payment.

Runs ``kscu bench`` in this process with timers around its parts (nothing else changes) and
prints the seconds of each part beside the total, so a speed-up is aimed at what the user waits
on. Issue 14's bench (``--methods kscu,esd``) is the default:

    python benchmarks/bench_phases.py --output /tmp/bench --json bench-phases.json

Extra ``kscu bench`` flags go after ``--`` (``-- --attack unlearndiff``). The run folder is
replaced (``--overwrite``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import time
from pathlib import Path
from typing import Any

from machine import machine

import kscu.bench
import kscu.memory
import kscu.runner
from kscu.cli import main as kscu_main

DEFAULT = ["--concept", "heart", "--mode", "class", "--methods", "kscu,esd"]


def timer(owner: Any, name: str, label: str, seconds: dict, calls: collections.Counter) -> None:
    """Wrap ``owner.name`` so each call adds its wall time to ``seconds[label]``."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - started
            calls[label] += 1

    setattr(owner, name, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True, help="the bench's run folder")
    p.add_argument("--json", type=Path, default=Path("bench_phases.json"))
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then more kscu bench flags")
    args = p.parse_args()
    extra = [a for a in args.extra if a != "--"]
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    parts = {  # label: (module or class, attribute)
        "erase (each method's erase_to_folder)": (kscu.runner, "erase_to_folder"),
        "images generated for scoring": (kscu.bench.Judge, "images"),
        "scoring in all (images, classifier, FD)": (kscu.bench.Judge, "score"),
        "first-use payment (kscu.memory)": (kscu.memory, "pay_first_use"),
    }
    for label, (owner, name) in parts.items():
        timer(owner, name, label, seconds, calls)
    command = ["bench", *DEFAULT, *extra, "--quiet", "--overwrite", "--output", str(args.output)]
    started = time.perf_counter()
    code = kscu_main(command)
    total = time.perf_counter() - started
    if code:
        raise SystemExit(f"kscu {' '.join(command)} exited with {code}")
    bench = json.loads((args.output / "bench.json").read_text())
    erases = {row["label"]: row["seconds"] for row in bench["rows"] if row["method"] != "original"}
    print(f"kscu {' '.join(command)}: {total:.1f} s in all")
    for label in parts:
        print(f"  {label:42s} {seconds[label]:7.1f} s  ({calls[label]} calls)")
    for label, s in erases.items():
        print(f"  erase of {label:33s} {s:7.1f} s")
    record = {
        **machine(),
        "command": ["kscu", *command],
        "total_seconds": total,
        "seconds": dict(seconds),
        "calls": dict(calls),
        "erase_seconds": erases,
    }
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
