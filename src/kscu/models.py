"""Loading Stable Diffusion pipelines (hub id or local folder) and their presets.

Weights load from safetensors only and remote code is never trusted. The bundled tiny world is
the default model when the user names none.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from kscu.errors import KscuError
from kscu.fileio import read_json_object

PRESET_FILE = "kscu_preset.json"
T = TypeVar("T")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_or_explain(load: Callable[[], T], what: str, hint: str) -> T:
    """Run a ``from_pretrained`` call; a failure becomes one line naming what and the fix.
    transformers' loading bar is off during the call (its "Loading weights" bar went to stderr
    even under --quiet, and above a one-line error); a Hub download inside it shows no bar."""
    bars = sys.modules.get("transformers.utils.logging")  # loaded by any transformers call
    shown = bars is not None and bars.is_progress_bar_enabled()
    if shown:
        bars.disable_progress_bar()
    try:
        return load()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KscuError(f"cannot load {what} ({first[:300]}); {hint}") from None
    finally:
        if shown:
            bars.enable_progress_bar()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise KscuError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KscuError(f"device {device!r} asked for, but CUDA is not available; use --device cpu")
    return dev


@contextlib.contextmanager
def cpu_convolution(native: bool, device: torch.device) -> Iterator[bool]:
    """Inside: torch's native convolution (im2col + GEMM) instead of oneDNN's, on a CPU device.

    oneDNN reorders each weight into its blocked layout on every call; with small feature maps
    (the tiny world, SD at 64 px) that copy costs more than the convolution, so the native kernel
    is 1.3x-3x faster there (README, Performance). It sums in another order, so results agree to
    float rounding, not bit for bit: opt-in (``--fast-cpu-conv``), float32 only, since the CPU's
    bf16/fp16 kernels are oneDNN's. Only the oneDNN switch changes, and it is restored on exit.
    Yields whether the native kernel is in use.
    """
    if not native or device.type != "cpu":
        yield False
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield True
    finally:
        torch.backends.mkldnn.enabled = before


def default_model() -> str:
    """The bundled tiny world's folder, used when ``--model`` is not given."""
    from kscu.world import default_model_path

    path = default_model_path()
    if not (path / "model_index.json").is_file():
        raise KscuError("no bundled default model in this install; pass --model PATH_OR_HUB_ID")
    return str(path)


def is_bundled_model(model: str | None) -> bool:
    """True for the default model (``--model`` omitted or pointing at the bundled folder)."""
    if model is None:
        return True
    try:
        return Path(model).expanduser().resolve() == Path(default_model()).resolve()
    except KscuError:
        return False


def _looks_local(model: str) -> bool:
    """Anything but ``owner/name`` is a path: a missing one is a typo, not a hub lookup."""
    return re.fullmatch(r"[\w][\w.-]*/[\w][\w.-]*", model) is None


