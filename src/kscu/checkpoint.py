"""Saving and loading erased weights: ``weights.safetensors`` + ``kscu.json``.

Only the edited tensors are stored (keys are the UNet's parameter names), so a checkpoint is a
patch on a base model. A patch applied to the wrong base gives a silently broken model, so
loading checks names, shapes and a fingerprint of the base weights the erase started from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kscu.errors import KscuError
from kscu.fileio import atomic_target, write_json

WEIGHTS = "weights.safetensors"
METADATA = "kscu.json"
_FINGERPRINT_TENSORS = 4
_FINGERPRINT_VALUES = 8


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """A few base-weight values at fixed positions: enough to tell two base models apart."""
    out = {}
    for name in sorted(tensors)[:_FINGERPRINT_TENSORS]:
        flat = tensors[name].detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, _FINGERPRINT_VALUES).long()
        out[name] = [float(v) for v in flat[idx.to(flat.device)].float().cpu()]
    return out


def _fingerprint_matches(expected: dict[str, list[float]], params: dict[str, Any]) -> bool:
    if any(name not in params for name in expected):
        return False
    current = fingerprint({name: params[name] for name in expected})
    # bf16 rounding of the same base is ~0.4% relative; another model differs far more.
    return all(
        torch.allclose(torch.tensor(current[k]), torch.tensor(v), rtol=1e-2, atol=1e-5)
        for k, v in expected.items()
    )


def save_erased(output: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write the edited tensors and the run's record, each atomically (weights first)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"format": "kscu", "base_model": str(metadata.get("base_model", ""))}
    with atomic_target(output / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    write_json(output / METADATA, metadata)


def read_metadata(directory: str | Path) -> dict:
    path = Path(directory) / METADATA
    if not path.is_file():
        raise KscuError(f"{path} is missing; give a folder written by `kscu erase`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KscuError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None


def load_erased(pipe: Any, directory: str | Path, force: bool = False) -> dict:
    """Put an erase's edited tensors into ``pipe.unet`` (in place); returns its metadata.

    Refuses keys or shapes that do not match the UNet (always), and a checkpoint made from
    another base model (unless ``force``: e.g. a deliberate transfer to a fine-tune).
    """
    directory = Path(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise KscuError(f"{weights} is missing; give a folder written by `kscu erase`")
    meta = read_metadata(directory)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise KscuError(f"cannot read {weights} ({e}); the checkpoint is damaged") from None

    params = dict(pipe.unet.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise KscuError(
            f"{weights} has {len(unknown)} tensors this UNet lacks (e.g. {unknown[0]}); "
            "it was made for another architecture"
        )
    bad = [k for k, v in tensors.items() if tuple(v.shape) != tuple(params[k].shape)]
    if bad:
        raise KscuError(
            f"{weights}: {len(bad)} tensors differ in shape from this UNet "
            f"(e.g. {bad[0]}: {tuple(tensors[bad[0]].shape)} vs {tuple(params[bad[0]].shape)}); "
            "it was made for another architecture"
        )
    expected = meta.get("base_fingerprint")
    if expected and not force and not _fingerprint_matches(expected, params):
        current = getattr(pipe, "name_or_path", None) or "this pipeline"
        raise KscuError(
            f"{directory} was erased from base model {meta.get('base_model')!r}, whose weights "
            f"differ from {current!r}; load that base model, or pass --force / force=True"
        )
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(params[k].dtype))
    return meta
