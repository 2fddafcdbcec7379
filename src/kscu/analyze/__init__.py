"""Concept sensitivity analysis (``kscu analyze``, ``kscu erase --start-step auto``).

Finds the key steps of a concept from data: at which denoising steps the image gets committed to
it, and from that the start step S of KSCU's Key Step Table. See ``kscu.analyze.analysis``.
Names are imported on first use, so registering the CLI command stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "AnalyzeSettings": "kscu.analyze.analysis",
    "analyze": "kscu.analyze.analysis",
    "auto_start_step": "kscu.analyze.analysis",
    "default_cache_dir": "kscu.analyze.analysis",
    "make_scorer": "kscu.analyze.scorers",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'kscu.analyze' has no attribute {name!r}")
