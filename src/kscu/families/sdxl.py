"""Stable Diffusion XL (``StableDiffusionXLPipeline``): the SD recipe with SDXL's conditioning.

No release of the KSCU authors covers SDXL; ESD's authors ship an SDXL variant. The SD recipe
carries over unchanged (KSCU_METHOD.md section 9): DDIM 50 steps with SD's settings (SDXL base
ships SD's noise schedule under an Euler scheduler), the same table, CFG-3 trajectory,
lambda1 = (1000 - t) * 2e-5, scopes by ``attn2``. What differs is the conditioning: both text
encoders' penultimate hidden states concatenated, the second encoder's pooled (projected)
embedding, and the ``time_ids`` (original size, crop, target size) the pipeline would use at the
training resolution (1024 px native).

The empty prompt: SDXL base sets ``force_zeros_for_empty_prompt``, so its pipeline's
unconditional branch under CFG is the zero embedding (sequence and pooled), not the encoding of
"". KSCU's n and u are that unconditional branch, so kscu uses what the pipeline uses: zeros when
the flag is set, the encoding of "" otherwise (recorded as ``"unconditional"`` in kscu.json).
"""

from __future__ import annotations

from typing import Any

import torch

from kscu.families.base import Cond
from kscu.families.sd import DDIMSampler, SDFamily, _token_ids


class SDXLFamily(SDFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    eval_guidance = 5.0  # StableDiffusionXLPipeline's default
    encoder_modules = ("text_encoder", "text_encoder_2", "vae")

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def load_kwargs(self) -> dict[str, Any]:
        return {"add_watermarker": False}

    @torch.no_grad()
    def encode(self, pipe: Any, prompts: list[str], max_sequence_length: int | None = None) -> Cond:
        """Both encoders' penultimate states (concatenated) and the second's pooled embedding."""
        hidden, pooled = [], None
        for tokenizer, encoder in (
            (pipe.tokenizer, pipe.text_encoder),
            (pipe.tokenizer_2, pipe.text_encoder_2),
        ):
            out = encoder(
                _token_ids(tokenizer, prompts).to(encoder.device), output_hidden_states=True
            )
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # CLIPTextModelWithProjection: the projected EOS state
        cond = {
            "encoder_hidden_states": torch.cat(hidden, -1).float(),
            "text_embeds": pooled.float(),
        }
        if zeros_for_empty(pipe):
            empty = torch.tensor([p == "" for p in prompts], device=pooled.device)
            cond = {
                k: torch.where(empty.view(-1, *[1] * (v.dim() - 1)), 0.0, v)
                for k, v in cond.items()
            }
        device = self.denoiser(pipe).device
        return {k: v.to(device) for k, v in cond.items()}

    def meta_cond(self, pipe: Any, rows: int, max_sequence_length: int | None = None) -> Cond:
        one, two = pipe.text_encoder.config, pipe.text_encoder_2.config
        width = one.hidden_size + two.hidden_size
        return {
            "encoder_hidden_states": torch.empty(
                (rows, one.max_position_embeddings, width), device="meta"
            ),
            "text_embeds": torch.empty((rows, two.projection_dim), device="meta"),
        }

    def unet_kwargs(self, cond: Cond, rows: int, resolution: int) -> dict[str, Any]:
        """SDXL's added conditioning at the training resolution: time_ids = (R, R, 0, 0, R, R)."""
        pooled = cond["text_embeds"]
        r = float(resolution)
        time_ids = torch.tensor([[r, r, 0.0, 0.0, r, r]], dtype=pooled.dtype, device=pooled.device)
        return {
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(rows, 6)},
        }

    def sampler(self, pipe, num_steps, resolution=None, loss_space="epsilon", guidance=None):
        sampler = DDIMSampler(self, pipe, num_steps, resolution, loss_space)
        sampler.extra_record = {
            "unconditional": "zeros" if zeros_for_empty(pipe) else 'the encoding of ""'
        }
        return sampler


def zeros_for_empty(pipe: Any) -> bool:
    """The pipeline's flag; a stand-in without a config (kscu.memory's meta pipeline) has none."""
    config = getattr(pipe, "config", None)
    return bool(getattr(config, "force_zeros_for_empty_prompt", False))
