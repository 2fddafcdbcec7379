"""UnlearnDiffAtk (Zhang et al., ECCV 2024): the erased model as its own classifier.

A diffusion model denoises an image best when the prompt describes it. So, to make an erased
model draw the concept again, take an image of the concept made by the *original* model from the
attack prompt (its latent x0), and search for K tokens which, prepended to the prompt, minimise
the *erased* model's denoising loss on noised copies of that image,

    min over slots   E_eps || eps_erased(x_t, t, text(slots + prompt)) - eps ||^2,
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

No classifier or second model is involved: the loss is the erased model's own. Then the erased
model generates from the adversarial prompt and the judge looks at the image.

As the reference code (OPTML-Group/Diffusion-MU-Attack) runs it, and the defaults here:
K = 5 slots prepended after the start token; rounds over the timesteps from low noise to high,
one timestep per round (the reference visits 50, t = 10, 30, ..., 990; here the 50 timesteps of
SD's DDIM grid, t = 1, 21, ..., 981, or ``rounds`` of them spread over the whole range); 40 Adam
steps per round (lr 0.01, weight decay 0.1), a fresh noise draw each step; after each round the
slots are projected to real tokens, the erased model generates from that prompt with the
prompt's seed, and the attack stops at the first image the judge flags.

Parametrisation (what the issue asks for, and where it differs from the reference): each slot is
a continuous vector in the text encoder's token-embedding space, initialised from a random
vocabulary word. It is projected to its nearest vocabulary word (cosine similarity, or L2) at
*every* step: the forward pass sees the projected word's embedding, and the gradient updates the
continuous vector straight through (as in PEZ, Wen et al. 2023), so the loss is always that of a
real prompt. The reference instead keeps a probability vector over the vocabulary per slot,
samples one token from it per step (straight-through) and takes the argmax after each round.
Slots are restricted to whole-word tokens that round-trip (``kscu.attack.vocab``). The networks
stay frozen; gradients reach only the slots, through the text encoder's own forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from kscu.attack.settings import AttackSettings
from kscu.attack.targets import Candidate, Target, render, stream
from kscu.attack.vocab import WordVocab
from kscu.errors import KscuError
from kscu.families import family_of
from kscu.families.sd import _token_ids
from kscu.protocol import UNLEARNDIFF_TIMESTEPS


def encode_with_slots(text_encoder: nn.Module, ids: torch.Tensor, slots: torch.Tensor):
    """Last hidden states of ``ids`` (N, L) with positions 1..K taken from ``slots`` (N, K, d).

    A hook on the token-embedding layer splices the slots in, so the rest of the forward pass
    (position embeddings, causal mask, final layer norm) is the text encoder's own: with the
    slots equal to the ids' own embeddings it returns exactly what the family's ``encode`` does.
    """
    k = slots.shape[1]

    def splice(module, args, out):
        return torch.cat([out[:, :1], slots.to(out.dtype), out[:, 1 + k :]], dim=1)

    handle = text_encoder.get_input_embeddings().register_forward_hook(splice)
    try:
        return text_encoder(ids.to(text_encoder.device))[0].float()
    finally:
        handle.remove()


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """No gradients into the networks' weights while attacking; their flags restored after."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def swapped(net: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """``net`` with ``tensors`` (e.g. the original weights) in place of its own, then its own."""
    params = dict(net.named_parameters())
    own = {k: params[k].detach().clone() for k in tensors}
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in own.items():
                params[k].copy_(v)


@torch.no_grad()
def image_latents(pipe: Any, images: torch.Tensor) -> torch.Tensor:
    """The VAE latent (posterior mean, scaled) of images in [0, 1]: the attack's x0."""
    vae = pipe.vae
    posterior = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist
    return posterior.mean.float() * vae.config.scaling_factor


def timestep_schedule(rounds: int, grid: int = UNLEARNDIFF_TIMESTEPS) -> list[int]:
    """Step indices of the rounds: ``rounds`` of the ``grid`` timesteps, low noise first.

    With all 50 rounds every timestep of the grid in turn (t = 1, 21, ..., 981 for SD's DDIM);
    with fewer, the midpoints of equal parts of the range (10 rounds: t = 41, 141, ..., 941).
    """
    return [grid - 1 - int((r + 0.5) * grid / rounds) for r in range(rounds)]


