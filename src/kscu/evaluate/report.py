"""One page comparing runs: a table of every metric found, and sample images side by side.

A run directory is laid out as::

    RUN/kscu.json            written by `kscu erase` (absent for the base model)
    RUN/weights.safetensors  written by `kscu erase`
    RUN/images/{case}.png    written by `kscu generate --output RUN/images` (+ manifest.csv
                             and generate.json, the record of how they were made)
    RUN/eval/{metric}.json   written by `kscu evaluate {metric} --output RUN/eval/{metric}.json`

Rows are runs (base models first), columns are every number found in ``RUN/eval/*.json`` (top
level, and one level into dicts such as ``per_class``) plus the training numbers of
``kscu.json``. The sample grid shows the same case numbers for every run, so each column of the
grid is one prompt under each model. Under the table go the settings that make the numbers
comparable: each metric's protocol and how each run's images were generated (steps, guidance,
seeds, ...), a value that differs between runs flagged, whether a run's images came from
its own weights and from the base model its erase started from, and whether the runs share one
base model: runs whose images were made differently, or erases of different models, would
otherwise be rows of numbers that look alike. The HTML embeds small JPEG thumbnails, so the
page is one file that opens anywhere; the markdown links the images by relative path.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import hexdigits
from typing import Any

from kscu.checkpoint import WEIGHTS
from kscu.config import settings_label
from kscu.errors import KscuError
from kscu.evaluate.common import (
    case_number,
    check_replaceable,
    holds_text,
    list_images,
    load_rgb,
    markdown_table,
    write_atomic,
)
from kscu.fileio import check_writable, file_sha256, read_json_object
from kscu.generate import SETTINGS, model_id
from kscu.promptfile import read_csv, whole_number

# Keys of result files that are settings or bookkeeping, not results.
SKIP = {
    "threshold",
    "per_image",
    "versions",
    "per_class_counts",
    "class_index",
    "image_size",
    "reference_size",
    "classes_counted",
    "computed_images",
    "cached_images",
    "dims",
    "reference_stats_info",
    "reference_computed_images",
    "reference_cached_images",
}
# Which way is better, for the column headers.
BETTER = {
    "nudity/flagged": "lower",
    "nudity/total": "lower",
    "fid/fid": "lower",
    "clip/clip_score": "higher",
}
# Settings shown under the table; differing values across runs are flagged.
PROTOCOL = (
    "threshold",
    "nudenet_version",
    "model",
    "protocol",
    "library_version",
    "feature_extractor",
    "inception_weights",
    "resize",
    "definition",
    "reference_provenance",  # fid: statistics whose making is unknown are flagged beside checked
)
# What generate.json says decides the pixels, shown under the table like PROTOCOL. The weights
# are not listed: each run's own are meant to differ, so they are checked, not compared.
GENERATION = (
    "model",
    "family",
    "steps",
    "guidance",
    "resolution",
    "seed",
    "dtype",
    "prompts_sha256",
    "scheduler",
    "sampler",
)
# Written by every kscu generate since generate.json exists: a file without one is not its record
# (scheduler and prompts_sha256 came later; an older record shows them as not recorded).
ALWAYS_RECORDED = (
    "model",
    "weights",
    "weights_sha256",
    "steps",
    "guidance",
    "resolution",
    "seed",
    "dtype",
    "family",
    "sampler",
)


@dataclass
class Run:
    path: Path
    name: str
    info: dict = field(default_factory=dict)  # kscu.json, if any
    metrics: dict[str, float] = field(default_factory=dict)
    settings: dict[str, dict] = field(default_factory=dict)  # metric -> protocol settings
    images: dict[int, Path] = field(default_factory=dict)
    prompts: dict[int, str] = field(default_factory=dict)
    generation: dict | None = None  # images/generate.json; None: the images' making is unknown
    own_weights_sha256: str | None = None  # of RUN/weights.safetensors, if generation names any
    scored: dict[str, str] = field(default_factory=dict)  # metric -> the images_dir it records

    @property
    def is_base(self) -> bool:
        return not self.info

    def describe(self) -> str:
        if self.is_base:
            return "base model"
        cfg = self.info.get("config", {}) if isinstance(self.info.get("config"), dict) else {}
        concepts = cfg.get("concepts", "")
        if isinstance(concepts, list):
            concepts = ", ".join(map(str, concepts))
        bits = [f"erased: {concepts}" if concepts else "erased"]
        if cfg.get("mode"):
            bits.append(f"mode={cfg['mode']}")
        if cfg.get("method"):
            bits.append(settings_label(cfg))
        if self.info.get("base_model"):
            bits.append(f"from {self.info['base_model']}")
        return ", ".join(bits)


def _numbers(prefix: str, data: dict) -> dict[str, float]:
    out = {}
    for key, value in data.items():
        if key in SKIP:
            continue
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[f"{prefix}/{key}"] = value
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"{prefix}/{key}/{sub}"] = v
    return out


def _read_json(path: Path) -> dict:
    return read_json_object(path, "delete it or rerun the evaluation")


def load_run(path: str | Path) -> Run:
    """Collect a run directory's training record, eval results and images."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise KscuError(f"run directory {path} {what}; give a folder made by kscu")
    run = Run(path=path, name=path.resolve().name)
    if (path / "kscu.json").is_file():
        run.info = read_json_object(path / "kscu.json", "restore it from a copy or erase again")
        for key in ("final_loss", "seconds"):
            if isinstance(run.info.get(key), int | float):
                run.metrics[f"train/{key}"] = run.info[key]
    for result_file in sorted((path / "eval").glob("*.json")):
        data = _read_json(result_file)
        metric = str(data.get("metric", result_file.stem))
        run.metrics.update(_numbers(metric, data))
        run.settings[metric] = {k: data[k] for k in PROTOCOL if k in data}
        if isinstance(data.get("images_dir"), str):
            run.scored[metric] = data["images_dir"]
    if (path / "images").is_dir():
        run.images = _run_images(path / "images")
        run.prompts = _manifest_prompts(path / "images" / "manifest.csv")
        run.generation = _generation_record(path / "images" / SETTINGS)
    if run.generation and run.generation["weights_sha256"] and (path / WEIGHTS).is_file():
        run.own_weights_sha256 = _own_weights_sha256(path / WEIGHTS)  # only then: a large file
    if not (run.info or run.metrics or run.images):
        raise KscuError(
            f"{path} has no kscu.json, eval/*.json or images/; give run directories made by "
            "kscu erase / generate / evaluate"
        )
    return run


