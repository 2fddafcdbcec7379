"""The ``kscu analyze`` subcommand: writes ``DIR/analyze.json`` and ``DIR/analyze.png``."""

from __future__ import annotations

import argparse
from pathlib import Path

from kscu.errors import KscuError

JSON_NAME, PNG_NAME = "analyze.json", "analyze.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``analyze`` to an argparse subparsers object."""
    from kscu.config import MODE_DEFAULTS

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
    p.add_argument("--samples", type=int, default=8, help="seeded noises per step (default 8)")
    p.add_argument("--seed", type=int, default=0, help="noise of sample i: seed + i")
    p.add_argument("--neutral", default="", help='prompt switched to/from (default "")')
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default 7.5)")
    p.add_argument(
        "--stride",
        type=int,
        default=1,
        help="measure every n-th switch step and interpolate (default 1: all 50)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.1,
        help="rule: S = last step with commitment <= this (default 0.1)",
    )
    p.add_argument("--num-steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument(
        "--scorer",
        default="auto",
        help="auto (world classifier for the tiny world, else CLIP), world, clip",
    )
    p.add_argument(
        "--clip-model",
        default=None,
        help="CLIP hub id or folder (default $KSCU_CLIP_MODEL or openai/clip-vit-large-patch14)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="UNet rows per call (default 64)")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's own")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--no-cache", action="store_true", help="measure again, ignore the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from kscu.analyze.analysis import AnalyzeSettings, analyze
    from kscu.analyze.plot import plot_curve
    from kscu.analyze.scorers import make_scorer
    from kscu.config import MODE_DEFAULTS, parse_concepts
    from kscu.fileio import write_json
    from kscu.models import load_pipeline, resolve_device

    concepts = parse_concepts(args.concept)
    if args.mode not in MODE_DEFAULTS:
        raise KscuError(f"unknown mode {args.mode!r}; choose one of {', '.join(MODE_DEFAULTS)}")
    settings = AnalyzeSettings(
        samples=args.samples,
        seed=args.seed,
        neutral=args.neutral,
        guidance=args.guidance,
        stride=args.stride,
        threshold=args.threshold,
        num_steps=args.num_steps,
        resolution=args.resolution,
        batch_size=args.batch_size,
    )
    settings.validate()
    if args.output.exists() and not args.output.is_dir():
        raise KscuError(f"--output {args.output} is a file; give a folder")
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
    write_json(args.output / JSON_NAME, result)
    plot_curve(
        args.output / PNG_NAME,
        result["curve"],
        result["recommended_start_step"],
        result["task_defaults"],
        settings.threshold,
        f"commitment of {', '.join(concepts)} ({result['scorer']['name']}, "
        f"{settings.samples} samples)",
        *_single_extras(result),
    )
    print(
        f"recommended start step {result['recommended_start_step']} of {settings.num_steps} "
        f"for {', '.join(concepts)} ({args.mode} default {result['mode_default_start_step']}; "
        f"{result['seconds']:.1f} s) -> {args.output / JSON_NAME}"
    )
    return 0


def _single_extras(result: dict) -> tuple:
    """The forward and 1 - reverse curves, drawn only when there is a single concept."""
    if len(result["per_concept"]) != 1:
        return None, None
    only = next(iter(result["per_concept"].values()))
    return only["forward"], only["reverse_complement"]
