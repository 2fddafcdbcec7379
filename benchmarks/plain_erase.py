"""The straightforward KSCU loop, written for clarity, not speed: the yardstick for kscu.trainer.

It keeps a deep copy of the UNet as the frozen model and makes every prediction with its own
UNet call (two per CFG trajectory step, four per iteration), as a first implementation would.
``kscu.trainer.erase`` computes the same thing with batched calls and without the copy; the tests
(tests/test_fast_path.py) check that both agree, and ``sd14_erase.py --plain`` times this one.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import torch

from kscu.config import EraseConfig, resolve
from kscu.models import encode_prompts
from kscu.objective import kscu_loss
from kscu.prompts import augmented_prompts
from kscu.scope import trainable_names
from kscu.trainer import Trajectory, build_schedule


def plain_erase(pipe: Any, config: EraseConfig, callback=None) -> dict[str, torch.Tensor]:
    """float32 only; returns the edited tensors (float32, CPU) and leaves them in ``pipe``."""
    cfg = resolve(config)
    unet = pipe.unet.eval().requires_grad_(False)
    frozen = copy.deepcopy(unet)
    params = dict(unet.named_parameters())
    names = trainable_names(unet, cfg.scope)
    for n in names:
        params[n].requires_grad_(True)
    optimizer = torch.optim.Adam([params[n] for n in names], lr=cfg.lr)

    trajectory = Trajectory(pipe, cfg, unet_call=None)
    uncond = encode_prompts(pipe, [""])
    cond = {c: encode_prompts(pipe, [c]) for c in cfg.concepts}
    variants = {
        c: encode_prompts(pipe, augmented_prompts(c, cfg.mode, cfg.augment_variants, cfg.seed))
        for c in cfg.concepts
    }
    augment_from = cfg.iterations - math.ceil(cfg.augment_fraction * cfg.iterations)
    rng = random.Random(cfg.seed)
    emb_noise = torch.Generator("cpu").manual_seed(cfg.seed)
    num_train = int(pipe.scheduler.config.num_train_timesteps)

    @torch.no_grad()
    def advance(x, s, c):  # one CFG DDIM step, two separate UNet calls
        t = trajectory.timesteps[s]
        n, p = unet(x, t, uncond).sample, unet(x, t, cond[c]).sample
        eps = n + cfg.trajectory_guidance * (p - n)
        return trajectory.scheduler.step(eps, t, x).prev_sample

    x, previous = None, None
    for i, (c, s) in enumerate(build_schedule(cfg)):
        if cfg.reuse_trajectory and previous == (c, s - 1):
            x = advance(x, s - 1, c)
        else:
            x = trajectory.noise(cfg.seed + i)
            for k in range(s):
                x = advance(x, k, c)
        t = trajectory.timesteps[s]
        with torch.no_grad():
            p = frozen(x, t, cond[c]).sample
            n = frozen(x, t, uncond).sample
        cond_e = cond[c]
        if cfg.augment and i >= augment_from:
            cond_e = variants[c][rng.randrange(len(variants[c]))][None]
            cond_e = (
                cond_e + torch.randn(cond_e.shape, generator=emb_noise) * cfg.embedding_noise_std
            )
        e = unet(x, t, cond_e).sample
        u = unet(x, t, uncond).sample if cfg.lambda2 != 0 else None
        loss = kscu_loss(
            e, u, p, n, t, cfg.negative_guidance, cfg.lambda1_alpha, cfg.lambda2, num_train
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if callback is not None:
            callback(i, (c, s), x, loss.item())
        previous = (c, s)
    for n in names:
        params[n].requires_grad_(False)
    return {n: params[n].detach().cpu().clone() for n in names}