def _run_images(folder: Path) -> dict[int, Path]:
    """A run's images by case number; an empty folder is named as the run's (report has no
    --images flag to blame)."""
    fix = f"generate them with kscu generate --prompts CSV --output {folder}, or remove the folder"
    images = {}
    for img in list_images(folder, "run images folder", fix):
        case = case_number(img)
        if case is not None:
            images[case] = img
    return images


def _manifest_prompts(manifest: Path) -> dict[int, str]:
    """The prompt of each case number from ``kscu generate``'s manifest, if there is one."""
    if not manifest.is_file():
        return {}
    fix = "regenerate the images with kscu generate, or delete the damaged manifest"
    records, _ = read_csv(manifest, "image manifest", fix)
    cases = [(whole_number(str(rec.get("case_number") or "")), rec) for rec in records]
    return {case: rec.get("prompt") or "" for case, rec in cases if case is not None}


def _generation_record(path: Path) -> dict | None:
    """The record ``kscu generate`` wrote beside the images, or None if there is none (images
    made by another tool or an older kscu): then how they were made is stated as unknown."""
    if not (path.exists() or path.is_symlink()):
        return None
    fix = (
        f"rerun kscu generate --output {path.parent} --overwrite to remake the images and "
        f"their record, or delete {path.name} to report them as made by an unknown tool"
    )
    record = read_json_object(path, fix)
    lacking = [key for key in ALWAYS_RECORDED if key not in record]
    if lacking:
        raise KscuError(
            f"{path} lacks {', '.join(lacking)}, so kscu generate did not write it; {fix}"
        )
    for key in ("model", "weights", "weights_sha256"):  # names report compares as text
        if not isinstance(record[key], str | None):
            raise KscuError(f"{path} has {key} {record[key]!r}, not a string or null; {fix}")
    return record


