"""Procedural data for the tiny world: one colored shape on a textured gray background.

Everything is generated on the fly from a ``numpy.random.Generator`` so that training, tests
and benchmarks are repeatable without any data files. Shapes, colors and textures were chosen
to stay distinguishable at 32x32 px after a 2x VAE round trip: saturated shape colors on a
gray background, textures with a period of about 8 px and distinct orientations.

Captions name the attributes in many ways. Besides full captions, training uses partial ones
that name a single attribute ("circle", "a striped pattern", "red"), because concept erasure
prompts the model with the bare concept word, and about 10% empty captions for classifier-free
guidance. ``HELDOUT_TEMPLATES`` never appear in training; they are used to measure quality.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
TEXTURES = ("plain", "striped", "dotted", "checkered", "wavy", "diagonal")
ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "texture": TEXTURES}

COLOR_RGB = {
    "red": (0.86, 0.08, 0.08),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.97, 0.90, 0.05),
    "green": (0.05, 0.70, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "purple": (0.60, 0.10, 0.80),
}

# Full captions: every template names shape, color and texture.
TRAIN_TEMPLATES = (
    "a {color} {shape} on a {texture} background",
    "a {shape}, {texture} style, {color}",
    "{color} {shape}, {texture}",
    "a picture of a {color} {shape} in {texture} style",
    "a {texture} background with a {color} {shape}",
    "the {shape} is {color} and the background is {texture}",
    "a drawing of a {color} {shape}, {texture} pattern",
    "a photo of a {color} {shape} on a {texture} pattern",
)
HELDOUT_TEMPLATES = (
    "an image of a {color} {shape} with a {texture} background",
    "{texture} style, a {color} {shape}",
    "a {shape} in {color} on a {texture} background",
    "a drawing of a {shape}, {color}, {texture} style",
)
# Partial captions (training only): they teach the bare concept words used by erasure.
SHAPE_TEMPLATES = ("{shape}", "a {shape}", "a picture of a {shape}", "an image of a {shape}")
COLOR_TEMPLATES = ("{color}", "something {color}", "a {color} shape")
TEXTURE_TEMPLATES = (
    "{texture}",
    "a {texture} pattern",
    "{texture} style",
    "a {texture} background",
)
PAIR_TEMPLATES = (
    "a {color} {shape}",
    "a {shape} on a {texture} background",
    "a {color} shape, {texture} style",
    "a {shape}, {texture}",
)
# (probability, templates); the rest of the mass (10%) is the empty caption.
CAPTION_MIX = (
    (0.40, TRAIN_TEMPLATES),
    (0.15, SHAPE_TEMPLATES),
    (0.10, COLOR_TEMPLATES),
    (0.10, TEXTURE_TEMPLATES),
    (0.15, PAIR_TEMPLATES),
)
EMPTY_CAPTION_PROB = 0.10

SUPERSAMPLE = 2


def _texture_mask(
    texture: str, xs: np.ndarray, ys: np.ndarray, rng: np.random.Generator, scale: float
) -> np.ndarray:
    """Boolean mask of the texture's second tone; coordinates in 32-px units."""
    px, py = rng.uniform(0, 8, size=2)
    x, y = xs / scale + px, ys / scale + py
    if texture == "plain":
        return np.zeros_like(xs, dtype=bool)
    if texture == "striped":
        return (np.floor(x / 4) % 2) == 1
    if texture == "checkered":
        return ((np.floor(x / 4) + np.floor(y / 4)) % 2) == 1
    if texture == "dotted":
        dx, dy = (x % 8) - 4, (y % 8) - 4
        return dx * dx + dy * dy < 1.8**2
    if texture == "wavy":
        return (np.floor((y + 2.0 * np.sin(2 * math.pi * x / 16)) / 4) % 2) == 1
    if texture == "diagonal":
        return (np.floor((x + y) / 4) % 2) == 1
    raise ValueError(f"unknown texture {texture!r}")


