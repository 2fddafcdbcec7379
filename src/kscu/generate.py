"""Image generation for evaluation: prompt tables in, one PNG per row out.

Built for benchmark-size runs (I2P's 4,703 prompts, COCO-30k): every row has a fixed seed (its
own ``evaluation_seed`` or ``seed + case_number``), so an image does not depend on batching or on
how many processes share the work; files that exist are skipped, so an interrupted run resumes;
under ``accelerate launch`` each process takes every n-th row, so no image is made twice.
Skipping is only safe if the images were made the same way: ``generate.json`` records what
decides the pixels before the first image (with a fingerprint of every row's prompt, seed and
guidance), and a rerun with other settings or other rows is refused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import kscu
from kscu.checkpoint import weights_sha256
from kscu.config import check_seed, non_negative
from kscu.errors import KscuError
from kscu.families import family_of
from kscu.fileio import atomic_target, file_sha256, read_json_object, write_text
from kscu.models import is_bundled_model, native_resolution
from kscu.promptfile import PromptRow, whole_number
from kscu.sampling import sample_images, to_pil
from kscu.tracing import TracedDenoiser

MANIFEST = "manifest.csv"
SETTINGS = "generate.json"
# Recorded, not compared: moving the weights folder or the prompt file, or upgrading kscu, leaves
# the images valid (the weights' bytes are "weights_sha256", the rows "prompts_sha256", and a
# sampler that changes shows up in "sampler" and "scheduler").
_NOT_COMPARED = ("weights", "weights_resolved", "prompts", "prompts_file_sha256", "kscu_version")
# Recorded since a later kscu: compared only where the folder's own record has them
_ADDED_LATER = ("scheduler", "prompts_sha256")
# What a fingerprint that differs stands for, so the refusal says what to look at
_EXPLAINED = {"prompts_sha256": "the rows' case numbers, prompts, seeds or guidance"}


def image_name(row: PromptRow) -> str:
    return f"{row.case_number}.png"


def row_seed(row: PromptRow, seed: int) -> int:
    return row.seed if row.seed is not None else seed + row.case_number


def _batches(rows: list[PromptRow], size: int, guidance: float) -> Iterator[list[PromptRow]]:
    """Consecutive rows of equal guidance, at most ``size`` at a time (one pipeline call)."""
    batch: list[PromptRow] = []
    for row in rows:
        if batch and (len(batch) == size or _g(batch[0], guidance) != _g(row, guidance)):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def _g(row: PromptRow, guidance: float) -> float:
    return row.guidance if row.guidance is not None else guidance


@torch.no_grad()
def generate_images(
    pipe: Any,
    rows: list[PromptRow],
    output: str | Path,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 1,
    resolution: int | None = None,
    progress: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
    weights: str | Path | None = None,
    overwrite: bool = False,
    wait_for_everyone: Callable[[], None] | None = None,
    prompts: str | Path | None = None,
) -> list[Path]:
    """Make the missing images of this process's share of ``rows``; returns the files written.

    Sampling is the family's own (``kscu.sampling``: SD's pinned DDIM with CFG, FLUX's
    flow-matching Euler with its guidance embedding); ``steps`` and ``guidance`` default to the
    family's protocol (SD 50 / 7.5, SDXL 50 / 5.0, FLUX.1-dev 28 / 3.5).
    ``weights`` (the ``kscu erase`` folder loaded into ``pipe``) is fingerprinted into
    ``generate.json``. ``prompts`` is where ``rows`` were read from (``load_prompts``' CSV or
    Hub dataset id; None: given directly), recorded so the images can be traced to their file.
    A folder made with other settings is refused unless ``overwrite``, which deletes its images
    first. Several processes pass their accelerate ``wait_for_everyone``.
    """
    output = Path(output)
    family = family_of(pipe)
    steps = family.eval_steps if steps is None else steps
    guidance = family.eval_guidance if guidance is None else guidance
    check_inputs(rows, seed, guidance, resolution)  # before the folder, its record or any image
    if process_index == 0:
        note_long_prompts(family, pipe, rows)
    size = native_resolution(pipe) if resolution is None else resolution
    record = generation_record(pipe, steps, guidance, size, seed, weights, rows, prompts)
    output.mkdir(parents=True, exist_ok=True)  # once the record (the sampler's steps) is sound
    check_resume(output, record, overwrite)  # every process, before any image
    if process_index == 0:
        start_folder(output, record, overwrite)
    if wait_for_everyone is not None:
        wait_for_everyone()  # no process lists the missing images before old ones are cleared
    mine = rows[process_index::num_processes]
    todo = [r for r in mine if not (output / image_name(r)).exists()]
    written: list[Path] = []
    bar = tqdm(total=len(todo), desc=f"generate[{process_index}]", disable=not progress)
    records = TracedDenoiser(family.denoiser(pipe))  # each batch shape recorded once (exact)
    for batch in _batches(todo, batch_size, guidance):
        images = to_pil(
            sample_images(
                pipe,
                [r.prompt for r in batch],
                [row_seed(r, seed) for r in batch],
                steps,
                _g(batch[0], guidance),
                size,
                batch_size=len(batch),
                replay=records,
            )
        )
        for row, image in zip(batch, images, strict=True):
            path = output / image_name(row)
            with atomic_target(path) as tmp:
                image.save(tmp, format="PNG")
            written.append(path)
        bar.update(len(batch))
    bar.close()
    return written


def check_inputs(rows: list[PromptRow], seed: int, guidance: float, resolution: int | None) -> None:
    """Refuse settings that would make wrong images rather than an error: a non-finite guidance
    samples all-black PNGs, and a size that is not a positive multiple of 8 is either ignored
    (0) or does not fit the latent grid. Same rule and wording as ``kscu erase``. A seed torch
    cannot take would fail only at its row's batch, after earlier images were written."""
    if resolution is not None and (resolution <= 0 or resolution % 8 != 0):
        raise KscuError(f"--resolution must be a positive multiple of 8 (got {resolution})")
    if not non_negative(guidance):  # as every command's guidance
        raise KscuError(f"--guidance must be a finite number >= 0 (got {guidance})")
    for row in rows:
        check_seed(row_seed(row, seed), f"case {row.case_number}")
        if row.guidance is not None and not non_negative(row.guidance):
            raise KscuError(
                f"case {row.case_number} has evaluation_guidance {row.guidance}; "
                "give a finite number >= 0 or leave it empty for --guidance"
            )