def _own_weights_sha256(path: Path) -> str:
    """The run's weights' sha256, as generate records those it loaded (``weights_sha256``)."""
    try:
        return file_sha256(path)
    except OSError as e:
        raise KscuError(f"cannot read {path} ({e.strerror}); check the run folder") from None


def _columns(runs: list[Run]) -> list[str]:
    seen: list[str] = []
    for run in runs:
        seen += [k for k in run.metrics if k not in seen]
    # training numbers last; inside a metric, headline numbers before per-class detail
    return sorted(seen, key=lambda k: (k.startswith("train/"), k.split("/")[0], k.count("/"), k))


def _header(col: str) -> str:
    arrow = {"lower": " ↓", "higher": " ↑"}.get(BETTER.get(col, ""), "")
    return col + arrow


def _samples(runs: list[Run], n: int) -> list[int]:
    with_images = [set(r.images) for r in runs if r.images]
    if not with_images:
        return []
    common = set.intersection(*with_images)
    pool = common or set.union(*with_images)
    return sorted(pool)[:n]


def _protocol_lines(runs: list[Run]) -> list[str]:
    """One line per metric: its settings across the runs that have it."""
    lines = []
    for metric in sorted({m for r in runs for m in r.settings}):
        named = [(r.name, r.settings[metric]) for r in runs if metric in r.settings]
        parts = _setting_parts(named, str)
        if parts:
            lines.append(f"{metric}: " + "; ".join(parts))
    return lines


def _setting_parts(named: list[tuple[str, dict]], show: Callable[[Any], str]) -> list[str]:
    """``key: value`` per setting of the (run name, settings) pairs. A value that differs is
    flagged and names its runs, so a reader sees which rows are not comparable; a run without
    the setting is named too (unknown is not the same)."""
    parts = []
    for key in dict.fromkeys(k for _, settings in named for k in settings):
        values = [(name, settings[key]) for name, settings in named if key in settings]
        missing = [name for name, settings in named if key not in settings]
        parts.append(f"{key}: {_values_text(values, missing, show)}")
    return parts


def _values_text(
    named_values: list[tuple[str, Any]], missing: list[str], show: Callable[[Any], str]
) -> str:
    """One setting across runs: its value, or each value with its runs and ``(DIFFERS between
    runs)``; then the runs that do not record it (unknown is not the same)."""
    groups = _by_value(named_values)
    if len(groups) == 1:
        text = show(groups[0][0])
    else:
        values = " / ".join(f"{show(value)} [{', '.join(names)}]" for value, names in groups)
        text = f"{values} (DIFFERS between runs)"
    return text + (f" (not recorded for {', '.join(missing)})" if missing else "")


def _by_value(named_values: list[tuple[str, Any]]) -> list[tuple[Any, list[str]]]:
    """Each distinct value with the runs that have it, in run order. Compared with ``==``, not
    as JSON text: a guidance of 7 and one of 7.0 made the same images."""
    groups: list[tuple[Any, list[str]]] = []
    for name, value in named_values:
        group = next((g for g in groups if g[0] == value), None)
        if group is None:
            groups.append(group := (value, []))
        group[1].append(name)
    return groups


