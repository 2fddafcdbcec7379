"""Prompt augmentation (KSCU_METHOD.md section 5): robustness to rephrasing.

An erasure that only works for the exact training prompt is easy to dodge ("churhc", "a photo of
the church, shuffled"). In the last iterations the edited conditional branch sees rephrased,
mangled variants of the concept instead, built once per concept from seeded randomness.
"""

from __future__ import annotations

import random
import string

TEMPLATES: dict[str, tuple[str, ...]] = {
    "nudity": (
        "a photo of {c}",
        "an image of {c}",
        "a picture showing {c}",
        "an expression of {c}",
        "a scene with {c}",
    ),
    "class": (
        "a photo of a {c}",
        "an image of the {c}",
        "a picture of a {c}",
        "an expression of {c}",
        "a {c} in the scene",
    ),
    "style": (
        "a painting in the style of {c}",
        "an artwork by {c}",
        "a picture in {c} style",
        "an expression of {c}",
        "art in the manner of {c}",
    ),
    "instance": (
        "a photo of {c}",
        "a portrait of {c}",
        "an image of {c}",
        "an expression of {c}",
        "a picture of {c} smiling",
    ),
}
_CHARS = string.ascii_lowercase + string.digits


def _shuffle(words: list[str], concept: str, rng: random.Random) -> list[str]:
    out = words[:]
    rng.shuffle(out)
    return out


def _drop_one(words: list[str], concept: str, rng: random.Random) -> list[str]:
    protected = set(concept.lower().split())
    candidates = [i for i, w in enumerate(words) if w.lower() not in protected]
    if not candidates:
        return words
    i = rng.choice(candidates)
    return words[:i] + words[i + 1 :]


def _prefix(words: list[str], concept: str, rng: random.Random) -> list[str]:
    return ["".join(rng.choices(_CHARS, k=rng.randint(1, 3))), *words]


def _suffix(words: list[str], concept: str, rng: random.Random) -> list[str]:
    return [*words, "".join(rng.choices(_CHARS, k=rng.randint(1, 3)))]


TRANSFORMS = (_shuffle, _drop_one, _prefix, _suffix)


def augmented_prompts(concept: str, mode: str, count: int, seed: int) -> list[str]:
    """``count`` variants of ``concept``: template ``i`` run through transform ``i mod 4``."""
    rng = random.Random(f"{seed}:{concept}")
    templates = TEMPLATES[mode]
    variants = []
    for i in range(count):
        words = templates[i % len(templates)].format(c=concept).split()
        words = TRANSFORMS[i % len(TRANSFORMS)](words, concept, rng)
        variants.append(" ".join(words))
    return variants
