"""An erase from start to finish: load the model, resolve the config, erase, save.

The CLI and the Python API both go through ``erase_to_folder``, so a run started either way
writes the same files and the same record.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import diffusers
import torch

import kscu
from kscu import preview
from kscu.checkpoint import save_erased
from kscu.config import EraseConfig, resolve
from kscu.models import load_pipeline, read_preset, resolve_device
from kscu.trainer import EraseResult, erase

BUNDLED_MODEL = "kscu-tiny-world"  # base_model name recorded for the default model


def prepare(config: EraseConfig, model: str | None) -> EraseConfig:
    """Resolve ``config`` against the model's preset; fails fast, before any weights load."""
    resolve(config)  # a bad flag is reported before a missing model
    return resolve(config, read_preset(model))


def run_record(result: EraseResult, base_model: str, device: torch.device) -> dict[str, Any]:
    """The ``kscu.json`` of a run: everything needed to know, and redo, what was done."""
    trainable = sum(t.numel() for t in result.tensors.values())
    return {
        "kscu_version": kscu.__version__,
        "base_model": base_model,
        "base_fingerprint": result.base_fingerprint,
        "config": result.config.to_dict(),
        "preset": result.config.preset,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "trainable_elements": trainable,
        "schedule": [[c, s] for c, s in result.schedule],
        "losses": result.losses,
        "final_loss": result.losses[-1] if result.losses else None,
        "seconds": round(result.seconds, 3),
    }


def erase_to_folder(
    config: EraseConfig,
    model: str | None,
    output: str | Path,
    progress: bool = True,
    pipe: Any = None,
    preview_prompts: list[str] | None = None,
) -> tuple[EraseResult, Any]:
    """Erase and write ``output/weights.safetensors`` + ``output/kscu.json``.

    With ``preview_prompts``, also ``output/preview.png``: the same seeds before and after.
    Returns the result and the (now edited) pipeline. Pass ``pipe`` to reuse a loaded one.
    """
    cfg = prepare(config, model)
    device = resolve_device(cfg.device)
    if pipe is None:
        pipe = load_pipeline(model, cfg.dtype, device)
    base = model if model is not None else BUNDLED_MODEL
    before = preview.sample(pipe, preview_prompts, cfg.seed) if preview_prompts else None
    result = erase(pipe, cfg, progress=progress)
    save_erased(output, result.tensors, run_record(result, str(base), device))
    if preview_prompts:
        after = preview.sample(pipe, preview_prompts, cfg.seed)
        title = f"kscu {cfg.method} {cfg.mode}: erased {', '.join(cfg.concepts)}"
        grid = preview.compose(preview_prompts, before, after, title)
        preview.save_png(grid, Path(output) / "preview.png")
    return result, pipe
