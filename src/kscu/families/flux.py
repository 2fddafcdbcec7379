"""FLUX.1 (``FluxPipeline``, a ``FluxTransformer2DModel``), as the KSCU authors' release runs it.

KSCU_METHOD.md section 9, row by row:
- sampler: flow-matching Euler over 28 steps, sigmas ``linspace(1, 1/28, 28)`` with the
  pipeline's resolution-dependent shift (``mu`` from the packed image sequence length); the
  transformer gets ``timestep / 1000``; x_{s+1} = x_s + (sigma_{s+1} - sigma_s) v;
- guidance: FLUX.1-dev is guidance-distilled, so there is no classifier-free guidance: every
  prediction (trajectory, p, n, e, u) is one call with the guidance embedding at 3.5; a model
  without the embedding (FLUX.1-schnell) gets none;
- the loss is on the model's velocity output (``loss_space`` "model"; "epsilon" converts with
  eps = x_t + (1 - sigma) v);
- lambda1 = (1 - sigma_s) * 0.02, i.e. (1000 - t_s) * 2e-5 with t = 1000 sigma: the same
  ``lambda1_alpha`` as SD, on the shifted noise level of step index s;
- scope ``attn``: every Linear under ``transformer_blocks.*.attn`` and
  ``single_transformer_blocks.*.attn`` (Q, K, V, the added Q/K/V and both output projections);
- lr 1e-4, start steps 8/8/14/22 of 28, prompts = CLIP pooled + T5 sequence
  (``--max-sequence-length``, 512 by default), encoded once; noise drawn and packed the way the
  pipeline's ``prepare_latents`` does; 512 px for training (the pipeline generates at 1024).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import nn

from kscu.errors import KscuError
from kscu.families.base import Cond, RawFn, Sampler, cond_rows, sampling_resolution, unwrapped
from kscu.families.sd import _token_ids, cut_prompts

_ATTN = re.compile(r"^(single_)?transformer_blocks\.\d+\.attn\.")
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default and maximum


class FluxFamily:
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_attr = "transformer"
    max_tokens: int | None = MAX_SEQUENCE_LENGTH  # the longest --max-sequence-length
    release_dtype = torch.bfloat16  # FLUX.1 [dev] and [schnell] ship bf16 weights
    # moved off the accelerator once the prompts are encoded (T5-XXL alone is 9.5 GB in bf16)
    encoder_modules = ("text_encoder", "text_encoder_2", "vae")
    mode_defaults: dict[str, dict[str, Any]] = {
        "nudity": {"start_step": 8, "scope": "attn"},
        "class": {"start_step": 8, "scope": "attn"},
        "style": {"start_step": 14, "scope": "attn"},
        "instance": {"start_step": 22, "scope": "attn"},
    }
    defaults: dict[str, Any] = {
        "lr": 1e-4,
        "num_steps": 28,
        "trajectory_guidance": 3.5,  # the guidance embedding of every prediction
        "loss_space": "model",  # the velocity, as the release computes it
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        # on a CPU, freed blocks kept in glibc's heap fragment it: the resident set was 1.2x-1.4x
        # the live bytes; returned, it tracks them at 1.1x-1.4x the time (README, Memory)
        "reuse_freed_memory": False,
    }
    scope_layers: tuple[type, ...] = (nn.Linear,)
    scope_rules = {"attn": lambda name: _ATTN.match(name + ".") is not None}
    eval_steps = 28
    eval_guidance = 3.5
    training_resolution = 512

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def denoiser_class(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def load_kwargs(self) -> dict[str, Any]:
        return {}

    def denoiser(self, pipe: Any) -> nn.Module:
        return unwrapped(pipe.transformer)

    def native_resolution(self, pipe: Any) -> int:
        """The pipeline's default image size (FluxPipeline: 128 latent pixels x the VAE's 8)."""
        return int(getattr(pipe, "default_sample_size", 128)) * int(pipe.vae_scale_factor)

    def default_resolution(self, pipe: Any) -> int:
        return self.training_resolution

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: list[str], max_sequence_length: int | None = None) -> Cond:
        """CLIP's pooled embedding and T5's sequence (padded to ``max_sequence_length``)."""
        length = MAX_SEQUENCE_LENGTH if max_sequence_length is None else max_sequence_length
        if not 0 < length <= MAX_SEQUENCE_LENGTH:  # kscu.config checks an erase's before this
            raise KscuError(f"--max-sequence-length must be in [1, 512] (got {length})")
        clip, t5 = pipe.text_encoder, pipe.text_encoder_2
        pooled = clip(_token_ids(pipe.tokenizer, prompts).to(clip.device)).pooler_output
        ids = pipe.tokenizer_2(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        sequence = t5(ids.to(t5.device))[0]
        device = self.denoiser(pipe).device
        return {
            "encoder_hidden_states": sequence.float().to(device),
            "pooled_projections": pooled.float().to(device),
        }

    def long_prompts(self, pipe: Any, prompts: list[str]) -> tuple[list[int], int]:
        """Which prompts T5 reads only in part (the sequence the transformer attends to; CLIP
        gives only its pooled vector), and its limit, the 512 tokens ``encode`` keeps."""
        return cut_prompts(pipe.tokenizer_2, prompts, MAX_SEQUENCE_LENGTH)

    def meta_cond(self, pipe: Any, rows: int, max_sequence_length: int | None = None) -> Cond:
        length = max_sequence_length or MAX_SEQUENCE_LENGTH
        t5, clip = pipe.text_encoder_2.config, pipe.text_encoder.config
        return {
            "encoder_hidden_states": torch.empty((rows, length, t5.d_model), device="meta"),
            "pooled_projections": torch.empty((rows, clip.hidden_size), device="meta"),
        }

    def sampler(
        self,
        pipe: Any,
        num_steps: int,
        resolution: int | None = None,
        loss_space: str = "model",
        guidance: float | None = None,
    ) -> FlowSampler:
        return FlowSampler(self, pipe, num_steps, resolution, loss_space, guidance)


def _shift_mu(image_seq_len: int, config: Any) -> float:
    """The resolution-dependent shift of FluxPipeline: linear in the packed sequence length."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (top - base) / (max_len - base_len)
    return image_seq_len * m + base - m * base_len


