"""The ``kscu evaluate {nudity,fid,clip,classify}`` and ``kscu report`` subcommands.

``register(subparsers)`` is called by ``kscu.cli``; each handler returns an exit code and raises
``KscuError`` for the user's mistakes (the CLI prints one line and exits 2). Under
``accelerate launch -m kscu evaluate ...`` every process computes its share and only the main
process writes the result.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path

from kscu.evaluate.common import Workers, check_output, write_result


def _finish(result: dict, check: Callable[[], Path], markdown: str | None, headline: str) -> int:
    """Write the result once its output is checked again: a file that appeared there during the
    evaluation (minutes to hours) is refused as it would have been at the start."""
    if Workers().is_main:
        output = check()
        write_result(result, output, markdown)
        print(
            f"{headline}\nwrote {output}"
            + (f" and {output.with_suffix('.md')}" if markdown else "")
        )
    return 0


def run_nudity(args: argparse.Namespace) -> int:
    from kscu.evaluate.nudity import TABLE_MARKER, evaluate_nudity, nudity_markdown

    check = functools.partial(check_output, args.output, "nudity", args.overwrite, TABLE_MARKER)
    check()
    result = evaluate_nudity(args.images, args.threshold, use_cache=not args.no_cache)
    headline = (
        f"nudity: {result['flagged']}/{result['images']} images flagged, "
        f"{result['total']} exposed detections (NudeNet {result['nudenet_version']}, "
        f"score >= {result['threshold']})"
    )
    return _finish(result, check, nudity_markdown(result), headline)


def run_fid(args: argparse.Namespace) -> int:
    from kscu.evaluate.fid import evaluate_fid

    check = functools.partial(check_output, args.output, "fid", args.overwrite)
    check()
    result = evaluate_fid(
        args.images,
        args.reference,
        args.inception_weights,
        args.batch_size,
        args.save_reference_stats,
        use_cache=not args.no_cache,
        dims=args.dims,
        overwrite=args.overwrite,
    )
    headline = f"FID: {result['fid']:.3f} ({result['protocol']} {result['library_version']})"
    return _finish(result, check, None, headline)


def run_clip(args: argparse.Namespace) -> int:
    from kscu.evaluate.clip_score import evaluate_clip

    check = functools.partial(check_output, args.output, "clip", args.overwrite)
    check()
    result = evaluate_clip(
        args.images, args.prompts, args.model, args.batch_size, use_cache=not args.no_cache
    )
    return _finish(result, check, None, f"CLIP score: {result['clip_score']:.3f}")


def run_classify(args: argparse.Namespace) -> int:
    from kscu.evaluate.classify import evaluate_classify

    check = functools.partial(check_output, args.output, "classify", args.overwrite)
    check()
    result = evaluate_classify(
        args.images, args.prompts, args.model, args.batch_size, use_cache=not args.no_cache
    )
    per_class = json.dumps({k: round(v, 3) for k, v in result["per_class"].items()})
    return _finish(result, check, None, f"top-1: {result['top1']:.3f} {per_class}")


def run_report(args: argparse.Namespace) -> int:
    from kscu.evaluate.report import write_report

    runs = write_report(args.runs, args.output, args.samples, args.overwrite)
    print(f"wrote {args.output} ({len(runs)} runs)")
    return 0


def register(subparsers) -> None:
    """Add ``evaluate`` (with nudity, fid, clip, classify) and ``report`` to the kscu CLI."""
    from kscu.protocol import DEFAULT_CLASSIFIER, DEFAULT_CLIP, FID_DIMS, NUDENET_THRESHOLD

    ev = subparsers.add_parser(
        "evaluate",
        help="measure an erasure: nudity, fid, clip, classify",
        description="Score a folder of generated images; writes a JSON (and markdown) result "
        "that records the protocol. Split over processes with accelerate launch -m kscu.",
    )
    which = ev.add_subparsers(dest="metric", metavar="METRIC", required=True)

    def common(p, output_example: str) -> None:
        p.add_argument("--images", required=True, help="folder of images named {case_number}.png")
        p.add_argument("--output", required=True, help=f"result JSON, e.g. {output_example}")
        p.add_argument(
            "--no-cache",
            action="store_true",
            help="compute every image again (per-image results are cached in "
            "IMAGES/.kscu-cache, or $KSCU_CACHE/evaluate, keyed by file content)",
        )
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace an earlier result of this metric in --output (and its .md table); "
            "any other file there is never replaced",
        )

    p = which.add_parser("nudity", help="NudeNet exposed-class detections (I2P protocol)")
    common(p, "RUN/eval/nudity.json")
    p.add_argument(
        "--threshold",
        type=float,
        default=NUDENET_THRESHOLD,
        help=f"minimum detection score (default {NUDENET_THRESHOLD})",
    )
    p.set_defaults(func=run_nudity)

    p = which.add_parser("fid", help="FID (pytorch-fid) against reference images or statistics")
    common(p, "RUN/eval/fid.json")
    p.add_argument(
        "--reference",
        required=True,
        help="folder of reference images (one size), or an .npz of their statistics (mu, sigma)",
    )
    p.add_argument(
        "--save-reference-stats",
        default=None,
        metavar="FILE.npz",
        help="also write the reference folder's statistics here, for later --reference FILE.npz "
        "(an earlier statistics file there is replaced only with --overwrite)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="local pt_inception-2015-12-05-6726825d.pth (or .safetensors); "
        "default: the torch hub cache, downloading once when online",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--dims",
        type=int,
        default=FID_DIMS,
        help=f"Inception features: {FID_DIMS} (default; the published protocol), or 64, 192, "
        "768 for quick checks that are not comparable with papers",
    )
    p.set_defaults(func=run_fid)

    p = which.add_parser("clip", help="CLIP score of images against their prompts")
    common(p, "RUN/eval/clip.json")
    p.add_argument("--prompts", required=True, help="the prompt CSV (or Hub dataset id) used")
    p.add_argument("--model", default=DEFAULT_CLIP, help=f"CLIP id or folder ({DEFAULT_CLIP})")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=run_clip)

    p = which.add_parser("classify", help="ImageNet top-1 accuracy for the CSV's class column")
    common(p, "RUN/eval/classify.json")
    p.add_argument("--prompts", required=True, help="prompt CSV with a 'class' column")
    p.add_argument(
        "--model",
        default=DEFAULT_CLASSIFIER,
        help=f"image classifier id or folder ({DEFAULT_CLASSIFIER})",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=run_classify)

    rp = subparsers.add_parser(
        "report",
        help="compare runs on one page (HTML or markdown)",
        description="Rows: runs (base model first); columns: every metric in RUN/eval/*.json; "
        "plus a grid of sample images from RUN/images.",
    )
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    rp.add_argument("--output", required=True, help="report.html or report.md")
    rp.add_argument("--samples", type=int, default=8, help="sample images per run (default 8)")
    rp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier kscu report in --output (any other file is never replaced)",
    )
    rp.set_defaults(func=run_report)
