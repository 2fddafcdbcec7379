"""``kscu bench``: score erasure methods in the tiny world the way UnlearnCanvas does.

Every method erases from the same original weights with the same seed and iterations, then
generates the same prompts with the same seeds, and the world classifier judges the images:

- UA  (unlearning accuracy): share of target-prompt images where the target is no longer found;
- IRA (in-domain retain accuracy): on prompts naming the *other* concepts of the target's kind
  (other shapes when a shape is erased), share where the prompted value is recognized;
- CRA (cross-domain retain accuracy): on those same images, mean accuracy of the other
  attributes (color and texture when a shape is erased);
- FD: Frechet distance, in the classifier's feature space, between the original model's and
  this model's images of those non-target prompts (0 for the original itself).

Higher UA/IRA/CRA and lower FD are better. ``--step-ranges S:E,...`` adds one KSCU row per
key-step window (the paper's ablation: all steps 0:50, the last 70% 14:50, the first 30% 0:15).
``--attack unlearndiff`` adds UA_attack, the UA left after an adversarial prompt attack
(``kscu.attack``); ``--seeds 0,1,2`` runs everything per seed and reports mean and spread.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kscu import interrupts
from kscu.config import SEED_RANGE, EraseConfig, non_negative, settings_label
from kscu.errors import KscuError
from kscu.fileio import read_json_object, write_json, write_text
from kscu.preview import save_png
from kscu.protocol import EVAL_GUIDANCE, EVAL_STEPS

ATTRIBUTES = ("shape", "color", "texture")
PR_SET_PDEATHSIG = 1  # Linux prctl: a signal for this process when its parent dies
IMAGE_SEED_OFFSET = 10_000  # the retain images' seeds start here (the target images' at 0)


@dataclass
class BenchRow:
    method: str  # "original", "kscu", "esd"
    label: str  # unique row name, e.g. "kscu[14:50]"
    UA: float
    IRA: float
    CRA: float
    FD: float
    seconds: float  # erase time (0 for the original)
    start_step: int | None = None
    end_step: int | None = None
    iterations: int | None = None
    final_loss: float | None = None
    settings: str | None = None  # what was really run: iterations, lr, scope, augmentation
    torch_threads: int | None = None  # the erase's CPU threads: its last bits depend on them
    UA_attack: float | None = None  # UA after the attack (--attack), on the attacked prompts
    UA_attack_pre: float | None = None  # UA on the same attacked prompts and seeds, no attack


def parse_step_ranges(text: str | None) -> list[tuple[int, int]]:
    """ "0:50,14:50,0:15" -> [(0, 50), (14, 50), (0, 15)]."""
    if not text:
        return []
    ranges = []
    for part in text.split(","):
        try:
            start, end = (int(v) for v in part.split(":"))
        except ValueError:
            raise KscuError(f"bad step range {part!r}; write S:E, e.g. 14:50") from None
        if not 0 <= start < end:
            raise KscuError(f"bad step range {part!r}; need 0 <= S < E")
        ranges.append((start, end))
    return ranges


def parse_seeds(text: str | None) -> list[int]:
    """ "0,1,2" -> [0, 1, 2]; None (not given) -> []. An empty list or item is refused: an
    explicit ``--seeds ""`` would otherwise quietly run the default seed alone."""
    if text is None:
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise KscuError(
            f"bad --seeds {text!r}; write integers separated by commas, e.g. 0,1,2"
        ) from None


def parse_methods(text: str) -> list[str]:
    """ "kscu,esd" -> ["kscu", "esd"]; an empty item ("kscu,,esd") is refused, as in --seeds."""
    methods = [m.strip() for m in text.split(",")]
    if not all(methods):
        raise KscuError(f"bad --methods {text!r}; write kscu and/or esd separated by commas")
    return methods


def bench_prompts(concept: str, samples: int, seed: int) -> dict[str, Any]:
    """Target prompts (naming the concept) and retain prompts (other concepts of its kind)."""
    from kscu.world import COLORS, HELDOUT_TEMPLATES, SHAPES, TEXTURES, concept_kind

    kind = concept_kind(concept)
    vocab = {"shape": SHAPES, "color": COLORS, "texture": TEXTURES}
    target = concept.strip().lower()
    others = [v for v in vocab[kind] if v != target]
    rng = np.random.default_rng(seed)

    def make(values: list[str]) -> tuple[list[str], list[dict[str, str]]]:
        prompts, labels = [], []
        for i in range(samples):
            lab = {k: vs[rng.integers(len(vs))] for k, vs in vocab.items()}
            lab[kind] = values[i % len(values)]
            prompts.append(HELDOUT_TEMPLATES[i % len(HELDOUT_TEMPLATES)].format(**lab))
            labels.append(lab)
        return prompts, labels

    target_prompts, target_labels = make([target])
    retain_prompts, retain_labels = make(others)
    return {
        "kind": kind,
        "target": target,
        "target_prompts": target_prompts,
        "target_labels": target_labels,
        "retain_prompts": retain_prompts,
        "retain_labels": retain_labels,
    }


def feature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between two sets of world-classifier features (rows are images).

    The FID formula |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) on the classifier's small
    feature space; numpy only, because ``kscu bench`` must not need the FID extras
    (pytorch-fid, torchvision). Tr((S1 S2)^(1/2)) is computed as Tr((S1^(1/2) S2 S1^(1/2))^(1/2))
    with symmetric eigendecompositions, stable when a covariance is singular.
    """
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ s2 @ root
    covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * covmean)