def load_pipeline(
    model: str | None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    family: str | None = None,
    exact_denoiser: bool = False,
) -> Any:
    """A pipeline of a supported family from a folder or hub id, safety checker off, on ``device``.

    With ``exact_denoiser`` the denoiser's weights are exactly the checkpoint's: loaded in
    ``dtype`` when the checkpoint stores that dtype (FLUX.1 ships bf16), else in float32 (an exact
    upcast), so an erase's masters start from the true base and the saved weights are
    base + update, not round_bf16(base) + update.
    """
    import diffusers
    from diffusers.utils import logging as diffusers_logging
    from packaging.version import Version
    from transformers.utils import logging as transformers_logging

    model = default_model() if model is None else str(model)
    if dtype not in TORCH_DTYPES:
        raise KscuError(f"unknown dtype {dtype!r}; choose one of {', '.join(TORCH_DTYPES)}")
    fam = model_family(model, family)
    path = Path(model).expanduser()
    source = str(path) if path.exists() else model
    hint = (
        "check the id or folder (offline? point --model at a local copy with safetensors weights)"
    )
    verbosity = diffusers_logging.get_verbosity()
    # the "safety checker disabled" notice is expected, and a failed load's own error line
    # would only precede ours (load_or_explain), which carries its text
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    diffusers_logging.disable_progress_bar()  # loading bars would bury our own output
    transformers_logging.disable_progress_bar()
    dtype_key = "dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype"
    try:
        kwargs = fam.load_kwargs()
        stored = stored_dtype(source, fam) if exact_denoiser else None
        if stored is not None and stored != TORCH_DTYPES[dtype]:
            kwargs[fam.denoiser_attr] = load_or_explain(
                lambda: fam.denoiser_class().from_pretrained(
                    source,
                    subfolder=fam.denoiser_attr,
                    use_safetensors=True,
                    **{dtype_key: torch.float32},
                ),
                f"the {fam.denoiser_attr} of {model}",
                hint,
            )
        pipe = load_or_explain(
            lambda: fam.pipeline_class().from_pretrained(
                source, use_safetensors=True, **kwargs, **{dtype_key: TORCH_DTYPES[dtype]}
            ),
            f"model {model}",
            hint,
        )
    finally:
        diffusers_logging.set_verbosity(verbosity)
    check_networks(model, fam, pipe.components)
    pipe.set_progress_bar_config(disable=True)
    pipe._kscu_family = fam.name
    return pipe.to(device)


def check_networks(source: str, family: Any, networks: dict[str, Any]) -> None:
    """A folder whose model_index.json names a pipeline class without that family's networks
    (an SDXL class over SD parts) would fail deep inside the first call that needs one."""
    missing = [
        n for n in (family.denoiser_attr, *family.encoder_modules) if networks.get(n) is None
    ]
    if missing:
        raise KscuError(
            f"{source} is declared a {family.name} pipeline but has no {missing[0]}; "
            "fix its model_index.json or give the matching --family"
        )


def stored_dtype(source: str, family: Any) -> torch.dtype:
    """The dtype a checkpoint stores its denoiser in (read from a local safetensors header).

    For a hub id without a local copy, the family's release dtype (SD/SDXL float32, FLUX bf16).
    """
    folder = Path(source).expanduser() / family.denoiser_attr
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return family.release_dtype
    with _read_safetensors(files[0]) as f:
        keys = list(f.keys())
        name = f.get_slice(keys[0]).get_dtype() if keys else None
    return _SAFETENSORS_DTYPES.get(name, torch.float32) if name else family.release_dtype


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # torch.save's files: loading runs code
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)  # checkpoints as A1111/ComfyUI keep them


def model_family(model: str | None, family: str | None = None) -> Any:
    """The family of ``model`` (named, or read from its ``model_index.json``), before loading."""
    import diffusers

    from kscu.families import detect_family, get_family

    model = default_model() if model is None else str(model)
    path = Path(model).expanduser()
    if not path.exists() and _looks_local(model):
        raise KscuError(f"model folder {model} does not exist; give a folder or a hub id")
    if family is not None:
        named = get_family(family)
        if (path / "model_index.json").is_file():
            _check_named_family(path, named)
        return named
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        raise KscuError(
            f"{model} is a single-file checkpoint; kscu loads diffusers pipeline folders: convert "
            "it once (diffusers: PIPELINE_CLASS.from_single_file(FILE).save_pretrained(DIR)) "
            "and pass --model DIR"
        )
    if path.exists() and not (path / "model_index.json").is_file():
        run = (path / "kscu.json").is_file()  # an erase's output: its weights, not a pipeline
        raise KscuError(
            f"{model} is not a diffusers pipeline folder (no model_index.json); "
            + (
                "it is an erase run: give its base model as --model (generate and attack take "
                "the run as --weights)"
                if run
                else "give the folder that holds model_index.json"
            )
        )
    if path.exists():
        _check_parts(path)
        _check_safetensors(path)
        return detect_family(path)
    config = load_or_explain(
        lambda: diffusers.DiffusionPipeline.load_config(model),
        f"model {model}",
        "check the id (offline? point --model at a local copy, or name --family)",
    )
    return detect_family(None, config.get("_class_name"))


