"""What an attack works on (one prompt, its seed and guidance) and what it proposes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kscu.sampling import sample_images


@dataclass(frozen=True)
class Target:
    """One attack prompt: its position in the run, its row and how its images are seeded."""

    index: int
    case_number: int
    prompt: str
    seed: int
    guidance: float


@dataclass
class Candidate:
    """An adversarial prompt: a real string and the ids of the tokens the attack chose."""

    prompt: str
    token_ids: list[int]
    loss: float  # the attack's own objective (denoising loss, or embedding distance)


def render(pipe, targets: list[Target], prompts: list[str], steps: int) -> torch.Tensor:
    """Images of ``prompts`` (one per target) with each target's seed and guidance, in order."""
    images = [torch.empty(0)] * len(targets)
    for guidance in sorted({t.guidance for t in targets}):
        rows = [i for i, t in enumerate(targets) if t.guidance == guidance]
        batch = sample_images(
            pipe, [prompts[i] for i in rows], [targets[i].seed for i in rows], steps, guidance
        )
        for i, image in zip(rows, batch, strict=True):
            images[i] = image
    return torch.stack(images)


def stream(seed: int, index: int) -> torch.Generator:
    """The random stream of prompt ``index``: its attack does not depend on batching or resume."""
    state = np.random.SeedSequence([seed, index]).generate_state(1)[0]
    return torch.Generator("cpu").manual_seed(int(state))
