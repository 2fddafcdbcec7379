"""The ``kscu world`` subcommand (``kscu world train``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kscu.errors import KscuError


def _train(args: argparse.Namespace) -> int:
    from kscu.world.train import run

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise KscuError("--device cuda was given but no CUDA GPU is visible; use --device cpu")
    if args.init_from is not None and not (Path(args.init_from) / "unet").is_dir():
        raise KscuError(
            f"--init-from {args.init_from} is not a pipeline folder (no unet/); "
            "pass a folder written by `kscu world train`"
        )
    for name in ("classifier_steps", "vae_steps", "unet_steps", "n_latents", "batch_size"):
        if getattr(args, name) <= 0:
            raise KscuError(f"--{name.replace('_', '-')} must be positive")
    run(
        args.output,
        device=args.device,
        seed=args.seed,
        only=args.only,
        classifier_steps=args.classifier_steps,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        n_latents=args.n_latents,
        batch_size=args.batch_size,
        snapshot_every=args.snapshot_every,
        init_from=args.init_from,
        lr=args.lr,
    )
    return 0


def register(subparsers) -> None:
    """Add ``world train`` to an argparse subparsers object."""
    world = subparsers.add_parser("world", help="the bundled tiny text-to-image world")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    train = world_sub.add_parser(
        "train", help="train the world's classifier and/or diffusion model from scratch"
    )
    train.add_argument("--output", required=True, help="folder for classifier/, model/, train.log")
    train.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--only",
        choices=("classifier", "model"),
        default=None,
        help="train just this part (default: both)",
    )
    train.add_argument("--classifier-steps", type=int, default=1000)
    train.add_argument("--vae-steps", type=int, default=600)
    train.add_argument("--unet-steps", type=int, default=3000)
    train.add_argument(
        "--n-latents",
        type=int,
        default=40000,
        help="renders encoded once and reused by the denoiser",
    )
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument(
        "--snapshot-every",
        type=int,
        default=500,
        help="save an EMA snapshot pipeline every N UNet steps (0: never)",
    )
    train.add_argument("--lr", type=float, default=6e-4, help="text encoder + UNet learning rate")
    train.add_argument(
        "--init-from",
        default=None,
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
        print(f"error: {e}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