def _check_parts(path: Path) -> None:
    """Every part ``model_index.json`` names has its folder: diffusers' own error for a missing
    one names only a config.json it did not find."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return  # diffusers reports an unreadable index in its own words (load_or_explain)
    for name, spec in index.items() if isinstance(index, dict) else ():
        named = isinstance(spec, list) and len(spec) == 2 and None not in spec
        if named and not name.startswith("_") and not (path / name).is_dir():
            raise KscuError(
                f"model folder {path} has no {name}/, which its model_index.json names; "
                "copy the whole pipeline folder"
            )


def _check_safetensors(path: Path) -> None:
    """kscu loads safetensors only (a pickle can run code when loaded); a part of a local
    pipeline folder saved as pickles alone is named here, before diffusers reports it after
    its own error line, and before ``--plan`` sizes a model that cannot be loaded."""
    for part in sorted(p for p in path.iterdir() if (p / "config.json").is_file()):
        names = {f.suffix for f in part.iterdir() if f.is_file()}
        if ".safetensors" not in names and names & set(PICKLE_SUFFIXES):
            raise KscuError(
                f"{part} holds pickle weights only, which kscu does not load; save the model "
                "with safetensors (diffusers: save_pretrained(DIR, safe_serialization=True))"
            )
        for file in sorted(part.glob("*.safetensors")):  # a truncated copy: seconds, not minutes
            if "." in file.stem:  # a variant (model.fp16.safetensors): loaded only when named
                continue
            with _read_safetensors(file):
                pass


@contextlib.contextmanager
def _read_safetensors(file: Path) -> Iterator[Any]:
    """``safe_open(file)``, whose header check catches a truncated or corrupt copy, or one line
    naming the file. A local folder's files are checked before a CPU erase starts measuring
    (``kscu.memory.pay_first_use`` runs first) and before ``--plan`` sizes the model."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise KscuError(
            f"{file} is not a readable safetensors file ({e}); copy the model again"
        ) from None


def _check_named_family(path: Path, named: Any) -> None:
    """``--family`` names the family of a pipeline kscu does not recognise by its class; for a
    folder of another family's known class it would fail deep inside loading, so refuse it."""
    from kscu.families import family_for_class

    try:
        class_name = json.loads((path / "model_index.json").read_text()).get("_class_name")
        detected = family_for_class(class_name) if class_name else None
    except (OSError, ValueError, KscuError):  # unreadable, unnamed or a class kscu does not
        return  # know: --family is how to name its family (loading reports the rest)
    if detected is not None and detected.name != named.name:
        raise KscuError(
            f"{path} is a pipeline of the {detected.name!r} family, not {named.name!r}; "
            f"drop --family {named.name} (the family is read from model_index.json)"
        )


def read_preset(model: str | None) -> dict[str, Any]:
    """Hyperparameters a model folder ships for itself (e.g. the tiny world's learning rate)."""
    path = Path(default_model() if model is None else model).expanduser() / PRESET_FILE
    if not path.is_file():
        return {}
    return read_json_object(path, "fix or remove it")


def native_resolution(pipe: Any) -> int:
    """The image size the model was trained for."""
    from kscu.families import family_of

    return family_of(pipe).native_resolution(pipe)


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> Any:
    """DDIM with Stable Diffusion's schedule (timesteps 981, 961, ..., 1 at 50 steps)."""
    from diffusers import DDIMScheduler

    from kscu.protocol import SD_DDIM_SETTINGS

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        **SD_DDIM_SETTINGS,
    )


def assemble_pipeline(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler: Any):
    """A StableDiffusionPipeline from parts built in code (tests, benchmarks, the tiny world)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
