"""FID between two image folders, with the standard FID Inception network.

Why our own code: torchmetrics (the better-kept library) and clean-fid both get the FID
Inception from packages that require torchvision, which has no CPU wheel to pair with every
torch build; the network is small enough to state here. It is the TensorFlow 2015-12-05
Inception-v3 that every FID number since 2017 uses, in the layout of pytorch-fid's port (same
layer names, so its weight file ``pt_inception-2015-12-05-6726825d.pth`` loads as is), and the
2048-d pool3 features. Images are resized to 299x299 the way clean-fid's "clean" mode does
(PIL bicubic on float channels, which antialiases), then scaled to [-1, 1].

The weights come from pytorch-fid's GitHub release into the torch hub cache on first use; when
offline, the error names the file and where to put it (or pass ``--inception-weights``; a
``.safetensors`` copy of the same tensors works too). ``.pth`` files are read with
``weights_only=True``: tensors only, no pickled code.

FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with the unbiased covariance of each set
(numpy only; see ``frechet_distance``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from kscu.errors import KscuError
from kscu.evaluate.common import Workers, list_images, load_rgb, versions

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
)
SIZE = 299


# ---------------------------------------------------------------------------- the statistic
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of an (N, D) feature matrix."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise KscuError(f"FID needs at least 2 images per folder, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between two Gaussians.

    Tr((S1 S2)^(1/2)) is computed as Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), the same number, with
    symmetric eigendecompositions only: fast for 2048-d features and stable when the covariances
    are singular (fewer images than dimensions), where a general matrix sqrt goes complex.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID between two sets of feature vectors (rows are samples)."""
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


# ---------------------------------------------------------------------------- the network
class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TF's average pool ignores the padding; torch's default would count it.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """The last two blocks; TF's final block max-pools its pool branch (``max_pool=True``)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """Inception-v3 up to the 2048-d pool3 features; input (N, 3, 299, 299) in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused for FID; present so the weight file loads whole

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _read_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_inception(weights: str | Path | None = None) -> tuple[FIDInception, str]:
    """The FID Inception with its standard weights; returns the model and where they came from."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise KscuError(f"--inception-weights {path} does not exist; give the {WEIGHTS_FILE}")
        state, source = _read_weights(path), str(path)
    else:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        try:
            state = torch.hub.load_state_dict_from_url(
                WEIGHTS_URL, map_location="cpu", check_hash=True, weights_only=True, progress=False
            )
        except Exception as e:  # URLError, HTTPError, timeouts, hash mismatch: all mean "fetch it"
            raise KscuError(
                f"FID needs the Inception weights {WEIGHTS_FILE}, which are not in {cache} and "
                f"could not be downloaded from {WEIGHTS_URL} ({type(e).__name__}; offline?); "
                f"copy the file into {cache} or pass --inception-weights FILE"
            ) from None
        source = WEIGHTS_URL
    model = FIDInception()
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        example = (missing or result.unexpected_keys)[0]
        raise KscuError(
            f"{source} is not the FID Inception ({len(missing)} tensors missing, "
            f"{len(result.unexpected_keys)} unexpected, e.g. {example}); give {WEIGHTS_FILE}"
        )
    return model.eval().requires_grad_(False), source


def preprocess(image: Image.Image) -> torch.Tensor:
    """clean-fid's resize: bicubic on each float channel to 299x299, then [0, 255] -> [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32)
    chans = [
        np.asarray(Image.fromarray(arr[:, :, c]).resize((SIZE, SIZE), Image.BICUBIC))
        for c in range(3)
    ]
    x = np.clip(np.stack(chans, 0), 0, 255) / 127.5 - 1.0
    return torch.from_numpy(x.astype(np.float32))


def _one_size(files: list[Path], what: str) -> tuple[int, int]:
    sizes: dict[tuple[int, int], str] = {}
    for f in files:
        with Image.open(f) as im:
            sizes.setdefault(im.size, f.name)
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h} ({name})" for (w, h), name in list(sizes.items())[:3])
        raise KscuError(
            f"{what} mixes image sizes ({listed}); FID compares sets of one size: "
            "resize/center-crop them to one size first (COCO: 512x512)"
        )
    return next(iter(sizes))


@torch.no_grad()
def folder_features(
    files: list[Path], model: nn.Module, workers: Workers, batch_size: int = 32, desc: str = ""
) -> np.ndarray:
    """Inception features of every file, split over processes and gathered in file order."""
    model = model.to(workers.device)
    order = {f: i for i, f in enumerate(files)}
    mine = workers.share(files)
    out: list[tuple[int, np.ndarray]] = []
    for start in tqdm(range(0, len(mine), batch_size), desc=desc, disable=not workers.is_main):
        batch = mine[start : start + batch_size]
        x = torch.stack([preprocess(load_rgb(f)) for f in batch]).to(workers.device)
        feats = model(x).float().cpu().numpy()
        out += [(order[f], feats[i]) for i, f in enumerate(batch)]
    gathered = sorted(workers.gather(out), key=lambda t: t[0])
    return np.stack([f for _, f in gathered])


def evaluate_fid(
    images: str | Path,
    reference: str | Path,
    inception_weights: str | Path | None = None,
    batch_size: int = 32,
) -> dict:
    """FID of the images in one folder against a reference folder (lower is closer)."""
    files = list_images(images, "--images")
    ref_files = list_images(reference, "--reference")
    size = _one_size(files, f"--images {images}")
    ref_size = _one_size(ref_files, f"--reference {reference}")
    if len(files) < 2 or len(ref_files) < 2:
        raise KscuError("FID needs at least 2 images in each folder (thousands for a real number)")
    model, source = load_inception(inception_weights)
    workers = Workers()
    feats = folder_features(files, model, workers, batch_size, "fid images")
    ref = folder_features(ref_files, model, workers, batch_size, "fid reference")
    return {
        "metric": "fid",
        "fid": fid_from_features(feats, ref),
        "images": len(files),
        "reference_images": len(ref_files),
        "image_size": list(size),
        "reference_size": list(ref_size),
        "feature_extractor": f"Inception-v3 TF 2015-12-05 pool3 (2048-d), {WEIGHTS_FILE}",
        "weights_source": source,
        "resize": "PIL bicubic per float channel to 299x299 (clean-fid 'clean' mode)",
        "images_dir": str(Path(images).resolve()),
        "reference_dir": str(Path(reference).resolve()),
        "versions": versions("pillow", "numpy"),
    }
