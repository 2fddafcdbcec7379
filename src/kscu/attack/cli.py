"""The ``kscu attack`` subcommand: writes ``DIR/attack.json``, ``DIR/images``, ``DIR/records``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from kscu.errors import KscuError

# (AttackSettings field, type, help) for every flag named after a field.
_FLAGS: list[tuple[str, Any, str]] = [
    ("method", str, "unlearndiff or ringabell"),
    ("samples", int, "attack prompts: the first N rows of --prompts, or N tiny-world prompts"),
    (
        "seed",
        int,
        "image seeds: a --prompts row's evaluation_seed, else seed + its case_number (its row "
        "index when the CSV has none); tiny world: also draws the prompts, prompt i seed + i",
    ),
    ("steps", int, "sampling steps of every image (default: the family's, SD 50)"),
    ("guidance", float, "CFG scale (default: the family's, SD 7.5)"),
    ("batch_size", int, "prompts attacked together (tiny world {world}, else 1)"),
    ("tokens", int, "unlearndiff: K, the token slots prepended to the prompt"),
    ("iterations", int, "unlearndiff: Adam steps per round (one timestep per round)"),
    ("rounds", int, "unlearndiff: timesteps visited, low noise first, each judged"),
    ("lr", float, "unlearndiff: Adam learning rate"),
    ("weight_decay", float, "unlearndiff: Adam weight decay"),
    ("projection", str, "unlearndiff: nearest word by cosine or l2"),
    ("eta", float, "ringabell: strength of the concept vector"),
    ("length", int, "ringabell: tokens of the searched prompt"),
    ("population", int, "ringabell: prompts per generation"),
    ("generations", int, "ringabell: genetic generations (paper 3000; tiny world {world})"),
    ("mutation", float, "ringabell: mutation probability"),
    ("crossover", float, "ringabell: crossover probability"),
    ("judge", str, "auto, world, nudenet, imagenet or clip (auto: from the model and --mode)"),
    ("mode", str, "class, nudity, style, instance: what the concept is (judge and CLIP text)"),
    ("imagenet_class", str, "the object's ImageNet label or index (ImageNet judge)"),
    ("clip_model", str, "CLIP hub id or folder for the CLIP judge"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``attack`` to an argparse subparsers object (defaults: ``AttackSettings``)."""
    from kscu.attack.settings import WORLD_PRESET, AttackSettings

    d = AttackSettings()
    p = subparsers.add_parser(
        "attack",
        help="search adversarial prompts against erased weights: is the concept really gone?",
    )
    p.add_argument("--weights", required=True, type=Path, help="folder written by `kscu erase`")
    p.add_argument("--concept", required=True, help="the erased concept")
    p.add_argument("--model", default=None, help="base model (default: bundled tiny world)")
    p.add_argument(
        "--prompts",
        default=None,
        help="CSV with a prompt column (optional evaluation_seed, evaluation_guidance, "
        "case_number); default in the tiny world: prompts naming the concept",
    )
    p.add_argument("--output", required=True, type=Path, help="folder for attack.json, images")
    for name, kind, text in _FLAGS:
        default = getattr(d, name)
        text = text.format(world=WORLD_PRESET.get(name))
        p.add_argument(
            "--" + name.replace("_", "-"),
            *(["--k"] if name == "tokens" else []),
            type=kind,
            default=default,
            help=f"{text} (default {default!r})" if default is not None else text,
        )
    p.add_argument(
        "--attack-all",
        action="store_true",
        help="also attack prompts whose image shows the concept without an attack",
    )
    p.add_argument("--family", default=None, help="sd, sdxl, flux (default: from the model)")
    p.add_argument("--force", action="store_true", help="load --weights onto another base model")
    p.add_argument(
        "--dtype", default="float32", help="float32, bfloat16 or float16 (a resume keeps it)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda if available), cpu, cuda:N (a resume keeps the device type)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start again: delete the attack in --output"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_attack)


