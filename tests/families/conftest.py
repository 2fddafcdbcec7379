"""Tiny SDXL, FLUX.1-dev and FLUX.1-schnell pipelines for the family tests, and shared checks.

Pipelines are built once per session and handed out as fresh copies (an erase edits in place);
saved model folders and small erase runs are made once, on first use, as a user's ``--model``
and ``--weights`` would be. The checks that read the same for every family (trajectory reuse,
scope, seeds, save/load, refusals, the loss by hand) are fixtures here, so each family's test
file states only the family's own facts and settings.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_families import build_tiny_flux_pipeline, build_tiny_sdxl_pipeline, save_pipeline

from kscu.checkpoint import load_erased
from kscu.config import EraseConfig, resolve
from kscu.errors import KscuError
from kscu.families import family_of
from kscu.models import load_pipeline
from kscu.runner import erase_to_folder
from kscu.trainer import erase

BUILDERS = {
    "sdxl": build_tiny_sdxl_pipeline,
    "flux": build_tiny_flux_pipeline,  # FLUX.1-dev: guidance embedding
    "schnell": functools.partial(build_tiny_flux_pipeline, guidance_embeds=False),
}
# Seconds per erase: FLUX at 32 px (4 image tokens) with 16 T5 tokens, SDXL at 32 px.
FAST = {
    "sdxl": dict(num_steps=6, start_step=3, resolution=32),
    "flux": dict(num_steps=6, start_step=3, resolution=32, max_sequence_length=16),
    "schnell": dict(num_steps=4, start_step=1, resolution=32, max_sequence_length=16),
}


@pytest.fixture(scope="session")
def template():
    """``template(variant)``: the session's one built pipeline of that variant (do not edit)."""
    return functools.cache(lambda variant: BUILDERS[variant]())


@pytest.fixture
def sdxl_pipe(template):
    return copy.deepcopy(template("sdxl"))


@pytest.fixture
def flux_pipe(template):
    return copy.deepcopy(template("flux"))


@pytest.fixture
def schnell_pipe(template):
    return copy.deepcopy(template("schnell"))


@pytest.fixture(scope="session")
def model_dir(template, tmp_path_factory):
    """``model_dir(variant)``: the variant saved as a diffusers folder (safetensors)."""
    root = tmp_path_factory.mktemp("family-models")

    @functools.cache
    def saved(variant: str) -> Path:
        return save_pipeline(template(variant), root / variant)

    return saved


@pytest.fixture(scope="session")
def run_dir(model_dir, tiny_model_dir, tmp_path_factory):
    """``run_dir(variant)``: a 3-iteration erase of "church" from the saved folder ("sd": the
    SD tiny pipeline's), as ``kscu erase --output`` writes it."""
    root = tmp_path_factory.mktemp("family-runs")
    folders = {"sd": tiny_model_dir}

    @functools.cache
    def run(variant: str) -> Path:
        settings = FAST.get(variant, dict(num_steps=6, start_step=2))
        cfg = EraseConfig(concepts=["church"], iterations=3, lr=1e-3, **settings)
        model = folders.get(variant) or model_dir(variant)
        erase_to_folder(cfg, str(model), root / variant, progress=False)
        return root / variant

    return run


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def erase_logged(pipe, cfg: EraseConfig):
    """The erase's result and, per iteration, its entry, x_s, loss and the denoiser's
    parameters after that iteration's Adam step."""
    seen = []
    net = family_of(pipe).denoiser(pipe)

    def callback(i, entry, x, loss):
        seen.append({"entry": entry, "x": x.clone(), "loss": loss, "after": snapshot(net)})

    return erase(pipe, cfg, progress=False, callback=callback), seen


class Walk:
    """A prompt's guided trajectory walked from noise with the family's own sampler, outside the
    erase loop: what the loop's reused x_s must equal."""

    def __init__(self, pipe, cfg: EraseConfig, prompt: str):
        family = family_of(pipe)
        self.sampler = family.sampler(
            pipe, cfg.num_steps, cfg.resolution, guidance=cfg.trajectory_guidance
        )
        self.cond = family.encode(pipe, [prompt], cfg.max_sequence_length)
        self.uncond = family.encode(pipe, [""], cfg.max_sequence_length)
        self.guidance = cfg.trajectory_guidance
        net = family.denoiser(pipe)
        self.raw = lambda x, s, c: self.sampler.raw(net, x, s, c)

    @torch.no_grad()
    def run(self, seed: int, stop: int) -> torch.Tensor:
        x = self.sampler.noise(seed)
        for s in range(stop):
            x = self.sampler.guided_step(self.raw, x, s, self.cond, self.uncond, self.guidance)
        return x