class UnlearnDiff:
    """The attack on one batch of prompts: ``start`` once, then ``propose`` once per round."""

    def __init__(self, pipe: Any, original: dict[str, torch.Tensor], settings: AttackSettings):
        family = family_of(pipe)
        if family.name != "sd":
            raise KscuError(
                f"--method unlearndiff supports Stable Diffusion 1.x/2.x models for now (this "
                f"model is {family.name}); use --method ringabell"
            )
        self.pipe, self.family, self.settings = pipe, family, settings
        self.net = family.denoiser(pipe)
        self.original = original
        self.vocab = WordVocab(pipe.tokenizer, pipe.text_encoder)
        self.grid = family.sampler(pipe, UNLEARNDIFF_TIMESTEPS)
        self.schedule = timestep_schedule(settings.rounds)
        self.rounds = settings.rounds

    def describe(self) -> dict[str, Any]:
        return {
            "timesteps": [self.grid.timesteps[s] for s in self.schedule],
            "vocabulary_words": len(self.vocab.words),
            "slots": "continuous, projected to the nearest word at every step (straight-through)",
        }

    def check(self, targets: list[Target]) -> None:
        """Every prompt has room for the K slots (the text encoder's length is fixed)."""
        for t in targets:
            self.vocab.adversarial_prompt([0] * self.settings.tokens, t.prompt)

    def start(self, targets: list[Target], steps: int) -> torch.Tensor:
        """Target images from the original weights; slots from random words. Returns the images."""
        with swapped(self.net, self.original):
            images = render(self.pipe, targets, [t.prompt for t in targets], steps)
        self.x0 = image_latents(self.pipe, images).to(self.grid.device)
        self.row = {t.index: r for r, t in enumerate(targets)}
        self.streams = {t.index: stream(self.settings.seed, t.index) for t in targets}
        k, n = self.settings.tokens, len(self.vocab.words)
        start = [torch.randint(n, (k,), generator=self.streams[t.index]) for t in targets]
        table = self.vocab.embeddings.to(self.grid.device)
        self.slots = nn.Parameter(table[torch.stack(start).to(table.device)].clone())
        self.optimizer = torch.optim.Adam(
            [self.slots], lr=self.settings.lr, weight_decay=self.settings.weight_decay
        )
        return images

    def propose(self, active: list[Target], round_: int) -> list[Candidate]:
        """``iterations`` Adam steps at this round's timestep; the projected prompts."""
        s = self.schedule[round_]
        t = self.grid.timesteps[s]
        rows = torch.tensor([self.row[target.index] for target in active])
        x0 = self.x0[rows.to(self.x0.device)]
        table = self.vocab.embeddings.to(self.slots.device)
        text_encoder = self.pipe.text_encoder
        losses = torch.zeros(len(active))
        with frozen(self.net, text_encoder):
            for _ in range(self.settings.iterations):
                slots = self.slots[rows.to(self.slots.device)]
                nearest = self.vocab.nearest(slots.detach(), self.settings.projection)
                straight = table[nearest] + slots - slots.detach()
                prompts = [
                    self.vocab.adversarial_prompt(p.tolist(), target.prompt)
                    for p, target in zip(nearest.cpu(), active, strict=True)
                ]
                ids = _token_ids(self.pipe.tokenizer, prompts)
                eps = torch.cat(
                    [
                        torch.randn(x0.shape[1:], generator=self.streams[a.index])[None]
                        for a in active
                    ]
                ).to(x0.device)
                x_t = self.grid.scheduler.add_noise(x0, eps, torch.full((len(active),), t))
                cond = {"encoder_hidden_states": encode_with_slots(text_encoder, ids, straight)}
                out = self.grid.to_loss_space(self.grid.raw(self.net, x_t, s, cond), x_t, s)
                loss = ((out - eps) ** 2).mean(dim=(1, 2, 3))
                self.optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()  # rows are independent: each slot sees its own loss only
                self.optimizer.step()
                losses += loss.detach().cpu()
        nearest = self.vocab.nearest(
            self.slots[rows.to(self.slots.device)].detach(), self.settings.projection
        )
        return [
            Candidate(
                prompt=self.vocab.adversarial_prompt(p.tolist(), target.prompt),
                token_ids=self.vocab.token_ids[p.cpu()].tolist(),
                loss=float(loss) / self.settings.iterations,
            )
            for p, target, loss in zip(nearest.cpu(), active, losses, strict=True)
        ]
