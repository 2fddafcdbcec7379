"""Concept sensitivity analysis: the commitment curve of a concept and the start step it implies.

Procedure (see ``kscu.analyze.core`` for the curve): for ``samples`` seeded noises, generate with
the concept prompt and switch to the neutral prompt (default "") at step s, and the reverse, for
every s; score the concept's presence in each final image; the commitment C(s) in [0, 1] says how
much of the concept is already decided when x_s is reached.

Rule for the recommended start step, from the paper's logic: KSCU trains on the steps [S, N), and
the steps before S should be the ones where conditioning on the concept has not yet committed the
image to it, so editing them buys little erasure and costs image structure (the paper's ablation:
training only the first 30% of steps collapsed structure; the last 70% gave about 95% of the
erasure of all steps). So S is the last step whose commitment is at most ``threshold`` (0.1):
[S, N) is the shortest run of final steps that decides at least 90% of the concept. The rule reads
the isotonic (non-decreasing) fit of the curve, so one noisy bump cannot move S, and S is clamped
to [0, ceil(0.9 N) - 1], the Key Step Table's own cap. With several concepts S is the minimum over
them (the key step table walks the same [S, N) for every concept, so it must cover the concept
decided earliest); that equals the rule applied to the pointwise maximum of their curves. When
the scorer cannot tell concept-only from neutral-only images (contrast below ``min_contrast``),
the curve means nothing and the mode's fixed default is kept, and said so.

Measurements are cached on disk per (model, weights fingerprint, concept, settings, scorer), the
rule is applied afresh, so changing the threshold costs nothing. Cache folder: ``cache_dir``, else
``$KSCU_CACHE/analyze``, else ``$XDG_CACHE_HOME/kscu/analyze`` (``~/.cache/kscu/analyze``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kscu
from kscu.allocator import host_memory
from kscu.analyze.core import (
    EpsFn,
    GuidedStepper,
    commitment_curve,
    start_from_curve,
    switch_finals,
    to_all_steps,
)
from kscu.analyze.scorers import Scorer, is_world_model, make_scorer
from kscu.analyze.settings import AnalyzeSettings, cap_for
from kscu.config import MODE_DEFAULTS, parse_concepts
from kscu.errors import KscuError
from kscu.families import FAMILIES
from kscu.fileio import is_number, write_json

VERSION = 1  # of the measurement procedure: a change makes old cache entries miss


def task_defaults(family: Any) -> dict[str, int]:
    """The fixed start step of every mode for this family (SD: 14/14/24/40 of 50)."""
    return {
        mode: family.mode_defaults.get(mode, {}).get("start_step", row["start_step"])
        for mode, row in MODE_DEFAULTS.items()
    }


DECODE_BATCH = 16


def default_cache_dir() -> Path:
    if os.environ.get("KSCU_CACHE"):
        return Path(os.environ["KSCU_CACHE"]).expanduser() / "analyze"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kscu" / "analyze"


def check_cache_dir(
    folder: str | Path | None = None, fix: str = "set KSCU_CACHE to a writable folder"
) -> Path:
    """The cache folder (``folder``, else the default), refused at once if it cannot be written:
    a measurement takes minutes, and its cache entry is written only at its end. Returns it."""
    from kscu.fileio import check_writable

    path = Path(folder) if folder is not None else default_cache_dir()
    try:
        check_writable(path, flag="the analysis cache")
    except KscuError as e:
        problem = str(e).split(";")[0]  # what is wrong, without check_writable's fix
        if folder is not None:
            source, fix = "the cache_dir given", "give another cache_dir"
        elif os.environ.get("KSCU_CACHE"):
            source = "from $KSCU_CACHE"
        else:
            source = "the default: $KSCU_CACHE is not set"
        raise KscuError(f"{problem} ({source}); {fix}") from None
    return path


def check_steps(model_id: str | None, family: Any, settings: AnalyzeSettings) -> None:
    """More sampling steps than the model's scheduler has, or too large a resolution, refused
    before the scorer and the model load (``kscu.memory.check_sampler``)."""
    from kscu.memory import check_sampler

    check_sampler(model_id, family, settings.num_steps, settings.resolution, settings.guidance)


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor, sampler: Any = None) -> torch.Tensor:
    """Images (N,3,H,W) in [0, 1] on the CPU, decoded a few at a time by the family's sampler."""
    from kscu.families import family_of

    sampler = sampler or family_of(pipe).sampler(pipe, 1)
    out = [
        sampler.decode(pipe, latents[i : i + DECODE_BATCH])
        for i in range(0, len(latents), DECODE_BATCH)
    ]
    return torch.cat(out)


