"""Tiny random SDXL and FLUX.1 pipelines built in code, for tests of the model families.

Each mirrors the structure of the released model (class names, block kinds, conditioning paths,
scheduler config, VAE scale factor 8) at a few thousand parameters per component, so that code
written against them runs unchanged on stabilityai/stable-diffusion-xl-base-1.0 and
black-forest-labs/FLUX.1-dev / FLUX.1-schnell. Nothing is downloaded.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from tiny import write_char_tokenizer

# The VAEs below have four levels, so vae_scale_factor is 8 as in the released models: the
# latent sizes, FLUX's packed sequence length and its resolution-dependent shift then follow the
# same arithmetic as at full size.
VAE_LEVELS = 4
CLIP_MAX_LENGTH = 77

# FLUX.1-dev's scheduler/scheduler_config.json (FLUX.1-schnell ships shift 1.0, no dynamic shift).
FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}

# stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json, an EulerDiscreteScheduler. The
# keys Euler ignores (clip_sample, set_alpha_to_one, ...) are kept on purpose: the release ships
# them, and DDIMScheduler.from_config needs them to come out as Stable Diffusion's DDIM.
SDXL_EULER_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _tiny_vae(latent_channels: int, **config: Any) -> Any:
    """An AutoencoderKL with the released down-sampling factor (8) and a few thousand weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,) * VAE_LEVELS,
        down_block_types=("DownEncoderBlock2D",) * VAE_LEVELS,
        up_block_types=("UpDecoderBlock2D",) * VAE_LEVELS,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        **config,
    )


def _clip_config(hidden_size: int, **extra: Any) -> Any:
    """A CLIP text config matching write_char_tokenizer's ids (512 = BOS, 513 = EOS/pad)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        **extra,
    )


def _char_clip_tokenizer(pad_token: str | None = None) -> Any:
    """The tests' character-level CLIP tokenizer: any prompt tokenizes, offline.

    SDXL's tokenizer_2 pads with "!" instead of the end token; pad_token reproduces that.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_char_tokenizer(Path(d), max_length=CLIP_MAX_LENGTH)
        tokenizer = CLIPTokenizer.from_pretrained(d)
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return tokenizer


def tiny_t5_tokenizer() -> Any:
    """A T5 (Unigram) tokenizer built in code: single characters plus a few whole words.

    Characters keep every ASCII prompt free of <unk>; the whole words make common concept
    prompts tokenize into fewer, word-level pieces as a real SentencePiece vocabulary would.
    """
    from transformers import T5TokenizerFast

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = [("\u2581", -2.0)] + [(c, -5.0) for c in string.ascii_letters + string.digits]
    chars += [(c, -5.0) for c in string.punctuation]
    words = "a photo of church painting in the style van gogh nudity".split()
    pieces = specials + chars + [("\u2581" + w, -1.0) for w in words]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def flux_scheduler(guidance_embeds: bool = True) -> Any:
    """The scheduler FLUX.1-dev ships (or FLUX.1-schnell's, for a model without guidance)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        **(FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER)
    )


def sdxl_euler_scheduler() -> Any:
    """The scheduler SDXL base 1.0 ships; kscu's DDIM is DDIMScheduler.from_config of it."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(SDXL_EULER_SCHEDULER)


def build_tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8) -> Any:
    """A StableDiffusionXLPipeline shaped like SDXL base 1.0, native size sample_size * 8 px.

    Like the release: a DownBlock2D (no attention) on top, cross-attention blocks below with
    several transformer layers, linear projections, the "text_time" added conditioning fed by
    text_encoder_2's projection, both encoders' penultimate hidden states concatenated for
    cross-attention, and zeros for an empty negative prompt. Text encoder 2 has a projection
    width different from its hidden width so a mix-up of the two fails loudly.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    hidden_1, hidden_2, projection_dim, time_dim = 8, 16, 12, 4
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=hidden_1 + hidden_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=projection_dim + 6 * time_dim,
            norm_num_groups=4,
        )
        vae = _tiny_vae(4, sample_size=sample_size * 8, scaling_factor=0.13025, force_upcast=True)
        text_encoder = CLIPTextModel(_clip_config(hidden_1))
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_config(hidden_2, projection_dim=projection_dim)
        )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_char_clip_tokenizer(),
        tokenizer_2=_char_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=sdxl_euler_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _ready(pipe)


# FLUX.1-dev's transformer at full width (benchmarks/memory.py builds it with a few blocks).
FLUX_DEV_WIDTH = {
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": (16, 56, 56),
}


def build_tiny_flux_pipeline(
    seed: int = 0, guidance_embeds: bool = True, transformer_shape: dict | None = None
) -> Any:
    """A FluxPipeline shaped like FLUX.1-dev (guidance_embeds=False: like FLUX.1-schnell).

    One joint and one single-stream block, 16 latent channels packed 2x2 into 64 transformer
    inputs, rotary axes summing to the head width, the FLUX VAE's scaling and shift factors,
    and the released scheduler config of the variant. ``transformer_shape`` overrides the
    transformer's config (e.g. ``FLUX_DEV_WIDTH`` and block counts); the text encoders then
    take the widths it asks for.
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    shape = {
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "pooled_projection_dim": 8,
        "axes_dims_rope": (2, 2, 4),
        **(transformer_shape or {}),
    }
    clip_hidden, t5_hidden = shape["pooled_projection_dim"], shape["joint_attention_dim"]
    t5_tokenizer = tiny_t5_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, guidance_embeds=guidance_embeds, **shape
        )
        vae = _tiny_vae(
            16,
            sample_size=1024,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            force_upcast=True,
        )
        text_encoder = CLIPTextModel(_clip_config(clip_hidden))
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=t5_hidden,
                d_kv=4,
                d_ff=32,
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    pipe = FluxPipeline(
        scheduler=flux_scheduler(guidance_embeds),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_char_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    return _ready(pipe)


def _ready(pipe: Any) -> Any:
    """Eval mode and no progress bars, as from_pretrained would hand the pipeline over.

    Modules built in code start in training mode, and T5 (dropout_rate 0.1 as released) would
    then encode the same prompt differently on every call.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe: Any, folder: Path) -> Path:
    """Save as a user's model folder would look: safetensors weights, configs, tokenizers."""
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def reload_pipeline(folder: Path) -> Any:
    """Load a saved folder back so that it computes bit for bit what the saved pipeline did.

    from_pretrained leaves each weight inside the memory-mapped safetensors file, at offsets
    aligned to 8 bytes only; CPU matmuls then take other kernel paths and can differ in the last
    bit (seen on the tiny FLUX.1-schnell stand-in). Copying every tensor into memory torch
    allocates itself restores the saved pipeline's exact arithmetic.
    """
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()
    return _ready(pipe)
