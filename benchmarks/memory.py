"""Peak memory of an erase, measured on the CPU, beside ``kscu erase --plan``'s prediction.

Memory does not depend on the values of the weights or on the device, so random weights on the
CPU count every byte a GPU would hold (the CPU figure is the growth of the process's peak
resident set during the erase, which also holds what a GPU run keeps in host RAM: it is counted
in the plan as ``restore_copy`` when the erase runs on the CPU). Each run is a fresh process.

``--model sd14``: SD v1.4's exact architecture, class mode, a few iterations of the default path,
each memory option, and ``benchmarks/plain_erase.py`` (deep copy, one UNet call per prediction,
autocast under bf16), side by side in one run:

    python benchmarks/memory.py --model sd14 --resolution 256 --dtype bfloat16 --json m.json

``--model flux-width``: FLUX.1-dev's transformer at full width (hidden 3072, 24 heads of 128,
T5 width 4096, the real block shapes) with 1+1, 2+1 and 1+2 joint+single blocks by default (see
``--added-blocks``); the differences
give each block kind's bytes, extrapolated to FLUX.1-dev's 19 + 38 blocks. The plan of the full
19 + 38 model (built on the meta device from its config) is printed beside it:

    python benchmarks/memory.py --model flux-width --resolution 512 --dtype bfloat16

The extrapolation weighs the 1+1 run by -54 (2+1 by 18, 1+2 by 37), so a CPU run's resident-set
noise (with freed memory kept, glibc's heap keeps a varying 0.7-1.2 GiB of freed buffers; FLUX's
default on a CPU since stop 30 returns them) is multiplied by as much.
``--added-blocks 3,6`` measures 1+1, 4+1 and 1+7 instead, each difference divided by the blocks
it adds (weights -11.2, 6 and 6.2), and ``--repeats N`` takes each shape's median of N runs. The
price is time: on 2 cores a 4+1 or 1+7 run takes 2-4 minutes where 2+1 takes 1-2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_model, machine

HERE = Path(__file__).parent
VARIANTS: dict[str, list[str]] = {
    "default (optimizer-in-backward)": [],
    "glibc returns freed blocks (--no-reuse-freed-memory)": ["--no-reuse-freed-memory"],
    "kept freed blocks (--reuse-freed-memory)": ["--reuse-freed-memory"],  # SD/SDXL default
    "eager denoiser calls (--no-trace-denoiser)": ["--no-trace-denoiser"],
    "all gradients held": ["--no-optimizer-in-backward"],
    "gradient checkpointing": ["--gradient-checkpointing"],
    "lean Adam state": ["--lean-adam"],
    "checkpointing + lean Adam": ["--gradient-checkpointing", "--lean-adam"],
    "host Adam state (--offload-adam)": ["--offload-adam"],
    "offload + checkpointing": ["--offload-adam", "--gradient-checkpointing"],
    "native convolution (--fast-cpu-conv)": ["--fast-cpu-conv"],  # float32 only: a speed option
    "fastest CPU: native conv + held gradients": ["--fast-cpu-conv", "--no-optimizer-in-backward"],
}
FLUX_DEV_BLOCKS = (19, 38)
GIB = 2**30


def save_sd14(folder: Path) -> None:
    sys.path.insert(0, str(HERE))
    import torch
    from sd14_erase import build_sd14

    build_sd14(torch.device("cpu"), torch.float32).save_pretrained(folder, safe_serialization=True)


def flux_width(joint: int, single: int, meta: bool = False):
    """A FluxPipeline with FLUX.1-dev's transformer width and the given block counts."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import torch
    from tiny_families import FLUX_DEV_WIDTH, build_tiny_flux_pipeline

    import kscu  # noqa: F401  (before diffusers: PyPI's torchvision beside a CPU torch)

    shape = {**FLUX_DEV_WIDTH, "num_layers": joint, "num_single_layers": single}
    if meta:
        with torch.device("meta"):
            return build_tiny_flux_pipeline(transformer_shape=shape)
    pipe = build_tiny_flux_pipeline(transformer_shape=shape)
    pipe.transformer.to(torch.bfloat16)  # as FLUX.1-dev ships it
    return pipe