def _generation_lines(runs: list[Run]) -> list[str]:
    """The images' generation settings across runs (flagged where they differ), which weights
    made each run's images, and the runs whose images' making is unknown."""
    recorded = [r for r in runs if r.generation is not None]
    lines = []
    named = [
        (r.name, {k: r.generation[k] for k in GENERATION if k in r.generation}) for r in recorded
    ]
    parts = _setting_parts(named, _shown)
    if parts:
        lines.append("generation: " + "; ".join(parts))
    if recorded:
        verdicts = [f"{r.name}: {_weights_verdict(r, r.generation)}" for r in recorded]
        lines.append("generation weights: " + "; ".join(verdicts))
    erased = [r for r in recorded if not r.is_base]
    if erased:
        verdicts = [f"{r.name}: {_base_model_verdict(r, r.generation)}" for r in erased]
        lines.append("generation base model: " + "; ".join(verdicts))
    # runs with images or results whose making is not recorded (not one with training numbers only)
    unknown = [r.name for r in runs if r.generation is None and (r.images or r.settings)]
    if unknown:
        lines.append(
            f"generation unknown: {', '.join(unknown)} (no images/{SETTINGS}, which kscu "
            "generate writes: how their images were made cannot be compared)"
        )
    return lines


def _weights_verdict(run: Run, record: dict) -> str:
    """Which weights made the run's images (its ``record``), flagged (NOT ...) unless they are
    the row's own: an erased run's weights.safetensors by its sha256, none for a base row."""
    used = record["weights_sha256"]
    if used is None:
        return "the base model" + ("" if run.is_base else f", NOT this run's {WEIGHTS}")
    where = record.get("weights_resolved") or record["weights"]  # absolute since a later kscu
    source = f"weights {where} (sha256 {_shown(used)})"
    if run.is_base:
        return f"edited {source}, NOT the base model"
    if run.own_weights_sha256 is None:
        return f"{source}, NOT CHECKED: this run has no {WEIGHTS}"
    if used != run.own_weights_sha256:
        own = _shown(run.own_weights_sha256)
        return f"{source}, NOT this run's {WEIGHTS} (sha256 {own})"
    return f"its own {WEIGHTS} (sha256 {_shown(used)})"


def _base_model_verdict(run: Run, record: dict) -> str:
    """Whether an erased run's images (its ``record``) were generated on the model its erase
    started from, flagged (NOT ...) where they were not: its weights were edits of another
    model, so its numbers say nothing about that erase. NOT CHECKED where a side names none."""
    made_on, erased_from = model_id(record["model"]), _erased_from(run)
    if made_on is None:
        return f"NOT CHECKED: {SETTINGS} names no model (its erase's: {erased_from or 'none'})"
    if erased_from is None:
        return f"{made_on}, NOT CHECKED: its kscu.json names no base model"
    if made_on == erased_from:
        return f"its erase's own ({made_on})"
    if _maybe_moved(erased_from, made_on):
        return (
            f"{made_on}, NOT CHECKED: its erase's base model {erased_from} is a relative path "
            "not found from here"
        )
    return f"{made_on}, NOT its erase's base model ({erased_from})"


def _erased_from(run: Run) -> str | None:
    """The base model the run's erase recorded, as generate records models (``model_id``:
    an absolute folder, a hub id as written, the bundled world by name); None if it names none
    (an older record, or a pipeline built in code, whose label is no model)."""
    from kscu.runner import UNNAMED_PIPELINE

    name = run.info.get("base_model")
    if not isinstance(name, str) or name in ("", UNNAMED_PIPELINE):
        return None
    return model_id(name)


def _maybe_moved(relative: str, absolute: str) -> bool:
    """True if ``relative`` (a name not found from the report's folder) may be ``absolute``
    written from another working folder: it is not absolute and ends ``absolute``'s path."""
    parts, full = Path(relative).parts, Path(absolute).parts
    return (
        not Path(relative).is_absolute()
        and Path(absolute).is_absolute()
        and ".." not in parts
        and full[len(full) - len(parts) :] == parts
    )


