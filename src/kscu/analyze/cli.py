"""The ``kscu analyze`` subcommand: writes ``DIR/analyze.json`` and ``DIR/analyze.png``.

An earlier analysis in DIR (either file) is refused before any model loads, or with
``--overwrite`` replaced file by file, each only once the new one is complete; the folder's other
files are never touched (an analysis may sit beside an erase's run), and neither is a file of
either name that analyze did not write, ``--overwrite`` or not.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from kscu.errors import KscuError
from kscu.fileio import check_replaceable, check_writable, read_json_object, write_json

JSON_NAME, PNG_NAME = "analyze.json", "analyze.png"
# Top-level keys of every analyze.json; an erase's kscu.json keeps its analysis one level down
# (under start_step_analysis), an evaluation result has none of them.
JSON_KEYS = ("curve", "recommended_start_step", "per_concept")
FIX = "move it away or give a new --output folder"
UNMARKED = " (it carries no kscu marker; plots from earlier kscu versions have none either)"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``analyze`` to an argparse subparsers object (defaults: ``AnalyzeSettings``)."""
    from kscu.analyze.settings import AnalyzeSettings
    from kscu.config import MODE_DEFAULTS
    from kscu.protocol import DEFAULT_CLIP

    d = AnalyzeSettings()

    p = subparsers.add_parser(
        "analyze",
        help="measure at which denoising steps a concept is decided; recommend a start step",
    )
    p.add_argument("--concept", required=True, help='concept(s): "church" or "A,B,C"')
    p.add_argument("--model", default=None, help="hub id or folder (default: bundled tiny world)")
    p.add_argument(
        "--mode",
        default="class",
        help=", ".join(MODE_DEFAULTS) + " (default class): the task whose default "
        "start is marked, and CLIP's prompt template",
    )
    p.add_argument("--output", required=True, type=Path, help="folder for analyze.json/.png")
    # Flags named after AnalyzeSettings fields: their types and defaults are the fields'.
    for name, text in (
        ("samples", "seeded noises per step"),
        ("seed", "noise of sample i: seed + i"),
        ("neutral", "prompt switched to/from"),
        ("guidance", "CFG scale (FLUX: guidance embedding); None: the family's"),
        ("stride", "measure every n-th switch step and interpolate"),
        ("threshold", "rule: S = last step with commitment <= this"),
        ("num_steps", "sampling steps; None: the family's (SD 50, FLUX 28)"),
        ("batch_size", "UNet rows per call"),
        ("resolution", "image size in pixels; None: the model's own"),
    ):
        default = getattr(d, name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=float if name == "guidance" else int if default is None else type(default),
            default=default,
            help=f"{text} (default {default!r})",
        )
    p.add_argument(
        "--scorer",
        default="auto",
        help="auto (world classifier for the tiny world, else CLIP), world, clip",
    )
    p.add_argument(
        "--clip-model",
        default=None,
        help=f"CLIP hub id or folder (default $KSCU_CLIP_MODEL or {DEFAULT_CLIP})",
    )
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--no-cache", action="store_true", help="measure again, ignore the cache")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the analysis kscu analyze wrote in --output (other files there stay, "
        "and so do files of its names that it did not write)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse, before any model loads, to replace a file of analyze's names unless
    ``overwrite``, and even then unless analyze wrote it (the JSON's keys, the PNG's marker):
    a user's own analyze.json or plot in ``output`` is never replaced."""
    from kscu.analyze.plot import is_plot

    check_writable(output)
    files = (
        (JSON_NAME, "commitment analysis", is_analysis, ""),
        (PNG_NAME, "commitment plot", is_plot, UNMARKED),
    )
    # a file analyze did not write is named first, whichever it is: asking for --overwrite over
    # an earlier analyze.json would only lead to the refusal of a foreign analyze.png beside it
    for allowed in (True, overwrite):
        for name, what, ours, unrecognised in files:
            path = output / name
            check_replaceable(
                path, str(path), what, ours, allowed, fix=FIX, unrecognised=unrecognised
            )


def is_analysis(path: Path) -> bool:
    """Whether ``path`` is an ``analyze.json`` that analyze wrote (a JSON object with its keys)."""
    try:
        data = read_json_object(path, "")
    except KscuError:
        return False
    return all(key in data for key in JSON_KEYS)


def cmd_analyze(args: argparse.Namespace) -> int:
    from kscu.analyze.analysis import analyze, check_cache_dir, check_steps
    from kscu.analyze.plot import plot_curve
    from kscu.analyze.scorers import make_scorer
    from kscu.config import MODE_DEFAULTS, parse_concepts
    from kscu.models import load_pipeline, model_family, resolve_device

    concepts = parse_concepts(args.concept)
    if args.mode not in MODE_DEFAULTS:
        raise KscuError(f"unknown mode {args.mode!r}; choose one of {', '.join(MODE_DEFAULTS)}")
    settings = settings_from_args(args)
    settings.validate()
    check_output(args.output, args.overwrite)  # before any model loads
    # a missing or foreign model folder fails before the scorer loads; its family's steps are
    # the ones --stride must fit when --num-steps is not given
    family = model_family(args.model)
    settings = settings.for_family(family)
    settings.validate()
    check_steps(args.model, family, settings)  # more steps than the scheduler has
    if not args.no_cache:
        # written only after the measurement: refused before it
        check_cache_dir(fix="set KSCU_CACHE to a writable folder, or pass --no-cache")
    device = resolve_device(args.device)
    scorer = make_scorer(args.scorer, args.model, args.mode, args.neutral, args.clip_model, device)
    for c in concepts:
        scorer.check(c)  # a concept the scorer cannot judge fails before the model loads
    pipe = load_pipeline(args.model, args.dtype, device)
    result = analyze(
        pipe,
        args.model,
        concepts,
        args.mode,
        settings,
        scorer,
        use_cache=not args.no_cache,
        progress=not args.quiet,
    )
    plot_curve(  # the picture first, the JSON (what scripts read) last
        args.output / PNG_NAME,
        result["curve"],
        result["recommended_start_step"],
        result["task_defaults"],
        settings.threshold,
        f"commitment of {', '.join(concepts)} ({result['scorer']['name']}, "
        f"{settings.samples} samples)",
        *_single_extras(result),
    )
    write_json(args.output / JSON_NAME, result)
    # a curve the scorer could not read gives the mode's default, not a measurement: say so
    start, n, names = result["recommended_start_step"], len(result["curve"]), ", ".join(concepts)
    took = f"{result['seconds']:.1f} s) -> {args.output / JSON_NAME}"
    if result["reliable"]:
        default = result["mode_default_start_step"]
        print(
            f"recommended start step {start} of {n} for {names} ({args.mode} default {default}; "
            f"{took}"
        )
    else:
        print(
            f"no start step measured for {names} (the curve is not informative): the "
            f"{args.mode} default {start} of {n} is kept ({took}"
        )
    return 0


def settings_from_args(args: argparse.Namespace):
    """The ``AnalyzeSettings`` the flags give (every field that has a flag of its name)."""
    from kscu.analyze.settings import AnalyzeSettings

    names = [f.name for f in dataclasses.fields(AnalyzeSettings) if hasattr(args, f.name)]
    return AnalyzeSettings(**{name: getattr(args, name) for name in names})


def _single_extras(result: dict) -> tuple:
    """The forward and 1 - reverse curves, drawn only when there is a single concept."""
    if len(result["per_concept"]) != 1:
        return None, None
    only = next(iter(result["per_concept"].values()))
    return only["forward"], only["reverse_complement"]
