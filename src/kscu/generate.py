"""Image generation for evaluation: prompt tables in, one PNG per row out.

Built for benchmark-size runs (I2P's 4,703 prompts, COCO-30k): every row has a fixed seed (its
own ``evaluation_seed`` or ``seed + case_number``), so an image does not depend on batching or on
how many processes share the work; files that exist are skipped, so an interrupted run resumes;
under ``accelerate launch`` each process takes every n-th row, so no image is made twice.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from kscu.fileio import atomic_target, write_text
from kscu.models import native_resolution
from kscu.promptfile import PromptRow

MANIFEST = "manifest.csv"


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
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 1,
    resolution: int | None = None,
    progress: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
) -> list[Path]:
    """Make the missing images of this process's share of ``rows``; returns the files written."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the field's protocol
    size = resolution or native_resolution(pipe)
    mine = rows[process_index::num_processes]
    todo = [r for r in mine if not (output / image_name(r)).exists()]
    written: list[Path] = []
    bar = tqdm(total=len(todo), desc=f"generate[{process_index}]", disable=not progress)
    for batch in _batches(todo, batch_size, guidance):
        generators = [torch.Generator("cpu").manual_seed(row_seed(r, seed)) for r in batch]
        images = pipe(
            prompt=[r.prompt for r in batch],
            num_inference_steps=steps,
            guidance_scale=_g(batch[0], guidance),
            generator=generators,
            height=size,
            width=size,
        ).images
        for row, image in zip(batch, images, strict=True):
            path = output / image_name(row)
            with atomic_target(path) as tmp:
                image.save(tmp, format="PNG")
            written.append(path)
        bar.update(len(batch))
    bar.close()
    return written


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
