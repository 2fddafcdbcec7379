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

``import kscu`` does not import torchvision (with torch, 3 s before ``kscu --help`` could print,
and a Ctrl-C in those seconds ended in a traceback before the CLI's handler existed); it calls
``fix_on_first_import()``, which applies the same repair when torchvision is first imported,
by whoever imports it (diffusers, transformers, pytorch-fid).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: a torch.library.Library drops its definitions when collected


def ensure_torchvision() -> bool:
    """Import torchvision if it is installed (see the module docstring); False if it is not."""
    fix_on_first_import()
    if importlib.util.find_spec("torchvision") is None:
        return False
    import torchvision  # noqa: F401

    return True


def _declare_schemas() -> None:
    global _library
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        _library.define(schema)


class _RepairingLoader(importlib.abc.Loader):
    """torchvision's own loader; if executing the package fails as the module docstring says,
    declare the schemas, forget the half-imported submodules and execute it once more."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __getattr__(self, name: str) -> Any:  # get_data, get_resource_reader, ...: torchvision's
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        try:
            self.loader.exec_module(module)
        except RuntimeError as e:
            if "torchvision::nms does not exist" not in str(e) or _library is not None:
                raise
            _declare_schemas()
            for name in [m for m in sys.modules if m.startswith("torchvision.")]:
                del sys.modules[name]
            self.loader.exec_module(module)


class _FirstImport(importlib.abc.MetaPathFinder):
    """Finds torchvision as the finders after it do, with its loader wrapped."""

    looking = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torchvision" or self.looking:
            return None
        self.looking = True
        try:
            spec = importlib.util.find_spec(name)  # the other finders' answer
        finally:
            self.looking = False
        if spec is not None and spec.loader is not None:
            spec.loader = _RepairingLoader(spec.loader)
        return spec


def fix_on_first_import() -> None:
    """Repair torchvision (see the module docstring) when it is first imported, not now."""
    if "torchvision" not in sys.modules and not any(
        isinstance(f, _FirstImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _FirstImport())