def _accuracy(pred: list[str], labels: list[dict[str, str]], attribute: str) -> float:
    return float(np.mean([p == lab[attribute] for p, lab in zip(pred, labels, strict=True)]))


class Judge:
    """Generates the bench prompts with fixed seeds and scores the images."""

    def __init__(self, prompts: dict[str, Any], seed: int, steps: int, guidance: float):
        from kscu.world.classifier import load_classifier

        self.p = prompts
        self.seed, self.steps, self.guidance = seed, steps, guidance
        self.classifier = load_classifier()
        self.reference_features: np.ndarray | None = None

    def images(self, pipe: Any, prompts: list[str], offset: int) -> torch.Tensor:
        from kscu.world.quality import generate

        return generate(pipe, prompts, self.seed + offset, self.steps, self.guidance)

    def score(self, pipe: Any) -> dict[str, float]:
        p, kind = self.p, self.p["kind"]
        target = self.classifier.predict(self.images(pipe, p["target_prompts"], 0))
        retain_images = self.images(pipe, p["retain_prompts"], IMAGE_SEED_OFFSET)
        retain = self.classifier.predict(retain_images)
        features = self.classifier.features(retain_images).double().cpu().numpy()
        if self.reference_features is None:
            self.reference_features = features  # the first model scored is the original
        cross = [a for a in ATTRIBUTES if a != kind]
        return {
            "UA": 1.0 - _accuracy(target[kind], p["target_labels"], kind),
            "IRA": _accuracy(retain[kind], p["retain_labels"], kind),
            "CRA": float(np.mean([_accuracy(retain[a], p["retain_labels"], a) for a in cross])),
            "FD": max(0.0, feature_distance(self.reference_features, features)),
        }


# EraseConfig fields the bench sets for each run itself, from its own arguments
_PER_RUN = {
    "concepts": "concept",
    "mode": "mode",
    "iterations": "iterations",
    "seed": "seed",
    "method": "methods",
    "start_step": "start_step",
}


def _check_overrides(overrides: dict[str, Any], ranges: bool) -> None:
    """``overrides`` reach every erase of the bench; a key the bench sets per run, or one that is
    no erase setting, would otherwise end in a TypeError deep inside ``runs_for``. ``end_step``
    applies to every run unless ``step_ranges`` set each range's end (``ranges``)."""
    EraseConfig.check_keys(overrides)
    owned = _PER_RUN | ({"end_step": "step_ranges"} if ranges else {})
    per_run = sorted(set(overrides) & owned.keys())
    if per_run:
        use = ", ".join(f"{key} -> {owned[key]}=" for key in per_run)
        raise KscuError(
            f"overrides {per_run}: the bench sets these for each run; pass them as its own "
            f"arguments ({use})"
        )


