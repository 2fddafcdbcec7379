"""An attack over a list of prompts: images before and after, verdicts, per-prompt records.

For each prompt: the erased model's image of the prompt itself (``{i}-pre.png``) is judged. A
prompt that already shows the concept needs no attack; as in the UnlearnDiffAtk reference it
counts as a success and is not attacked (``attack_all`` attacks it anyway). The others are
attacked round by round; after each round the erased model's image of the adversarial prompt
(``{i}.png``, same seed and guidance) is judged, and a prompt leaves the attack at its first
success. ``asr`` is the share of prompts whose final image shows the concept, ``pre_asr`` the
share whose ``-pre`` image does.

Each finished prompt is written to ``records/{i}.json`` at once, so an interrupted run resumes
where it stopped; ``attack-run.json``, written once every check has passed and before the first
prompt, states how the run is made, and a rerun made another way is refused unless
``overwrite``. A run record with no finished prompt beside it holds no result, so a rerun made
another way starts afresh there. A folder that holds ``attack.json``, ``images`` or ``records``
but no run record is not an attack's, and is never written into. ``overwrite`` deletes only the
files an attack writes. Every prompt has its own random streams, so its result does not depend
on which prompts share its batch.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kscu.attack.judges import Judge
from kscu.attack.settings import AttackSettings
from kscu.attack.targets import Target, render
from kscu.errors import KscuError
from kscu.fileio import check_writable, is_number, read_json_object, write_json
from kscu.preview import save_png
from kscu.sampling import to_pil

RESULT = "attack.json"
RUN = "attack-run.json"
RECORDS = "records"
IMAGES = "images"
# Moving the weights folder leaves the results valid; --force changes no image (the model and
# the weights' digest are compared), it only lets the weights load onto another base.
_NOT_COMPARED = ("weights", "force")
_OWN_IMAGE = re.compile(r"\d+(-pre|-target)?\.png")  # {i}.png, {i}-pre.png, {i}-target.png
_OWN_RECORD = re.compile(r"\d+\.json")  # records/{i}.json


def attack_targets(
    concept: str,
    settings: AttackSettings,
    bundled: bool,
    guidance: float,
    prompts: str | Path | None = None,
) -> list[Target]:
    """The first ``samples`` rows of ``prompts``, or in the tiny world ``samples`` prompts naming
    the concept (the bench's target prompts). Row seeds and guidance win over the defaults."""
    if prompts is not None:
        from kscu.promptfile import load_prompts

        rows = load_prompts(prompts)[: settings.samples]
        return [
            Target(
                i,
                r.case_number,
                r.prompt,
                r.seed if r.seed is not None else settings.seed + r.case_number,
                r.guidance if r.guidance is not None else guidance,
            )
            for i, r in enumerate(rows)
        ]
    if not bundled:
        raise KscuError("give --prompts CSV (a 'prompt' column): attack prompts naming the concept")
    from kscu.bench import bench_prompts

    texts = bench_prompts(concept, settings.samples, settings.seed)["target_prompts"]
    return [Target(i, i, p, settings.seed + i, guidance) for i, p in enumerate(texts)]


def load_with_original(pipe: Any, weights: str | Path, force: bool = False):
    """Load an erase into ``pipe`` (``load_erased`` checks it); return the base values it replaced.

    The original model is needed for UnlearnDiffAtk's target images: only the tensors the erase
    changed are kept twice, not the whole network.
    """
    from safetensors import SafetensorError, safe_open

    from kscu.checkpoint import WEIGHTS, load_erased
    from kscu.families import family_of

    params = dict(family_of(pipe).denoiser(pipe).named_parameters())
    try:
        with safe_open(str(Path(weights) / WEIGHTS), framework="pt") as f:
            names = [k for k in f.keys() if k in params]
    except (SafetensorError, OSError):
        names = []  # load_erased says what is wrong with the file
    original = {k: params[k].detach().clone() for k in names}
    load_erased(pipe, weights, force=force)
    return original


def check_folder(output: str | Path, run: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse to add to a folder attacked another way, or to write into files that are not an
    attack's; cheap, so it runs before any load."""
    output = Path(output)
    check_writable(output)
    if not (output / RUN).is_file():
        _refuse_foreign(output)
        return
    if overwrite or not holds_results(output):
        return
    old = read_json_object(output / RUN, "pass --overwrite to start again")
    differ = _differences(old, json.loads(json.dumps(run, default=str)))
    if differ:
        why = (
            " (float results differ in the last bits between devices, so a run is resumed on "
            "the device it started on)"
            if "device" in old and old["device"] != run["device"]  # older records: unstated
            else ""
        )
        raise KscuError(
            f"{output} holds an attack made another way (differs in: {', '.join(differ)}){why}; "
            "rerun with its settings to resume, pass --overwrite to start again, or give "
            "another --output"
        )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The compared keys of two run records that differ, with both values where they are short
    (``settings.lr 0.01 vs 0.02``; nested keys by their path)."""
    differ = []
    for key in sorted({*old, *new} - set(_NOT_COMPARED)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differ += [
                _shown(f"{key}.{k}", a.get(k), b.get(k))
                for k in sorted({*a, *b})
                if a.get(k) != b.get(k) and not _defaulted(f"{key}.{k}", a.get(k), b.get(k))
            ]
        elif a != b:
            differ.append(_shown(key, a, b))
    return differ


# Flags recorded as given whose resolved values the record compares elsewhere: the steps at its
# top level, the judge as judge_name, the guidance in each target. One run left to its default
# and one spelling the default out are the same attack.
_RESOLVED_ELSEWHERE = {"settings.steps": None, "settings.guidance": None, "settings.judge": "auto"}


def _defaulted(key: str, a: Any, b: Any) -> bool:
    return key in _RESOLVED_ELSEWHERE and _RESOLVED_ELSEWHERE[key] in (a, b)


def _shown(key: str, a: Any, b: Any) -> str:
    if key == "targets":
        return "targets (their prompts, seeds or guidance)"
    long = any(isinstance(v, dict | list) or len(str(v)) > 40 for v in (a, b))
    return key if long else f"{key} {a} vs {b}"


def _refuse_foreign(output: Path) -> None:
    """A folder without a run record may hold the user's own ``attack.json`` or ``images``: the
    attack would write over them (and ``--overwrite`` delete them), so it is not used."""
    held = [name for name in (RESULT, IMAGES, RECORDS) if (output / name).exists()]
    if held:
        raise KscuError(
            f"--output {output} holds {', '.join(held)} but no {RUN}, so not a kscu attack; "
            "give a new folder, or one without those names"
        )


def holds_results(output: str | Path) -> bool:
    """Whether an attack in ``output`` finished anything: a run record alone (a run stopped
    before its first prompt) is no result to keep, resume or refuse for."""
    output = Path(output)
    return (output / RESULT).exists() or any(_own_files(output / RECORDS, _OWN_RECORD))


def _own_files(folder: Path, pattern: re.Pattern) -> list[Path]:
    """The files in ``folder`` named as the attack names its own."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and pattern.fullmatch(p.name)]


def clear_attack(output: str | Path) -> None:
    """Delete the files an attack writes, and nothing else (other files in ``images`` stay)."""
    output = Path(output)
    for path in _own_files(output / RECORDS, _OWN_RECORD) + _own_files(output / IMAGES, _OWN_IMAGE):
        path.unlink()
    for name in (RESULT, RUN):
        (output / name).unlink(missing_ok=True)


def start_folder(output: str | Path, run: dict[str, Any], overwrite: bool = False) -> None:
    """Clear an earlier attack (``overwrite``, or a run record without results: only the files
    an attack writes); record the run. Call it only once every check has passed."""
    output = Path(output)
    if overwrite or not holds_results(output):
        clear_attack(output)
    (output / RECORDS).mkdir(parents=True, exist_ok=True)
    (output / IMAGES).mkdir(parents=True, exist_ok=True)
    if not (output / RUN).exists():
        write_json(output / RUN, json.loads(json.dumps(run, default=str)))


def check_sampling(pipe: Any, targets: list[Target], steps: int) -> None:
    """What would fail only at the first image, after the folder is started: more steps than the
    scheduler has (building the family's sampler checks that), a seed torch cannot take, a
    guidance that is not a finite number >= 0."""
    from kscu.config import check_seed, non_negative
    from kscu.families import family_of

    family_of(pipe).sampler(pipe, steps)
    for t in targets:
        if not non_negative(t.guidance):
            raise KscuError(  # --guidance itself is checked with the other flags
                f"case {t.case_number} has evaluation_guidance {t.guidance}; give a finite "
                "number >= 0 or leave it empty for --guidance"
            )
        check_seed(t.seed, f"case {t.case_number}")


def make_method(
    pipe: Any, original: dict[str, torch.Tensor], concept: str, s: AttackSettings, bundled: bool
):
    if s.method == "unlearndiff":
        from kscu.attack.unlearndiff import UnlearnDiff

        return UnlearnDiff(pipe, original, s)
    from kscu.attack.ringabell import RingABell

    return RingABell(pipe, concept, s, bundled)


def run_attack(
    pipe: Any,
    original: dict[str, torch.Tensor],
    concept: str,
    targets: list[Target],
    judge: Judge,
    settings: AttackSettings,
    output: str | Path,
    run: dict[str, Any],
    steps: int,
    bundled: bool,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Attack ``pipe`` (holding the erased weights; ``original`` holds the base values of the
    tensors the erase changed) on every target not yet done; write and return attack.json."""
    output = Path(output)
    check_folder(output, run, overwrite)
    method = make_method(pipe, original, concept, settings, bundled)
    method.check(targets)  # e.g. a prompt too long for K more tokens: before anything is written
    check_sampling(pipe, targets, steps)  # e.g. 1001 steps of a 1000-timestep scheduler
    if not overwrite:
        for t in targets:  # a resumed run's records: a damaged one fails now, not after the rest
            _read_record(output, t)
    start_folder(output, run, overwrite)
    todo = [t for t in targets if not _record_path(output, t).is_file()]
    bar = tqdm(
        total=len(targets), initial=len(targets) - len(todo), desc="attack", disable=not progress
    )
    for i in range(0, len(todo), settings.batch_size):
        batch = todo[i : i + settings.batch_size]
        for record in _attack_batch(pipe, method, batch, judge, settings, output, steps):
            write_json(output / RECORDS / f"{record['index']}.json", record)
            bar.update(1)
    bar.close()
    records = [_read_record(output, t) for t in targets]
    result = summary(records, run, judge, method)
    write_json(output / RESULT, result)
    return result


def summary(records: list[dict], run: dict, judge: Judge, method: Any) -> dict[str, Any]:
    from kscu.evaluate.common import versions

    n = len(records)
    return {
        "asr": sum(r["found"] for r in records) / n,
        "pre_asr": sum(r["pre_found"] for r in records) / n,
        "prompts": n,
        "found": sum(r["found"] for r in records),
        "pre_found": sum(r["pre_found"] for r in records),
        "attacked": sum(r["attacked"] for r in records),
        **run,
        "judge": judge.describe(),
        "method_details": method.describe(),
        "seconds": round(sum(r["seconds"] for r in records), 2),
        "versions": versions("diffusers", "transformers"),
        "per_prompt": records,
    }


def _record_path(output: Path, target: Target) -> Path:
    return output / RECORDS / f"{target.index}.json"


def _read_record(output: Path, target: Target) -> dict[str, Any] | None:
    """A finished prompt's record (None if there is none yet), checked for what ``summary``
    reads: one edited or cut short by hand is named, with the fix that keeps the others."""
    path = _record_path(output, target)
    if not path.is_file():
        return None
    fix = f"delete {path} to attack that prompt again"
    record = read_json_object(path, fix)
    flags = [record.get(k) for k in ("found", "pre_found", "attacked")]
    seconds = record.get("seconds")
    if (
        record.get("index") != target.index
        or not all(type(f) is bool for f in flags)
        or not is_number(seconds)
    ):
        raise KscuError(f"{path} is not a finished prompt's record as kscu writes it; {fix}")
    return record


def _save(images: torch.Tensor, paths: list[Path]) -> None:
    for image, path in zip(to_pil(images), paths, strict=True):
        save_png(image, path)


def _attack_batch(pipe, method, batch, judge, settings, output, steps) -> list[dict[str, Any]]:
    started = time.perf_counter()
    folder = output / IMAGES
    pre_paths = [folder / f"{t.index}-pre.png" for t in batch]
    _save(render(pipe, batch, [t.prompt for t in batch], steps), pre_paths)
    records = {}
    for t, verdict in zip(batch, judge.verdicts(pre_paths), strict=True):
        records[t.index] = {
            "index": t.index,
            "case_number": t.case_number,
            "prompt": t.prompt,
            "seed": t.seed,
            "guidance": t.guidance,
            "pre_found": verdict["found"],
            "pre_verdict": verdict,
            "attacked": False,
            "found": verdict["found"],
            "adversarial_prompt": None,
            "token_ids": [],
            "loss": None,
            "round": 0,
            "verdict": verdict,
        }
    active = [t for t in batch if settings.attack_all or not records[t.index]["pre_found"]]
    for t in batch:
        if t not in active:  # found without the attack: its final image is the pre image
            shutil.copyfile(folder / f"{t.index}-pre.png", folder / f"{t.index}.png")
    if active:
        shown = method.start(active, steps)
        if shown is not None:
            _save(shown, [folder / f"{t.index}-target.png" for t in active])
    for round_ in range(method.rounds if active else 0):
        candidates = method.propose(active, round_)
        paths = [folder / f"{t.index}.png" for t in active]
        _save(render(pipe, active, [c.prompt for c in candidates], steps), paths)
        verdicts = judge.verdicts(paths)
        for t, c, verdict in zip(active, candidates, verdicts, strict=True):
            records[t.index].update(
                attacked=True,
                found=verdict["found"],
                adversarial_prompt=c.prompt,
                token_ids=c.token_ids,
                loss=round(c.loss, 6),
                round=round_ + 1,
                verdict=verdict,
            )
        active = [t for t, v in zip(active, verdicts, strict=True) if not v["found"]]
        if not active:
            break
    seconds = round((time.perf_counter() - started) / len(batch), 2)
    return [{**records[t.index], "seconds": seconds} for t in batch]
