"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``, a ``UNet2DConditionModel``).

The sampler is DDIM with Stable Diffusion's settings made explicit (KSCU_METHOD.md section 1):
a model's own scheduler config (often PNDM, sometimes without ``clip_sample``, sometimes with
trailing spacing or zero-SNR betas) would otherwise change silently which timestep a step index
means or clip x0. Only the noise schedule (betas) and the prediction type come from the model.

Guidance is classifier-free: ``n + g (p - n)`` from one batched call of the unconditional and the
conditional rows. The loss is computed in epsilon space by default: for a v-prediction model
(SD 2.x) the output is converted with the scheduler's alphas, because an MSE on v weights step t
by about 1/abar_t (KSCU_METHOD.md section 9).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from kscu.errors import KscuError
from kscu.families.base import (
    Cond,
    RawFn,
    Sampler,
    cond_cat,
    cond_rows,
    sampling_resolution,
    unwrapped,
)
from kscu.protocol import SD_DDIM_FROM_MODEL, SD_DDIM_SETTINGS

log = logging.getLogger("kscu")

LOSS_SPACES = ("epsilon", "model")
_announced: set[str] = set()  # pinned-sampler notices already logged in this process


class SDFamily:
    """Stable Diffusion 1.x/2.x: everything kscu needs to know about these pipelines."""

    name = "sd"
    pipeline_classes: tuple[str, ...] = ("StableDiffusionPipeline",)
    denoiser_attr = "unet"
    max_tokens: int | None = None  # CLIP's fixed 77 tokens: no --max-sequence-length
    release_dtype = torch.float32  # SD v1.4, SD 2.x and SDXL base ship float32 weights
    encoder_modules: tuple[str, ...] = ("text_encoder", "vae")  # off the accelerator in erase
    # Per-mode and global defaults that differ from kscu.config's tables (SD is the reference).
    mode_defaults: dict[str, dict[str, Any]] = {}
    defaults: dict[str, Any] = {}
    scope_layers: tuple[type, ...] = (nn.Linear, nn.Conv2d)
    scope_rules = {
        "xattn": lambda name: "attn2" in name,
        "noxattn": lambda name: "attn2" not in name,
        "selfattn": lambda name: "attn1" in name,
    }
    eval_steps = 50
    eval_guidance = 7.5

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def load_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def denoiser(self, pipe: Any) -> nn.Module:
        return unwrapped(getattr(pipe, self.denoiser_attr))

    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def native_resolution(self, pipe: Any) -> int:
        """The image size the UNet was trained for (sample_size times the VAE's downscale)."""
        size = pipe.unet.config.sample_size  # diffusers also allows [h, w]
        return int(max(size) if isinstance(size, list | tuple) else size) * int(
            pipe.vae_scale_factor
        )

    def default_resolution(self, pipe: Any) -> int:
        return self.native_resolution(pipe)

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: list[str], max_sequence_length: int | None = None) -> Cond:
        """Text embeddings as SD computes them (padded to the tokenizer's max length), float32."""
        ids = _token_ids(pipe.tokenizer, prompts).to(pipe.text_encoder.device)
        emb = pipe.text_encoder(ids)[0].float()
        return {"encoder_hidden_states": emb.to(self.denoiser(pipe).device)}

    def long_prompts(self, pipe: Any, prompts: list[str]) -> tuple[list[int], int]:
        """Which prompts CLIP reads only in part, and its token limit: ``encode`` keeps the
        first 77 tokens, as diffusers' pipelines (and so every published I2P number) do."""
        return cut_prompts(pipe.tokenizer, prompts, pipe.tokenizer.model_max_length)

    def meta_cond(self, pipe: Any, rows: int, max_sequence_length: int | None = None) -> Cond:
        """Conditioning of the right shapes on the meta device (memory planning)."""
        te = pipe.text_encoder.config
        shape = (rows, te.max_position_embeddings, te.hidden_size)
        return {"encoder_hidden_states": torch.empty(shape, device="meta")}

    def sampler(
        self,
        pipe: Any,
        num_steps: int,
        resolution: int | None = None,
        loss_space: str = "epsilon",
        guidance: float | None = None,
    ) -> DDIMSampler:
        """``guidance`` is unused: SD's guidance is CFG, applied per step (``guided_step``)."""
        return DDIMSampler(self, pipe, num_steps, resolution, loss_space)

    def unet_kwargs(self, cond: Cond, rows: int, resolution: int) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}


def _token_ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def cut_prompts(tokenizer: Any, prompts: list[str], limit: int) -> tuple[list[int], int]:
    """Indices of ``prompts`` longer than ``limit`` tokens (special tokens included), and the
    limit. Tokenized to one token past it, so the tokenizer has nothing to warn about."""
    ids = tokenizer(prompts, truncation=True, max_length=limit + 1).input_ids
    return [i for i, row in enumerate(ids) if len(row) > limit], limit