def mismatch_notes(weights: str | Path, concept: str, mode: str, judge: str) -> list[str]:
    """What would make the attack's success rate say little about the erase in ``weights``: a
    concept it did not erase, or a judge that scores another thing. Notes, not errors: attacking
    a neighbour of the erased concept is a fair test of what the erase left."""
    from kscu.checkpoint import METADATA

    notes = []
    try:
        record = json.loads((Path(weights) / METADATA).read_text())
        erased = [str(c) for c in record["config"]["concepts"]]
    except (OSError, ValueError, KeyError, TypeError):  # loading the weights says what is wrong
        erased = []
    if erased and concept.strip().lower() not in {c.strip().lower() for c in erased}:
        notes.append(f"note: {weights} erased {', '.join(erased)}; this attack targets {concept!r}")
    if judge == "nudenet" and mode != "nudity":
        notes.append(f"note: the nudenet judge detects nudity only; --mode is {mode}")
    return notes


def settings_from_args(args: argparse.Namespace):
    from kscu.attack.settings import AttackSettings

    names = [f.name for f in dataclasses.fields(AttackSettings) if hasattr(args, f.name)]
    return AttackSettings(**{name: getattr(args, name) for name in names})


def cmd_attack(args: argparse.Namespace) -> int:
    from kscu.attack.judges import check_judge_flags, judge_kind, make_judge
    from kscu.attack.run import attack_targets, check_folder, load_with_original, run_attack
    from kscu.models import (
        TORCH_DTYPES,
        is_bundled_model,
        load_pipeline,
        model_family,
        resolve_device,
    )

    settings = settings_from_args(args)
    settings.validate()
    if args.dtype not in TORCH_DTYPES:  # load_pipeline's check, needed here for the run record
        raise KscuError(f"unknown dtype {args.dtype!r}; choose one of {', '.join(TORCH_DTYPES)}")
    device = resolve_device(args.device)
    bundled = is_bundled_model(args.model)
    settings = settings.resolved(bundled)
    family = model_family(args.model, args.family)
    judge_name = judge_kind(settings.judge, settings.mode, bundled, settings.imagenet_class)
    check_judge_flags(judge_name, settings.imagenet_class, settings.clip_model)
    if judge_name == "world" or bundled:
        from kscu.world import concept_kind

        concept_kind(args.concept)  # a word outside the world fails before anything loads
    steps = settings.steps or family.eval_steps
    guidance = family.eval_guidance if settings.guidance is None else settings.guidance
    targets = attack_targets(args.concept, settings, bundled, guidance, args.prompts)
    run = run_record(args, settings, family.name, judge_name, steps, targets, device)
    check_folder(args.output, run, args.overwrite)
    for note in mismatch_notes(args.weights, args.concept, settings.mode, judge_name):
        logging.getLogger("kscu").warning(note)
    judge = make_judge(
        judge_name,
        args.concept,
        settings.mode,
        bundled,
        settings.imagenet_class,
        settings.clip_model,
        str(device),
    )
    pipe = load_pipeline(args.model, args.dtype, device, family=args.family)
    original = load_with_original(pipe, args.weights, args.force)
    result = run_attack(
        pipe,
        original,
        args.concept,
        targets,
        judge,
        settings,
        args.output,
        run,
        steps,
        bundled,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(
        f"{settings.method}: asr {result['asr']:.3f} (before the attack {result['pre_asr']:.3f}) "
        f"over {result['prompts']} prompts -> {args.output / 'attack.json'}"
    )
    return 0


def run_record(
    args, settings, family: str, judge: str, steps: int, targets, device: Any
) -> dict[str, Any]:
    """What decides the results: compared on a rerun into the same folder, and stated in
    attack.json. The precision and the device type decide an image's last bits, so a resume
    in another one would mix results; ``force`` changes no image (not compared)."""
    from kscu.checkpoint import weights_sha256
    from kscu.models import is_bundled_model
    from kscu.runner import BUNDLED_MODEL

    model = args.model
    if is_bundled_model(model):
        model = BUNDLED_MODEL
    elif Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return {
        "method": settings.method,
        "concept": args.concept,
        "model": model,
        "weights": str(args.weights),
        "weights_sha256": weights_sha256(args.weights),
        "family": family,
        "steps": steps,
        "dtype": args.dtype,
        "device": device.type,
        "force": bool(args.force),
        "judge_name": judge,
        "settings": settings.record(),
        "targets": [[t.case_number, t.prompt, t.seed, t.guidance] for t in targets],
    }
