"""Saving and loading erased weights: ``weights.safetensors`` + ``kscu.json``.

Only the edited tensors are stored (keys are the UNet's parameter names), so a checkpoint is a
patch on a base model. A patch applied to the wrong base gives a silently broken model, so
loading checks names, shapes and a fingerprint of the base weights the erase started from.
That fingerprint covers only the run's own tensors, so the denoiser also records the runs loaded
into it (``LOADED``): a second run of another scope would otherwise stack on the first unseen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kscu.errors import KscuError
from kscu.families import family_of
from kscu.families.base import check_editable
from kscu.fileio import atomic_target, check_writable, file_sha256, read_json_object, write_json

WEIGHTS = "weights.safetensors"
METADATA = "kscu.json"
_FINGERPRINT_TENSORS = 8
_FINGERPRINT_VALUES = 16
LOADED = "_kscu_loaded"  # on the denoiser: [{"run": folder, "values": fingerprint}], see below


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Base-weight values at fixed positions, exactly (float32 holds every stored value).

    Enough to tell two base models apart, and to tell a base from a rounded copy of itself.
    """
    out = {}
    for name in sorted(tensors)[:_FINGERPRINT_TENSORS]:
        flat = tensors[name].detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, _FINGERPRINT_VALUES).long()
        out[name] = [float(v) for v in flat[idx.to(flat.device)].float().cpu()]
    return out


def _fingerprint_matches(expected: dict[str, list[float]], params: dict[str, Any]) -> bool:
    """Exact: every recorded value equals the pipeline's, in the pipeline's own precision.

    A float32 base must match to the bit; a base loaded in bf16 for generation matches the
    recorded values rounded to bf16 (the same base, loaded in lower precision), nothing looser.
    """
    if any(name not in params for name in expected):
        return False
    current = fingerprint({name: params[name] for name in expected})
    held = _held_dtype(expected)
    for name, values in expected.items():
        dtype = params[name].dtype if held == torch.float32 else held
        want = torch.tensor(values, dtype=torch.float32).to(dtype)
        if not torch.equal(torch.tensor(current[name], dtype=torch.float32).to(dtype), want):
            return False
    return True


def loaded_runs(net: torch.nn.Module) -> list[dict[str, Any]]:
    """The runs ``load_erased`` put into ``net`` whose values it still holds, oldest first.

    A record whose tensors no longer hold the run's values (the base restored with
    ``load_state_dict``, as the bench does between runs, or overwritten since) is left out:
    what counts is what the weights hold, not what was once loaded.
    """
    params = dict(net.named_parameters())
    return [r for r in getattr(net, LOADED, []) if _fingerprint_matches(r["values"], params)]


def record_run(net: torch.nn.Module, run: str, tensors: dict[str, torch.Tensor]) -> None:
    """Note on ``net`` that it now holds ``tensors`` (a run's edit, named ``run`` in messages).

    ``load_erased`` calls it after copying; an erase in place could too, so that a run loaded
    onto its result is refused as well. Kept on the module, so a deepcopy of the pipeline keeps it.
    """
    values = fingerprint(tensors)
    kept = [r for r in loaded_runs(net) if r["values"] != values]
    setattr(net, LOADED, [*kept, {"run": run, "values": values}])