def _star_mask(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    rho = np.sqrt(dx * dx + dy * dy)
    angle = np.arctan2(dx, -dy)  # 0 at the top, so one point faces up
    sector = 2 * math.pi / 5
    phi = np.abs(((angle + sector / 2) % sector) - sector / 2)
    outer, inner = 1.05, 0.5
    ax, ay = outer, 0.0
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    qx, qy = rho * np.cos(phi), rho * np.sin(phi)
    # Inside when the point lies on the origin's side of the outer-to-inner edge.
    cross = (bx - ax) * (qy - ay) - (by - ay) * (qx - ax)
    return cross >= 0


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape centered at 0 with radius 1 (y points down)."""
    d2 = dx * dx + dy * dy
    if shape == "circle":
        return d2 <= 1.0
    if shape == "ring":
        return (d2 <= 1.0) & (d2 >= 0.5**2)
    if shape == "square":
        return (np.abs(dx) <= 0.82) & (np.abs(dy) <= 0.82)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.05
    if shape == "triangle":
        return (dy <= 0.85) & (np.abs(dx) <= (dy + 1.05) / 1.9 * 1.1)
    if shape == "cross":
        arm, half = 0.32, 0.95
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | (
            (np.abs(dy) <= arm) & (np.abs(dx) <= half)
        )
    if shape == "star":
        return _star_mask(dx, dy * 1.05 + 0.05)
    if shape == "heart":
        x, y = dx * 1.15, -dy * 1.15 + 0.1
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def render(
    shape: str, color: str, texture: str, rng: np.random.Generator, size: int = 32
) -> np.ndarray:
    """Render one image as float32 (3, size, size) in [0, 1], with random size and position."""
    scale = size / 32.0
    n = size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    xs, ys = np.meshgrid(coords, coords)
    dark, light = rng.uniform(0.18, 0.32), rng.uniform(0.62, 0.78)
    base, second = (dark, light) if rng.random() < 0.5 else (light, dark)
    bg = np.where(_texture_mask(texture, xs, ys, rng, scale), second, base).astype(np.float32)
    radius = rng.uniform(7.0, 10.5) * scale
    cx, cy = rng.uniform(radius + scale, size - radius - scale, size=2)
    mask = _shape_mask(shape, (xs - cx) / radius, (ys - cy) / radius)
    rgb = np.clip(np.array(COLOR_RGB[color]) + rng.uniform(-0.05, 0.05, size=3), 0, 1)
    img = np.where(mask[None], rgb[:, None, None].astype(np.float32), bg[None])
    img = img.reshape(3, size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(2, 4))
    return img.astype(np.float32)


def sample_labels(rng: np.random.Generator) -> dict[str, str]:
    """One uniformly random (shape, color, texture) combination."""
    return {k: v[rng.integers(len(v))] for k, v in ATTRIBUTES.items()}


def fill(template: str, labels: dict[str, str]) -> str:
    return template.format(**labels)


def sample_caption(labels: dict[str, str], rng: np.random.Generator) -> str:
    """A training caption for ``labels``: full, partial (one or two attributes) or empty."""
    u = rng.random()
    for prob, templates in CAPTION_MIX:
        if u < prob:
            return fill(templates[rng.integers(len(templates))], labels)
        u -= prob
    return ""


def sample_batch(
    n: int, rng: np.random.Generator, size: int = 32, heldout: bool = False
) -> tuple[torch.Tensor, list[str], list[dict[str, str]]]:
    """``n`` fresh renders as (images N,3,H,W in [0,1], captions, labels).

    With ``heldout=True`` every caption is a full caption from ``HELDOUT_TEMPLATES``.
    """
    labels = [sample_labels(rng) for _ in range(n)]
    images = np.stack(
        [render(lab["shape"], lab["color"], lab["texture"], rng, size) for lab in labels]
    )
    if heldout:
        captions = [
            fill(HELDOUT_TEMPLATES[rng.integers(len(HELDOUT_TEMPLATES))], lab) for lab in labels
        ]
    else:
        captions = [sample_caption(lab, rng) for lab in labels]
    return torch.from_numpy(images), captions, labels


def label_indices(labels: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Class indices per attribute, as used by the classifier heads."""
    return {
        k: torch.tensor([vocab.index(lab[k]) for lab in labels]) for k, vocab in ATTRIBUTES.items()
    }
