"""Prompt tables in the layout the field's benchmark files use (I2P, COCO-30k).

Columns: ``prompt`` (required), and optionally ``evaluation_seed``, ``evaluation_guidance`` and
``case_number``. A row's own seed and guidance win over the command's defaults, which is what
makes numbers comparable across papers: every image of I2P has its published seed.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from kscu.errors import KscuError

HUB_DATASETS = {"AIML-TUDA/i2p"}


@dataclass(frozen=True)
class PromptRow:
    """One image to make: its prompt, its own seed/guidance if the file gives them, and its name."""

    case_number: int
    prompt: str
    seed: int | None = None
    guidance: float | None = None


def _whole(value: object, column: str, line: int, path: str) -> int | None:
    """A whole number ("3" or "3.0"), or None if empty: case numbers name files and seeds pick
    the noise, so "1.5" must not quietly become 1 (another image, under another name)."""
    text = "" if value is None else str(value).strip()
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is None or not number.is_integer():
        raise KscuError(
            f"{path}: row {line} has {column}={value!r}, which is not a whole number; "
            "fix or drop it"
        )
    return int(number)


def _finite(value: object, column: str, line: int, path: str) -> float | None:
    """A finite number, or None if empty: a guidance of nan or inf samples a black image."""
    text = "" if value is None else str(value).strip()
    if text == "":
        return None
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        raise KscuError(
            f"{path}: row {line} has {column}={value!r}, which is not a finite number; "
            "fix or drop it"
        )
    return number


def rows_from_records(records: list[dict], source: str) -> list[PromptRow]:
    """Turn dict records (CSV rows or dataset rows) into PromptRows, checking the columns."""
    if not records:
        raise KscuError(f"{source} has no rows; give a prompt file with a 'prompt' column")
    if "prompt" not in records[0]:
        cols = ", ".join(map(str, records[0].keys()))
        raise KscuError(
            f"{source} has no 'prompt' column (columns: {cols}); add one, one prompt per row"
        )
    rows: list[PromptRow] = []
    seen: set[int] = set()
    for i, rec in enumerate(records):
        case = _whole(rec.get("case_number"), "case_number", i + 2, source)
        case = i if case is None else case
        if case in seen:
            raise KscuError(f"{source}: case_number {case} appears twice; case numbers name files")
        seen.add(case)
        rows.append(
            PromptRow(
                case_number=case,
                prompt=str(rec["prompt"] or ""),
                seed=_whole(rec.get("evaluation_seed"), "evaluation_seed", i + 2, source),
                guidance=_finite(
                    rec.get("evaluation_guidance"), "evaluation_guidance", i + 2, source
                ),
            )
        )
    return rows


def load_prompts(source: str | Path) -> list[PromptRow]:
    """Read a local CSV, or a Hub dataset id (e.g. ``AIML-TUDA/i2p``) when online."""
    path = Path(source)
    if path.is_file():
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:  # Excel starts with a BOM
                records = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise KscuError(f"cannot read prompt file {path}: {e}; give a UTF-8 CSV") from None
        return rows_from_records(records, str(path))
    local = path.suffix.lower() == ".csv" or path.is_absolute() or path.exists()
    if str(source) in HUB_DATASETS or ("/" in str(source) and not local):
        return _load_hub_dataset(str(source))
    what = "is a folder" if path.is_dir() else "does not exist"
    raise KscuError(f"prompt file {source} {what}; give a CSV path or a Hub dataset id")


def _load_hub_dataset(repo_id: str) -> list[PromptRow]:
    """Fetch a prompt CSV from a Hub dataset repo (needs network; clear error offline)."""
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        csvs = [f for f in list_repo_files(repo_id, repo_type="dataset") if f.endswith(".csv")]
        if not csvs:
            raise KscuError(f"Hub dataset {repo_id} has no CSV file; download it and pass the CSV")
        local = hf_hub_download(repo_id, csvs[0], repo_type="dataset")
    except KscuError:
        raise
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise KscuError(
            f"cannot fetch Hub dataset {repo_id} ({type(e).__name__}); offline? "
            "download its CSV and pass the local path"
        ) from None
    return load_prompts(local)