def _held_dtype(expected: dict[str, list[float]]) -> torch.dtype:
    """The precision the base was held in when its fingerprint was taken: a half dtype when every
    recorded value is one of its values (an erase of a pipeline held in bf16 through the Python
    API), else float32; for the 128 values of a float32 base that happens by chance with odds
    near 2^-2000. A run made from a bf16-held base is so compared at bf16 with a float32 copy."""
    values = torch.tensor([v for vs in expected.values() for v in vs], dtype=torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        if torch.equal(values.to(dtype).float(), values):
            return dtype
    return torch.float32


def check_output(
    output: str | Path,
    overwrite: bool = False,
    markers: tuple[str, ...] = (WEIGHTS, METADATA),
    what: str = "run",
    how: str = "--overwrite / overwrite=True",
) -> bool:
    """Refuse an output folder that would lose work; cheap, so it runs before any load.

    A missing or empty folder is fine. A folder holding a ``what`` (one of the ``markers``, paths
    inside it; an erase run's: ``kscu.json`` or ``weights.safetensors``) is replaced as a whole,
    and only with ``overwrite`` (``how`` names that option in the message): whatever else is in
    it (images, evaluations) describes the old result. Any other non-empty folder is never
    replaced: kscu does not delete a folder it cannot recognise as its own output.

    Returns whether ``output`` holds a ``what`` that is to be replaced: pass it as
    ``atomic_folder``'s ``replace``, so the old one stays until the new one is complete.
    """
    output = Path(output)
    check_writable(output)
    here = Path.cwd().resolve()
    if output.resolve() == here or output.resolve() in here.parents:
        raise KscuError(
            f"--output {output} is the current folder or holds it; a {what} is written as a "
            "folder of its own, moved into place at the end: give a folder below it, e.g. runs/x"
        )
    if not output.is_dir() or not any(output.iterdir()):
        return False
    if not any((output / marker).exists() for marker in markers):
        raise KscuError(
            f"--output {output} is not empty and holds no kscu {what}; give a new or empty folder"
        )
    if not overwrite:
        article = "an" if what[:1] in tuple("aeiou") else "a"
        raise KscuError(
            f"--output {output} already holds {article} {what}; give a new folder, or pass "
            f"{how} to replace it (the old {what} stays until the new one is complete)"
        )
    return True


def save_erased(output: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write the edited tensors and the run's record into ``output``, each atomically.

    ``erase_to_folder`` calls it on a fresh hidden folder that is renamed into place afterwards,
    so a run's files are never seen half-replaced.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"format": "kscu", "base_model": str(metadata.get("base_model", ""))}
    with atomic_target(output / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    write_json(output / METADATA, metadata)


def _run_folder(directory: str | Path) -> Path:
    directory = Path(directory)
    if directory.is_file():  # e.g. RUN/weights.safetensors: its kscu.json is needed beside it
        raise KscuError(f"{directory} is a file; give the folder written by `kscu erase`")
    return directory


def read_metadata(directory: str | Path) -> dict:
    """An erase's ``kscu.json``: what says which base model and family its tensors fit."""
    path = _run_folder(directory) / METADATA
    if not path.is_file():
        raise KscuError(f"{path} is missing; give a folder written by `kscu erase`")
    return read_json_object(path, "the checkpoint is damaged")


def weights_sha256(directory: str | Path) -> str:
    """The sha256 of an erase's ``weights.safetensors``: what generate.json and attack.json
    record as the weights their images came from, and report compares with the run's own."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise KscuError(f"{path} is missing; give a folder written by `kscu erase`")
    return file_sha256(path)


def load_erased(pipe: Any, directory: str | Path, force: bool = False) -> dict:
    """Put an erase's edited tensors into the pipeline's denoiser (in place); returns its metadata.

    Refuses a checkpoint of another model family, keys or shapes that do not match the
    denoiser (always), and a checkpoint made from another base model (unless ``force``: e.g. a
    deliberate transfer to a fine-tune). The base check sees only this run's own tensors, so a
    denoiser already holding another run (of another scope: ``loaded_runs``) is refused too
    unless ``force``: both edits would apply, a model neither run made.
    """
    directory = _run_folder(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise KscuError(f"{weights} is missing; give a folder written by `kscu erase`")
    meta = read_metadata(directory)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise KscuError(f"cannot read {weights} ({e}); the checkpoint is damaged") from None
    if not tensors:
        raise KscuError(f"{weights} holds no tensors; the checkpoint is damaged")

    family = family_of(pipe)
    made_for = meta.get("family", "sd")
    if made_for != family.name:
        raise KscuError(
            f"{directory} was erased from a {made_for} model, but this pipeline is {family.name}; "
            f"load a {made_for} base model"
        )
    net = family.denoiser(pipe)
    check_editable(net, family.denoiser_attr)  # LoRA, offloaded to meta, fused projections
    params = dict(net.named_parameters())
    what = f"this {family.denoiser_attr}"
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise KscuError(
            f"{weights} has {len(unknown)} tensors {what} lacks (e.g. {unknown[0]}); "
            "it was made for another architecture"
        )
    bad = [k for k, v in tensors.items() if tuple(v.shape) != tuple(params[k].shape)]
    if bad:
        raise KscuError(
            f"{weights}: {len(bad)} tensors differ in shape from {what} "
            f"(e.g. {bad[0]}: {tuple(tensors[bad[0]].shape)} vs {tuple(params[bad[0]].shape)}); "
            "it was made for another architecture"
        )
    held = loaded_runs(net)
    expected = meta.get("base_fingerprint")
    if not expected and not force:  # nothing to check the base model against
        raise KscuError(
            f"{directory / METADATA} names no base_fingerprint, so it was not written by "
            "`kscu erase`; give an erase's folder, or pass --force / force=True to load anyway"
        )
    if expected and not force and not _fingerprint_matches(expected, params):
        current = getattr(pipe, "name_or_path", None) or "this pipeline"
        holds = f": it holds {_names(held)}" if held else ""
        raise KscuError(
            f"{directory} was erased from base model {meta.get('base_model')!r}, whose weights "
            f"differ from those of {current!r} as held now (another model, or one already "
            f"edited by an erase or an earlier load_erased{holds}); load that base model fresh, "
            "or pass --force / force=True"
        )
    if held and not force:  # the base check passed: this run's tensors are not the held ones
        raise KscuError(
            f"this {family.denoiser_attr} already holds {_names(held)}, and "
            f"{directory} replaces only its own tensors, so both edits would apply; load the "
            "base model fresh before loading another run, or pass --force / force=True to "
            "stack them"
        )
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(params[k].dtype))
    record_run(net, str(directory), tensors)
    return meta


def _names(runs: list[dict[str, Any]]) -> str:
    return ", ".join(r["run"] for r in runs)
