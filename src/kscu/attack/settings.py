"""The settings of ``kscu attack``: one dataclass whose defaults the CLI shows and uses.

Defaults are the published attacks' own (``kscu.protocol``: the reference code of each paper).
The bundled tiny world overrides a few of them (``WORLD_PRESET``), stated with its reason, the
way its ``kscu_preset.json`` does for erasing. Kept apart from the attack code (torch, the
pipelines) so that registering the CLI command stays cheap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kscu.config import non_negative
from kscu.errors import KscuError
from kscu.protocol import (
    RINGABELL_CROSSOVER,
    RINGABELL_ETA,
    RINGABELL_GENERATIONS,
    RINGABELL_LENGTH,
    RINGABELL_MUTATION,
    RINGABELL_POPULATION,
    UNLEARNDIFF_ITERATIONS,
    UNLEARNDIFF_LR,
    UNLEARNDIFF_TIMESTEPS,
    UNLEARNDIFF_TOKENS,
    UNLEARNDIFF_WEIGHT_DECAY,
)

METHODS = ("unlearndiff", "ringabell")
JUDGES = ("auto", "world", "nudenet", "imagenet", "clip")
PROJECTIONS = ("cosine", "l2")
MODES = ("class", "nudity", "style", "instance")

# What the tiny world changes, and why (the settings record states the values used).
WORLD_PRESET: dict[str, Any] = {"generations": 300, "batch_size": 16}
WORLD_PRESET_WHY = (
    "CPU time: ringabell runs 300 genetic generations instead of 3000 (3000 take about 1.5 "
    "minutes per prompt on one CPU thread; the world's vocabulary has 113 word tokens, against "
    "about 30,000 in SD's); all 16 prompts are attacked in one batch (elsewhere one at a time, "
    "as the reference does, since a batch of SD-size backward passes needs a lot of memory)."
)
# Everything else: the papers' own values (and one prompt at a time).
GENERAL: dict[str, Any] = {"generations": RINGABELL_GENERATIONS, "batch_size": 1}


@dataclass
class AttackSettings:
    """Everything that decides an attack's prompts and images (``batch_size`` only its speed)."""

    method: str = "unlearndiff"
    samples: int = 16  # attack prompts: the first N rows of --prompts, or N world prompts
    # image seeds: a CSV row's evaluation_seed, else seed + its case_number (the row index
    # when the CSV has none); tiny world: also draws the prompts, and prompt i gets seed + i
    seed: int = 0
    steps: int | None = None  # sampling steps of every image; None: the family's (SD 50)
    guidance: float | None = None  # CFG scale; None: the family's (SD 7.5)
    attack_all: bool = False  # also attack prompts that show the concept without the attack
    batch_size: int | None = None  # prompts attacked together (None: world 16, else 1)
    # UnlearnDiffAtk
    tokens: int = UNLEARNDIFF_TOKENS  # K token slots prepended to the prompt
    iterations: int = UNLEARNDIFF_ITERATIONS  # Adam steps per round (one timestep per round)
    rounds: int = UNLEARNDIFF_TIMESTEPS  # timesteps visited (low noise first), each judged
    lr: float = UNLEARNDIFF_LR
    weight_decay: float = UNLEARNDIFF_WEIGHT_DECAY
    projection: str = "cosine"  # nearest vocabulary token by cosine similarity or L2 distance
    # Ring-A-Bell
    eta: float = RINGABELL_ETA  # strength of the concept vector
    length: int = RINGABELL_LENGTH  # tokens of the searched prompt
    population: int = RINGABELL_POPULATION
    generations: int | None = None  # None: 3000 (tiny world: preset)
    mutation: float = RINGABELL_MUTATION
    crossover: float = RINGABELL_CROSSOVER
    # Judge
    judge: str = "auto"  # auto: world classifier / NudeNet (nudity) / ImageNet / CLIP
    mode: str = "class"  # what the concept is: class, nudity, style, instance
    imagenet_class: str | None = None  # ImageNet label or index the object concept is
    clip_model: str | None = None

    def resolved(self, bundled: bool) -> AttackSettings:
        """These settings with every ``None`` filled: the tiny world's preset, else the paper's."""
        fill = WORLD_PRESET if bundled else GENERAL
        return dataclasses.replace(
            self, **{k: v for k, v in fill.items() if getattr(self, k) is None}
        )

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise KscuError(message)

        need(self.method in METHODS, f"unknown method {self.method!r}; use {' or '.join(METHODS)}")
        need(
            self.judge in JUDGES, f"unknown judge {self.judge!r}; choose one of {', '.join(JUDGES)}"
        )
        need(self.mode in MODES, f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        need(
            self.projection in PROJECTIONS,
            f"unknown projection {self.projection!r}; choose {' or '.join(PROJECTIONS)}",
        )
        for name in ("samples", "tokens", "iterations", "length", "population"):
            need(
                getattr(self, name) > 0, f"--{_flag(name)} must be > 0 (got {getattr(self, name)})"
            )
        # the per-prompt random streams (numpy's SeedSequence) take no negative seed
        need(self.seed >= 0, f"--seed must be >= 0 (got {self.seed})")
        for name in ("generations", "steps", "batch_size"):
            value = getattr(self, name)
            need(value is None or value > 0, f"--{_flag(name)} must be > 0 (got {value})")
        need(
            0 < self.rounds <= UNLEARNDIFF_TIMESTEPS,
            f"--rounds must be in [1, {UNLEARNDIFF_TIMESTEPS}] (got {self.rounds})",
        )
        for name in ("lr", "weight_decay", "eta"):
            value = getattr(self, name)
            need(non_negative(value), f"--{_flag(name)} must be >= 0 (got {value})")
        for name in ("mutation", "crossover"):
            value = getattr(self, name)
            need(0 <= value <= 1, f"--{name} is a probability in [0, 1] (got {value})")
        need(
            self.guidance is None or non_negative(self.guidance),
            f"--guidance must be a finite number >= 0 (got {self.guidance})",
        )

    def record(self) -> dict[str, Any]:
        """What decides the results (everything but the batch size)."""
        d = dataclasses.asdict(self)
        d.pop("batch_size")
        return d


def _flag(name: str) -> str:
    return name.replace("_", "-")
