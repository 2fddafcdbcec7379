"""The KSCU erase loop, in one place (KSCU_METHOD.md sections 2-5).

For each entry (concept c, step index s) of the schedule:
  1. get x_s: the edited model's own CFG-3 DDIM trajectory for c from seeded noise, advanced one
     step from the previous iteration's x when the schedule moved exactly one step on;
  2. frozen predictions p = eps(x_s, t, c), n = eps(x_s, t, "") from the original weights;
  3. edited predictions e = eps*(x_s, t, c'), u = eps*(x_s, t, "");
  4. one Adam step on MSE(e, n - eta (p - n)) + lambda2 MSE(u, n - lambda1 (p - n)).

The frozen model is the same UNet called with the original values of the trainable tensors
(``torch.func.functional_call``), so no module is copied. Trainable tensors are float32 master
weights whatever the compute dtype: bf16/fp16 only change the arithmetic (autocast), never the
precision of the updates (KSCU_METHOD.md section 8).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch.func import functional_call
from tqdm.auto import tqdm

from kscu.checkpoint import fingerprint
from kscu.config import EraseConfig, resolve
from kscu.errors import KscuError
from kscu.models import TORCH_DTYPES, encode_prompts, native_resolution
from kscu.objective import kscu_loss
from kscu.prompts import augmented_prompts
from kscu.schedule import Entry, key_step_table, uniform_table
from kscu.scope import trainable_names


@dataclass
class EraseResult:
    """What an erase produced: the edited tensors and the record of how."""

    config: EraseConfig
    tensors: dict[str, torch.Tensor]  # edited UNet parameters, float32, on the CPU
    schedule: list[Entry]
    losses: list[float]
    seconds: float
    base_fingerprint: dict[str, list[float]]  # see kscu.checkpoint.fingerprint


def build_schedule(cfg: EraseConfig) -> list[Entry]:
    """KSCU's key step table, or ESD's uniform draw over [start, end)."""
    if cfg.method == "esd":
        return uniform_table(cfg.concepts, cfg.start_step, cfg.end_step, cfg.iterations, cfg.seed)
    return key_step_table(cfg.concepts, cfg.start_step, cfg.end_step, cfg.iterations, cfg.loops)


class Trajectory:
    """The edited model's own sampling path: x_0 from seeded noise, then CFG DDIM steps."""

    def __init__(self, pipe: Any, cfg: EraseConfig, unet_call: Callable[..., torch.Tensor]):
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(cfg.num_steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        size = (cfg.resolution or native_resolution(pipe)) // pipe.vae_scale_factor
        self.shape = (1, pipe.unet.config.in_channels, size, size)
        self.guidance = cfg.trajectory_guidance
        self.unet_call = unet_call
        self.device = pipe.device

    def noise(self, seed: int) -> torch.Tensor:
        """Drawn on the CPU so a seed gives the same x_0 on every device."""
        g = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn(self.shape, generator=g) * self.scheduler.init_noise_sigma
        return x.to(self.device)

    @torch.no_grad()
    def step(self, x: torch.Tensor, s: int, cond: torch.Tensor, uncond: torch.Tensor):
        """x_s -> x_{s+1}: one DDIM step with CFG at the trajectory guidance scale."""
        t = self.timesteps[s]
        out = self.unet_call(torch.cat([x, x]), t, torch.cat([uncond, cond]))
        n, p = out.chunk(2)
        return self.scheduler.step(n + self.guidance * (p - n), t, x).prev_sample

    def run(self, x: torch.Tensor, start: int, stop: int, cond, uncond) -> torch.Tensor:
        for s in range(start, stop):
            x = self.step(x, s, cond, uncond)
        return x


def erase(
    pipe: Any,
    config: EraseConfig,
    progress: bool = True,
    callback: Callable[[int, Entry, torch.Tensor, float], None] | None = None,
) -> EraseResult:
    """Erase ``config.concepts`` from ``pipe.unet`` in place; returns the edited tensors.

    ``config`` is resolved here (idempotent); model presets are applied by ``kscu.runner``.
    ``callback(i, (concept, s), x_s, loss)`` sees every iteration (tests use it).
    """
    cfg = resolve(config)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    unet, device = pipe.unet, pipe.device
    compute_dtype = TORCH_DTYPES[cfg.dtype]
    if compute_dtype == torch.float32 and unet.dtype != torch.float32:
        raise KscuError(
            f"the pipeline is {unet.dtype} but the compute dtype is float32; "
            f"load it in float32 or set dtype to {str(unet.dtype).removeprefix('torch.')}"
        )
    unet.eval()
    unet.requires_grad_(False)

    params = dict(unet.named_parameters())
    names = trainable_names(unet, cfg.scope)
    stored_dtype = {n: params[n].dtype for n in names}
    original = {n: params[n].detach().clone() for n in names}
    for n in names:  # float32 master weights: lr-sized steps must not round away
        params[n].data = params[n].data.float()
        params[n].requires_grad_(True)
    # fused: one kernel for all tensors on CUDA; the same Adam update up to float rounding
    fused = device.type == "cuda"
    optimizer = torch.optim.Adam([params[n] for n in names], lr=cfg.lr, fused=fused)
    scaler = torch.amp.GradScaler(device.type) if cfg.dtype == "float16" else None

    def autocast():
        if compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=compute_dtype)

    def edited(x, t, emb):
        with autocast():
            return unet(x.to(compute_dtype), t, emb).sample.float()

    def frozen(x, t, emb):
        with autocast():
            return functional_call(unet, original, (x.to(compute_dtype), t, emb)).sample.float()

    def embed(prompts: list[str]) -> torch.Tensor:
        return encode_prompts(pipe, prompts).to(compute_dtype)

    uncond = embed([""])
    cond = {c: embed([c]) for c in cfg.concepts}
    variants = {
        c: embed(augmented_prompts(c, cfg.mode, cfg.augment_variants, cfg.seed))
        for c in cfg.concepts
    }
    augment_from = cfg.iterations - math.ceil(cfg.augment_fraction * cfg.iterations)
    rng = random.Random(cfg.seed)
    emb_noise = torch.Generator("cpu").manual_seed(cfg.seed)

    trajectory = Trajectory(pipe, cfg, edited)
    table = build_schedule(cfg)
    num_train = int(pipe.scheduler.config.num_train_timesteps)
    losses: list[float] = []
    x, previous = None, None
    bar = tqdm(table, desc="erase", disable=not progress, dynamic_ncols=True)
    try:
        for i, (c, s) in enumerate(bar):
            if cfg.reuse_trajectory and previous == (c, s - 1):
                x = trajectory.step(x, s - 1, cond[c], uncond)
            else:
                x = trajectory.run(trajectory.noise(cfg.seed + i), 0, s, cond[c], uncond)
            t = trajectory.timesteps[s]

            with torch.no_grad():
                p, n = frozen(torch.cat([x, x]), t, torch.cat([cond[c], uncond])).chunk(2)
            cond_e = cond[c]
            if cfg.augment and i >= augment_from:
                cond_e = variants[c][rng.randrange(len(variants[c]))][None]
                noise = torch.randn(cond_e.shape, generator=emb_noise) * cfg.embedding_noise_std
                cond_e = cond_e + noise.to(cond_e.device, cond_e.dtype)
            if cfg.lambda2 == 0:  # ESD: the leakage term is zero, skip its forward pass
                e, u = edited(x, t, cond_e), None
            else:
                e, u = edited(torch.cat([x, x]), t, torch.cat([cond_e, uncond])).chunk(2)
            loss = kscu_loss(
                e, u, p, n, t, cfg.negative_guidance, cfg.lambda1_alpha, cfg.lambda2, num_train
            )
            if not torch.isfinite(loss):
                raise KscuError(
                    f"loss became {loss.item()} at iteration {i} (step {s}); "
                    "lower --lr or use --dtype float32"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            losses.append(loss.item())
            bar.set_postfix(step=s, loss=f"{losses[-1]:.3g}")
            if callback is not None:
                callback(i, (c, s), x, losses[-1])
            previous = (c, s)
    except BaseException:
        _put(params, original, stored_dtype)  # leave the pipeline as it was
        raise
    finally:
        bar.close()

    tensors = {n: params[n].detach().to("cpu", torch.float32).clone() for n in names}
    _put(params, {n: params[n].detach() for n in names}, stored_dtype)
    return EraseResult(
        cfg, tensors, table, losses, time.perf_counter() - started, fingerprint(original)
    )


def _put(params: dict[str, torch.nn.Parameter], values, dtypes) -> None:
    """Write ``values`` into the UNet in its own dtypes, and freeze them again."""
    for n, v in values.items():
        params[n].data = v.detach().to(dtypes[n])
        params[n].requires_grad_(False)
