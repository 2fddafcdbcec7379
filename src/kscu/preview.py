"""A labelled before/after image grid, so a user sees what an erase did at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from kscu.fileio import atomic_target

PER_PROMPT = 4
LABEL_WIDTH = 150
HEADER = 18


def world_prompts(concept: str, count: int = 4) -> list[str]:
    """The erased tiny-world concept first, then others of its kind (and one of another kind)."""
    from kscu.world import COLORS, SHAPES, TEXTURES, concept_kind

    kind = concept_kind(concept)
    vocab = {"shape": SHAPES, "color": COLORS, "texture": TEXTURES}[kind]
    others = [w for w in vocab if w != concept.strip().lower()][: count - 1]
    cross = TEXTURES[1] if kind != "texture" else SHAPES[0]
    return [concept.strip().lower(), *others, cross]


def sample(
    pipe: Any,
    prompts: list[str],
    seed: int,
    steps: int | None = None,
    guidance: float | None = None,
    resolution: int | None = None,
):
    """``PER_PROMPT`` images per prompt; the same seeds before and after an erase."""
    from kscu.sampling import sample_images, to_pil

    every = [p for p in prompts for _ in range(PER_PROMPT)]
    seeds = [seed + i for i in range(len(every))]
    images = to_pil(sample_images(pipe, every, seeds, steps, guidance, resolution))
    return [images[i : i + PER_PROMPT] for i in range(0, len(images), PER_PROMPT)]


def compose(prompts: list[str], before: list[list], after: list[list], title: str) -> Image.Image:
    """Rows = prompts; left block = before, right block = after; images upscaled to >= 64 px."""
    side = max(64, before[0][0].width)
    gap = 8
    block = PER_PROMPT * side
    width = LABEL_WIDTH + 2 * block + gap
    height = 2 * HEADER + len(prompts) * side
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), title, fill="black")
    draw.text((LABEL_WIDTH, HEADER + 2), "before", fill="black")
    draw.text((LABEL_WIDTH + block + gap, HEADER + 2), "after", fill="black")
    for r, prompt in enumerate(prompts):
        y = 2 * HEADER + r * side
        draw.text((4, y + side // 2 - 6), (prompt or '""')[:24], fill="black")
        for c in range(PER_PROMPT):
            grid.paste(
                before[r][c].resize((side, side), Image.NEAREST), (LABEL_WIDTH + c * side, y)
            )
            x = LABEL_WIDTH + block + gap + c * side
            grid.paste(after[r][c].resize((side, side), Image.NEAREST), (x, y))
    return grid


def save_png(image: Image.Image, path: str | Path) -> None:
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")
