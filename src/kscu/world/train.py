"""Train the tiny world from scratch: the classifier, then the VAE, then text encoder + UNet.

Design (chosen so that 64 images of 50 CFG steps take well under 30 s on 2 CPU cores):
32x32 px images, a 2x AutoencoderKL (16x16x4 latents; a 4x VAE would blur the 8 px textures
away), a three-level UNet (16 -> 8 -> 4 latent px, 32/64/64 channels, 1.7M parameters) with
self- and cross-attention at 8x8 and 4x4, and a 3-layer CLIP text encoder (width 64).
The denoiser is trained with the standard epsilon loss on cached VAE latents, fresh captions
every step (10% empty for classifier-free guidance) and an EMA of the weights.

Run: ``kscu world train --output DIR [--device cpu|cuda] [--seed N] [--only classifier|model]``
(every flag: ``kscu.world.settings.WorldTrainSettings``; and ``--overwrite``).
DIR receives ``classifier/``, ``model/`` (a StableDiffusionPipeline folder) and ``train.log``.
A DIR holding an earlier run (its ``train.log``) is refused before training starts, or with
``--overwrite`` replaced as a whole once the new run is complete (see ``run``).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kscu.checkpoint import check_output
from kscu.errors import KscuError
from kscu.fileio import atomic_folder
from kscu.world import tokenizer as world_tokenizer
from kscu.world.classifier import WorldClassifier, WorldCNN, save_classifier
from kscu.world.data import ATTRIBUTES, label_indices, sample_batch, sample_caption
from kscu.world.settings import WorldTrainSettings

RESOLUTION = 32
LOG_NAME = "train.log"  # written first by every run: what marks a folder as a world train run
PARTS = ("classifier", "model")  # what --only names: each a folder of the run

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    sample_size=RESOLUTION,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    mid_block_add_attention=False,
)
UNET_CONFIG = dict(
    sample_size=RESOLUTION // 2,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=world_tokenizer.MODEL_MAX_LENGTH,
    projection_dim=64,
)
# Stable Diffusion's scheduler settings, so that step indices mean the same as with SD.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    prediction_type="epsilon",
)


class Logger:
    """Print and append to ``train.log`` with the elapsed time."""

    def __init__(self, path: Path):
        self.path, self.start = path, time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.start:7.1f}s] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild blur, noise and contrast jitter, so the classifier also reads generated images."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 1.0
    blurred = []
    for img, s in zip(x, sigma.tolist(), strict=True):
        if s < 0.3:
            blurred.append(img)
            continue
        k = torch.arange(-2, 3, dtype=torch.float32)
        w = torch.exp(-(k**2) / (2 * s * s))
        w = w / w.sum()
        img = F.conv2d(F.pad(img[:, None], (2, 2, 0, 0), mode="replicate"), w.view(1, 1, 1, 5))
        img = F.conv2d(F.pad(img, (0, 0, 2, 2), mode="replicate"), w.view(1, 1, 5, 1))
        blurred.append(img[:, 0])
    x = torch.stack(blurred)
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.3
    x = (x - 0.5) * contrast + 0.5
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.04
    return x.clamp(0, 1)


def evaluate_classifier(clf: WorldClassifier, n: int, seed: int) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` fresh clean renders."""
    images, _, labels = sample_batch(n, np.random.default_rng(seed))
    pred = clf.predict(images)
    return {
        k: float(np.mean([p == lab[k] for p, lab in zip(pred[k], labels, strict=True)]))
        for k in ATTRIBUTES
    }


def one_cycle(opt: torch.optim.Optimizer, max_lr: float, steps: int, warmup: float) -> Any:
    """torch's OneCycleLR over ``steps`` with a ``warmup`` fraction, except where that fraction
    is exactly one step (``--vae-steps 20``): torch then divides by the warm-up's length minus
    one step, zero (a ZeroDivisionError at the first step); one and a half steps are used."""
    if warmup * steps == 1:
        warmup = 1.5 / steps
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=steps, pct_start=warmup
    )