def note_long_prompts(family: Any, pipe: Any, rows: list[PromptRow]) -> None:
    """Say on stderr when prompts are longer than the text encoder reads (many of I2P's are):
    their images are of the prompt's first tokens only, as in every pipeline that cuts them."""
    cut, limit = family.long_prompts(pipe, [r.prompt for r in rows])
    if cut:
        print(
            f"note: {len(cut)} of {len(rows)} prompts are longer than the {limit} tokens the "
            f"text encoder reads; their images follow the first {limit} (as in diffusers), "
            f"e.g. case {rows[cut[0]].case_number}",
            file=sys.stderr,
        )


def prompts_sha256(rows: list[PromptRow], seed: int, guidance: float) -> str:
    """Fingerprint of what each image is made from: every row's case number (its file name),
    prompt, and seed and guidance as resolved. Resuming compares it, so an existing or pending
    image cannot be relabelled with another row. Sorted by case number: the order of the rows
    decides which process makes an image, not its pixels."""
    table = sorted(
        [r.case_number, r.prompt, row_seed(r, seed), float(_g(r, guidance))] for r in rows
    )
    return hashlib.sha256(json.dumps(table).encode()).hexdigest()


def write_manifest(rows: list[PromptRow], output: str | Path, seed: int, guidance: float) -> Path:
    """List every row whose image exists: the merge step after all processes finish."""
    output = Path(output)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case_number", "prompt", "seed", "guidance", "file"])
    for r in rows:
        if (output / image_name(r)).exists():
            w.writerow([r.case_number, r.prompt, row_seed(r, seed), _g(r, guidance), image_name(r)])
    write_text(output / MANIFEST, buf.getvalue())
    return output / MANIFEST


def generation_record(
    pipe: Any,
    steps: int,
    guidance: float,
    resolution: int,
    seed: int,
    weights: str | Path | None = None,
    rows: list[PromptRow] | None = None,
    prompts: str | Path | None = None,
) -> dict[str, Any]:
    """What decides a folder's pixels: the model, weights, the family's sampler as used and,
    given ``rows``, the fingerprint of every row (``prompts_sha256``); and, recorded but not
    compared, where the weights and rows came from (``weights_resolved``, ``prompts``)."""
    family = family_of(pipe)
    sampler = family.sampler(pipe, steps, resolution, guidance=guidance)
    record = {
        "model": model_id(getattr(pipe, "name_or_path", None)),
        "weights": None if weights is None else str(weights),  # as given
        "weights_resolved": None if weights is None else _absolute(weights),
        "weights_sha256": None if weights is None else weights_sha256(weights),
        "steps": steps,
        "guidance": guidance,
        "resolution": resolution,
        "seed": seed,
        "dtype": str(family.denoiser(pipe).dtype).removeprefix("torch."),
        "family": family.name,
        "sampler": sampler.record(),
        "scheduler": sampler.scheduler_record(),
        "kscu_version": kscu.__version__,
    }
    if rows is not None:
        record["prompts_sha256"] = prompts_sha256(rows, seed, guidance)
    return record | prompt_source(prompts)