@pytest.fixture
def check_reuse():
    """``check_reuse(pipe, cfg)`` with num_steps 6, start 3: lr = 0, so x_s advanced one step
    per iteration (trajectory reuse) must equal x_s walked from the seeded noise, bit for bit."""

    def check(pipe, cfg: EraseConfig) -> None:
        cfg = resolve(replace(cfg, lr=0.0, iterations=5), family=family_of(pipe))
        _, seen = erase_logged(pipe, cfg)
        assert [e["entry"][1] for e in seen] == [3, 4, 5, 3, 4]
        walk = Walk(pipe, cfg, cfg.concepts[0])
        for i, e in enumerate(seen):
            start = 0 if i < 3 else 3  # iteration 3 wraps to step 3: fresh noise, seed + 3
            assert torch.equal(e["x"], walk.run(cfg.seed + start, e["entry"][1])), i

    return check


@pytest.fixture
def changed_by_erase():
    """``changed_by_erase(pipe, cfg)``: names of the denoiser's parameters the erase moved."""

    def changed(pipe, cfg: EraseConfig) -> set[str]:
        net = family_of(pipe).denoiser(pipe)
        before = snapshot(net)
        erase(pipe, cfg, progress=False)
        after = snapshot(net)
        return {n for n in before if not torch.equal(before[n], after[n])}

    return changed


@pytest.fixture
def check_same_seed():
    """``check_same_seed(pipe, cfg)``: two erases with one seed give identical weights and
    losses; another seed gives other weights."""

    def check(pipe, cfg: EraseConfig) -> None:
        first, again = (erase(copy.deepcopy(pipe), cfg, progress=False) for _ in range(2))
        other = erase(copy.deepcopy(pipe), replace(cfg, seed=cfg.seed + 1), progress=False)
        assert all(torch.equal(first.tensors[n], again.tensors[n]) for n in first.tensors)
        assert first.losses == again.losses
        assert not all(torch.equal(first.tensors[n], other.tensors[n]) for n in first.tensors)

    return check


@pytest.fixture
def check_save_load(model_dir, tmp_path):
    """``check_save_load(variant, cfg, outputs)``: erase from the saved folder with
    ``erase_to_folder``, then ``load_pipeline`` the folder again and ``load_erased`` the run:
    ``outputs(pipe)`` (the denoiser on fixed inputs) must equal the erased pipeline's to the
    bit, and differ from the base's. Returns the run's kscu.json."""

    def check(variant: str, cfg: EraseConfig, outputs) -> dict:
        model = str(model_dir(variant))
        _, edited = erase_to_folder(cfg, model, tmp_path / "run", progress=False)
        base = load_pipeline(model)
        original = outputs(base)
        meta = load_erased(base, tmp_path / "run")
        loaded, want = outputs(base), outputs(edited)
        assert not torch.equal(loaded, original)
        assert torch.equal(loaded, want), (loaded - want).abs().max()
        return meta

    return check


@pytest.fixture
def refused():
    """``refused(pipe, run)``: load_erased refuses the run with a one-line KscuError and leaves
    the pipeline's denoiser as it was; returns the message."""

    def check(pipe, run: Path) -> str:
        net = family_of(pipe).denoiser(pipe)
        before = snapshot(net)
        with pytest.raises(KscuError) as err:
            load_erased(pipe, run)
        after = snapshot(net)
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert "\n" not in str(err.value)
        return str(err.value)

    return check


def objective(p, n, e, u, lambda1: float, eta: float = 1.0, lambda2: float = 1e-4):
    """KSCU_METHOD.md section 2 written out: MSE(e, n - eta (p - n)) + l2 MSE(u, n - l1 (p - n))."""
    erase_term = ((e - (n - eta * (p - n))) ** 2).mean()
    leak_term = ((u - (n - lambda1 * (p - n))) ** 2).mean()
    return erase_term + lambda2 * leak_term


@pytest.fixture
def hand_loss():
    return objective


@pytest.fixture
def loss_by_hand():
    """``loss_by_hand(pipe, cfg, predict, lambda1)``: the loop's loss at iteration 1 and the same
    loss from predictions made by hand: p, n by the original weights, e, u by the weights after
    the first Adam step, at the loop's own x_s. ``predict(pipe, x, s, prompt)`` is the family's
    denoiser call written against the diffusers pipeline; ``lambda1(s)`` the family's weight."""

    def check(pipe, cfg: EraseConfig, predict, lambda1) -> tuple[float, float]:
        base = copy.deepcopy(pipe)
        _, seen = erase_logged(pipe, cfg)
        edited = copy.deepcopy(base)
        family_of(edited).denoiser(edited).load_state_dict(seen[0]["after"], strict=False)
        (concept, s), x = seen[1]["entry"], seen[1]["x"]
        with torch.no_grad():
            p, n = predict(base, x, s, concept), predict(base, x, s, "")
            e, u = predict(edited, x, s, concept), predict(edited, x, s, "")
        stale = objective(p, n, p, n, lambda1(s)).item()  # e, u of the original weights
        assert stale != pytest.approx(seen[1]["loss"], rel=1e-3), "the first step changed nothing"
        return seen[1]["loss"], objective(p, n, e, u, lambda1(s)).item()

    return check
