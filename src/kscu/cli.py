"""The ``kscu`` command line: ``erase``, ``generate``, and the subpackages' commands.

Every user mistake ends as one ``error: ...`` line on stderr and exit code 2, before any output
file is touched. Defaults shown in ``--help`` come from ``kscu.config``, the only place they live.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from kscu import interrupts
from kscu.config import DEFAULTS, DTYPES, METHODS, MODE_DEFAULTS, EraseConfig
from kscu.errors import KscuError
from kscu.fileio import check_writable
from kscu.protocol import EVAL_GUIDANCE, EVAL_STEPS


def _int_or_auto(text: str) -> int | str:
    """``--start-step 14`` or ``--start-step auto`` (chosen by ``kscu analyze``, cached)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:  # argparse would name this function in its message
        raise argparse.ArgumentTypeError(f"give a step number or auto (got {text!r})") from None


# (flag name = EraseConfig field, type, help) for every overridable hyperparameter.
_OVERRIDES: list[tuple[str, type | str, str]] = [
    ("iterations", int, "training iterations (per mode: {modes})"),
    ("start_step", "int_or_auto", "first key step S (per mode: {modes}); auto: measured"),
    ("end_step", int, "end step E, exclusive (default: --num-steps)"),
    (
        "scope",
        str,
        "trainable parameters: xattn, noxattn, selfattn, full; FLUX: attn, full "
        "(per mode: {modes})",
    ),
    ("lr", float, "Adam learning rate (default {default})"),
    ("negative_guidance", float, "eta of the erase target (default {default})"),
    ("lambda1_alpha", float, "lambda1 = (T - t) * alpha (default {default})"),
    ("lambda2", float, "weight of the leakage term (default {default}; esd: 0)"),
    ("trajectory_guidance", float, "CFG scale of the trajectory (default {default})"),
    ("loops", int, "complete runs before S moves on (default {default})"),
    ("num_steps", int, "DDIM steps of the trajectory (default {default})"),
    ("resolution", int, "image size in pixels (default: the model's own)"),
    ("loss_space", str, "epsilon (default) or model: the model's own output space (v for SD 2.x)"),
    ("max_sequence_length", int, "FLUX: T5 tokens per prompt (default 512; schnell: <= 256)"),
]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line, like every other kscu error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _help(name: str, text: str) -> str:
    modes = ", ".join(f"{m} {row[name]}" for m, row in MODE_DEFAULTS.items() if name in row)
    return text.format(modes=modes, default=DEFAULTS.get(name))


