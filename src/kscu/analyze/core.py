"""Prompt-switch trajectories: how far a concept is committed at each denoising step.

For every step index s we generate two kinds of images from the same seeded noise:

* forward(s): the concept prompt on steps [0, s), the neutral prompt on [s, N). What survives of
  the concept is what the first s steps already committed the image to.
* reverse(s): the neutral prompt on [0, s), the concept prompt on [s, N). What the concept can
  still add from step s on is what is not yet decided at s.

With P_c (concept on every step) and P_n (neutral on every step) as the two ends, the
commitment at s is ``C(s) = (F(s) + 1 - R(s)) / 2`` where ``F = (forward - P_n) / (P_c - P_n)``
and ``R = (reverse - P_n) / (P_c - P_n)``. If each step added its own share of the concept,
F(s) and 1 - R(s) would be equal (both the share of steps [0, s)); measuring both and averaging
halves the noise and does not favour either way of switching. C(0) = 0 by construction (those
images are P_n and P_c themselves) and C(N) = 1.

All switch points share their prefix: one concept and one neutral trajectory per sample give
every x_s, and the branches run together, one batched UNet call per step (rows that have not yet
reached their switch step wait). Cost per sample: about N^2/2 neutral plus N^2/2 guided concept
rows; with the empty neutral prompt a neutral row is one unconditional UNet call, not two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from kscu.families.base import Cond, RawFn, Sampler

# eps(x (B,C,H,W), timestep, text embeddings (B,L,D)) -> noise prediction (B,C,H,W), float32
EpsFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
# A prompt for the stepper: a family's conditioning, or None for the empty prompt.
Prompt = Cond | None


@dataclass
class Finals:
    """Final latents of every branch, each (len(starts), samples, C, H, W) or (samples, ...)."""

    starts: list[int]  # switch steps with a branch of their own (s > 0)
    forward: torch.Tensor
    reverse: torch.Tensor
    concept: torch.Tensor  # concept prompt on every step (= forward at N, reverse at 0)
    neutral: torch.Tensor  # neutral prompt on every step (= forward at 0, reverse at N)


class GuidedStepper:
    """The family's guided steps over arbitrarily many rows, at most ``batch_size`` per call."""

    def __init__(
        self, sampler: Sampler, raw: RawFn, guidance: float, uncond: Cond, batch_size: int
    ):
        self.sampler, self.raw, self.guidance = sampler, raw, guidance
        self.uncond, self.batch_size = uncond, batch_size
        self.timesteps = sampler.timesteps

    @torch.no_grad()
    def step(self, x: torch.Tensor, s: int, cond: Cond | None) -> torch.Tensor:
        """x_s -> x_{s+1} for every row, all with prompt ``cond`` (None: the empty prompt)."""
        rows = self.batch_size if cond is None else max(1, self.batch_size // 2)
        out = [
            self.sampler.guided_step(self.raw, x[i : i + rows], s, cond, self.uncond, self.guidance)
            for i in range(0, len(x), rows)
        ]
        return torch.cat(out)

    def prefix(self, x0: torch.Tensor, cond: Prompt) -> list[torch.Tensor]:
        """[x_0, x_1, ..., x_N]: every state of one prompt's trajectory."""
        xs = [x0]
        for s in range(len(self.timesteps)):
            xs.append(self.step(xs[-1], s, cond))
        return xs

    def branches(
        self, prefix: list[torch.Tensor], starts: list[int], cond: Prompt, bar=None
    ) -> torch.Tensor:
        """Finish from x_s (taken from ``prefix``) with ``cond``, for every s in ``starts``."""
        if not starts:
            return prefix[-1].new_zeros((0, *prefix[-1].shape))
        lat = torch.stack([prefix[s] for s in starts])  # a row waits until its start step
        samples = lat.shape[1]
        for k in range(min(starts), len(self.timesteps)):
            active = [i for i, s in enumerate(starts) if s <= k]
            x = lat[active].flatten(0, 1)
            lat[active] = self.step(x, k, cond).view(len(active), samples, *x.shape[1:])
            if bar is not None:
                bar.update(1)
        return lat


def switch_finals(
    stepper: GuidedStepper,
    noise: torch.Tensor,
    concept: Prompt,
    neutral: Prompt,
    steps: list[int],
    progress: bool = False,
) -> Finals:
    """Final latents of the forward and reverse switches at ``steps`` (plus the two ends)."""
    n = len(stepper.timesteps)
    starts = [s for s in steps if 0 < s < n]
    bar = tqdm(
        total=2 * (n - min(starts, default=n)),
        desc="analyze",
        disable=not progress,
        dynamic_ncols=True,
    )
    with_concept = stepper.prefix(noise, concept)
    with_neutral = stepper.prefix(noise, neutral)
    forward = stepper.branches(with_concept, starts, neutral, bar)
    reverse = stepper.branches(with_neutral, starts, concept, bar)
    bar.close()
    return Finals(starts, forward, reverse, with_concept[-1], with_neutral[-1])


def commitment_curve(
    forward: np.ndarray,
    reverse: np.ndarray,
    p_concept: float,
    p_neutral: float,
    min_contrast: float,
) -> np.ndarray:
    """C(s) = (F + 1 - R) / 2 at the measured steps (see the module docstring).

    With a contrast below ``min_contrast`` the caller marks the result unreliable; the
    denominator is floored there so that the numbers stay finite.
    """
    contrast = max(p_concept - p_neutral, min_contrast)
    f = (forward - p_neutral) / contrast
    r = (reverse - p_neutral) / contrast
    return (f + 1 - r) / 2


def to_all_steps(steps: list[int], values: np.ndarray, num_steps: int) -> np.ndarray:
    """Linear interpolation from the measured steps to 0..N-1, anchored at C(N) = 1."""
    xs = [*steps, num_steps]
    ys = [*values.tolist(), 1.0]
    return np.interp(np.arange(num_steps), xs, ys)


def isotonic(values: np.ndarray) -> np.ndarray:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values.tolist():
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([np.full(int(w), m) for m, w in blocks])


def start_from_curve(curve: np.ndarray, threshold: float, cap: int) -> int:
    """The last step whose monotone commitment is <= ``threshold``, clamped to [0, cap].

    ``S = min{s : M(s+1) > threshold}`` with ``M`` the isotonic fit and ``M(N) = 1``: the steps
    before S together commit at most ``threshold`` of the concept, so [S, N) is the shortest
    suffix of steps that decides at least ``1 - threshold`` of it.
    """
    fit = np.append(isotonic(np.clip(curve, 0.0, 1.0)), 1.0)
    above = np.nonzero(fit[1:] > threshold)[0]
    start = int(above[0]) if len(above) else len(curve) - 1
    return int(min(max(start, 0), cap))