@torch.inference_mode()  # no_grad without autograd's bookkeeping: the same values, less time
def measure(
    pipe: Any,
    concept: str,
    settings: AnalyzeSettings,
    scorer: Scorer,
    eps: EpsFn | None = None,
    decode=None,
    progress: bool = False,
) -> dict[str, Any]:
    """Presence of ``concept`` in every switch image, averaged over the samples.

    ``eps`` and ``decode`` default to the pipeline's UNet and VAE; tests pass stand-ins.
    """
    from kscu.families import family_of

    started = time.perf_counter()
    family = family_of(pipe)
    sampler = family.sampler(
        pipe, settings.num_steps, settings.resolution, guidance=settings.guidance
    )
    net = family.denoiser(pipe)
    prompts = {
        p: None if p == "" else family.encode(pipe, [p]) for p in {concept, settings.neutral}
    }
    if eps is None:
        sampler.replay(net, net.dtype)  # where exact (kscu.tracing): the same values, faster

        def raw(x, s, cond):
            return sampler.raw(net, x, s, cond)
    else:  # a stand-in noise prediction (tests): eps(x, t, text embeddings)

        def raw(x, s, cond):
            return eps(x, sampler.timesteps[s], cond["encoder_hidden_states"])

    uncond = family.encode(pipe, [""])
    stepper = GuidedStepper(sampler, raw, settings.guidance, uncond, settings.batch_size)
    noise = torch.cat([sampler.noise(settings.seed + i) for i in range(settings.samples)])
    steps = settings.measured_steps()
    with host_memory(True, net.device):  # a CPU keeps freed blocks for the next step's buffers
        finals = switch_finals(
            stepper, noise, prompts[concept], prompts[settings.neutral], steps, progress
        )
        k, n = len(finals.starts), settings.samples
        latents = torch.cat(
            [
                finals.forward.flatten(0, 1),
                finals.reverse.flatten(0, 1),
                finals.concept,
                finals.neutral,
            ]
        )
        images = (decode or (lambda z: decode_latents(pipe, z, sampler)))(latents)
    scores = torch.cat(
        [
            scorer.presence(images[i : i + 256], concept).float().cpu()
            for i in range(0, len(images), 256)
        ]
    )
    fwd, rev = scores[: k * n].view(k, n).mean(1), scores[k * n : 2 * k * n].view(k, n).mean(1)
    p_concept = float(scores[2 * k * n : 2 * k * n + n].mean())
    p_neutral = float(scores[2 * k * n + n :].mean())
    by_start = {s: i for i, s in enumerate(finals.starts)}
    # s = 0: forward is the neutral-only image, reverse the concept-only one
    forward = [p_neutral if s == 0 else float(fwd[by_start[s]]) for s in steps]
    reverse = [p_concept if s == 0 else float(rev[by_start[s]]) for s in steps]
    return {
        "concept": concept,
        "measured_steps": steps,
        "forward_presence": forward,
        "reverse_presence": reverse,
        "presence_concept": p_concept,
        "presence_neutral": p_neutral,
        "seconds": round(time.perf_counter() - started, 3),
    }


