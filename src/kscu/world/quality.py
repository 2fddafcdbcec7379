"""How well a world pipeline draws what it is asked for, judged by the world classifier.

``score_pipeline`` prompts the pipeline with full captions (by default from the held-out
templates, never seen in training), generates with fixed seeds and reports, per attribute, the
fraction of images in which the classifier recognizes the prompted value. The same numbers
serve as the world's quality bars and, before and after an erasure, as a retention check.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from kscu.world.classifier import WorldClassifier, load_classifier
from kscu.world.data import ATTRIBUTES, COLORS, HELDOUT_TEMPLATES, SHAPES, TEXTURES


def quality_prompts(
    n: int, seed: int, templates: tuple[str, ...] = HELDOUT_TEMPLATES
) -> tuple[list[str], list[dict]]:
    """``n`` (prompt, labels) pairs; shapes cycle so each appears equally often."""
    rng = np.random.default_rng(seed)
    prompts, labels = [], []
    for i in range(n):
        lab = {
            "shape": SHAPES[i % len(SHAPES)],
            "color": COLORS[rng.integers(len(COLORS))],
            "texture": TEXTURES[rng.integers(len(TEXTURES))],
        }
        prompts.append(templates[i % len(templates)].format(**lab))
        labels.append(lab)
    return prompts, labels


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seed: int,
    steps: int = 50,
    guidance: float = 7.5,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images (N,3,H,W in [0,1]); batch ``i`` uses a generator seeded with ``seed + i``."""
    images = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        gen = torch.Generator(device="cpu").manual_seed(seed + b)
        out = pipe(
            prompts[start : start + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="pt",
        )
        images.append(out.images.float().cpu())
    return torch.cat(images)


def score_pipeline(
    pipe,
    n_images: int,
    seed: int,
    steps: int = 50,
    guidance: float = 7.5,
    templates: tuple[str, ...] = HELDOUT_TEMPLATES,
    classifier: WorldClassifier | None = None,
    batch_size: int = 64,
) -> dict:
    """Per-attribute accuracy of the prompted values in generated images.

    Returns ``{"shape": acc, "color": acc, "texture": acc, "n_images": n, "per_shape": {...}}``.
    """
    classifier = classifier if classifier is not None else load_classifier()
    prompts, labels = quality_prompts(n_images, seed, templates)
    images = generate(pipe, prompts, seed, steps, guidance, batch_size)
    pred = classifier.predict(images)
    result: dict = {}
    for k in ATTRIBUTES:
        hits = [p == lab[k] for p, lab in zip(pred[k], labels, strict=True)]
        result[k] = float(np.mean(hits))
    result["n_images"] = n_images
    result["per_shape"] = {
        s: float(
            np.mean(
                [p == s for p, lab in zip(pred["shape"], labels, strict=True) if lab["shape"] == s]
            )
        )
        for s in SHAPES
        if any(lab["shape"] == s for lab in labels)
    }
    return result


def time_generation(
    pipe, n_images: int = 64, steps: int = 50, guidance: float = 7.5, seed: int = 0
) -> float:
    """Seconds to generate ``n_images`` in one batch (after a short warm-up)."""
    prompts, _ = quality_prompts(n_images, seed)
    generate(pipe, prompts[:2], seed, steps=2, guidance=guidance)
    start = time.perf_counter()
    generate(pipe, prompts, seed, steps, guidance, batch_size=n_images)
    return time.perf_counter() - start
