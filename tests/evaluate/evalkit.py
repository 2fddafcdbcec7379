"""Helpers for the evaluation tests: tiny model builders, image/CSV writers, CLI runners.

Tiny random models are saved like the real ones, so tests go through the real loading code
(no network here: a folder is passed wherever a Hub id would go).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENETTE = [
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
]


def make_images(
    folder: Path, n: int, size=(32, 32), start: int = 0, seed: int = 0, blank: bool = False
) -> list[Path]:
    """``n`` PNGs named {case}.png: random noise, or plain white when ``blank``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for case in range(start, start + n):
        if blank:
            arr = np.full((size[1], size[0], 3), 255, np.uint8)
        else:
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"{case}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def kscu_main(argv: list[str]) -> int:
    """Run the CLI in-process, as ``kscu ARGS`` would (exit code, KscuError -> 2)."""
    try:
        from kscu.cli import main
    except ImportError:  # the top-level CLI is not there yet: same subcommands, minimal shell
        main = _fallback_main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return int(code or 0)


def _fallback_main(argv: list[str]) -> int:
    import argparse

    from kscu.errors import KscuError
    from kscu.evaluate.cli import register

    parser = argparse.ArgumentParser(prog="kscu")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KscuError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_kscu(
    args: list[str],
    cwd: Path | None = None,
    launcher: list[str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``python -m kscu ARGS`` (or under a launcher) in a subprocess, offline."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = (launcher or [sys.executable, "-m"]) + ["kscu", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launcher() -> list[str]:
    """``accelerate launch`` with 2 CPU processes (``--multi_gpu``: 2 torchrun workers, which
    form a gloo group on a machine without a GPU; ``--cpu`` would start only one)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"] + (
        "--num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no "
        f"--main_process_port {free_port()} -m"
    ).split()


def spawn_ranks(args: list[str], n: int = 2, timeout: float = 120) -> list[tuple[int, str]]:
    """``python -m kscu ARGS`` as ``n`` ranks of one CPU process group, started the way torchrun
    starts them (its environment variables), so each rank's own exit code and stderr are seen.
    Returns (exit code, stderr) per rank; fails if they do not all end within ``timeout``."""
    port = str(free_port())
    procs = []
    for rank in range(n):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(n),
            LOCAL_WORLD_SIZE=str(n),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "kscu", *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
