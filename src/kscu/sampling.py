"""Images from prompts through the family's own sampler: the one sampling walk of kscu.

Previews, the tiny world's quality check, the bench and evaluation images all sample here, with
the same sampler (and so the same pinned settings) the erase trajectory and analysis use. Each
image has its own seed, so an image does not depend on batching or on how work is split.
"""

from __future__ import annotations

from typing import Any

import torch

from kscu.allocator import host_memory
from kscu.families import family_of
from kscu.tracing import TracedDenoiser


def sample_images(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int | None = None,
    guidance: float | None = None,
    resolution: int | None = None,
    batch_size: int = 16,
    replay: bool | TracedDenoiser = True,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1], float32 on the CPU; image i starts from noise ``seeds[i]``.

    ``steps`` and ``guidance`` default to the family's evaluation protocol (SD: 50 DDIM steps,
    CFG 7.5). The walk runs in inference mode: a module moved to another device during it (by
    hooks such as accelerate's CPU offload, which kscu never installs) would keep inference-mode
    weights that a later erase cannot train. ``replay``: the denoiser's calls are replayed from
    records where that is exact (``kscu.tracing``; a CPU in float32), the same values; given a
    ``TracedDenoiser``, its records of earlier batches serve this call too (a record costs two
    calls' time, which a short walk of a large model does not win back).
    """
    family = family_of(pipe)
    steps = family.eval_steps if steps is None else steps
    guidance = family.eval_guidance if guidance is None else guidance
    sampler = family.sampler(pipe, steps, resolution, guidance=guidance)
    net = family.denoiser(pipe)
    if replay:
        records = replay if isinstance(replay, TracedDenoiser) else None
        sampler.replay(net, net.dtype, records=records)

    def raw(x, s, cond):
        return sampler.raw(net, x, s, cond)

    images = []
    # inference mode: no_grad without autograd's per-tensor bookkeeping (the same kernels and
    # values); freed memory kept: the same values, and batched steps allocate alike
    with torch.inference_mode(), host_memory(True, net.device):
        uncond = family.encode(pipe, [""])
        for i in range(0, len(prompts), batch_size):
            x = torch.cat([sampler.noise(seed) for seed in seeds[i : i + batch_size]])
            cond = family.encode(pipe, prompts[i : i + batch_size])
            for s in range(steps):
                x = sampler.guided_step(raw, x, s, cond, uncond, guidance)
            images.append(sampler.decode(pipe, x))
    return torch.cat(images)  # outside inference mode: an ordinary tensor for the caller


def to_pil(images: torch.Tensor) -> list:
    """[0, 1] image tensors as PIL images (8-bit, as PNG stores them)."""
    from PIL import Image

    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]