def _add_erase(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "erase", help="erase concepts from a text-to-image model (SD 1.x/2.x, SDXL, FLUX.1)"
    )
    p.add_argument("--concept", required=True, help='concept(s) to erase: "church" or "A,B,C"')
    p.add_argument("--mode", default="class", help=", ".join(MODE_DEFAULTS) + " (default class)")
    p.add_argument("--method", default="kscu", help=" or ".join(METHODS) + " (default kscu)")
    p.add_argument("--model", default=None, help="hub id or folder (default: bundled tiny world)")
    p.add_argument(
        "--output", type=Path, help="folder for the erased weights (required unless --plan)"
    )
    for name, kind, text in _OVERRIDES:
        kind = _int_or_auto if kind == "int_or_auto" else kind
        p.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=None, help=_help(name, text)
        )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="compute dtype: " + ", ".join(DTYPES))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument(
        "--no-reuse-trajectory",
        action="store_true",
        help="rebuild the trajectory from noise every iteration (the paper-era code)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the edited forward's activations during backward (less memory, slower)",
    )
    p.add_argument(
        "--lean-adam",
        action="store_true",
        help="Adam's moments in bf16 with stochastic rounding: half the optimizer memory, "
        "not exact (measured in the README)",
    )
    p.add_argument(
        "--offload-adam",
        action="store_true",
        help="keep Adam's moments in host memory and move each tensor's to the device for its "
        "step: exact, 8 bytes per trainable element off the GPU, slower (README)",
    )
    p.add_argument(
        "--fast-cpu-conv",
        action="store_true",
        help="float32 on the CPU: torch's native convolution instead of oneDNN's, faster on "
        "small feature maps; equal to float rounding, not bit for bit (measured in the README)",
    )
    p.add_argument(
        "--reuse-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CPU: keep freed buffers for the next iteration (default for SD/SDXL: faster), or "
        "with --no-reuse-freed-memory return those of 1 MiB and more to the system (default "
        "for FLUX: the resident set then tracks the live tensors that --plan counts; glibc's "
        "mmap threshold fixed at 1 MiB, torch asked for huge pages); same results (README)",
    )
    p.add_argument(
        "--no-trace-denoiser",
        action="store_true",
        help="CPU float32: call the denoiser through Python each time instead of replaying its "
        "recorded operations (slower, same results)",
    )
    p.add_argument(
        "--no-optimizer-in-backward",
        action="store_true",
        help="hold every gradient, then one Adam step (same update; more memory)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prompt augmentation in the last iterations (default: on for kscu, off for esd)",
    )
    p.add_argument(
        "--family", default=None, help="model family: sd, sdxl, flux (default: from the model)"
    )
    p.add_argument(
        "--preview",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write preview.png, before/after images (default: on for the bundled model)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --output (only once the new one is complete)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the trainable elements and the expected peak memory by component; no erase",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_erase)


def erase_config_from_args(args: argparse.Namespace) -> EraseConfig:
    """The CLI's flags as the one configuration object."""
    overrides = {name: getattr(args, name) for name, _, _ in _OVERRIDES}
    return EraseConfig(
        concepts=args.concept.split(","),
        mode=args.mode,
        method=args.method,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        reuse_trajectory=not args.no_reuse_trajectory,
        optimizer_in_backward=not args.no_optimizer_in_backward,
        gradient_checkpointing=args.gradient_checkpointing,
        lean_adam=args.lean_adam,
        offload_adam=args.offload_adam,
        fast_cpu_conv=args.fast_cpu_conv,
        reuse_freed_memory=args.reuse_freed_memory,
        trace_denoiser=not args.no_trace_denoiser,
        augment=args.augment,
        family=args.family,
        **overrides,
    )


def cmd_erase(args: argparse.Namespace) -> int:
    from kscu.models import is_bundled_model
    from kscu.runner import erase_to_folder, prepare

    if args.output is None and not args.plan:
        raise KscuError("kscu erase needs --output FOLDER for the erased weights (or --plan)")
    config = erase_config_from_args(args)
    resolved = prepare(config, args.model)  # validate everything before loading weights
    if is_bundled_model(args.model):  # the tiny world knows only its own concepts
        from kscu.world import concept_kind

        for concept in resolved.concepts:
            concept_kind(concept)
    if args.plan:
        from kscu.checkpoint import check_output
        from kscu.runner import memory_plan

        if args.output is not None:  # the plan answers for the run as given: its folder too
            check_output(args.output, args.overwrite)
        plan = memory_plan(args.model, resolved)
        if "error" in plan:
            raise KscuError(plan["error"])
        print(_plan_table(plan))
        return 0
    result, _ = erase_to_folder(
        config,
        args.model,
        args.output,
        progress=not args.quiet,
        preview_prompts=_preview(args),
        overwrite=args.overwrite,
    )
    print(
        f"erased {', '.join(result.config.concepts)} in {result.seconds:.1f} s "
        f"({len(result.losses)} iterations, final loss {result.losses[-1]:.4g}) -> {args.output}"
    )
    return 0


def _plan_table(plan: dict) -> str:
    unit, size = ("GiB", 2**30) if plan["total_bytes"] >= 2**30 else ("MiB", 2**20)
    lines = [f"trainable elements: {plan['trainable_elements']:,}"]
    lines += [f"  {name:<15} {n / size:8.3f} {unit}" for name, n in plan["bytes"].items()]
    lines.append(f"  {'total':<15} {plan['total_bytes'] / size:8.3f} {unit} (expected peak)")
    host = [(k, n) for k, n in plan.get("host_bytes", {}).items() if n]
    lines += [f"  {name:<15} {n / size:8.3f} {unit} (host RAM, off the device)" for name, n in host]
    lines.append(plan["assumptions"])
    return "\n".join(lines)


def _preview(args: argparse.Namespace) -> list[str] | None:
    """Preview prompts: the concept and its neighbours in the tiny world; else the concepts."""
    from kscu.models import is_bundled_model

    bundled = is_bundled_model(args.model)
    if not (args.preview if args.preview is not None else bundled):
        return None
    concepts = [c.strip() for c in args.concept.split(",")]
    if bundled:
        from kscu.preview import world_prompts

        return world_prompts(concepts[0])
    return [*concepts, ""]


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt or a prompt CSV")
    p.add_argument("--model", default=None, help="hub id or folder (default: bundled tiny world)")
    p.add_argument("--weights", type=Path, default=None, help="folder written by `kscu erase`")
    p.add_argument("--force", action="store_true", help="load --weights onto another base model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument(
        "--prompts",
        help="CSV with a prompt column (optional: evaluation_seed, evaluation_guidance, "
        "case_number), or a Hub dataset id such as AIML-TUDA/i2p",
    )
    p.add_argument("--output", required=True, type=Path, help="folder for the PNGs")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"sampling steps (default: the family's; SD/SDXL {EVAL_STEPS}, FLUX 28)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"CFG scale, FLUX: guidance embedding (default: SD {EVAL_GUIDANCE}, SDXL 5, FLUX 3.5)",
    )
    p.add_argument("--family", default=None, help="sd, sdxl, flux (default: from the model)")
    p.add_argument("--seed", type=int, default=0, help="row seed = seed + case_number if unset")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's own")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda:N (accelerate picks its own)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again: delete the images, manifest and generate.json in --output first",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from kscu.checkpoint import load_erased
    from kscu.distributed import process_state
    from kscu.families import family_of
    from kscu.generate import generate_images, write_manifest
    from kscu.models import load_pipeline, resolve_device
    from kscu.promptfile import PromptRow, load_prompts

    if (args.steps is not None and args.steps <= 0) or args.batch_size <= 0:
        raise KscuError("--steps and --batch-size must be > 0")
    if args.force and args.weights is None:  # it would be ignored: nothing is loaded onto a base
        raise KscuError("--force lets --weights load onto another base model; give --weights")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise KscuError("--prompt is empty; give the text to generate from")
        rows = [PromptRow(case_number=0, prompt=args.prompt)]
    else:
        rows = load_prompts(args.prompts)
    check_writable(args.output)
    state = process_state()
    device = state.device if state.num_processes > 1 else resolve_device(args.device)
    pipe = load_pipeline(args.model, args.dtype, device, family=args.family)
    if args.weights is not None:
        load_erased(pipe, args.weights, force=args.force)
    family = family_of(pipe)
    steps = family.eval_steps if args.steps is None else args.steps
    guidance = family.eval_guidance if args.guidance is None else args.guidance
    written = generate_images(
        pipe,
        rows,
        args.output,
        steps=steps,
        guidance=guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        resolution=args.resolution,
        progress=not args.quiet,
        process_index=state.process_index,
        num_processes=state.num_processes,
        weights=args.weights,
        prompts=None if args.prompt is not None else args.prompts,  # recorded in generate.json
        overwrite=args.overwrite,
        wait_for_everyone=state.wait_for_everyone,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = write_manifest(rows, args.output, args.seed, guidance)
        print(f"wrote {len(written)} new images (process 0) -> {args.output}; manifest {manifest}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="score kscu against esd in the bundled tiny world")
    p.add_argument("--concept", required=True, help="a tiny-world shape, color or texture")
    p.add_argument("--mode", default="class", help=", ".join(MODE_DEFAULTS) + " (default class)")
    p.add_argument("--methods", default="kscu,esd", help="comma-separated: kscu, esd")
    p.add_argument("--output", required=True, type=Path, help="folder for bench.json/md/png")
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--iterations", type=int, default=None, help="same for every method")
    p.add_argument("--start-step", type=_int_or_auto, default=None, help="kscu start step, or auto")
    p.add_argument("--lr", type=float, default=None, help="same for every method")
    p.add_argument("--step-ranges", default=None, help="extra kscu rows, e.g. 0:50,14:50,0:15")
    p.add_argument("--samples", type=int, default=64, help="images per prompt set (default 64)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps when scoring (default 50)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=None, help="erase and image seed (default 0)")
    p.add_argument(
        "--seeds", default=None, help="run the whole bench per seed, e.g. 0,1,2: mean +- std"
    )
    p.add_argument(
        "--attack",
        default=None,
        help="unlearndiff or ringabell: add UA_attack, UA after that attack (kscu attack)",
    )
    p.add_argument(
        "--attack-samples",
        type=int,
        default=None,
        help="target prompts attacked per row (default: kscu attack's --samples, 16)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="load erases already in --output with the same settings instead of erasing "
        "again, and resume their attacks; scores are computed again",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="erase again into an --output that holds a bench (without it: refused, or --reuse)",
    )
    p.add_argument(
        "--fast-cpu-conv",
        action="store_true",
        help="every erase with kscu erase --fast-cpu-conv (torch's native convolution): faster "
        "on the tiny world, equal to float rounding; scoring keeps oneDNN (faster there)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="erases run at once, each in its own process with 1/N of the CPU threads: "
        "faster on the tiny world; the weights' last bits are those of that thread count",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)


def _bench_attack_settings(samples: int | None):
    if samples is None:
        return None
    if samples <= 0:  # AttackSettings would name its own --samples, not the bench's flag
        raise KscuError(f"--attack-samples must be > 0 (got {samples})")
    from kscu.attack.settings import AttackSettings

    return AttackSettings(samples=samples)  # validated with the method by run_bench


def _bench_overrides(args: argparse.Namespace) -> dict:
    """Erase settings that every bench row shares."""
    overrides = {} if args.lr is None else {"lr": args.lr}
    return overrides | ({"fast_cpu_conv": True} if args.fast_cpu_conv else {})


def cmd_bench(args: argparse.Namespace) -> int:
    from kscu.bench import markdown, parse_methods, parse_seeds, parse_step_ranges, run_bench

    seeds, methods = parse_seeds(args.seeds), parse_methods(args.methods)
    if args.attack_samples is not None and args.attack is None:
        raise KscuError("--attack-samples needs --attack unlearndiff (or ringabell)")
    if seeds and args.seed is not None:
        raise KscuError("give --seed or --seeds, not both")
    check_writable(args.output)
    report = run_bench(
        concept=args.concept,
        mode=args.mode,
        methods=methods,
        output=args.output,
        model=args.model,
        iterations=args.iterations,
        seed=0 if args.seed is None else args.seed,
        seeds=seeds,
        attack=args.attack,
        attack_settings=_bench_attack_settings(args.attack_samples),
        reuse=args.reuse,
        overwrite=args.overwrite,
        jobs=args.jobs,
        samples=args.samples,
        steps=args.steps,
        guidance=args.guidance,
        step_ranges=parse_step_ranges(args.step_ranges),
        start_step=args.start_step,
        overrides=_bench_overrides(args),
        progress=not args.quiet,
    )
    print(markdown(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kscu", description="Key Step Concept Unlearning for diffusion models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_erase(sub)
    _add_generate(sub)
    _add_bench(sub)
    for register in _subpackage_commands():
        register(sub)
    return parser


def _subpackage_commands():
    """Commands of the subpackages (tiny world, evaluation, analysis, attack), one module each."""
    from kscu.analyze.cli import register as analyze
    from kscu.attack.cli import register as attack
    from kscu.evaluate.cli import register as evaluate
    from kscu.world.cli import register as world

    return [world, evaluate, analyze, attack]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    """kscu's own notices (e.g. what the pinned sampler changed) as plain lines on stderr."""
    log = logging.getLogger("kscu")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


HUB_LOOKUP_SECONDS = 2.0  # the longest a command waits to learn whether the Hub's name resolves


def _offline_without_hub() -> None:
    """Use the Hub's local cache alone (``HF_HUB_OFFLINE=1``) when its host name does not resolve.

    Without a network, every Hub lookup retries five times over about 25 s, printing a line per
    retry, before it fails; a model already in the cache then loads only after those retries.
    The libraries read the switch when first imported, so it is set before any of them is
    (a process that imported them already, or a user's own ``HF_HUB_OFFLINE``, is left as is).
    Behind a proxy the proxy resolves the name, so nothing is decided here.
    """
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    if "HF_HUB_OFFLINE" in os.environ or "huggingface_hub" in sys.modules:
        return
    if any(os.environ.get(name) for name in proxies):
        return
    import socket
    import threading
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    answer: list[bool] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host or "huggingface.co", 443)
            answer.append(True)
        except (OSError, UnicodeError):  # no name server, an unknown name, a malformed endpoint
            answer.append(False)

    lookup = threading.Thread(target=resolve, daemon=True)
    lookup.start()
    lookup.join(HUB_LOOKUP_SECONDS)  # a name server that does not answer: undecided, left alone
    if answer == [False]:
        os.environ["HF_HUB_OFFLINE"] = "1"


def main(argv: Sequence[str] | None = None) -> int:
    # Library notices (e.g. "torchvision not installed") would break the one-line error promise.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # diffusers' config lookup passes an argument huggingface_hub has deprecated (a notice per
    # Hub model, nothing the user can change)
    warnings.filterwarnings("ignore", "The `local_dir_use_symlinks` argument", UserWarning)
    _log_to_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)
    _offline_without_hub()  # after parsing: --help and bad flags need no lookup
    try:
        _import_torch()
        return int(args.func(args) or 0)
    except KscuError as e:
        _end_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # what no check foresaw (a full disk, a path changed during the run)
        _end_progress_bars()
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; check the paths and free space", file=sys.stderr)
        return 2


def _import_torch() -> None:
    """Import torch with Ctrl-C held until it is done. torch's import runs Python code from its
    C++ extension; a KeyboardInterrupt raised there crosses pybind11 and aborts the process
    (exit -6, "terminate called after throwing ... KeyboardInterrupt") or kills it by SIGINT,
    where it should end as "interrupted", exit 130 (measured: 1 in 10 interrupts 1 s after start
    on a loaded machine). Every command imports torch first thing anyway."""
    if "torch" in sys.modules:
        return
    with interrupts.deferred(signal.SIGINT):
        import torch  # noqa: F401


def _end_progress_bars() -> None:
    """Clear the progress bars an error left open, so its message starts a line of its own
    (a bar is closed only when the loop that drew it is collected, after the message)."""
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