def save_flux_width(folder: Path, joint: int, single: int) -> None:
    flux_width(joint, single).save_pretrained(folder, safe_serialization=True)


def save_config_only(folder: Path, pipe) -> None:
    """model_index.json and every component's config: enough for --plan, no weights."""
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if hasattr(component, "save_config"):
            component.save_config(folder / name)
        elif hasattr(component, "config"):
            component.config.save_pretrained(folder / name)


def erase_args(model: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        *("--concept", "church", "--mode", "class", "--model", str(model)),
        *("--output", str(out), "--resolution", str(args.resolution)),
        *("--iterations", str(args.iterations), "--dtype", args.dtype, "--device", "cpu"),
        *("--no-augment", "--no-preview", "--quiet"),
    ]


def child_env(args: argparse.Namespace, reuse: bool = False) -> dict[str, str]:
    """The measured processes' environment; ``--malloc-mmap-threshold`` fixes glibc's threshold.

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32
    MiB), so later blocks below it come from heaps that keep freed memory resident and split
    across per-thread arenas: the resident set then exceeds the live bytes. A fixed threshold
    returns every block above it to the system when freed, so the peak RSS tracks the live bytes
    (what ``--plan`` counts, and what CUDA's max allocated reports on a GPU). An SD erase turns
    glibc's mmap off on a CPU by default (freed memory kept for reuse, kscu.allocator), so with a
    fixed threshold the kscu runs also get ``--no-reuse-freed-memory`` (FLUX's default), except
    the ``--reuse-freed-memory`` variant. ``reuse``: glibc's environment form of kscu's kept
    setting, for the plain loop.
    """
    env = dict(os.environ)
    if reuse:
        from kscu.allocator import ENVIRONMENT, KEEP

        env |= {ENVIRONMENT[param]: str(value) for param, value in KEEP.items()}
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    return env


def kscu_run(model: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    kept = "--reuse-freed-memory" in extra  # its loop turns mmap off: the threshold is moot there
    if args.malloc_mmap_threshold is not None and not kept:  # glibc's mmap must be on for it
        extra = [*extra, "--no-reuse-freed-memory"]
    subprocess.run(
        [sys.executable, "-m", "kscu", "erase", *erase_args(model, out, args), *extra],
        check=True,
        env=child_env(args),
    )
    meta = json.loads((out / "kscu.json").read_text())
    shutil.rmtree(out)  # its float32 weights (GBs per FLUX run) are not what is measured
    return {
        "measured_bytes": meta["peak_memory_bytes"],
        "kind": meta["peak_memory_kind"],
        "plan_bytes": meta["memory_plan"]["total_bytes"],
        "plan": meta["memory_plan"]["bytes"],
        "host_bytes": meta["memory_plan"].get("host_bytes", {}),
        "trainable_elements": meta["trainable_elements"],
        "seconds": meta["seconds"],
        "iteration_seconds": meta["iteration_seconds"],
        "gpu_host_bytes": gpu_host_bytes(model, args, extra),
    }


def gpu_host_bytes(model: Path, args: argparse.Namespace, extra: list[str]) -> int:
    """What a GPU run of the same command keeps in host RAM (its plan's ``host_bytes``): on the
    CPU it is inside the measured peak, so measured minus this is the GPU's share (computed)."""
    return sum(plan_now(model, args, extra, device="cuda")["host_bytes"].values())


PLAIN = """
import json, sys, time, torch
sys.path.insert(0, {bench!r})
from plain_erase import plain_erase
from kscu.config import EraseConfig, resolve
from kscu.memory import START_BEFORE_LOAD, peak_memory, resident
from kscu.models import load_pipeline
# from before the load, as kscu erase counts it; glibc's defaults kept (no first-use payment,
# whose erase leaves kscu's settings behind): its first-use costs, 30-35 MiB, stay in its peak
since = resident(START_BEFORE_LOAD)
pipe = load_pipeline({model!r})
cfg = resolve(EraseConfig(concepts=["church"], iterations={it}, resolution={res}, augment=False,
                          dtype={dtype!r}))
ticks = []
with peak_memory(torch.device("cpu"), since) as peak:
    started = time.perf_counter()
    plain_erase(pipe, cfg, callback=lambda *_: ticks.append(time.perf_counter()))
    seconds = time.perf_counter() - started
steps = [b - a for a, b in zip([started, *ticks], ticks)]
print(json.dumps(peak | {{"seconds": seconds, "iteration_seconds": steps}}))
"""


def plain_run(model: Path, args: argparse.Namespace, reuse: bool = False) -> dict:
    code = PLAIN.format(
        bench=str(HERE), model=str(model), it=args.iterations, res=args.resolution, dtype=args.dtype
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env=child_env(args, reuse),
    )
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "measured_bytes": peak["bytes"],
        "kind": peak["kind"],
        "seconds": peak["seconds"],
        "iteration_seconds": peak["iteration_seconds"],
    }


