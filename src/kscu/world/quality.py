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

from kscu.protocol import EVAL_GUIDANCE, EVAL_STEPS
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


def generate(
    pipe,
    prompts: list[str],
    seed: int,
    steps: int = EVAL_STEPS,
    guidance: float = EVAL_GUIDANCE,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images (N,3,H,W in [0,1]); image ``i`` starts from the noise of seed ``seed + i``."""
    from kscu.sampling import sample_images

    seeds = [seed + i for i in range(len(prompts))]
    return sample_images(pipe, prompts, seeds, steps, guidance, batch_size=batch_size)


def score_pipeline(
    pipe,
    n_images: int,
    seed: int,
    steps: int = EVAL_STEPS,
    guidance: float = EVAL_GUIDANCE,
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
    pipe,
    n_images: int = 64,
    steps: int = EVAL_STEPS,
    guidance: float = EVAL_GUIDANCE,
    seed: int = 0,
) -> float:
    """Seconds to generate ``n_images`` in one batch (after a short warm-up)."""
    prompts, _ = quality_prompts(n_images, seed)
    generate(pipe, prompts[:2], seed, steps=2, guidance=guidance)
    start = time.perf_counter()
    generate(pipe, prompts, seed, steps, guidance, batch_size=n_images)
    return time.perf_counter() - start
