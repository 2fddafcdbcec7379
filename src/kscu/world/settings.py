"""The settings of ``kscu world train``: one dataclass whose defaults the CLI shows and uses.

Kept apart from ``kscu.world.train`` (torch, diffusers) so registering the CLI stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorldTrainSettings:
    """How the tiny world is trained (the bundled model: these defaults, then 6000 more steps)."""

    device: str = "cpu"
    seed: int = 0
    only: str | None = None  # "classifier" or "model"; None: both
    classifier_steps: int = 1000
    vae_steps: int = 600
    unet_steps: int = 3000
    n_latents: int = 40000  # renders encoded once and reused by the denoiser
    batch_size: int = 64
    snapshot_every: int = 500  # save an EMA snapshot pipeline every N UNet steps (0: never)
    lr: float = 6e-4  # text encoder + UNet
    init_from: str | None = None  # a world pipeline folder to continue training (keeps its VAE)
