"""The straightforward KSCU loop, written for clarity, not speed: the yardstick for kscu.trainer.

Independent of the package on purpose: it uses nothing of ``kscu`` but the resolved
``EraseConfig``. The Key Step Table, the DDIM walk, the loss and the choice of augmented prompts
are written here again, plainly, from KSCU_METHOD.md, so the agreement test
(tests/test_fast_path.py) checks the whole algorithm, not only the batching. It keeps a deep
copy of the UNet as the frozen model and makes every prediction with its own UNet call (two per
CFG trajectory step, four per iteration), as a first implementation would. Stable Diffusion
1.x, epsilon prediction; float32 weights, and under ``cfg.dtype`` bfloat16 every UNet call in
``torch.autocast`` (the float32 masters and deep copy kept, as a first mixed-precision loop
would). ``sd14_erase.py --compare-plain`` times it; ``memory.py`` measures its peak.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import torch
import torch.nn.functional as F


def key_step_table(concepts, start, end, length, loops):
    """KSCU_METHOD.md section 3: runs S..E-1 per concept; S moves on every ``loops`` runs."""
    cap = math.ceil(0.9 * end) - 1
    table, runs = [], 0
    while len(table) < length:
        for c in concepts:
            table += [(c, s) for s in range(start, end)]
        runs += 1
        if runs % loops == 0:
            start = min(start + 1, max(cap, start))
    return table[:length]


def ddim_timesteps(num_train: int, num_steps: int) -> list[int]:
    """SD's leading spacing with steps_offset 1: 981, 961, ..., 1 for 1000 and 50."""
    ratio = num_train // num_steps
    return [ratio * (num_steps - 1 - s) + 1 for s in range(num_steps)]


def ddim_step(alphas_cumprod, eps, t: int, t_prev: int, x):
    """Deterministic DDIM (eta = 0); alpha_prev is alphas_cumprod[0] past the end."""
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else alphas_cumprod[0]
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def encode(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return pipe.text_encoder(tok.input_ids)[0]


def plain_erase(
    pipe: Any, cfg, variants: dict[str, list[str]] | None = None, callback=None
) -> dict[str, torch.Tensor]:
    """Erase with a resolved ``cfg`` (method kscu or esd); returns the edited tensors.

    ``variants``: the augmented prompts per concept (data, not code: the agreement test passes
    the package's own). Trains the Linear/Conv2d layers selected by ``cfg.scope`` by name.
    """
    unet = pipe.unet.eval().requires_grad_(False)
    frozen = copy.deepcopy(unet)
    rule = {
        "xattn": lambda m: "attn2" in m,
        "noxattn": lambda m: "attn2" not in m,
        "selfattn": lambda m: "attn1" in m,
    }[cfg.scope]
    names = [
        f"{m}.{p}"
        for m, mod in unet.named_modules()
        if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d) and rule(m)
        for p, _ in mod.named_parameters(recurse=False)
    ]
    params = dict(unet.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    optimizer = torch.optim.Adam([params[n] for n in names], lr=cfg.lr)

    num_train = int(pipe.scheduler.config.num_train_timesteps)
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    timesteps = ddim_timesteps(num_train, cfg.num_steps)
    ratio = num_train // cfg.num_steps
    with torch.no_grad():
        uncond = encode(pipe, [""])
        cond = {c: encode(pipe, [c]) for c in cfg.concepts}
        augmented = {c: encode(pipe, v) for c, v in (variants or {}).items()}
    if cfg.method == "esd":
        rng_esd = random.Random(cfg.seed)
        table = [
            (cfg.concepts[i % len(cfg.concepts)], rng_esd.randrange(cfg.start_step, cfg.end_step))
            for i in range(cfg.iterations)
        ]
    else:
        table = key_step_table(
            cfg.concepts, cfg.start_step, cfg.end_step, cfg.iterations, cfg.loops
        )
    augment_from = cfg.iterations - math.ceil(cfg.augment_fraction * cfg.iterations)
    rng = random.Random(cfg.seed)
    emb_noise = torch.Generator("cpu").manual_seed(cfg.seed)

    @torch.no_grad()
    def advance(x, s, c):  # one CFG DDIM step of the edited model, two separate UNet calls
        t = timesteps[s]
        n = pred(unet, x, t, uncond)
        p = pred(unet, x, t, cond[c])
        eps = n + cfg.trajectory_guidance * (p - n)
        return ddim_step(alphas_cumprod, eps, t, t - ratio, x)

    amp_dtype = getattr(torch, cfg.dtype)

    def pred(model, x, t, emb):  # one UNet call, in autocast for a bf16/fp16 compute dtype
        if amp_dtype == torch.float32:
            return model(x, t, emb).sample
        with torch.autocast(x.device.type, dtype=amp_dtype):
            return model(x, t, emb).sample.float()

    x, previous = None, None
    for i, (c, s) in enumerate(table):
        if cfg.reuse_trajectory and previous == (c, s - 1):
            x = advance(x, s - 1, c)
        else:
            x = torch.randn(
                (1, unet.config.in_channels, *_latent(pipe, cfg)),
                generator=torch.Generator("cpu").manual_seed(cfg.seed + i),
            )
            for k in range(s):
                x = advance(x, k, c)
        t = timesteps[s]
        with torch.no_grad():
            p = pred(frozen, x, t, cond[c])
            n = pred(frozen, x, t, uncond)
        cond_e = cond[c]
        if cfg.augment and i >= augment_from:
            rows = augmented[c]
            row = rng.randrange(len(rows))
            noise = torch.randn(rows[row : row + 1].shape, generator=emb_noise)
            cond_e = rows[row : row + 1] + noise * cfg.embedding_noise_std
        e = pred(unet, x, t, cond_e)
        loss = F.mse_loss(e, n - cfg.negative_guidance * (p - n))
        if cfg.lambda2 != 0:
            u = pred(unet, x, t, uncond)
            lambda1 = (num_train - t) * cfg.lambda1_alpha
            loss = loss + cfg.lambda2 * F.mse_loss(u, n - lambda1 * (p - n))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if callback is not None:
            callback(i, (c, s), x, loss.item())
        previous = (c, s)
    for n in names:
        params[n].requires_grad_(False)
    return {n: params[n].detach().cpu().clone() for n in names}


def _latent(pipe, cfg) -> tuple[int, int]:
    size = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (size // pipe.vae_scale_factor,) * 2
