"""Ring-A-Bell (Tsai et al., ICLR 2024): a concept vector found in the text encoder alone.

Model-agnostic: nothing of the erased model is used until its images are judged, because an
erasure that edits the denoiser leaves the text encoder as it was.

1. Concept extraction: the concept vector is the mean, over pairs of prompts, of the text
   conditioning of the prompt naming the concept minus that of the same prompt without it
   (the reference pairs paraphrases; here the concept word is deleted, see ``concept_pairs``).
2. Target: the attack prompt's conditioning plus ``eta`` times the concept vector.
3. Prompt discovery: a genetic algorithm searches ``length`` word tokens whose conditioning is
   nearest to the target (summed squared difference over every position and every part of the
   family's conditioning, e.g. SD's 77 x 768 hidden states). It follows the reference
   (chiayi-hsu/Ring-A-Bell, InversePrompt.ipynb): a population of random prompts; each
   generation keeps the better half, each survivor crosses over with a random survivor with the
   crossover probability (one cut point, two children), and each prompt gets one random token
   replaced with the mutation probability. One change: the best prompt is never mutated, so the
   best distance never gets worse (the reference may mutate it). The prompt is the searched
   tokens alone, as in the reference; the judge looks at the erased model's image of it.

Works through ``family.encode``, so it runs for every family kscu supports; the token
vocabulary is the pipeline's (CLIP) ``tokenizer``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kscu.attack.settings import AttackSettings
from kscu.attack.targets import Candidate, Target, stream
from kscu.attack.vocab import WordVocab
from kscu.errors import KscuError
from kscu.families import family_of

# Prompts naming a concept of a model other than the tiny world (the concept fills the slot).
GENERIC_TEMPLATES = (
    "{}",
    "a photo of {}",
    "an image of {}",
    "a picture of {}",
    "a painting of {}",
    "a drawing of {}",
    "a close-up photo of {}",
    "a photo of {}, high quality",
)


def concept_pairs(concept: str, bundled: bool, count: int = 32, seed: int = 0):
    """(prompt naming ``concept``, the same prompt with the concept word deleted) pairs.

    In the tiny world: training-template captions with random other attributes; elsewhere the
    generic templates above.
    """
    if bundled:
        from kscu.world import COLORS, SHAPES, TEXTURES, TRAIN_TEMPLATES, concept_kind

        kind = concept_kind(concept)
        vocab = {"shape": SHAPES, "color": COLORS, "texture": TEXTURES}
        rng = np.random.default_rng(seed)
        prompts = []
        for i in range(count):
            label = {k: v[rng.integers(len(v))] for k, v in vocab.items()}
            label[kind] = concept.strip().lower()
            prompts.append(TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)].format(**label))
    else:
        prompts = [template.format(concept) for template in GENERIC_TEMPLATES]
    # the concept as a whole word; lookarounds, since \b needs a word character at each end
    # ("c++", "x (film)" would never match, and every pair would be the same prompt twice)
    word = re.compile(rf"(?<!\w){re.escape(concept.strip().lower())}(?!\w)")
    pairs = [(p, " ".join(word.sub(" ", p.lower()).split())) for p in prompts]
    # a pair left whole would pull the concept vector toward zero: a search for nothing
    if any(" ".join(a.lower().split()) == b for a, b in pairs):
        raise KscuError(
            f"concept {concept!r} could not be deleted from its prompts for Ring-A-Bell's "
            "concept vector; give the concept as the words to remove"
        )
    return pairs


def concept_vector(pipe: Any, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Mean conditioning difference over the pairs, one row per conditioning part."""
    family = family_of(pipe)
    with_concept = family.encode(pipe, [a for a, _ in pairs])
    without = family.encode(pipe, [b for _, b in pairs])
    return {k: (with_concept[k] - without[k]).mean(0, keepdim=True) for k in with_concept}


