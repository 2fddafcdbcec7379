"""The ``kscu world`` subcommand (``kscu world train``)."""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import fields
from pathlib import Path

from kscu.config import SEED_RANGE
from kscu.errors import KscuError
from kscu.world.settings import WorldTrainSettings


def _train(args: argparse.Namespace) -> int:
    from kscu.world.train import run

    settings = WorldTrainSettings(
        **{f.name: getattr(args, f.name) for f in fields(WorldTrainSettings)}
    )
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", settings.device):  # "cudax" is no CUDA device
        raise KscuError(f"unknown --device {settings.device!r}; use cpu, cuda or cuda:N")
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise KscuError("--device cuda was given but no CUDA GPU is visible; use --device cpu")
    if settings.init_from is not None:
        if settings.only == "classifier":
            raise KscuError("--init-from continues the model; --only classifier trains none")
        _check_init_from(Path(settings.init_from))
    for name in ("classifier_steps", "vae_steps", "unet_steps", "n_latents", "batch_size"):
        if getattr(settings, name) <= 0:
            raise KscuError(f"--{name.replace('_', '-')} must be positive")
    if not (math.isfinite(settings.lr) and settings.lr > 0):
        raise KscuError(f"--lr must be a finite number > 0 (got {settings.lr})")
    if settings.snapshot_every < 0:
        raise KscuError(
            f"--snapshot-every must be >= 0, 0 for never (got {settings.snapshot_every})"
        )
    last_seed = SEED_RANGE[1] - 2  # torch takes seed + 2 at most; numpy no negative seed
    if not 0 <= settings.seed <= last_seed:
        raise KscuError(f"--seed must be in [0, {last_seed}] (got {settings.seed})")
    try:
        run(args.output, settings, overwrite=args.overwrite)  # checks --output before training
    except (MemoryError, RuntimeError) as e:  # numpy's MemoryError; torch's allocators
        if isinstance(e, RuntimeError) and not OUT_OF_MEMORY.search(str(e)):
            raise
        rerun = "" if args.overwrite else ", with --overwrite (the stopped run's log is there)"
        raise KscuError(
            f"out of memory training the world (--batch-size {settings.batch_size}, "
            f"--n-latents {settings.n_latents}); run again with smaller ones{rerun}"
        ) from None
    return 0


# torch's CPU allocator ("not enough memory", "can't allocate memory") and CUDA's messages
OUT_OF_MEMORY = re.compile(r"out of memory|not enough memory|can't allocate memory", re.I)


def _check_init_from(folder: Path) -> None:
    """Before the output folder or its log is made: each network the run continues from has its
    safetensors weights, and the tokenizer its folder (a refusal later would leave a log behind
    that blocks the same command once fixed)."""
    needed = (
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "tokenizer/",
    )
    for what in needed:
        if not (folder / what).exists():
            raise KscuError(
                f"--init-from {folder} is not a world pipeline folder (no {what}); "
                "pass a folder written by `kscu world train`"
            )


def register(subparsers) -> None:
    """Add ``world train`` to an argparse subparsers object (defaults: ``WorldTrainSettings``)."""
    d = WorldTrainSettings()
    world = subparsers.add_parser("world", help="the bundled tiny text-to-image world")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    train = world_sub.add_parser(
        "train", help="train the world's classifier and/or diffusion model from scratch"
    )
    train.add_argument("--output", required=True, help="folder for classifier/, model/, train.log")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the world train run already in --output (only once the new one is complete)",
    )
    train.add_argument("--device", default=d.device, help=f"cpu or cuda (default: {d.device})")
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument(
        "--only",
        choices=("classifier", "model"),
        default=d.only,
        help="train just this part (default: both)",
    )
    for name, text in (
        ("classifier_steps", "classifier training steps"),
        ("vae_steps", "VAE training steps"),
        ("unet_steps", "text encoder + UNet training steps"),
        ("n_latents", "renders encoded once and reused by the denoiser"),
        ("batch_size", "images per step"),
        ("snapshot_every", "save an EMA snapshot pipeline every N UNet steps (0: never)"),
    ):
        default = getattr(d, name)
        train.add_argument(
            "--" + name.replace("_", "-"), type=int, default=default, help=f"{text} ({default})"
        )
    train.add_argument("--lr", type=float, default=d.lr, help=f"text encoder + UNet lr ({d.lr})")
    train.add_argument(
        "--init-from",
        default=d.init_from,
        help="continue training this world pipeline folder (keeps its VAE)",
    )
    train.set_defaults(func=_train)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m kscu.world.cli train ...``) for use before kscu.cli exists."""
    parser = argparse.ArgumentParser(prog="kscu")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["world", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except KscuError as e:
        print(f"error: {e}", file=sys.stderr)  # as kscu's own entry point
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