class FlowSampler(Sampler):
    """Flow-matching Euler over the shifted sigmas; guidance through the embedding, not CFG."""

    def __init__(self, family, pipe, num_steps, resolution, loss_space, guidance):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if loss_space not in ("epsilon", "model"):
            raise KscuError(f"unknown loss space {loss_space!r}; choose epsilon or model")
        self.family = family
        self.net = family.denoiser(pipe)
        self.resolution = sampling_resolution(family, pipe, resolution)
        self.latent = 2 * (self.resolution // (pipe.vae_scale_factor * 2))
        tokens = (self.latent // 2) ** 2
        self.scheduler = scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config
        )
        self.mu = _shift_mu(tokens, dict(pipe.scheduler.config))
        scheduler.set_timesteps(
            sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=self.mu, device="cpu"
        )
        self.sigmas = [float(s) for s in scheduler.sigmas]  # num_steps + 1, ending at 0
        self.timesteps = [float(t) for t in scheduler.timesteps]
        self.loss_space = "epsilon" if loss_space == "epsilon" else "velocity"
        self.guidance = family.defaults["trajectory_guidance"] if guidance is None else guidance
        self.channels = self.net.config.in_channels // 4
        half = self.latent // 2
        ids = torch.zeros(half, half, 3)
        ids[..., 1] = torch.arange(half)[:, None]
        ids[..., 2] = torch.arange(half)[None, :]
        self.img_ids = ids.reshape(-1, 3).to(self.net.device)
        self.vae_scale_factor = pipe.vae_scale_factor
        self.device = self.net.device

    def noise(self, seed: int) -> torch.Tensor:
        """Drawn unpacked on the CPU (one seed, the same x_0 on every device), then packed."""
        g = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((1, self.channels, self.latent, self.latent), generator=g)
        return pack(x).to(self.device)

    def raw(self, module: nn.Module, x: torch.Tensor, s: int, cond: Cond, params=None):
        rows, dtype = len(x), self.network_dtype(module)
        cond = {k: v.to(dtype) for k, v in cond_rows(cond, rows).items()}
        t = torch.full((rows,), self.timesteps[s] / 1000, device=x.device, dtype=dtype)
        guidance = None
        if module.config.guidance_embeds:
            guidance = torch.full((rows,), self.guidance, device=x.device, dtype=torch.float32)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x.device)
        out = self.call(
            module,
            params,
            hidden_states=x.to(dtype),
            timestep=t,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=txt_ids.to(dtype),
            img_ids=self.img_ids.to(dtype),
            return_dict=False,
        )
        return out[0].float()

    def to_loss_space(self, out: torch.Tensor, x: torch.Tensor, s: int) -> torch.Tensor:
        if self.loss_space == "velocity":
            return out
        return x + (1 - self.sigmas[s]) * out  # x_t = (1 - sigma) x0 + sigma eps, v = eps - x0

    def guided_step(
        self, raw: RawFn, x: torch.Tensor, s: int, cond: Cond | None, uncond: Cond, scale: float
    ) -> torch.Tensor:
        """One Euler step; the guidance is the embedding given at construction (no CFG)."""
        v = raw(x, s, uncond if cond is None else cond)
        return (x.float() + (self.sigmas[s + 1] - self.sigmas[s]) * v).to(x.dtype)

    def lambda1(self, s: int, alpha: float) -> float:
        """(1000 - t) * alpha with t = 1000 sigma_s: (1 - sigma_s) * 0.02 with the defaults."""
        return (1000.0 - 1000.0 * self.sigmas[s]) * alpha

    @torch.no_grad()
    def decode(self, pipe: Any, x: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = unpack(x, self.channels, self.latent).to(vae.device, vae.dtype)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        return ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1).cpu()

    def record(self) -> dict[str, Any]:
        return {
            **super().record(),
            "sigmas": [round(s, 8) for s in self.sigmas],
            "shift_mu": self.mu,
            "guidance_embedding": self.guidance if self.net.config.guidance_embeds else None,
        }


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as FLUX's 2x2 patch tokens (B, H/2 * W/2, 4C)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    b, half = len(x), size // 2
    x = x.view(b, half, half, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, size, size)