def prompt_source(prompts: str | Path | None) -> dict[str, str | None]:
    """Where the rows came from, as ``load_prompts`` decides it: a CSV by its absolute path and
    the sha256 of its bytes (a relative path means nothing once the user is elsewhere, and a
    file edited later must not pass for the one used), else the Hub dataset id. None: the rows
    were given directly (one ``--prompt``, or built in code); the manifest lists them."""
    if prompts is None:
        return {"prompts": None, "prompts_file_sha256": None}
    path = Path(prompts).expanduser()
    if path.is_file():
        return {"prompts": _absolute(path), "prompts_file_sha256": file_sha256(path)}
    return {"prompts": str(prompts), "prompts_file_sha256": None}


def _absolute(path: str | Path) -> str:
    """``path`` as an absolute path, so the record means the same from any working folder."""
    return str(Path(path).expanduser().resolve())


def model_id(name: str | None) -> str | None:
    """The hub id, or the absolute folder (a relative path must not look like another model);
    the bundled world by its recorded name wherever it was loaded from. Also how ``report``
    compares the model an erase recorded with the one its images were made on."""
    if not name:
        return None
    if is_bundled_model(name):
        from kscu.runner import BUNDLED_MODEL

        return BUNDLED_MODEL
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


def check_resume(output: str | Path, record: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse to add images to a folder made another way: the manifest would mislabel the old ones.

    Reads only ``record`` and the folder, so every process of a launch reaches the same answer.
    """
    output = Path(output)
    if output.is_dir() and _holds_weights(output):  # --overwrite too: its images would mix in
        raise KscuError(
            f"--output {output} holds a model or an erase run (weights, model_index.json or "
            "kscu.json); give a folder of its own, e.g. RUN/images for a run's images"
        )
    made_here = (output / SETTINGS).is_file() or (output / MANIFEST).is_file()
    if output.is_dir() and not made_here and any(_is_generated(p) for p in output.iterdir()):
        # numbered images no kscu recorded: --overwrite would delete them, a resume mix in
        raise KscuError(
            f"--output {output} holds numbered images that neither a {SETTINGS} nor a "
            f"{MANIFEST} records (not kscu's, or an interrupted run of a kscu before "
            f"{SETTINGS}); kscu never deletes them: give another --output, or delete them"
        )
    if overwrite:
        return
    if (output / SETTINGS).is_file():
        diffs = _differences(
            read_json_object(output / SETTINGS, "pass --overwrite to start again"),
            json.loads(_dumps(record)),
        )
        if diffs:
            raise KscuError(
                f"{output} holds images made with other settings (folder vs now: "
                f"{', '.join(diffs)}); rerun with the folder's settings to resume, pass "
                "--overwrite to start again, or give another --output"
            )
    elif output.is_dir() and any(_is_generated(p) for p in output.iterdir()):
        raise KscuError(
            f"{output} holds images but no {SETTINGS} (made by an older kscu), so how they were "
            "made is unknown; pass --overwrite to start again, or give another --output"
        )


def start_folder(output: str | Path, record: dict[str, Any], overwrite: bool = False) -> None:
    """Main process: clear an earlier run (``overwrite``), then record the settings.

    The record is written before the first image, so an interrupted run is checked on resume.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in output.iterdir():
            if path.name == SETTINGS or _is_generated(path):
                path.unlink()
    if not (output / SETTINGS).exists():  # a resumed folder keeps the record it started with
        write_text(output / SETTINGS, _dumps(record))


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2, default=str) + "\n"


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``steps 50 vs 20`` for every compared setting that differs (nested dicts by key)."""
    out = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key), new.get(key)
        if (not prefix and key in _NOT_COMPARED) or a == b:
            continue
        if not prefix and key in _ADDED_LATER and key not in old:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        else:
            why = f" ({_EXPLAINED[key]})" if not prefix and key in _EXPLAINED else ""
            out.append(f"{prefix}{key} {_show(key, a)} vs {_show(key, b)}{why}")
    return out


def _show(key: str, value: Any) -> str:
    if value is None:
        return "none"
    return value[:12] if key.endswith("sha256") and isinstance(value, str) else str(value)


def _holds_weights(folder: Path) -> bool:
    """A model folder, one of its parts (``unet/``) or an erase run: not an image folder."""
    named = ("model_index.json", "kscu.json")
    return any(p.suffix == ".safetensors" or p.name in named for p in folder.iterdir())


def _is_generated(path: Path) -> bool:
    """A file ``kscu generate`` writes: ``{case_number}.png`` or the manifest."""
    if path.name == MANIFEST:
        return True
    return path.suffix == ".png" and whole_number(path.stem) is not None and path.is_file()
