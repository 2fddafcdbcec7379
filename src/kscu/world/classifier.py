"""A small CNN that recognizes the world's shape, color and texture (one head each).

It is the world's judge: quality bars, erasure success (the erased concept is no longer
recognized) and retention (the other concepts still are) are all measured with it, and its
penultimate features serve for a Frechet distance. It is trained on fresh renders with mild
blur and noise, so that it also reads the slightly soft images the diffusion model generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kscu.errors import KscuError
from kscu.world.data import ATTRIBUTES

CLASSIFIER_DIR = Path(__file__).parent / "classifier"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class WorldCNN(nn.Module):
    """Three conv stages (32 -> 16 -> 8 px), global average pooling, one linear head per
    attribute."""

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            _block(3, width),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(feature_dim, len(vocab)) for name, vocab in ATTRIBUTES.items()}
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = self.body(x * 2 - 1)
        return feats, {name: head(feats) for name, head in self.heads.items()}


def to_tensor(images: torch.Tensor | list, resolution: int) -> torch.Tensor:
    """Images (N,3,H,W float in [0,1], or a list of PIL images) at ``resolution``."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        x = torch.stack(
            [
                torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(
                    2, 0, 1
                )
                for im in images
            ]
        )
    if x.ndim != 4 or x.shape[1] != 3:
        raise KscuError(
            f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}; "
            "pass RGB images as a float tensor in [0, 1] or a list of PIL images"
        )
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
    return x.clamp(0, 1)


class WorldClassifier:
    """Inference wrapper: resizing, batching and label names."""

    def __init__(self, model: WorldCNN, resolution: int, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.resolution = resolution
        self.device = device

    @torch.no_grad()
    def _run(self, images: torch.Tensor | list, batch_size: int = 256):
        x = to_tensor(images, self.resolution)
        feats, logits = [], {k: [] for k in ATTRIBUTES}
        for i in range(0, len(x), batch_size):
            f, out = self.model(x[i : i + batch_size].to(self.device))
            feats.append(f.cpu())
            for k in ATTRIBUTES:
                logits[k].append(out[k].cpu())
        return torch.cat(feats), {k: torch.cat(v) for k, v in logits.items()}

    def logits(self, images: torch.Tensor | list) -> dict[str, torch.Tensor]:
        """Raw per-attribute logits (N, classes)."""
        return self._run(images)[1]

    def predict(self, images: torch.Tensor | list) -> dict[str, list[str]]:
        """Predicted label names per attribute: {"shape": [...], "color": [...], ...}."""
        logits = self.logits(images)
        return {k: [ATTRIBUTES[k][i] for i in logits[k].argmax(1).tolist()] for k in ATTRIBUTES}

    def features(self, images: torch.Tensor | list) -> torch.Tensor:
        """Penultimate features (N, D), e.g. for a Frechet distance between image sets."""
        return self._run(images)[0]


def save_classifier(model: WorldCNN, folder: Path, resolution: int, extra: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "resolution": resolution,
        "width": model.body[0][0].out_channels,
        "feature_dim": model.body[-2].out_features,
        "labels": {k: list(v) for k, v in ATTRIBUTES.items()},
        **extra,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))


def load_classifier(device: str = "cpu", folder: str | Path | None = None) -> WorldClassifier:
    """The shipped world classifier (or one saved in ``folder``)."""
    folder = Path(folder) if folder is not None else CLASSIFIER_DIR
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise KscuError(
            f"no world classifier in {folder}; train one with "
            "`kscu world train --only classifier --output DIR`"
        )
    config = json.loads(config_path.read_text())
    if config["labels"] != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise KscuError(
            f"the classifier in {folder} was trained for another vocabulary; "
            "retrain it with `kscu world train --only classifier`"
        )
    model = WorldCNN(width=config["width"], feature_dim=config["feature_dim"])
    model.load_state_dict(load_file(str(weights_path)))
    return WorldClassifier(model, config["resolution"], device)