def chosen_variants(args: argparse.Namespace) -> dict[str, list[str]]:
    only = args.only.split(",") if args.only else None
    return {
        n: e
        for n, e in VARIANTS.items()
        if (only is None or n.split()[0] in only)
        and (args.dtype == "float32" or "--fast-cpu-conv" not in e)
    }


def sd14_rows(args: argparse.Namespace, folder: Path) -> dict:
    model = args.model_dir or folder / "sd14"
    if not (model / "model_index.json").exists():
        save_sd14(model)
    rows = {
        name: kscu_run(model, folder / name.replace(" ", "_"), args, extra)
        for name, extra in chosen_variants(args).items()
    }
    if not args.no_plain:
        rows["plain loop (benchmarks/plain_erase.py)"] = plain_run(model, args)
    if args.plain_reuse:
        rows["plain loop, freed memory kept (glibc env)"] = plain_run(model, args, reuse=True)
    return rows


def flux_shapes(added: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """1+1, then 1+1 with ``added[0]`` more joint blocks, then with ``added[1]`` more single."""
    shapes = [(1, 1), (1 + added[0], 1), (1, 1 + added[1])]
    return {f"{joint}+{single}": (joint, single) for joint, single in shapes}


def extrapolate(small: dict[str, int]) -> int:
    """Bytes of 19 + 38 blocks from 1+1, (1+J)+1 and 1+(1+S) (blocks add, the rest stays): each
    block kind's bytes are its shape's difference from 1+1 divided by the blocks it adds."""
    shapes = {tuple(int(n) for n in k.split("+")): v for k, v in small.items()}
    base = shapes[(1, 1)]
    (joints, _), joint = next((k, v) for k, v in shapes.items() if k[0] > 1)
    (_, singles), single = next((k, v) for k, v in shapes.items() if k[1] > 1)
    per_joint, per_single = (joint - base) / (joints - 1), (single - base) / (singles - 1)
    total = base + (FLUX_DEV_BLOCKS[0] - 1) * per_joint + (FLUX_DEV_BLOCKS[1] - 1) * per_single
    return round(total)


def flux_rows(args: argparse.Namespace, folder: Path) -> dict:
    rows = {}
    for name, extra in chosen_variants(args).items():
        runs = {}
        for shape, (joint, single) in flux_shapes(args.added_blocks).items():
            model = flux_model(args, folder, shape)
            if not (model / "model_index.json").exists():
                save_flux_width(model, joint, single)
            out = f"{name.split()[0]}-{shape}"
            repeats = [
                kscu_run(model, folder / f"{out}-{k}", args, extra) for k in range(args.repeats)
            ]
            runs[shape] = median_run(repeats)
        rows[name] = flux_summary(args, folder, runs, extra)
    return rows


def median_run(runs: list[dict]) -> dict:
    """The first run's record with the median of every run's measured peak (all kept beside)."""
    measured = [r["measured_bytes"] for r in runs]
    return {**runs[0], "measured_bytes": round(statistics.median(measured)), "runs": measured}


def flux_model(args: argparse.Namespace, folder: Path, shape: str) -> Path:
    return (args.model_dir or folder) / f"flux-width-{shape}"


def flux_summary(args: argparse.Namespace, folder: Path, runs: dict, extra: list[str]) -> dict:
    """The 19 + 38 extrapolation of measured and planned bytes, and the full model's own plan
    (built on the meta device from FLUX.1-dev's config, as a GPU would hold it)."""
    full = folder / "flux-dev-config"
    if not (full / "model_index.json").exists():
        save_config_only(full, flux_width(*FLUX_DEV_BLOCKS, meta=True))
    full_plan = plan_now(full, args, extra, device="cuda")
    return {
        "blocks": runs,
        "extrapolated_measured_bytes": extrapolate(
            {k: r["measured_bytes"] for k, r in runs.items()}
        ),
        "extrapolated_plan_bytes": extrapolate({k: r["plan_bytes"] for k, r in runs.items()}),
        "extrapolated_gpu_host_bytes": extrapolate(
            {k: r["gpu_host_bytes"] for k, r in runs.items()}
        ),
        "full_plan_bytes": full_plan["total_bytes"],
        "full_plan": full_plan["bytes"],
        "full_host_bytes": full_plan["host_bytes"],
        "full_trainable_elements": full_plan["trainable_elements"],
    }


def report(args: argparse.Namespace, rows: dict, cpu: str | None = None) -> None:
    """The table; ``cpu``: the CPU the measurements ran on (a replan's JSON), else this one's."""
    where = f"CPU ({cpu or cpu_model()})"
    shape = f"{args.resolution} px, {args.iterations} iterations, {args.dtype}"
    print(f"{args.model}, class mode, {shape}, {where}")
    print(
        f"{'path':<42} {'measured GiB':>12} {'plan GiB':>9} {'plan/measured':>14} "
        f"{'GPU: - host':>12} {'s/iteration':>12} {'later median':>12}"
    )
    for name, r in rows.items():
        if "blocks" in r:
            for shape, b in r["blocks"].items():
                line(f"{name} [{shape}]", b["measured_bytes"], b["plan_bytes"], b["gpu_host_bytes"])
            host = r["extrapolated_gpu_host_bytes"]
            line(f"{name} [19+38 extrapolated]", *_pair(r, "extrapolated"), host)
            print(f"{'':<42} {'':>12} {r['full_plan_bytes'] / GIB:9.3f}  (19+38 plan, GPU)")
        else:
            overall = r["seconds"] / args.iterations if r.get("seconds") else None
            speed = (overall, _later_median(r.get("iteration_seconds")))
            line(name, r["measured_bytes"], r.get("plan_bytes"), r.get("gpu_host_bytes"), speed)


def _pair(r: dict, key: str) -> tuple[int, int]:
    return r[f"{key}_measured_bytes"], r[f"{key}_plan_bytes"]


def _later_median(steps: list[float] | None) -> float | None:
    """Median seconds of the iterations after the first (which pays every first touch)."""
    return statistics.median(steps[1:]) if steps and len(steps) > 1 else None


def line(
    name: str, measured: int, planned: int | None, host: int | None, speed: tuple = ()
) -> None:
    """One table row; ``host``: what a GPU run keeps in host RAM (the GPU column subtracts it);
    ``speed``: (seconds per iteration overall, later iterations' median)."""
    ratio = f"{planned / measured:.3f}" if planned and measured else "-"
    plan_text = f"{planned / GIB:9.3f}" if planned else f"{'-':>9}"
    gpu = f"{(measured - host) / GIB:12.3f}" if host is not None else f"{'-':>12}"
    cells = " ".join(f"{v:12.2f}" if v else f"{'-':>12}" for v in speed)
    print(f"{name:<42} {measured / GIB:12.3f} {plan_text} {ratio:>14} {gpu} {cells}")


def plan_now(model: Path, args: argparse.Namespace, extra: list[str], device: str = "cpu") -> dict:
    """``kscu erase --plan`` of the code as it is now, for the same command line on ``device``."""
    import dataclasses

    from kscu.cli import build_parser, erase_config_from_args
    from kscu.runner import memory_plan, prepare

    ns = build_parser().parse_args(["erase", *erase_args(model, Path("unused"), args), *extra])
    config = erase_config_from_args(ns)
    # the convolution kernel changes no byte; the flag is refused off the CPU
    config = dataclasses.replace(
        config, device=device, fast_cpu_conv=config.fast_cpu_conv and device == "cpu"
    )
    return memory_plan(str(model), prepare(config, str(model)))


def replan(args: argparse.Namespace) -> None:
    """Redo the plans recorded in ``--json`` with the current code (the measurements stay)."""
    record = json.loads(args.json.read_text())
    saved = record["settings"]
    for key in ("resolution", "iterations", "dtype"):
        setattr(args, key, saved[key])
    args.model = saved["model"]
    for name, row in record["rows"].items():
        runs = row.get("blocks", {"": row})
        for shape, run in runs.items():
            if "plan_bytes" in run:
                model = flux_model(args, args.model_dir, shape) if shape else args.model_dir
                fresh = plan_now(model, args, VARIANTS[name])
                run.update(plan_bytes=fresh["total_bytes"], plan=fresh["bytes"])
                run["host_bytes"] = fresh["host_bytes"]
                run["gpu_host_bytes"] = gpu_host_bytes(model, args, VARIANTS[name])
        if "blocks" in row:
            with tempfile.TemporaryDirectory() as tmp:
                row.update(flux_summary(args, Path(tmp), row["blocks"], VARIANTS[name]))
    record["plan_redone_at"] = subprocess.run(
        ["git", "-C", str(HERE.parent), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    report(args, record["rows"], record.get("cpu") or "not recorded in the JSON")
    args.json.write_text(json.dumps(record, indent=2))


def block_pair(text: str) -> tuple[int, int]:
    """``J,S`` with J, S >= 1, for ``--added-blocks``."""
    try:
        pair = tuple(int(n) for n in text.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise argparse.ArgumentTypeError(f"expected J,S: two whole numbers >= 1, not {text!r}")
    return pair


def at_least_one(text: str) -> int:
    """A whole number >= 1, for ``--repeats``."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return int(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("sd14", "flux-width"), default="sd14")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-plain", action="store_true", help="skip the plain loop (sd14)")
    p.add_argument(
        "--plain-reuse",
        action="store_true",
        help="also run the plain loop with glibc keeping freed memory, as kscu's erase does "
        "(glibc's mmap off: --malloc-mmap-threshold has no effect on that row)",
    )
    p.add_argument("--only", default=None, help="comma-separated variant names' first words")
    p.add_argument(
        "--added-blocks",
        type=block_pair,
        default=(1, 1),
        metavar="J,S",
        help="flux-width: measure 1+1, (1+J)+1 and 1+(1+S) blocks (default 1,1)",
    )
    p.add_argument(
        "--repeats",
        type=at_least_one,
        default=1,
        help="flux-width: runs per shape, median taken",
    )
    p.add_argument("--model-dir", type=Path, default=None, help="keep/reuse the built models")
    p.add_argument("--json", type=Path, default=Path("memory.json"))
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="bytes: glibc's fixed mmap threshold for the measured processes (e.g. 1048576); "
        "kscu runs then also get --no-reuse-freed-memory, whose erase loop fixes it at 1 MiB "
        "and asks torch for huge pages (since stop 29), so the resident set tracks live bytes",
    )
    p.add_argument(
        "--replan",
        action="store_true",
        help="redo the plans in --json with the current code (needs --model-dir)",
    )
    args = p.parse_args()
    if args.replan:
        replan(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build = sd14_rows if args.model == "sd14" else flux_rows
        rows = build(args, Path(tmp))
    report(args, rows)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {"settings": settings, **machine(), "rows": rows}
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
