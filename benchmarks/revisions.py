"""Time one ``kscu`` command on two revisions of this repository, side by side in one run.

The base revision's ``src/`` is exported with ``git archive`` into a temporary folder; the
command then runs alternately on the base and on the working tree (each in a fresh process with
the same environment, so the machine's load affects both alike), ``--repeats`` times each.
Prints the median wall-clock seconds of the command and of the erase (``erased ... in X s``
from its log) and the command's peak resident set (its process's ``ru_maxrss``) per revision,
and their ratio; writes JSON.

    python benchmarks/revisions.py --base 30ae8f5 --repeats 3 --json speed.json -- \\
        erase --concept circle --mode class --output {out}

``--also=--fast-cpu-conv`` adds a third row: the working tree with those extra flags (options
the base revision does not know).

``{out}`` is replaced by a fresh folder per run. Both trees run in this environment (its torch,
diffusers, ...); the torchvision import fix of the working tree is applied to both, since an
older tree without it cannot import diffusers beside a CPU torch.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine

REPO = Path(__file__).resolve().parent.parent
RUN = """
import atexit, importlib.util, resource, sys
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
atexit.register(lambda: print("peak resident set", peak(), "KiB", file=sys.stderr))
spec = importlib.util.spec_from_file_location("tvc", {shim!r})
shim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shim)
shim.ensure_torchvision()
sys.path.insert(0, {src!r})
from kscu.cli import main
sys.exit(main({args!r}))
"""
ERASED = re.compile(r"erased .* in ([0-9.]+) s")
PEAK = re.compile(r"peak resident set ([0-9]+) KiB")
KEYS = ("command_seconds", "erase_seconds", "peak_rss_mib")


def export(revision: str, into: Path) -> Path:
    """The base revision's src/ as files (no checkout, the working tree is untouched)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "src"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def timed(src: Path, args: list[str], out: Path) -> dict[str, float | None]:
    shim = str(REPO / "src" / "kscu" / "torchvision_compat.py")
    argv = [a.replace("{out}", str(out)) for a in args]
    code = RUN.format(shim=shim, src=str(src), args=argv)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{src}: kscu {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    found = ERASED.findall(done.stdout + done.stderr)
    peak = PEAK.findall(done.stderr)
    return {
        "command_seconds": seconds,
        "erase_seconds": float(found[-1]) if found else None,
        "peak_rss_mib": int(peak[-1]) / 1024 if peak else None,  # Linux: ru_maxrss is in KiB
    }


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision to compare with")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path("revisions.json"))
    p.add_argument("--also", default=None, help="extra flags for a third row (working tree)")
    p.add_argument(
        "--only-also", action="store_true", help="with --also: skip the plain working-tree row"
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the kscu command's arguments")
    args = p.parse_args()
    command = [a for a in args.args if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {args.base: (export(args.base, Path(tmp)), []), "working tree": (REPO / "src", [])}
        if args.also:
            trees[f"working tree {args.also}"] = (REPO / "src", args.also.split())
            if args.only_also:
                del trees["working tree"]
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for i in range(args.repeats):
            for name, (src, extra) in trees.items():  # alternate, so load drifts hit all
                out = Path(tmp) / f"run-{i}-{len(runs[name])}-{name.replace(' ', '_')}"
                runs[name].append(timed(src, [*command, *extra], out))
                print(name, runs[name][-1], flush=True)
    summary = {name: {k: median(r, k) for k in KEYS} for name, r in runs.items()}
    base = summary[args.base]
    for name, new in list(summary.items())[1:]:
        for key in KEYS:
            if base[key] and new[key]:
                unit = "MiB" if key.endswith("mib") else "s"
                print(
                    f"{key}: {args.base} {base[key]:.1f} {unit}, {name} {new[key]:.1f} {unit}, "
                    f"ratio {base[key] / new[key]:.2f}x"
                )
    record = {
        "command": ["kscu", *command],
        "base": args.base,
        "head": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        **machine(),
        "runs": runs,
        "medians": summary,
    }
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
