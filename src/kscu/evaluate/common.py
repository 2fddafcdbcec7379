"""Shared plumbing for the evaluators: image folders, result files, splitting work over processes.

Every evaluator reads a folder of images named ``{case_number}.png`` (what ``kscu generate``
writes), computes per-image results on its share of the images (``accelerate launch`` splits the
images round-robin over processes), gathers them on the main process and writes one JSON file
that records the numbers *and* the protocol (versions, model ids, thresholds), so a number can
always be traced to how it was made.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kscu.distributed import Workers  # noqa: F401  (re-exported for the evaluators)
from kscu.errors import KscuError
from kscu.fileio import (  # check_replaceable: also imported from here by report and fid
    check_replaceable,
    check_writable,
    read_json_object,
    write_text,
)
from kscu.promptfile import read_csv, separator_fix, whole_number

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _sort_key(path: Path) -> tuple[int, int, str]:
    """Numeric stems (case numbers) first, in numeric order; then the rest by name."""
    case = case_number(path)
    return (1, 0, path.name) if case is None else (0, case, path.name)


def list_images(
    folder: str | Path,
    what: str = "--images",
    fix: str = "generate them first with kscu generate",
    cases: bool = True,
) -> list[Path]:
    """All image files directly in ``folder``, in case-number order; a clear error if none.

    ``what`` names where the folder came from (a flag, or a run folder's ``images/`` for
    ``kscu report``, which has no such flag) and ``fix`` what to do about an empty one.
    ``cases``: the files stand for prompt rows by their case numbers, so two of one case
    (``0.png`` and ``0.jpg``) are refused, not both scored; FID's sets are plain image sets.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise KscuError(f"{what} {folder} is not a folder; give the folder the images are in")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise KscuError(f"{what} {folder} has no images ({kinds}); {fix}")
    files = sorted(files, key=_sort_key)
    for a, b in itertools.pairwise(files if cases else []):  # adjacent once sorted by case
        case = case_number(a)
        if case is not None and case == case_number(b):
            raise KscuError(
                f"{what} {folder} holds {a.name} and {b.name}, two images of case {case}; "
                "keep one of them"
            )
    return files


# what Pillow raises for a file it cannot decode, or one too large to decode safely
UNREADABLE_IMAGE = (OSError, ValueError, Image.DecompressionBombError)
SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale as Pillow opens it


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, turning a decode failure into a one-line error naming the file.

    16-bit grayscale is scaled to 8 bits first: Pillow's own conversion clips it, so nearly
    every pixel of such a PNG would be scored as white.
    """
    try:
        with Image.open(path) as im:
            if im.mode in SIXTEEN_BIT:
                values = np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8
                return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
            return im.convert("RGB")
    except UNREADABLE_IMAGE as e:
        raise KscuError(f"cannot read image {path}: {e}; delete or regenerate it") from None


def case_number(path: Path) -> int | None:
    """The case number an image file stands for (``12.png`` -> 12), or None."""
    stem = path.stem
    return whole_number(stem)


def read_csv_records(path: str | Path, needed: list[str]) -> list[dict[str, str]]:
    """Read a CSV as dict rows, failing clearly when a needed column is missing."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise KscuError(f"prompt file {path} {what}; give a CSV path")
    records, columns = read_csv(path, "prompt file", "give a UTF-8 CSV")
    missing = [c for c in needed if c not in columns]
    if missing:
        raise KscuError(
            f"{path} has no {', '.join(repr(c) for c in missing)} column "
            f"(columns: {', '.join(columns) or 'none'}); {separator_fix(columns) or 'add it'}"
        )
    if not records:
        raise KscuError(f"{path} has no rows; give one row per image")
    for row, record in enumerate(records, start=2):  # csv gives None for a cell a row lacks
        short = [c for c in needed if record[c] is None]
        if short:
            raise KscuError(
                f"{path}: row {row} has no {short[0]!r} cell (fewer cells than the header); "
                "fill it in"
            )
    return records


