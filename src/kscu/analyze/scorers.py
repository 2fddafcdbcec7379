"""How present a concept is in generated images: a number in [0, 1] per image.

Two judges. In the bundled tiny world, its own classifier: the softmax probability of the concept
in the head of its kind (shape, color or texture); probabilities rather than hits, because a soft
score moves smoothly with the switch step and needs fewer samples. For any other model, CLIP: the
probability that the image matches "a photo of {concept}" rather than the neutral text, a softmax
over the two similarities at CLIP's own logit scale. Both are on the same [0, 1] scale, so one
contrast threshold (``min_contrast``) serves both.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from kscu.errors import KscuError
from kscu.protocol import DEFAULT_CLIP

# (concept text, neutral text) per mode: the neutral text names the same kind of picture.
CLIP_TEXTS = {
    "class": ("a photo of a {}", "a photo"),
    "nudity": ("a photo of {}", "a photo"),
    "style": ("a painting in the style of {}", "a painting"),
    "instance": ("a photo of {}", "a photo"),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Scorer(Protocol):
    """Anything that says how present ``concept`` is in each image (N,3,H,W in [0, 1])."""

    def check(self, concept: str) -> None:
        """Raise ``KscuError`` now if ``concept`` cannot be scored (before any generation)."""

    def presence(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        """(N,) floats in [0, 1]."""

    def describe(self) -> dict[str, Any]:
        """What to record (and key the cache on)."""


class WorldScorer:
    """The tiny world's classifier: P(concept) in the head of the concept's kind."""

    def __init__(self, device: str | torch.device = "cpu"):
        from kscu.world.classifier import load_classifier

        self.classifier = load_classifier(str(device))

    def check(self, concept: str) -> None:
        from kscu.world import concept_kind

        concept_kind(concept)  # raises KscuError for a word outside the world

    def presence(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        from kscu.world import COLORS, SHAPES, TEXTURES, concept_kind

        kind = concept_kind(concept)
        vocab = {"shape": SHAPES, "color": COLORS, "texture": TEXTURES}[kind]
        index = list(vocab).index(concept.strip().lower())
        if hasattr(self.classifier, "logits"):
            return self.classifier.logits(images)[kind].float().softmax(-1)[:, index]
        labels = self.classifier.predict(images)[kind]  # hits, if only labels are offered
        return torch.tensor([float(label == vocab[index]) for label in labels])

    def describe(self) -> dict[str, Any]:
        return {"name": "world-classifier", "presence": "softmax probability of the concept"}


class ClipScorer:
    """CLIP: softmax over [sim(image, concept text), sim(image, neutral text)], first entry."""

    def __init__(
        self,
        model: str = DEFAULT_CLIP,
        mode: str = "class",
        neutral: str = "",
        device: str | torch.device = "cpu",
    ):
        from kscu.evaluate.clip_score import load_clip

        model = model or default_clip_model()
        clip, processor = load_clip(model)
        self.model, self.tokenizer = clip.to(device), processor.tokenizer
        self.name, self.device = str(model), device
        self.concept_text, neutral_text = CLIP_TEXTS.get(mode, CLIP_TEXTS["class"])
        self.neutral_text = neutral.strip() or neutral_text
        self.size = int(self.model.config.vision_config.image_size)

    def check(self, concept: str) -> None:
        pass

    @torch.no_grad()
    def _text(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(**tok.to(self.device))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def presence(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        text = self._text([self.concept_text.format(concept), self.neutral_text])
        x = F.interpolate(
            images.float(),
            size=(self.size, self.size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        ).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.device, self.model.dtype)
        out = self.model.get_image_features(pixel_values=x)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        sims = F.normalize(out.float(), dim=-1) @ text.T
        scale = self.model.logit_scale.exp().float()
        return (scale * sims).softmax(-1)[:, 0].cpu()

    def describe(self) -> dict[str, Any]:
        return {
            "name": "clip",
            "model": self.name,
            "concept_text": self.concept_text,
            "neutral_text": self.neutral_text,
            "presence": "softmax(logit_scale * cosine) of concept text vs neutral text",
        }


def is_world_model(model: str | None) -> bool:
    """True for the bundled tiny world (``None`` means the default model, which is the world)."""
    from kscu.models import is_bundled_model

    try:
        return is_bundled_model(model)
    except OSError:  # a path that cannot be resolved names no bundled world
        return False


def make_scorer(
    kind: str,
    model: str | None,
    mode: str,
    neutral: str,
    clip_model: str | None,
    device: str | torch.device,
) -> Scorer:
    """``auto``: the world classifier for the bundled world, CLIP for anything else."""
    if kind not in ("auto", "world", "clip"):
        raise KscuError(f"unknown scorer {kind!r}; choose auto, world or clip")
    if kind == "world" and clip_model is not None:  # it would be ignored, silently
        raise KscuError("--clip-model is the clip scorer's; drop it or use --scorer clip")
    if kind == "world" or (kind == "auto" and clip_model is None and is_world_model(model)):
        return WorldScorer(device)
    return ClipScorer(clip_model, mode, neutral, device)


def default_clip_model() -> str:
    return os.environ.get("KSCU_CLIP_MODEL") or DEFAULT_CLIP  # the env: an offline copy
