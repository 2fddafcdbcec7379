"""The bundled tiny world: a small text-to-image model of colored shapes on textured
backgrounds, and a classifier that recognizes them, so that erasure can be run and measured
offline on a CPU in minutes."""

from __future__ import annotations

from pathlib import Path

from kscu.errors import KscuError
from kscu.world.data import (
    COLORS,
    HELDOUT_TEMPLATES,
    SHAPES,
    TEXTURES,
    TRAIN_TEMPLATES,
)

__all__ = [
    "COLORS",
    "HELDOUT_TEMPLATES",
    "SHAPES",
    "TEXTURES",
    "TRAIN_TEMPLATES",
    "concept_kind",
    "default_model_path",
]


def default_model_path() -> Path:
    """The bundled StableDiffusionPipeline folder (the default ``--model``)."""
    return Path(__file__).parent / "model"


def concept_kind(concept: str) -> str:
    """ "shape", "color" or "texture" for a world concept word (case and spaces ignored)."""
    word = concept.strip().lower()
    for kind, vocab in (("shape", SHAPES), ("color", COLORS), ("texture", TEXTURES)):
        if word in vocab:
            return kind
    raise KscuError(
        f"{concept!r} is not a concept of the tiny world; use one of the shapes "
        f"{', '.join(SHAPES)}; colors {', '.join(COLORS)}; or textures {', '.join(TEXTURES)}"
    )