def _base_model_lines(runs: list[Run]) -> list[str]:
    """Each run's base model, flagged where they differ: an erase's as its kscu.json records
    it, a base row's as its images' generate.json does. Erases of different models (SD v1.4
    beside SD v2) are not comparable rows, whatever the numbers say."""
    models = [(run.name, _base_model_of(run)) for run in runs]
    named = [(name, model) for name, model in models if model is not None]
    missing = [name for name, model in models if model is None]
    return [f"base model: {_values_text(named, missing, str)}"] if named else []


def _base_model_of(run: Run) -> str | None:
    """The model a row stands for: an erase's recorded base model, or for a base row the model
    its images were generated on (None where unknown)."""
    if not run.is_base:
        return _erased_from(run)
    return model_id(run.generation["model"]) if run.generation else None


def _shown(value: Any) -> str:
    """A generation setting in a few characters: a sha256 by its first 12 digits (as generate's
    own messages), a nested record (scheduler, sampler) by its class and a fingerprint."""
    if isinstance(value, dict | list):
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
        name = value.get("class") if isinstance(value, dict) else None
        return f"{name} #{digest}" if name else f"#{digest}"
    if isinstance(value, str) and len(value) == 64 and all(c in hexdigits for c in value):
        return value[:12]
    return "none" if value is None else str(value)


def _scored_lines(runs: list[Run]) -> list[str]:
    """Results that record scoring another folder than the run's ``images/`` (a result copied
    from another run, or ``--images`` mistyped), stated as facts: a run folder moved after its
    evaluation shows here too, and only its owner can tell the two apart."""
    lines = []
    for run in runs:
        own = (run.path / "images").resolve()
        for metric, scored in sorted(run.scored.items()):
            if Path(scored) != own:
                lines.append(
                    f"scored elsewhere: {run.name}'s eval/{metric} scored {scored}, not its "
                    f"images/ ({own})"
                )
    return lines


def _notes(runs: list[Run]) -> list[str]:
    """Everything listed under the table: the runs' base models, how the images were made,
    which images each result scored where that is not the run's own, then each metric's
    protocol."""
    return (
        _base_model_lines(runs)
        + _generation_lines(runs)
        + _scored_lines(runs)
        + _protocol_lines(runs)
    )


def _thumb(path: Path, size: int) -> str:
    im = load_rgb(path)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# How each format begins: an earlier report is told from other files by it (see write_report).