def match_rows(images: list[Path], by_case: dict[int, Any], source: str) -> list[tuple[Path, Any]]:
    """Pair each image with its CSV row through the case number in its file name."""
    pairs = []
    for img in images:
        case = case_number(img)
        if case is None or case not in by_case:
            raise KscuError(
                f"image {img.name} has no row in {source} (images are named "
                "{case_number}.png); give the prompt file the images were generated from"
            )
        pairs.append((img, by_case[case]))
    return pairs


def model_identity(model_id: str) -> dict[str, Any]:
    """What tells one model's weights from another's, for the per-image caches.

    A folder: its files' names, sizes and modification times (retraining into the same folder
    changes them); a Hub id: the id (a new revision under the same id is not noticed: pass
    ``--no-cache`` after updating a Hub model).
    """
    folder = Path(model_id)
    if not folder.is_dir():
        return {"hub_id": model_id}
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        "files": [
            [p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files
        ]
    }


def cache_counts(computed: int, images: int) -> dict[str, int]:
    """How many images went through the model in this run, and how many came from the cache."""
    return {"computed_images": computed, "cached_images": images - computed}


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of the packages that shaped a number (recorded in every result)."""
    out = {"python": platform.python_version()}
    for name in ("kscu", "torch", *packages):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_atomic(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see half a file."""
    write_text(path, text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_result(result: dict, output: str | Path, markdown: str | None = None) -> None:
    """Write the result JSON (and its markdown table next to it, ``FILE.md``) atomically."""
    output = Path(output)
    write_atomic(output, json.dumps(_jsonable(result), indent=2) + "\n")
    if markdown is not None:
        write_atomic(output.with_suffix(".md"), markdown)


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch size below 1 before any work: it would fail deep in a loop or a
    DataLoader with a traceback, or (everything cached) slip through unnoticed."""
    if batch_size < 1:
        raise KscuError(f"--batch-size must be a positive integer (got {batch_size}); e.g. 16")


def is_result(path: Path, metric: str) -> bool:
    """Whether ``path`` is a result ``kscu evaluate {metric}`` wrote: what every evaluator puts
    in its JSON (``metric``, ``images_dir``, ``versions``), which kscu.json and generate.json
    do not hold."""
    try:
        data = read_json_object(path, "")
    except KscuError:
        return False
    return data.get("metric") == metric and "images_dir" in data and "versions" in data


def holds_text(path: Path, marker: str, start: bool = False) -> bool:
    """Whether the text file ``path`` contains ``marker`` (``start``: begins with it), the text
    kscu writes into such a file: how an earlier table or report is told from anyone's notes."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith(marker) if start else marker in text


def check_output(
    output: str | Path, metric: str, overwrite: bool = False, table_marker: str | None = None
) -> Path:
    """Fail before any work if the result cannot be written (the wrong suffix, a folder) or
    would replace a file: an earlier ``metric`` result only with ``overwrite``, anything else
    never. ``table_marker``: the evaluator also writes ``FILE.md``, recognised by that text."""
    output = Path(output)
    if output.suffix.lower() != ".json":
        raise KscuError(f"--output {output} must end in .json; e.g. RUN/eval/{metric}.json")
    check_writable(output, folder=False)  # a folder in the way, or nowhere to write
    ours = functools.partial(is_result, metric=metric)
    check_replaceable(output, f"--output {output}", f"{metric} result", ours, overwrite)
    if table_marker is not None:
        table = output.with_suffix(".md")
        if table.is_dir():
            raise KscuError(
                f"--output {output} writes its table to {table}, which is a folder; "
                "give another --output"
            )
        ours = functools.partial(holds_text, marker=table_marker)
        name = f"{table} (the table written beside --output)"
        check_replaceable(table, name, f"{metric} table", ours, overwrite)
    return output


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table (numbers formatted compactly)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
