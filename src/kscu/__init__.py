"""kscu: Key Step Concept Unlearning for text-to-image diffusion models.

Python API::

    from kscu import EraseConfig, erase, load_erased, load_pipeline, save_erased
    pipe = load_pipeline("CompVis/stable-diffusion-v1-4", device="cuda")
    result = erase(pipe, EraseConfig(concepts=["church"], mode="class"))
"""

__version__ = "0.1.0"

from kscu.checkpoint import load_erased, save_erased  # noqa: E402
from kscu.config import EraseConfig, resolve  # noqa: E402
from kscu.errors import KscuError  # noqa: E402
from kscu.models import load_pipeline  # noqa: E402
from kscu.runner import erase_to_folder  # noqa: E402
from kscu.trainer import EraseResult, erase  # noqa: E402

__all__ = [
    "EraseConfig",
    "EraseResult",
    "KscuError",
    "erase",
    "erase_to_folder",
    "load_erased",
    "load_pipeline",
    "resolve",
    "save_erased",
]