def train_classifier(out: Path, device: str, seed: int, steps: int, log: Logger) -> None:
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    model = WorldCNN(width=16, feature_dim=128).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = one_cycle(opt, 3e-3, steps, warmup=0.3)  # torch's default warm-up
    for step in range(steps):
        images, _, labels = sample_batch(128, rng)
        images = _augment(images, gen)
        targets = label_indices(labels)
        _, logits = model(images.to(device))
        loss = sum(F.cross_entropy(logits[k], targets[k].to(device)) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps} loss {loss.item():.4f}")
    acc = evaluate_classifier(WorldClassifier(model, RESOLUTION, device), 2000, seed + 1)
    log(f"classifier accuracy on 2000 fresh renders: {acc}")
    save_classifier(
        model.cpu(),
        out / "classifier",
        RESOLUTION,
        {"train_steps": steps, "seed": seed, "accuracy_fresh_renders": acc},
    )


def train_vae(device: str, seed: int, steps: int, log: Logger):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = one_cycle(opt, 2e-3, steps, warmup=0.05)
    for step in range(steps):
        x = sample_batch(32, rng)[0].to(device) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + 1e-7 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae, n: int, seed: int, device: str):
    """Render ``n`` images once and cache their (unscaled) latent means and labels."""
    rng = np.random.default_rng(seed)
    latents, labels = [], []
    for i in range(0, n, 500):
        images, _, labs = sample_batch(min(500, n - i), rng)
        latents.append(vae.encode(images.to(device) * 2 - 1).latent_dist.mean.cpu())
        labels += labs
    return torch.cat(latents), labels


def save_pipeline(folder: Path, vae, text_encoder, tokenizer, unet) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # a whole pipeline or the previous one: a snapshot is written again every N steps, and an
    # interrupt during its save must not leave a mix of two snapshots to continue from
    with atomic_folder(folder, replace=True) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        # transformers 5 saves only tokenizer.json; keep the plain CLIP vocab.json + merges.txt.
        world_tokenizer.save_tokenizer_files(tmp / "tokenizer")