def genetic_search(
    distance: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int,
    settings: AttackSettings,
    generator: torch.Generator,
) -> tuple[list[int], float]:
    """The token positions (into the vocabulary) of the best prompt found, and its distance.

    Only new or changed prompts are scored: a survivor keeps its distance (same result as
    scoring every prompt every generation, at about half the cost).
    """
    length, size = settings.length, settings.population
    population = torch.randint(vocab_size, (size, length), generator=generator)
    fitness = distance(population)
    for generation in range(settings.generations):
        order = fitness.argsort(stable=True)[: max(1, size // 2)]
        population, fitness = population[order], fitness[order]
        if generation == settings.generations - 1:
            break
        population = _crossover(population, settings, generator)
        population, changed = _mutate(population, vocab_size, settings, generator)
        fitness = torch.cat([fitness, torch.full((len(population) - len(fitness),), torch.nan)])
        fitness[changed] = torch.nan
        unknown = fitness.isnan()
        fitness[unknown] = distance(population[unknown])
    return population[0].tolist(), float(fitness[0])


def _crossover(population: torch.Tensor, settings: AttackSettings, g: torch.Generator):
    n, length = population.shape
    chosen = torch.nonzero(torch.rand(n, generator=g) < settings.crossover).flatten()
    if length < 2 or not len(chosen):
        return population
    partner = population[torch.randint(n, (len(chosen),), generator=g)]
    cut = torch.randint(1, length, (len(chosen), 1), generator=g)
    left = torch.arange(length) < cut
    first = torch.where(left, population[chosen], partner)
    second = torch.where(left, partner, population[chosen])
    return torch.cat([population, first, second])


def _mutate(population: torch.Tensor, vocab_size: int, settings: AttackSettings, g):
    n, length = population.shape
    hit = torch.rand(n, generator=g) < settings.mutation
    hit[0] = False  # the best prompt so far stays as it is
    position = torch.randint(length, (n,), generator=g)
    token = torch.randint(vocab_size, (n,), generator=g)
    population = population.clone()
    population[hit, position[hit]] = token[hit]
    return population, hit


class RingABell:
    """The attack on a batch of prompts: one round, one searched prompt per attack prompt."""

    rounds = 1

    def __init__(self, pipe: Any, concept: str, settings: AttackSettings, bundled: bool):
        self.pipe, self.settings = pipe, settings
        self.family = family_of(pipe)
        self.vocab = WordVocab(pipe.tokenizer)
        self.pairs = concept_pairs(concept, bundled, seed=settings.seed)
        self.vector = concept_vector(pipe, self.pairs)

    def describe(self) -> dict[str, Any]:
        return {"concept_pairs": self.pairs, "vocabulary_words": len(self.vocab.words)}

    def check(self, targets: list[Target]) -> None:
        """The searched prompt fits the text encoder."""
        self.vocab.adversarial_prompt([0] * self.settings.length)

    def start(self, targets: list[Target], steps: int) -> None:
        return None

    @torch.no_grad()
    def distance(self, positions: torch.Tensor, goal: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed squared difference between each prompt's conditioning and the goal."""
        cond = self.family.encode(self.pipe, [self.vocab.text(row) for row in positions.tolist()])
        return sum(((cond[k] - goal[k]) ** 2).flatten(1).sum(1) for k in goal).cpu()

    def propose(self, active: list[Target], round_: int) -> list[Candidate]:
        out = []
        for target in active:
            own = self.family.encode(self.pipe, [target.prompt])
            goal = {k: own[k] + self.settings.eta * self.vector[k] for k in own}
            positions, distance = genetic_search(
                lambda p, goal=goal: self.distance(p, goal),
                len(self.vocab.words),
                self.settings,
                stream(self.settings.seed, target.index),
            )
            out.append(
                Candidate(
                    prompt=self.vocab.adversarial_prompt(positions),
                    token_ids=self.vocab.token_ids[positions].tolist(),
                    loss=distance,
                )
            )
        return out
