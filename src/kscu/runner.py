"""An erase from start to finish: load the model, resolve the config, erase, save.

The CLI and the Python API both go through ``erase_to_folder``, so a run started either way
writes the same files and the same record.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch

import kscu
from kscu import preview
from kscu.allocator import torch_huge_pages
from kscu.checkpoint import check_output, save_erased
from kscu.config import EraseConfig, resolve
from kscu.errors import KscuError
from kscu.families import family_of
from kscu.fileio import atomic_folder
from kscu.memory import (
    START_AFTER_LOAD,
    START_BEFORE_LOAD,
    check_sampler,
    cpu_start,
    peak_memory,
    planned_bytes,
)
from kscu.models import (
    TORCH_DTYPES,
    is_bundled_model,
    load_pipeline,
    model_family,
    read_preset,
    resolve_device,
)
from kscu.trainer import EraseResult, erase

BUNDLED_MODEL = "kscu-tiny-world"  # base_model name recorded for the default model
# base_model recorded for a pipeline passed without a model that names no folder or hub id:
# a name is needed (kscu.checkpoint writes it into the weights' header as a string), and a
# model's name would be a lie; load_erased checks the fingerprint, never this name
UNNAMED_PIPELINE = "unnamed pipeline (built in code)"


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """The model a run erases, as the preset, the record, the memory plan and the auto start
    step must all see it: one answer, from ``identify_model``, so they cannot disagree.

    ``model`` is what kscu's model functions take (a folder or hub id; None: the bundled world);
    ``name`` is the ``base_model`` recorded; ``built_in_code`` marks a pipeline with no name,
    which has no folder to read a preset or a plan from.
    """

    model: str | None
    name: str
    built_in_code: bool = False

    def preset(self) -> dict[str, Any]:
        """The model's own ``kscu_preset.json``; none for a pipeline built in code (the world's
        would be applied silently to a model it was never measured on)."""
        return {} if self.built_in_code else read_preset(self.model)

    def plan(self, cfg: EraseConfig) -> dict[str, Any]:
        """``memory_plan`` for this model; a pipeline built in code has no config files."""
        if self.built_in_code:
            return {"error": f"no plan for an {UNNAMED_PIPELINE}: a plan reads the model's files"}
        return memory_plan(self.model, cfg)

    @property
    def scorer_model(self) -> str | None:
        """The id ``auto_start_step`` chooses its scorer by: None (the world's classifier) only
        for the bundled world; the label for a pipeline built in code, which names no world
        folder, so it gets the generic CLIP scorer like any other model."""
        return self.name if self.built_in_code else self.model


def _pipeline_name(pipe: Any) -> str | None:
    """The folder or hub id diffusers loaded ``pipe`` from (``from_pretrained`` records it in
    ``config._name_or_path``); None for a pipeline assembled in code."""
    name = getattr(pipe, "name_or_path", None)
    if not name:
        config = getattr(pipe, "config", None)
        name = config.get("_name_or_path") if isinstance(config, Mapping) else None
    return str(name) if name else None


def identify_model(model: str | None, pipe: Any = None) -> BaseModel:
    """Which model a run erases: the one rule (see ``BaseModel``).

    An explicit ``model`` is taken as given. With only a ``pipe``, the pipeline decides: loaded
    from the bundled world's folder it is the world (``kscu bench`` passes it so); loaded from
    another folder or hub id it is that model; built in code it is an unnamed pipeline. Without
    either, the default model, the bundled world.
    """
    if model is not None:
        return BaseModel(model, _recorded_name(str(model)))
    if pipe is None:
        return BaseModel(None, BUNDLED_MODEL)
    name = _pipeline_name(pipe)
    if name is None:
        return BaseModel(None, UNNAMED_PIPELINE, built_in_code=True)
    if is_bundled_model(name):
        return BaseModel(None, BUNDLED_MODEL)
    return BaseModel(name, _recorded_name(name))


def _recorded_name(model: str) -> str:
    """A local folder as an absolute path, a hub id as given: ``kscu.json`` is read later from
    elsewhere (``kscu evaluate report``, a colleague), where a relative folder names nothing."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def prepare(config: EraseConfig, model: str | None, pipe: Any = None) -> EraseConfig:
    """Resolve ``config`` against the model's preset; fails fast, before any weights load.

    The family comes from ``pipe`` when one is given, else from the model's folder or hub id;
    the preset from the model ``identify_model`` finds (a ``pipe`` without ``model``: its own).

    ``start_step="auto"`` is checked as step 0 here (every other flag fully);
    ``erase_to_folder`` replaces it with the measured step once the model is loaded.
    """
    if config.start_step == "auto":
        if config.method == "esd":
            raise KscuError("--start-step auto is for --method kscu (ESD draws every step)")
        config = dataclasses.replace(config, start_step=0)  # any valid step, for the checks
    try:
        named = config.family
        family = family_of(pipe, named) if pipe is not None else model_family(model, named)
    except KscuError:
        resolve(config)  # a bad flag is reported before a missing model
        raise
    return resolve(config, identify_model(model, pipe).preset(), family=family)


def memory_plan(model: str | None, cfg: EraseConfig) -> dict[str, Any]:
    """``kscu erase --plan``'s figures for this configuration and model (see kscu.memory)."""
    from kscu.memory import plan
    from kscu.models import default_model

    try:
        family = model_family(model, cfg.family)
        return plan(default_model() if model is None else model, cfg, family)
    except Exception as e:  # a plan must never cost a finished run
        name = "the bundled world" if model is None else repr(model)
        why = str(e).splitlines()[0][:200] if str(e).strip() else ""
        why = (
            why if isinstance(e, KscuError | OSError | ValueError) else f"{type(e).__name__}: {why}"
        )
        return {"error": f"no plan for {name}: {why}"}


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
        # a float32 result's last bits depend on the CPU and on its thread count
        "torch_threads": torch.get_num_threads(),
        "trainable_elements": trainable,
        **result.record,  # "family", "timesteps" (the sampler's, in step order), "loss_space"
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
    overwrite: bool = False,
) -> tuple[EraseResult, Any]:
    """Erase and write ``output/weights.safetensors`` + ``output/kscu.json``.

    With ``preview_prompts``, also ``output/preview.png``: the same seeds before and after.
    Returns the result and the (now edited) pipeline, in ``config.dtype`` if loaded here (the saved
    weights are the exact float32 ones). Pass ``pipe`` to reuse a loaded one; with
    ``model`` None the pipeline then says which model it is (``identify_model``): its preset, its
    name in ``kscu.json``, its memory plan and, for ``start_step="auto"``, its scorer.
    The files are written into a hidden sibling folder renamed to ``output`` at the end, so
    ``output`` holds a complete run or nothing new; an existing run there is replaced only with
    ``overwrite`` (see ``kscu.checkpoint.check_output``).
    """
    base = identify_model(model, pipe)  # before loading: a pipeline we load is named by model
    cfg = prepare(config, model, pipe)
    replace = check_output(output, overwrite)  # before any weights load
    loaded = pipe is None
    since = None  # on a CPU, where the measured growth is counted from (kscu.memory)
    if not loaded:  # it runs where it is: recorded, and its peak measured, there
        device = family_of(pipe, cfg.family).denoiser(pipe).device
        since = cpu_start(START_AFTER_LOAD, cfg) if device.type == "cpu" else None
    else:
        device = resolve_device(cfg.device)
        with torch_huge_pages(cfg.reuse_freed_memory, device):  # where freed memory is returned
            # steps or a size its sampler refuses: before minutes of loading, not after (its
            # scheduler's tensors are torch's first, so only once huge pages were asked for)
            family = model_family(model, cfg.family)
            check_sampler(model, family, cfg.num_steps, cfg.resolution)
            since = cpu_start(START_BEFORE_LOAD, cfg) if device.type == "cpu" else None
            pipe = load_pipeline(model, cfg.dtype, device, family=cfg.family, exact_denoiser=True)
    analysis = None
    if config.start_step == "auto":  # measured on the original weights, before any edit
        from kscu.analyze import auto_start_step

        analysis = auto_start_step(
            pipe,
            base.scorer_model,
            cfg.concepts,
            cfg.mode,
            num_steps=cfg.num_steps,
            resolution=cfg.resolution,
            progress=progress,
        )
        auto = dataclasses.replace(config, start_step=analysis["recommended_start_step"])
        cfg = prepare(auto, model, pipe)
    size = cfg.resolution
    before = (
        preview.sample(pipe, preview_prompts, cfg.seed, resolution=size)
        if preview_prompts
        else None
    )
    plan = base.plan(cfg)
    with peak_memory(device, since) as peak:
        result = erase(pipe, cfg, progress=progress)
    record = run_record(result, base.name, device)
    # the measured peak as a number of bytes (None where it cannot be read), labelled apart
    record["peak_memory_bytes"] = peak["bytes"]
    record["peak_memory_kind"] = peak["kind"]
    record["peak_memory_start_bytes"] = peak.get("start_bytes")
    # library code and mapped weights' pages first read, in the peak
    record["peak_memory_file_backed_bytes"] = peak.get("file_bytes")
    record["peak_memory_start"] = peak.get("start")  # what the growth is counted from
    record["peak_memory_first_use"] = peak.get("first_use")  # paid before it, or why not
    record["memory_plan"] = plan
    record["peak_memory_planned_bytes"] = planned_bytes(plan, peak.get("start"))  # the same span
    if analysis is not None:
        record["start_step_analysis"] = analysis
    # only the run found above: a folder made there meanwhile is not replaced, even so
    with atomic_folder(output, replace=replace) as folder:
        save_erased(folder, result.tensors, record)
        if preview_prompts:
            after = preview.sample(pipe, preview_prompts, cfg.seed, resolution=size)
            title = f"{cfg.method} ({cfg.mode} mode): erased {', '.join(cfg.concepts)}"
            grid = preview.compose(preview_prompts, before, after, title)
            preview.save_png(grid, folder / "preview.png")
    if loaded:  # the denoiser was loaded in float32 for exact masters; the rest is in cfg.dtype
        _to_compute_dtype(pipe, cfg)
    return result, pipe


def _to_compute_dtype(pipe: Any, cfg: EraseConfig) -> None:
    """The pipeline ``erase_to_folder`` loaded, as ``load_pipeline`` would give it in
    ``cfg.dtype``: under bf16 its float32 denoiser beside bf16 encoders made ``pipe(prompt)``
    fail on mixed dtypes. The saved weights and ``result.tensors`` stay the exact float32 ones."""
    net = family_of(pipe, cfg.family).denoiser(pipe)
    if net.dtype != TORCH_DTYPES[cfg.dtype]:
        net.to(TORCH_DTYPES[cfg.dtype])
