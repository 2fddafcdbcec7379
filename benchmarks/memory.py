"""Peak memory of an erase, measured on the CPU, beside ``kscu erase --plan``'s prediction.

Builds SD v1.4's exact architecture with random weights (memory does not depend on the values),
saves it as a diffusers folder, and runs, each in a fresh process, a few class-mode iterations of:
the default path, each memory option, and ``benchmarks/plain_erase.py`` (deep copy, one UNet call
per prediction). Each kscu run's ``kscu.json`` holds its measured peak (growth of the process's
peak resident set during the erase) and the plan; the plain loop's peak is measured the same way.

    python benchmarks/memory.py --resolution 64 --iterations 3 --json memory.json

Every figure is CPU-measured on the machine it runs on; the FLUX.1-dev-width extrapolation of
issue 14 is not implemented here yet.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "default (optimizer-in-backward)": [],
    "all gradients held": ["--no-optimizer-in-backward"],
    "gradient checkpointing": ["--gradient-checkpointing"],
    "lean Adam state": ["--lean-adam"],
}


def save_sd14(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from sd14_erase import build_sd14

    build_sd14(torch.device("cpu"), torch.float32).save_pretrained(folder, safe_serialization=True)


def kscu_run(model: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "kscu",
        "erase",
        "--concept",
        "church",
        "--mode",
        "class",
        "--model",
        str(model),
        "--output",
        str(out),
        "--resolution",
        str(args.resolution),
        "--iterations",
        str(args.iterations),
        "--dtype",
        args.dtype,
        "--device",
        "cpu",
        "--no-augment",
        "--no-preview",
        "--quiet",
        *extra,
    ]
    subprocess.run(cmd, check=True)
    meta = json.loads((out / "kscu.json").read_text())
    return {
        "measured_bytes": meta["peak_memory_bytes"]["bytes"],
        "kind": meta["peak_memory_bytes"]["kind"],
        "plan_bytes": meta["memory_plan"]["total_bytes"],
        "plan": meta["memory_plan"]["bytes"],
        "seconds": meta["seconds"],
    }


PLAIN = """
import json, sys, torch
sys.path.insert(0, {bench!r})
from plain_erase import plain_erase
from kscu.config import EraseConfig, resolve
from kscu.memory import peak_memory
from kscu.models import load_pipeline
pipe = load_pipeline({model!r})
cfg = resolve(EraseConfig(concepts=["church"], iterations={it}, resolution={res}, augment=False))
with peak_memory(torch.device("cpu")) as peak:
    plain_erase(pipe, cfg)
print(json.dumps(peak))
"""


def plain_run(model: Path, args: argparse.Namespace) -> dict:
    code = PLAIN.format(
        bench=str(Path(__file__).parent), model=str(model), it=args.iterations, res=args.resolution
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    return {"measured_bytes": peak["bytes"], "kind": peak["kind"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    p.add_argument("--only", default=None, help="comma-separated variant names' first words")
    p.add_argument("--json", type=Path, default=Path("memory.json"))
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "sd14"
        save_sd14(model)
        chosen = args.only.split(",") if args.only else None
        for name, extra in VARIANTS.items():
            if chosen is None or name.split()[0] in chosen:
                rows[name] = kscu_run(model, Path(tmp) / name.split()[0], args, extra)
        if not args.no_plain and args.dtype == "float32":
            rows["plain loop (benchmarks/plain_erase.py)"] = plain_run(model, args)
    gib = 2**30
    print(
        f"SD v1.4 architecture, class mode, {args.resolution} px, {args.iterations} iterations, "
        f"{args.dtype}, CPU ({platform.processor() or platform.machine()})"
    )
    print(f"{'path':<42} {'measured GiB':>12} {'plan GiB':>9} {'plan/measured':>14}")
    for name, r in rows.items():
        plan = r.get("plan_bytes")
        ratio = f"{plan / r['measured_bytes']:.3f}" if plan and r["measured_bytes"] else "-"
        plan_text = f"{plan / gib:9.3f}" if plan else f"{'-':>9}"
        print(f"{name:<42} {r['measured_bytes'] / gib:12.3f} {plan_text} {ratio:>14}")
    args.json.write_text(
        json.dumps(
            {
                "settings": vars(args) | {"json": str(args.json)},
                "machine": platform.platform(),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