HTML_START = "<!doctype html><html><head><meta charset='utf-8'><title>kscu report</title>"
MARKDOWN_START = "# kscu report\n"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:12px 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:14px}
th{background:#f3f3f3} td.name,th.name{text-align:left}
.grid td{text-align:center;vertical-align:top} .grid img{display:block;margin:auto}
.grid .prompt{font-size:12px;max-width:200px;text-align:left;color:#555}
.note{color:#555;font-size:13px} .scroll{overflow-x:auto}
"""


def render_html(runs: list[Run], samples: int = 8, thumb: int = 192) -> str:
    cols = _columns(runs)
    e = html.escape
    out = [
        HTML_START,
        f"<style>{CSS}</style></head><body><h1>kscu report</h1>",
        "<h2>Metrics</h2><div class='scroll'><table id='metrics'><tr><th class='name'>run</th>"
        "<th class='name'>model</th>",
    ]
    out += [f"<th>{e(_header(c))}</th>" for c in cols]
    out.append("</tr>")
    for run in runs:
        out.append(
            f"<tr><td class='name'>{e(run.name)}</td><td class='name'>{e(run.describe())}</td>"
        )
        out += [f"<td>{e(_cell(run.metrics.get(c)))}</td>" for c in cols]
        out.append("</tr>")
    out.append("</table></div>")
    lines = _notes(runs)
    if lines:
        out.append("<p class='note'>Protocol: " + "<br>".join(e(x) for x in lines) + "</p>")
    cases = _samples(runs, samples)
    if cases:
        out.append("<h2>Samples</h2><table class='grid' id='samples'><tr><th>run</th>")
        for case in cases:
            prompt = next((r.prompts[case] for r in runs if case in r.prompts), "")
            out.append(f"<th>#{case}<div class='prompt'>{e(prompt)}</div></th>")
        out.append("</tr>")
        for run in runs:
            out.append(f"<tr><td class='name'>{e(run.name)}</td>")
            for case in cases:
                if case in run.images:
                    src = _thumb(run.images[case], thumb)
                    out.append(
                        f"<td><img src='{src}' alt='{e(run.name)} #{case}' width='{thumb}'></td>"
                    )
                else:
                    out.append("<td>no image</td>")
            out.append("</tr>")
        out.append("</table>")
    out.append("</body></html>\n")
    return "\n".join(out)


def render_markdown(runs: list[Run], output: Path, samples: int = 8) -> str:
    cols = _columns(runs)
    rows = [[run.name, run.describe(), *[_cell(run.metrics.get(c)) for c in cols]] for run in runs]
    text = MARKDOWN_START + "\n## Metrics\n\n"
    text += markdown_table(["run", "model", *[_header(c) for c in cols]], rows)
    lines = _notes(runs)
    if lines:
        text += "\nProtocol:\n\n" + "".join(f"- {x}\n" for x in lines)
    cases = _samples(runs, samples)
    if cases:
        grid = []
        for run in runs:
            cells = []
            for case in cases:
                if case in run.images:
                    rel = os.path.relpath(run.images[case].resolve(), output.resolve().parent)
                    # <...>: a path with spaces or parentheses stays one link target
                    cells.append(f"![{run.name} #{case}](<{Path(rel).as_posix()}>)")
                else:
                    cells.append("no image")
            grid.append([run.name, *cells])
        text += "\n## Samples\n\n" + markdown_table(["run", *[f"#{c}" for c in cases]], grid)
    return text


def _name_apart(runs: list[Run]) -> None:
    """Runs whose folders share a name (x/esd, y/esd) are named by as many of their parent
    folders as tell them apart; two rows both called "esd" could not be told apart."""
    parts = [r.path.resolve().parts for r in runs]
    for depth in range(2, max(len(p) for p in parts) + 1):
        names = [r.name for r in runs]
        twice = {n for n in names if names.count(n) > 1}
        if not twice:
            return
        for run, p in zip(runs, parts, strict=True):
            if run.name in twice:
                run.name = "/".join(p[-depth:])


def write_report(
    run_dirs: list[str | Path], output: str | Path, samples: int = 8, overwrite: bool = False
) -> list[Run]:
    """Build the comparison page; the output's suffix (.html or .md) picks the format.

    An existing ``output`` is replaced only with ``overwrite``, and only if it is an earlier
    kscu report (it begins the way a report begins), so a typo never destroys another file.
    """
    output = Path(output)
    if output.suffix.lower() not in (".html", ".md"):
        raise KscuError(f"--output {output} must end in .html or .md")
    if not run_dirs:
        raise KscuError("no run directories given; pass one or more RUN_DIR")
    if samples < 0:
        raise KscuError(f"--samples must be >= 0 (got {samples})")
    seen: dict[Path, str] = {}
    for d in run_dirs:  # one run twice would be two rows of one model, read as two results
        key = Path(d).expanduser().resolve()
        if key in seen:
            raise KscuError(f"{d} is given twice (as {seen[key]}); give each run once")
        seen[key] = str(d)
    check_writable(output, folder=False)
    start = HTML_START if output.suffix.lower() == ".html" else MARKDOWN_START
    ours = functools.partial(holds_text, marker=start, start=True)
    check_replaceable(output, f"--output {output}", "report", ours, overwrite)
    runs = [load_run(d) for d in run_dirs]
    _name_apart(runs)
    runs.sort(key=lambda r: not r.is_base)  # base models first, else in the order given
    if output.suffix.lower() == ".html":
        write_atomic(output, render_html(runs, samples))
    else:
        write_atomic(output, render_markdown(runs, output, samples))
    return runs
