"""The bundled tiny world: a small text-to-image model of colored shapes on textured
backgrounds, and a classifier that recognizes them, so that erasure can be run and measured
offline on a CPU in minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kscu.errors import KscuError

# the vocabulary lives with the renderer (kscu.world.data, which imports torch): read on first
# use, so commands that only parse arguments (kscu --help, kscu world train's checks) start fast
_VOCABULARY = ("COLORS", "HELDOUT_TEMPLATES", "SHAPES", "TEXTURES", "TRAIN_TEMPLATES")

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


def __getattr__(name: str) -> Any:
    if name in _VOCABULARY:
        from kscu.world import data

        return getattr(data, name)
    raise AttributeError(f"module 'kscu.world' has no attribute {name!r}")


def concept_kind(concept: str) -> str:
    """ "shape", "color" or "texture" for a world concept word (case and spaces ignored)."""
    from kscu.world.data import COLORS, SHAPES, TEXTURES

    word = concept.strip().lower()
    for kind, vocab in (("shape", SHAPES), ("color", COLORS), ("texture", TEXTURES)):
        if word in vocab:
            return kind
    raise KscuError(
        f"{concept!r} is not a concept of the tiny world; use one of the shapes "
        f"{', '.join(SHAPES)}; colors {', '.join(COLORS)}; or textures {', '.join(TEXTURES)}"
    )