def summarize(m: dict[str, Any], settings: AnalyzeSettings) -> dict[str, Any]:
    """The curve and the per-concept start step from one measurement."""
    settings = settings.for_family(FAMILIES["sd"])  # steps/guidance if unset: SD's
    n = settings.num_steps
    steps = m["measured_steps"]
    p_c, p_n = m["presence_concept"], m["presence_neutral"]
    fwd, rev = np.array(m["forward_presence"]), np.array(m["reverse_presence"])
    contrast = p_c - p_n
    denom = max(contrast, settings.min_contrast, 1e-6)
    measured = commitment_curve(fwd, rev, p_c, p_n, max(settings.min_contrast, 1e-6))
    curve = to_all_steps(steps, measured, n)
    f = to_all_steps(steps, (fwd - p_n) / denom, n)
    r_complement = to_all_steps(steps, 1 - (rev - p_n) / denom, n)
    reliable = contrast >= settings.min_contrast
    return {
        **m,
        "curve": _round(curve),
        "forward": _round(f),  # F(s): share of the concept surviving a switch to neutral at s
        "reverse_complement": _round(r_complement),  # 1 - R(s): share no longer addable at s
        "contrast": round(contrast, 6),
        "reliable": bool(reliable),
        "recommended_start_step": start_from_curve(curve, settings.threshold, cap_for(n)),
    }


def rule_text(settings: AnalyzeSettings, several: bool) -> str:
    t, n = settings.threshold, settings.num_steps
    text = (
        f"S = the last step index whose commitment (the curve made non-decreasing by isotonic "
        f"regression, with 1 after step {n - 1}) is at most {t:g}: the steps before S together "
        f"commit at most {t:.0%} of the concept, so [S, {n}) is the shortest run of final steps "
        f"that decides at least {1 - t:.0%} of it; clamped to [0, {cap_for(n)}]"
    )
    if several:
        text += "; with several concepts, the earliest S over them (pointwise max of curves)"
    return text


def combine(
    per: dict[str, dict[str, Any]], mode: str, settings: AnalyzeSettings, family: Any = None
) -> dict[str, Any]:
    """One recommendation for all concepts: the minimum over those the scorer could see."""
    family = family or FAMILIES["sd"]
    settings = settings.for_family(family)
    n = settings.num_steps
    seen = [c for c, r in per.items() if r["reliable"]]
    curves = np.array([per[c]["curve"] for c in (seen or list(per))])
    curve = curves.max(axis=0)
    defaults = task_defaults(family)
    table = defaults.get(mode, defaults["class"])  # a step of the family's own step count
    default = min(table, cap_for(n))  # what the table can start at over n steps
    kept = f"{table}" if default == table else f"{table}, clamped to {default} for {n} steps,"
    if seen:
        start = start_from_curve(curve, settings.threshold, cap_for(n))
        rule = rule_text(settings, len(per) > 1)
        if len(seen) < len(per):
            rule += f"; ignored (scorer could not see them): {sorted(set(per) - set(seen))}"
    else:
        start = default
        rule = (
            f"fallback: the scorer's presence differs by less than {settings.min_contrast:g} "
            f"between concept-only and neutral-only images, so the curve is not informative; "
            f"the {mode} default start step {kept} is kept"
        )
    steps = settings.measured_steps()
    return {
        "curve": _round(curve),
        "recommended_start_step": int(start),
        "rule": rule,
        "rule_parameters": {
            "threshold": settings.threshold,
            "max_start_step": cap_for(n),
            "min_contrast": settings.min_contrast,
            "combine": "min over concepts",
        },
        "reliable": bool(seen),
        "mode": mode,
        "mode_default_start_step": default,
        "task_defaults": defaults,
        "measured_steps": steps,
        "interpolated": len(steps) < n,
        "interpolation": (
            "linear between measured steps, anchored at 1 after the last step"
            if len(steps) < n
            else None
        ),
    }


def _round(values) -> list[float]:
    return [round(float(v), 6) for v in values]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "concept"


def model_key(model_id: str | None) -> str:
    """A stable name for the model: the resolved folder for a local one, else the hub id."""
    if model_id is None:
        from kscu.models import default_model

        model_id = default_model()
    path = Path(model_id).expanduser()
    return str(path.resolve()) if path.exists() else str(model_id)