def run_bench(
    concept: str,
    mode: str,
    methods: list[str],
    output: str | Path,
    model: str | None = None,
    iterations: int | None = None,
    seed: int = 0,
    samples: int = 64,
    steps: int = EVAL_STEPS,
    guidance: float = EVAL_GUIDANCE,
    step_ranges: list[tuple[int, int]] | None = None,
    start_step: int | str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    seeds: list[int] | None = None,
    attack: str | None = None,
    attack_settings: Any = None,
    reuse: bool = False,
    jobs: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Erase with each method from the same start, score all models, write bench.json/md/png.

    ``overrides``: erase settings for every run (``EraseConfig`` fields such as ``lr``), not
    those the bench sets per run (refused: concept, mode, iterations, seed, method, start step,
    and the end step when ``step_ranges`` set it).
    ``seeds`` runs the whole bench once per seed (erase seed, prompts and image seeds) and
    reports each column's mean, its sample standard deviation (``UA_std``, 0 for one seed) and
    the per-seed values (``UA_per_seed``). ``attack`` (``unlearndiff`` or ``ringabell``) adds
    ``UA_attack``: UA on the first ``attack_settings.samples`` target prompts (same prompts and
    seeds as UA's first images) after that attack (``kscu.attack``), with ``attack_settings``
    (an ``AttackSettings``; default: the attack's tiny-world defaults, 16 prompts).
    ``reuse`` loads erases already in ``output`` with the same resolved settings instead of
    erasing again, and resumes their attacks; every score is computed again. An ``output``
    holding a bench (or anything) is refused unless ``reuse`` or ``overwrite`` (erase again).
    ``jobs`` > 1 runs the erases first, that many at a time in their own processes, the CPU
    threads split between them (see ``_erase_in_parallel``); scoring follows with all threads.
    """
    from kscu.models import is_bundled_model, load_pipeline
    from kscu.runner import prepare

    seeds = list(seeds) if seeds else [seed]
    # numpy draws the prompts (no negative seed); image i of a set has seed + offset + i
    last = SEED_RANGE[1] - IMAGE_SEED_OFFSET - samples + 1
    bad = [s for s in seeds if not 0 <= s <= last]
    if bad:
        raise KscuError(f"--seed/--seeds {bad[0]}: give seeds in [0, {last}]")
    if not is_bundled_model(model):
        raise KscuError("kscu bench scores with the tiny world's classifier; omit --model")
    if reuse and overwrite:  # one keeps the finished erases, the other erases them again
        raise KscuError("--reuse keeps finished erases, --overwrite erases again: give one")
    target = bench_prompts(concept, samples, seeds[0])["target"]  # outside the world: fails
    _check_earlier_bench(Path(output), target, mode, reuse or overwrite)
    unknown = sorted(set(methods) - {"kscu", "esd"})
    if unknown or not methods:
        raise KscuError(f"unknown method(s) {unknown}; --methods takes kscu and/or esd")
    if samples < 2 or steps <= 0:  # FD compares feature covariances: 2 images at the least
        raise KscuError(f"--samples must be >= 2 and --steps > 0 (got {samples} and {steps})")
    if start_step is not None and "kscu" not in methods:
        raise KscuError("--start-step is kscu's; add kscu to --methods or drop --start-step")
    if not non_negative(guidance):  # as every command's guidance
        raise KscuError(f"--guidance must be a finite number >= 0 (got {guidance})")
    if len(set(seeds)) != len(seeds):
        raise KscuError(f"--seeds {seeds} repeats a seed; give each seed once")
    _check_overrides(overrides or {}, bool(step_ranges))
    if attack is not None:
        attack_settings = _attack_settings(attack, attack_settings)
    threads = torch.get_num_threads()
    if not 1 <= jobs <= threads:
        raise KscuError(
            f"--jobs {jobs}: give 1 to {threads} (the CPU threads torch uses here), "
            "one erase per job"
        )

    def runs_for(seed: int) -> list[tuple[str, str, EraseConfig]]:
        runs = []
        common = dict(concepts=[concept], mode=mode, iterations=iterations, seed=seed)
        common.update(overrides or {})
        for method in methods:
            s = start_step if method == "kscu" else None
            label = "kscu(auto)" if s == "auto" else method
            runs.append((method, label, EraseConfig(method=method, start_step=s, **common)))
        for s, e in step_ranges or []:
            cfg = EraseConfig(method="kscu", start_step=s, end_step=e, **common)
            runs.append(("kscu", f"kscu[{s}:{e}]", cfg))
        return runs

    labels = [label for _, label, _ in runs_for(seeds[0])]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise KscuError(f"{', '.join(twice)} asked for twice; give each method and range once")
    for _, label, cfg in runs_for(seeds[0]):  # validate every run before the first one starts
        if label.startswith("kscu["):  # named by the bench's flag, not erase's --end-step
            whole = prepare(dataclasses.replace(cfg, start_step=0, end_step=None), model)
            if cfg.end_step > whole.num_steps:
                raise KscuError(
                    f"--step-ranges {cfg.start_step}:{cfg.end_step}: the erase has "
                    f"{whole.num_steps} steps; give ranges S:E with E <= {whole.num_steps}"
                )
        prepare(cfg, model)

    output = Path(output)
    pipe = load_pipeline(model)
    original = copy.deepcopy(pipe.unet.state_dict())
    # --fast-cpu-conv is each erase's own (generation, batched 128 rows, is faster with oneDNN)
    native_conv = bool((overrides or {}).get("fast_cpu_conv"))

    def folder_of(seed: int) -> Path:
        return output if len(seeds) == 1 else output / f"seed{seed}"

    pending = [
        (cfg, folder_of(s) / _folder(label))
        for s in seeds
        for _, label, cfg in runs_for(s)
        if not (reuse and _recorded_config(model, cfg, folder_of(s) / _folder(label), pipe))
    ]
    erased = min(jobs, len(pending)) > 1  # with one erase to run, it runs here, as without
    if erased:
        _erase_in_parallel(model, pending, min(jobs, len(pending)), progress)
    per_seed = []
    for s in seeds:
        folder = folder_of(s)
        judge = Judge(bench_prompts(concept, samples, s), s, steps, guidance)
        attacker = None
        if attack is not None:
            attacker = _Attacker(
                pipe, original, concept, s, judge, attack_settings, folder, progress
            )
        per_seed.append(
            _score_runs(
                pipe, original, model, runs_for(s), judge, attacker, folder, progress, reuse, erased
            )
        )
    pipe.unet.load_state_dict(original)
    prompts = bench_prompts(concept, samples, seeds[0])
    report = {
        "concept": prompts["target"],
        "kind": prompts["kind"],
        "mode": mode,
        "seed": seeds[0],
        "seeds": seeds,
        "samples": samples,
        "steps": steps,
        "guidance": guidance,
        "fast_cpu_conv": native_conv,
        "jobs": jobs if erased else 1,
        "attack": None if attack is None else asdict(attack_settings),
        "rows": aggregate(per_seed),
    }
    write_json(output / "bench.json", report)
    write_text(output / "bench.md", markdown(report))
    save_png(chart(report), output / "bench.png")
    return report


def _check_earlier_bench(output: Path, concept: str, mode: str, keep: bool) -> None:
    """A bench replaces the run folders it makes: only where the user said so (``keep``:
    ``reuse`` or ``overwrite``), and never another concept's, which would stay beside the new
    runs in a folder whose bench.json no longer describes them."""
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not (output / "bench.json").is_file():
        stranger = next((e for e in sorted(output.iterdir()) if not _bench_made(e)), None)
        if stranger is not None:  # the bench would write its files and runs beside it
            raise KscuError(
                f"--output {output} holds {stranger.name!r}, which no bench made; give a new "
                "or empty folder"
            )
        if keep:  # an interrupted bench's erases (reused where they match, else replaced)
            return
        raise KscuError(
            f"--output {output} is not empty and holds no bench.json; give a new or empty "
            "folder, or pass --reuse (an interrupted bench) or --overwrite"
        )
    old = read_json_object(output / "bench.json", "remove it or give another --output")
    if (old.get("concept"), old.get("mode")) != (concept, mode):
        raise KscuError(
            f"{output} holds a bench of {old.get('concept')!r} ({old.get('mode')} mode), not "
            f"{concept!r} ({mode} mode); give another --output"
        )
    if not keep:
        raise KscuError(
            f"--output {output} already holds a bench of {concept!r}; pass --reuse to keep its "
            "erases made with the same settings, or --overwrite to erase again"
        )


def _bench_made(entry: Path) -> bool:
    """What an interrupted bench leaves before its bench.json: hidden folders being written,
    run folders (kscu, esd, kscu_14-50, kscu_auto), per-seed folders and the attack folder."""
    if entry.name.startswith("."):
        return True
    pattern = r"attack|seed[0-9]+|esd|kscu(_[0-9a-z-]+)?"
    return entry.is_dir() and re.fullmatch(pattern, entry.name) is not None


def _score_runs(
    pipe, original, model, runs, judge, attacker, output, progress, reuse=False, erased=False
) -> list[BenchRow]:
    """The original row, then one row per erase, each from the original weights (one seed).

    ``reuse``: a run folder that already holds an erase of the same resolved settings is loaded
    instead of erased again (its recorded seconds are kept); scores are always recomputed.
    ``erased``: every run folder holds its erase already (``_erase_in_parallel``); load them.
    """
    from kscu.memory import pay_first_use
    from kscu.runner import erase_to_folder

    def scores(label: str) -> dict[str, float]:
        out = judge.score(pipe)
        if attacker is not None:
            out["UA_attack"], out["UA_attack_pre"] = attacker.ua(label, resume=reuse)
        return out

    pipe.unet.load_state_dict(original)  # a previous seed's last erase must not be scored here
    rows = [BenchRow("original", "original", **scores("original"), seconds=0.0)]
    for method, label, cfg in runs:
        pipe.unet.load_state_dict(original)
        folder = output / _folder(label)  # the bench owns its run folders: a rerun replaces them
        record = _finished_run(pipe, model, cfg, folder) if reuse or erased else None
        if record is None and erased:
            raise KscuError(f"the parallel erase of {label} left no matching run in {folder}")
        if record is None:
            if pipe.unet.device.type == "cpu":  # once per process, not in the first run's time
                pay_first_use(cfg)
            started = time.perf_counter()
            result, _ = erase_to_folder(cfg, model, folder, progress, pipe=pipe, overwrite=True)
            seconds = time.perf_counter() - started
            record = {"config": result.config.to_dict(), "final_loss": result.losses[-1]}
            record |= {"bench_seconds": seconds, "torch_threads": torch.get_num_threads()}
        rc = record["config"]
        rows.append(
            BenchRow(
                method,
                label,
                **scores(label),
                seconds=round(record["bench_seconds"], 2),
                start_step=rc["start_step"],
                end_step=rc["end_step"],
                iterations=rc["iterations"],
                final_loss=record["final_loss"],
                settings=settings_label(rc),
                torch_threads=record.get("torch_threads"),  # None: a run from before it was kept
            )
        )
    return rows


def _recorded_config(model: str | None, cfg: EraseConfig, folder: Path, pipe: Any) -> dict | None:
    """The metadata of an erase of ``cfg`` in ``folder`` (same resolved settings), else None.

    An automatic start step matches the step that run measured (the measurement, on the same
    original weights, is deterministic).
    """
    from kscu.checkpoint import WEIGHTS, read_metadata
    from kscu.runner import prepare

    if not (folder / WEIGHTS).is_file():
        return None
    meta = read_metadata(folder)
    recorded = meta.get("config") or {}
    if cfg.start_step == "auto":
        if "start_step_analysis" not in meta:
            return None
        cfg = dataclasses.replace(cfg, start_step=recorded.get("start_step"))
    return meta if recorded == prepare(cfg, model, pipe).to_dict() else None


def _finished_run(pipe: Any, model: str | None, cfg: EraseConfig, folder: Path) -> dict | None:
    """The record of an erase of ``cfg`` already in ``folder``, loaded into ``pipe``; else None.

    The bench's seconds for a reused run are the erase's own recorded seconds.
    """
    from kscu.checkpoint import load_erased

    meta = _recorded_config(model, cfg, folder, pipe)
    if meta is None:
        return None
    load_erased(pipe, folder)  # checks the base model's fingerprint too
    return meta | {"bench_seconds": meta["seconds"]}


def _erase_in_parallel(
    model: str | None, pending: list[tuple[EraseConfig, Path]], jobs: int, progress: bool
) -> None:
    """The bench's erases, ``jobs`` at a time, each in its own process with 1/jobs of the threads.

    The bundled world's kernels are too small to split well: on 2 cores its erase takes about
    as long with 1 thread as with 2, so two erases at once finish in about the time of one.
    Each erase is exactly ``kscu erase`` run with that many threads; since a float32 result's
    last bits depend on the thread count (parallel reductions sum in another order), the
    weights differ in their last bits from the serial bench's, which is why this is opt-in.
    A failed erase or an interrupt stops the others at once (each writes its run folder only
    when it is complete, so a stopped one leaves nothing but its hidden temporary folder); the
    workers ignore Ctrl-C, which reaches the bench, and end on its SIGTERM as on an exit.
    """
    threads = max(1, torch.get_num_threads() // jobs)
    # ESD's erases first: each of its iterations walks from noise, so they are the longest, and
    # starting the longest first packs the jobs best
    queue = sorted(pending, key=lambda run: run[0].method != "esd")
    context = multiprocessing.get_context("spawn")  # no fork of a process holding OpenMP threads
    running: dict[Any, tuple[Any, Path]] = {}  # its pipe's end -> worker process, its folder
    bar = tqdm(total=len(queue), desc="erases", disable=not progress)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                cfg, folder = queue.pop(0)
                receive, send = context.Pipe(duplex=False)
                args = (model, cfg, folder, threads, send, os.getpid())
                process = context.Process(target=_erase_alone, args=args, daemon=True)
                # Ctrl-C is the bench's (it stops the workers): a worker inherits SIGINT ignored
                with interrupts.replaced({signal.SIGINT: signal.SIG_IGN}):
                    process.start()
                    running[receive] = (process, folder)
                send.close()
            # a pipe is readable when its worker sent its error or ended (end of file); read
            # before joining, so that a long message never waits for a reader
            for receive in multiprocessing.connection.wait(list(running)):
                process, folder = running.pop(receive)
                error = _message(receive)
                receive.close()
                process.join()
                if error is None and process.exitcode != 0:
                    error = (
                        f"the erase into {folder} stopped (its process exited with code "
                        f"{process.exitcode}); run the bench without --jobs to see why"
                    )
                if error is not None:
                    raise KscuError(error) if isinstance(error, str) else RuntimeError(error[0])
                bar.update()
    finally:
        for process, _ in running.values():
            process.terminate()
        for process, _ in running.values():
            process.join(timeout=30)
            if process.is_alive():  # SIGTERM's exit was swallowed somewhere: end it for sure
                process.kill()
                process.join()
        bar.close()


def _message(receive: Any) -> Any:
    """What a finished worker sent, or None (a worker that succeeded closes its end unsent)."""
    try:
        return receive.recv()
    except EOFError:
        return None


def _erase_alone(
    model: str | None, cfg: EraseConfig, folder: Path, threads: int, report: Any, bench: int
) -> None:
    """One bench erase in a worker process, as ``_score_runs`` runs it, with ``threads`` threads.

    Sends ``report`` a KscuError's message (one line for the user), a bug's traceback as a
    1-tuple, or nothing. SIGTERM ends it as an exit does (SystemExit: cleanups run, nothing is
    printed): the bench's, or on Linux the kernel's when the bench's process ``bench`` dies in
    any way, so no worker goes on writing into a bench that is gone.
    """
    from kscu.allocator import glibc
    from kscu.models import load_pipeline
    from kscu.runner import erase_to_folder

    signal.signal(signal.SIGTERM, _exit_on_signal)
    libc = glibc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != bench:  # the bench died before the line above
        raise SystemExit(1)
    torch.set_num_threads(threads)
    try:
        erase_to_folder(cfg, model, folder, False, pipe=load_pipeline(model), overwrite=True)
    except KscuError as e:
        report.send(str(e))
    except Exception:
        report.send((f"an erase into {folder} failed:\n{traceback.format_exc()}",))


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _attack_settings(method: str, settings: Any = None) -> Any:
    """The attack's settings for the bench (checked before anything runs)."""
    from kscu.attack.settings import AttackSettings

    settings = dataclasses.replace(settings or AttackSettings(), method=method)
    settings.validate()
    return settings.resolved(bundled=True)


class _Attacker:
    """Runs ``kscu attack`` on the bench's target prompts (same seeds, steps and guidance)."""

    def __init__(self, pipe, original, concept, seed, judge, settings, output, progress):
        from kscu.attack.judges import WorldJudge
        from kscu.attack.run import attack_targets

        # The first ``settings.samples`` target prompts (the attack's own default, 16): each
        # attacked prompt costs up to rounds x iterations edited-model steps.
        samples = min(settings.samples, len(judge.p["target_prompts"]))
        self.settings = dataclasses.replace(settings, samples=samples, seed=seed, steps=judge.steps)
        self.targets = attack_targets(concept, self.settings, True, judge.guidance)
        params = dict(pipe.unet.named_parameters())
        self.original = {k: v for k, v in original.items() if k in params}
        self.pipe, self.concept, self.output, self.progress = pipe, concept, output, progress
        self.judge = WorldJudge(concept)

    def ua(self, label: str, resume: bool = False) -> tuple[float, float]:
        """UA after the attack (share of attacked prompts whose image lacks the concept), and
        before it on the same prompts and seeds: UA itself is over all ``--samples`` prompts."""
        from kscu.attack.run import run_attack

        s = self.settings
        run = {
            "bench_row": label,
            "method": s.method,
            "concept": self.concept,
            "settings": s.record(),
        }
        result = run_attack(
            self.pipe,
            self.original,
            self.concept,
            self.targets,
            self.judge,
            s,
            self.output / "attack" / _folder(label),
            run,
            s.steps,
            bundled=True,
            progress=self.progress,
            overwrite=not resume,  # the bench owns its folders: a rerun replaces them
        )
        return 1.0 - result["asr"], 1.0 - result["pre_asr"]


# Columns averaged over seeds (each gains "_std" and "_per_seed").
AGGREGATED = ("UA", "IRA", "CRA", "FD", "UA_attack", "UA_attack_pre", "seconds", "final_loss")


def aggregate(per_seed: list[list[BenchRow]]) -> list[dict[str, Any]]:
    """One row per label: the mean of each column over seeds, its sample std and the values.

    Columns that are not averaged keep the first seed's value, plus ``_per_seed`` values when
    they differ between seeds (e.g. an automatic start step).
    """
    rows = []
    for same in zip(*per_seed, strict=True):
        row = asdict(same[0])
        for key in list(row):
            values = [getattr(r, key) for r in same]
            if key in AGGREGATED and all(v is not None for v in values):
                row[key] = float(np.mean(values))
                row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                row[f"{key}_per_seed"] = values
            elif any(v != values[0] for v in values):
                row[f"{key}_per_seed"] = values
        rows.append(row)
    return rows


def _folder(label: str) -> str:
    """A shell-friendly folder name: kscu[14:50] -> kscu_14-50, kscu(auto) -> kscu_auto."""
    return label.translate(str.maketrans({"[": "_", "(": "_", ":": "-", "]": None, ")": None}))


def markdown(report: dict[str, Any]) -> str:
    seeds = report.get("seeds") or [report["seed"]]
    several = len(seeds) > 1
    which = (
        f"seeds {', '.join(map(str, seeds))} (mean ± sample std over seeds)"
        if several
        else f"seed {seeds[0]}"
    )
    attack = report.get("attack")
    head = (
        f"Erasing **{report['concept']}** ({report['kind']}, mode {report['mode']}), "
        f"{report['samples']} images per prompt set, {report['steps']} DDIM steps, "
        f"guidance {report['guidance']}, {which}."
        + (
            f" UA_attack: UA after the {attack['method']} attack on the first"
            f" {min(attack['samples'], report['samples'])} target prompts; UA_pre: UA on"
            " those prompts without it."
            if attack
            else ""
        )
        + (" Erases with --fast-cpu-conv." if report.get("fast_cpu_conv") else "")
        + _threads_note(report)
        + "\n\n"
    )
    columns = [("UA ↑", "UA", ".3f"), ("IRA ↑", "IRA", ".3f"), ("CRA ↑", "CRA", ".3f")]
    columns += [("FD ↓", "FD", ".2f")]
    columns += (
        [("UA_pre ↑", "UA_attack_pre", ".3f"), ("UA_attack ↑", "UA_attack", ".3f")]
        if attack
        else []
    )
    columns += [("seconds", "seconds", ".1f")]
    lines = [
        "| method | settings | " + " | ".join(c[0] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for r in report["rows"]:
        settings = (r.get("settings") or "-").split(": ", 1)[-1]
        cells = [_cell(r, key, fmt, several) for _, key, fmt in columns]
        lines.append(f"| {r['label']} | {settings} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _threads_note(report: dict[str, Any]) -> str:
    """How many CPU threads the erases had: their weights' last bits depend on it."""
    rows = report["rows"]
    counts = {r.get("torch_threads") for r in rows} | {
        n for r in rows for n in r.get("torch_threads_per_seed", [])
    }
    counts = sorted(n for n in counts if n)
    if not counts:  # a report from before threads were recorded
        return ""
    jobs = report.get("jobs", 1)
    ran = f" Erases ran {jobs} at a time (--jobs)" if jobs > 1 else " Erases ran"
    if len(counts) == 1:
        return f"{ran} with {counts[0]} CPU thread(s) each."
    return f"{ran} with {'/'.join(map(str, counts))} CPU threads (per row: torch_threads)."


def _cell(row: dict[str, Any], key: str, fmt: str, spread: bool) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if spread and row.get(f"{key}_std") is not None:
        return f"{value:{fmt}} ± {row[f'{key}_std']:{fmt}}"
    return f"{value:{fmt}}"


def chart(report: dict[str, Any]):
    """Grouped bars of UA / IRA / CRA per row (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    rows = report["rows"]
    metrics = ["UA", "IRA", "CRA"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.6), dpi=100)
    several = len(report.get("seeds") or [0]) > 1
    for i, m in enumerate(metrics):
        spread = [r.get(f"{m}_std", 0.0) for r in rows] if several else None
        ax.bar(x + (i - 1) * 0.26, [r[m] for r in rows], width=0.26, label=m, yerr=spread)
    ax.set_xticks(x, [r["label"] for r in rows], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"erasing {report['concept']} ({report['mode']})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue()))