def pinned_ddim(model_config: Any) -> Any:
    """DDIM with SD's settings; the model contributes only its betas and prediction type.

    Says in one log line what differs from the model's own scheduler config, once per process
    for a given difference (samplers are built per erase, analysis, preview and image batch).
    """
    from diffusers import DDIMScheduler

    config = dict(model_config)
    own = {k: config[k] for k in SD_DDIM_FROM_MODEL if config.get(k) is not None}
    scheduler = DDIMScheduler(**own, **SD_DDIM_SETTINGS)
    changed = [
        f"{k} {config.get(k, 'unset')} -> {v}"
        for k, v in SD_DDIM_SETTINGS.items()
        if config.get(k) != v
    ]
    kind = config.get("_class_name")
    if changed or kind not in (None, "DDIMScheduler"):
        message = (
            f"sampler: DDIM with SD's settings instead of the model's {kind or 'scheduler'} "
            f"({', '.join(changed) or 'same settings'})"
        )
        if message not in _announced:
            _announced.add(message)
            log.info(message)
    return scheduler


class DDIMSampler(Sampler):
    """DDIM over ``num_steps`` steps with classifier-free guidance (SD, SDXL)."""

    def __init__(
        self,
        family: SDFamily,
        pipe: Any,
        num_steps: int,
        resolution: int | None,
        loss_space: str = "epsilon",
    ):
        if loss_space not in LOSS_SPACES:
            raise KscuError(f"unknown loss space {loss_space!r}; choose one of {LOSS_SPACES}")
        self.family = family
        self.scheduler = pinned_ddim(pipe.scheduler.config)
        trained = int(self.scheduler.config.num_train_timesteps)
        if not 0 < num_steps <= trained:  # diffusers' own check raises deep inside set_timesteps
            raise KscuError(
                f"{num_steps} sampling steps: this model's scheduler has {trained} timesteps; "
                f"give between 1 and {trained} steps (--num-steps of erase and analyze, "
                "--steps of generate, bench and attack)"
            )
        self.scheduler.set_timesteps(num_steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self.prediction_type = self.scheduler.config.prediction_type
        self.loss_space = "epsilon" if loss_space == "epsilon" else self.prediction_type
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.resolution = sampling_resolution(family, pipe, resolution)
        size = self.resolution // pipe.vae_scale_factor
        self.shape = (1, family.denoiser(pipe).config.in_channels, size, size)
        self.device = family.denoiser(pipe).device
        self.extra_record: dict[str, Any] = {}

    def noise(self, seed: int) -> torch.Tensor:
        """Drawn on the CPU so a seed gives the same x_0 on every device."""
        g = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn(self.shape, generator=g) * self.scheduler.init_noise_sigma
        return x.to(self.device)

    def raw(self, module: nn.Module, x: torch.Tensor, s: int, cond: Cond, params=None):
        dtype = self.network_dtype(module)  # inputs in the network's dtype (autocast may recast)
        cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
        kwargs = self.family.unet_kwargs(cond, len(x), self.resolution)
        # the tensor diffusers makes of an int timestep (shape [1]; int32 where it uses int32),
        # passed as one so that a record (kscu.tracing) keeps it an input, not a constant
        narrow = x.device.type in ("mps", "npu")
        t = torch.tensor(
            [self.timesteps[s]], device=x.device, dtype=torch.int32 if narrow else None
        )
        out = self.call(module, params, sample=x.to(dtype), timestep=t, return_dict=False, **kwargs)
        return out[0].float()

    def to_loss_space(self, out: torch.Tensor, x: torch.Tensor, s: int) -> torch.Tensor:
        if self.loss_space == self.prediction_type:
            return out
        abar = self.scheduler.alphas_cumprod[self.timesteps[s]].double()
        a, b = abar.sqrt().item(), (1 - abar).sqrt().item()
        out64, x64 = out.double(), x.double()  # cheap next to the network; keeps it exact
        if self.prediction_type == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
            return (a * out64 + b * x64).float()
        if self.prediction_type == "sample":  # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
            return ((x64 - a * out64) / b).float()
        return out

    def guided_step(
        self, raw: RawFn, x: torch.Tensor, s: int, cond: Cond | None, uncond: Cond, scale: float
    ) -> torch.Tensor:
        """x_s -> x_{s+1}; ``cond=None`` means the unconditional prompt alone (one call)."""
        n = len(x)
        if cond is None:
            direction = raw(x, s, cond_rows(uncond, n))
        else:
            rows = cond_cat(cond_rows(uncond, n), cond_rows(cond, n))
            un, co = raw(torch.cat([x, x]), s, rows).chunk(2)
            direction = un + scale * (co - un)
        return self.scheduler.step(direction, self.timesteps[s], x).prev_sample

    def lambda1(self, s: int, alpha: float) -> float:
        """(T - t) * alpha: 0.006 at t = 701, 0.02 at t = 1 with the defaults."""
        return (self.num_train_timesteps - self.timesteps[s]) * alpha

    def record(self) -> dict[str, Any]:
        return {**super().record(), **self.extra_record}

    @torch.no_grad()
    def decode(self, pipe: Any, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1], float32 on the CPU."""
        vae = pipe.vae
        z = x.to(vae.device, vae.dtype) / vae.config.scaling_factor
        return ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1).cpu()
