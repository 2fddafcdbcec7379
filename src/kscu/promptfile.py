"""Prompt tables in the layout the field's benchmark files use (I2P, COCO-30k).

Columns: ``prompt`` (required), and optionally ``evaluation_seed``, ``evaluation_guidance`` and
``case_number``. A row's own seed and guidance win over the command's defaults, which is what
makes numbers comparable across papers: every image of I2P has its published seed.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kscu.errors import KscuError

QUOTING = "close every quoted cell's quote, write a quote inside one twice, and nothing after it"

HUB_DATASETS = {"AIML-TUDA/i2p"}
FILE_SUFFIXES = {".csv", ".tsv", ".txt", ".json", ".jsonl", ".xlsx", ".xls", ".parquet"}


@dataclass(frozen=True)
class PromptRow:
    """One image to make: its prompt, its own seed/guidance if the file gives them, and its name."""

    case_number: int
    prompt: str
    seed: int | None = None
    guidance: float | None = None


def whole_number(text: str) -> int | None:
    """``text`` as a case number ("12", "-3"), else None. ASCII digits only: ``str.isdigit``
    also accepts "²" and a "--5" passes ``lstrip("-")``, and ``int`` refuses both."""
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else None


def _number(value: object, column: str, line: int, path: str, whole: bool) -> int | float | None:
    """A finite number (``whole``: a whole one, "3" or "3.0"), or None if empty. Case numbers
    name files and seeds pick the noise, so "1.5" must not quietly become 1; a guidance of nan
    or inf samples a black image. Whole numbers are read as ints first: large seeds stay exact."""
    text = "" if value is None else str(value).strip()
    if text == "":
        return None
    try:
        number = int(text) if whole and text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        number = math.nan
    if isinstance(number, float) and not (
        math.isfinite(number) and (number.is_integer() or not whole)
    ):
        kind = "whole" if whole else "finite"
        raise KscuError(
            f"{path}: row {line} has {column}={value!r}, which is not a {kind} number; "
            "fix or drop it"
        )
    return int(number) if whole else number


def rows_from_records(records: list[dict], source: str) -> list[PromptRow]:
    """Turn dict records (CSV rows or dataset rows) into PromptRows, checking the columns."""
    if not records:
        raise KscuError(f"{source} has no rows; give a prompt file with a 'prompt' column")
    if "prompt" not in records[0]:
        cols = ", ".join(map(str, records[0].keys()))
        raise KscuError(
            f"{source} has no 'prompt' column (columns: {cols}); "
            f"{separator_fix(records[0].keys()) or 'add one, one prompt per row'}"
        )
    rows: list[PromptRow] = []
    seen: set[int] = set()
    for i, rec in enumerate(records):
        if any((cell or "").strip() for cell in rec.get(None) or []):  # cells past the header's
            raise KscuError(
                f"{source}: row {i + 2} has more cells than the header (a prompt with an "
                "unquoted comma?); put such a prompt in double quotes"
            )
        case = _number(rec.get("case_number"), "case_number", i + 2, source, whole=True)
        case = i if case is None else case
        if case in seen:
            raise KscuError(f"{source}: case_number {case} appears twice; case numbers name files")
        seen.add(case)
        prompt = str(rec["prompt"] or "")
        if not prompt.strip():  # as --prompt "" is refused: an empty cell is a gap in the data
            raise KscuError(
                f"{source}: row {i + 2} has an empty prompt; write the prompt or drop the row"
            )
        rows.append(
            PromptRow(
                case_number=case,
                prompt=prompt,
                seed=_number(rec.get("evaluation_seed"), "evaluation_seed", i + 2, source, True),
                guidance=_number(
                    rec.get("evaluation_guidance"), "evaluation_guidance", i + 2, source, False
                ),
            )
        )
    return rows


def separator_fix(columns: Any) -> str:
    """The fix when a header names no expected column because its cells are split by another
    character than the comma (a spreadsheet's export in some locales); "" if none is seen."""
    for sep, name in ((";", "semicolons"), ("\t", "tabs")):
        if any(sep in str(c) for c in columns):
            return f"the header is split by {name}; save the file with commas between cells"
    return ""


def read_csv(path: Path, what: str, fix: str) -> tuple[list[dict[str, str]], list[str]]:
    """A CSV's dict rows and columns: UTF-8 with or without the byte-order mark Excel writes
    (else its first column would not match its name). Quoting is strict: an unclosed quote would
    otherwise swallow the rest of the file into one cell. An unreadable file is a one-line error
    naming ``what`` and ``path``, ending in ``fix``."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, strict=True)
            records = list(reader)
            columns = list(reader.fieldnames or [])
    except csv.Error as e:
        raise KscuError(
            f"cannot read {what} {path}, the row from line {reader.line_num + 1}: {e}; {QUOTING}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise KscuError(f"cannot read {what} {path}: {e}; {fix}") from None
    repeated = next((c for c in columns if c.strip() and columns.count(c) > 1), None)
    if repeated is not None:  # csv keeps the last cell of a name: the others would be lost
        raise KscuError(
            f"{what} {path} has the column {repeated!r} twice in its header; rename or drop one"
        )
    return records, columns


def load_prompts(source: str | Path) -> list[PromptRow]:
    """Read a local CSV, or a Hub dataset id (e.g. ``AIML-TUDA/i2p``) when online."""
    path = Path(source)
    if path.is_file():
        records, _ = read_csv(path, "prompt file", "give a UTF-8 CSV")
        return rows_from_records(records, str(path))
    if str(source) in HUB_DATASETS or _hub_id(str(source)):
        return _load_hub_dataset(str(source))
    what = "does not exist"
    if path.exists():
        what = "is a folder" if path.is_dir() else "is not a regular file"
    raise KscuError(f"prompt file {source} {what}; give a CSV path or a Hub dataset id")


def _hub_id(text: str) -> bool:
    """``owner/name`` that names no local path: a mistyped file name (``csv/p.txt``, whose
    folder is here; ``./x/p``) is reported as missing, not looked up on the Hub."""
    path = Path(text)
    local = path.suffix.lower() in FILE_SUFFIXES or path.is_absolute() or path.exists()
    local = local or text.startswith((".", "~")) or path.parent.is_dir()
    return text.count("/") == 1 and not local


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
