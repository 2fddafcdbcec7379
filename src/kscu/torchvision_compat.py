"""Make PyPI's torchvision importable beside a CPU-only build of the same torch.

PyPI's Linux torchvision wheels are built against CUDA torch. Beside a CPU build of torch (the
one this project's machines and CI install) their C++ operators cannot load, and torchvision
then fails at import with "operator torchvision::nms does not exist": it registers fake kernels
for ``nms`` and ``qnms`` whether or not its operators loaded. transformers and diffusers import
torchvision whenever it is installed, so that one failure breaks them too.

``ensure_torchvision()`` declares those two operator schemas (without kernels) when, and only
when, that failure happens, and imports torchvision again: everything written in Python (the
models pytorch-fid builds on, the transforms) works; the C++ operators (nms, roi_align, ...)
raise if called, as they would have anyway. With a matching torchvision nothing is changed.
"""

from __future__ import annotations

import importlib.util
import sys

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: a torch.library.Library drops its definitions when collected


def ensure_torchvision() -> bool:
    """Import torchvision if it is installed (see the module docstring); False if it is not."""
    global _library
    if importlib.util.find_spec("torchvision") is None:
        return False
    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e) or _library is not None:
            raise
        _library = torch.library.Library("torchvision", "DEF")
        for schema in SCHEMAS:
            _library.define(schema)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision  # noqa: F401
    return True
