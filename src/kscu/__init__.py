"""kscu: Key Step Concept Unlearning for text-to-image diffusion models.

Python API::

    from kscu import EraseConfig, erase, load_erased, load_pipeline
    pipe = load_pipeline("CompVis/stable-diffusion-v1-4", device="cuda")
    result = erase(pipe, EraseConfig(concepts=["church"], mode="class"))

Names are imported on first use, so ``import kscu`` (and the CLI's start) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from kscu.torchvision_compat import fix_on_first_import  # noqa: E402

fix_on_first_import()  # PyPI's torchvision beside a CPU torch (see there); imports nothing now

_API = {
    "EraseConfig": "kscu.config",
    "resolve": "kscu.config",
    "KscuError": "kscu.errors",
    "EraseResult": "kscu.trainer",
    "erase": "kscu.trainer",
    "erase_to_folder": "kscu.runner",
    "load_erased": "kscu.checkpoint",
    "save_erased": "kscu.checkpoint",
    "load_pipeline": "kscu.models",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'kscu' has no attribute {name!r}")