def train_model(
    out: Path,
    device: str,
    seed: int,
    vae_steps: int,
    unet_steps: int,
    n_latents: int,
    batch_size: int,
    snapshot_every: int,
    log: Logger,
    init_from: str | None = None,
    lr: float = 6e-4,
) -> None:
    """Train the VAE, then text encoder + UNet; or, with ``init_from`` (a world pipeline
    folder), keep its VAE and tokenizer and continue training its text encoder + UNet."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if init_from is not None:
        src = Path(init_from)
        vae = _load(AutoencoderKL, src, "vae").to(device).eval()
        log(f"continuing from {src} (its VAE, tokenizer, text encoder and UNet)")
    else:
        vae = train_vae(device, seed, vae_steps, log)
    latents, labels = encode_dataset(vae, n_latents, seed + 1, device)
    if init_from is None:
        vae.register_to_config(scaling_factor=1.0 / latents.std().item())
    latents = latents * vae.config.scaling_factor
    log(
        f"cached {len(latents)} latents {tuple(latents.shape[1:])}, "
        f"scaling_factor {vae.config.scaling_factor:.4f}"
    )

    if init_from is not None:
        tokenizer = CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
        text_encoder = _load(CLIPTextModel, src, "text_encoder").to(device)
        unet = _load(UNet2DConditionModel, src, "unet").to(device)
    else:
        tok_dir = out / "tokenizer_build"
        world_tokenizer.save_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **TEXT_CONFIG,
            )
        ).to(device)
        unet = UNet2DConditionModel(**UNET_CONFIG).to(device)
    noise_sched = DDPMScheduler(
        **{
            k: v
            for k, v in SCHEDULER_CONFIG.items()
            if k not in ("steps_offset", "set_alpha_to_one")
        }
    )
    alphas = noise_sched.alphas_cumprod.to(device)
    log(
        f"unet params {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, vae "
        f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M"
    )

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = min(200, unet_steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (unet_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    rng, gen = np.random.default_rng(seed + 2), torch.Generator().manual_seed(seed + 2)
    start, running = time.time(), None
    for step in range(unet_steps):
        idx = torch.from_numpy(rng.integers(0, len(latents), size=batch_size))
        x0 = latents[idx].to(device)
        captions = [sample_caption(labels[i], rng) for i in idx.tolist()]
        ids = tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch_size,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text_encoder(ids.to(device))[0]
        loss = F.mse_loss(unet(xt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == unet_steps - 1:
            rate = (time.time() - start) / (step + 1)
            log(
                f"unet step {step}/{unet_steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e}"
                f" {rate:.2f}s/step eta {rate * (unet_steps - step - 1) / 60:.1f} min"
            )
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < unet_steps:
            save_pipeline(out / "snapshot", vae, ema_text, tokenizer, ema_unet)
            log(f"snapshot at step {step + 1} -> {out / 'snapshot'}")
    save_pipeline(out / "model", vae.cpu(), ema_text.cpu(), tokenizer, ema_unet.cpu())
    (out / "model" / "world_train.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "vae_steps": vae_steps,
                "unet_steps": unet_steps,
                "batch_size": batch_size,
                "n_latents": n_latents,
                "lr": lr,
                "init_from": init_from,
                "minutes": round((time.time() - log.start) / 60, 1),
            },
            indent=2,
        )
        + "\n"
    )
    log(f"saved pipeline to {out / 'model'}")


def _load(cls: Any, src: Path, part: str) -> Any:
    """One network of the ``--init-from`` pipeline, from its safetensors file only (a pickled
    ``.bin`` beside it or instead of it is never read)."""
    from kscu.models import load_or_explain

    return load_or_explain(
        lambda: cls.from_pretrained(str(src / part), use_safetensors=True),
        f"the {part} of --init-from {src}",
        "pass a folder written by `kscu world train` (its weights in .safetensors files)",
    )


def run(
    output: str | Path, settings: WorldTrainSettings | None = None, overwrite: bool = False
) -> None:
    """Train the parts ``settings.only`` names (default: classifier and model) into ``output``.

    A missing or empty ``output`` is trained into directly (an interrupted run leaves its log and
    snapshot there). A folder holding an earlier run is refused before training starts unless
    ``overwrite``; then the new run is trained in a hidden folder beside it, which replaces it
    only once complete (until then the old run stays; an interrupted run leaves only its latest
    snapshot, moved beside ``output`` as ``NAME-snapshot``). A part ``settings.only`` leaves out
    is carried over from the run replaced, so retraining one part never deletes the other. A
    folder whose run stopped before its model was saved is refused with the ``--init-from``
    that continues it. Any other non-empty folder is refused (``kscu.checkpoint.check_output``).
    """
    s = settings or WorldTrainSettings()
    out = Path(output)
    snapshot = out / "snapshot"
    unfinished = (out / LOG_NAME).is_file() and snapshot.is_dir() and not (out / "model").is_dir()
    if unfinished and not overwrite:
        raise KscuError(
            f"--output {out} holds an unfinished world train run; continue it with --init-from "
            f"{snapshot} and a new --output, or pass --overwrite to start again"
        )
    if check_output(out, overwrite, markers=(LOG_NAME,), what="world train run"):
        with atomic_folder(out, replace=True) as folder:
            try:
                shown = f"{out} (trained in {folder}; the old run stays until done)"
                _train_into(folder, s, shown, keep_from=out)
            except BaseException:  # the hidden folder goes; its latest snapshot need not
                _keep_snapshot(folder / "snapshot", out)
                raise
    else:
        out.mkdir(parents=True, exist_ok=True)
        _train_into(out, s, str(out))


def _keep_snapshot(snapshot: Path, out: Path) -> None:
    """Move an interrupted ``--overwrite`` run's snapshot beside ``out``, and say where."""
    if not snapshot.is_dir():
        return
    kept, k = out.with_name(f"{out.name}-snapshot"), 1
    while kept.exists():
        k += 1
        kept = out.with_name(f"{out.name}-snapshot-{k}")
    snapshot.rename(kept)
    print(f"kept the unfinished run's snapshot: continue with --init-from {kept}", file=sys.stderr)


def _train_into(
    out: Path, s: WorldTrainSettings, shown: str, keep_from: Path | None = None
) -> None:
    if s.device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    log = Logger(out / LOG_NAME)
    log(f"world train: output={shown} device={s.device} seed={s.seed} only={s.only}")
    if s.only in (None, "classifier"):
        train_classifier(out, s.device, s.seed, s.classifier_steps, log)
    if s.only in (None, "model"):
        train_model(
            out,
            s.device,
            s.seed,
            s.vae_steps,
            s.unet_steps,
            s.n_latents,
            s.batch_size,
            s.snapshot_every,
            log,
            init_from=s.init_from,
            lr=s.lr,
        )
    for part in PARTS:
        if s.only not in (None, part) and keep_from is not None and (keep_from / part).is_dir():
            shutil.copytree(keep_from / part, out / part)
            log(f"kept {part}/ of the run replaced (--only {s.only})")
    log("done")