def analyze(
    pipe: Any,
    model_id: str | None,
    concepts: list[str] | str,
    mode: str,
    settings: AnalyzeSettings | None = None,
    scorer: Scorer | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
    eps: EpsFn | None = None,
    decode=None,
) -> dict[str, Any]:
    """Measure (or read from the cache) every concept, and combine: the ``analyze.json`` body."""
    from kscu.checkpoint import fingerprint
    from kscu.families import family_of

    started = time.perf_counter()
    family = family_of(pipe)
    settings = (settings or AnalyzeSettings()).for_family(family)
    settings.validate()
    # more steps than the scheduler has: one line now, not after the cache key's fingerprint
    family.sampler(pipe, settings.num_steps, settings.resolution, guidance=settings.guidance)
    concepts = parse_concepts(concepts)
    if mode not in MODE_DEFAULTS:
        raise KscuError(f"unknown mode {mode!r}; choose one of {', '.join(MODE_DEFAULTS)}")
    folder = check_cache_dir(cache_dir) if use_cache else Path(cache_dir or default_cache_dir())
    if scorer is None:
        scorer = make_scorer("auto", model_id, mode, settings.neutral, None, pipe.device)
    for c in concepts:
        scorer.check(c)
    base = {
        "version": VERSION,
        "model": model_key(model_id) if eps is None else "custom-eps",
        "weights": fingerprint(dict(family.denoiser(pipe).named_parameters())),
        "settings": settings.measurement_key(),
        "scorer": scorer.describe(),
    }
    per, cached = {}, []
    for c in concepts:
        key = json.dumps({**base, "concept": c}, sort_keys=True)
        path = folder / f"{_slug(c)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        m = _read_cache(path, key) if use_cache else None
        if m is None:
            m = measure(pipe, c, settings, scorer, eps=eps, decode=decode, progress=progress)
            if use_cache:
                write_json(path, {"key": json.loads(key), "measurement": m})
        else:
            cached.append(c)
        per[c] = summarize(m, settings)
    return {
        "kscu_version": kscu.__version__,
        "model": model_id if model_id is not None else "kscu-tiny-world",
        "concepts": concepts,
        **combine(per, mode, settings, family),
        "per_concept": per,
        "settings": dataclasses.asdict(settings),
        "scorer": scorer.describe(),
        "cached": cached,
        "cache_dir": str(folder) if use_cache else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The stored measurement if ``path`` holds one for exactly ``key`` (else recompute)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or json.dumps(data.get("key"), sort_keys=True) != key:
        return None
    measurement = data.get("measurement")
    return measurement if _whole_measurement(measurement) else None


def _whole_measurement(m: Any) -> bool:
    """A measurement as ``measure`` writes it; one edited or damaged by hand (a traceback in
    ``summarize`` before) is measured again instead, as an unreadable cache file is."""
    if not isinstance(m, dict):
        return False
    lists = [m.get(k) for k in ("measured_steps", "forward_presence", "reverse_presence")]
    if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1:
        return False
    steps, fwd, rev = lists
    numbers = [*fwd, *rev, m.get("presence_concept"), m.get("presence_neutral")]
    return all(is_number(x) for x in numbers) and all(type(s) is int for s in steps)


def auto_start_step(
    pipe: Any,
    model_id: str | None,
    concepts: list[str] | str,
    mode: str,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    settings: AnalyzeSettings | None = None,
    scorer: Scorer | None = None,
    progress: bool = False,
    num_steps: int | None = None,
    resolution: int | None = None,
) -> dict[str, Any]:
    """For ``kscu erase --start-step auto``: the analysis (cached), as ``analyze`` returns it.

    ``result["recommended_start_step"]`` is the start step; record the whole dict (it holds the
    curve and the rule). Call it on the original weights, before the erase edits them.
    """
    settings = dataclasses.replace(settings or AnalyzeSettings(), seed=seed)
    if num_steps is not None:
        settings.num_steps = num_steps
    if resolution is not None:
        settings.resolution = resolution
    return analyze(pipe, model_id, concepts, mode, settings, scorer, cache_dir, progress=progress)


__all__ = [
    "AnalyzeSettings",
    "analyze",
    "auto_start_step",
    "check_cache_dir",
    "check_steps",
    "default_cache_dir",
    "is_world_model",
    "measure",
    "summarize",
]
