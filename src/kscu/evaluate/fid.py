"""FID exactly as pytorch-fid computes it, with per-image feature caches.

Protocol ``"pytorch-fid"``: pytorch-fid's own ``InceptionV3`` (the TensorFlow 2015-12-05 FID
Inception that every FID number since 2017 uses, weights ``pt_inception-2015-12-05-6726825d.pth``)
and its preprocessing: the image as RGB, ``ToTensor`` to [0, 1], a bilinear resize to 299x299
inside the network (``F.interpolate``, ``align_corners=False``), then [-1, 1]; the 2048-d pool3
features (``get_activations``); mean and unbiased covariance per set; the Frechet distance by
``calculate_frechet_distance``. So a number here is pytorch-fid's number for the same images
(clean-fid's differs: it resizes with PIL bicubic first).

Weights: pytorch-fid downloads them into torch hub's cache (``$TORCH_HOME/hub/checkpoints``) and
unpickles them in full; kscu hands its network a loader that reads the same file from the same
place with ``weights_only=True`` (tensors only, no pickled code), or ``--inception-weights FILE``
(``.pth`` read the same way, or a ``.safetensors`` copy). Offline without the file, a one-line
error names the file and the folder to put it in.

Caching: the features of every image are cached by file content (``kscu.evaluate.cache``), so
a rerun computes only new images; the result counts each side apart (``computed_images`` /
``cached_images`` for ``--images``, ``reference_computed_images`` / ``reference_cached_images``
for a reference folder). ``--reference`` may also be an ``.npz`` of statistics (``mu``,
``sigma``: pytorch-fid's format), which ``--save-reference-stats FILE.npz`` writes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from PIL import Image

from kscu.errors import KscuError
from kscu.evaluate.cache import ImageCache, cached_map
from kscu.evaluate.common import (
    Workers,
    cache_counts,
    check_batch_size,
    check_replaceable,
    list_images,
    load_rgb,
    versions,
)
from kscu.fileio import atomic_target, check_writable
from kscu.protocol import FID_DIMS

PROTOCOL = "pytorch-fid"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
RESIZE = "bilinear to 299x299 inside pytorch-fid's InceptionV3 (F.interpolate, align_corners=False)"


def library():
    """pytorch-fid's ``inception`` and ``fid_score`` modules, or a one-line install hint."""
    from kscu.torchvision_compat import ensure_torchvision

    try:
        if not ensure_torchvision():
            raise ImportError("torchvision")
        from pytorch_fid import fid_score, inception
    except ImportError as e:
        raise KscuError(
            f"FID needs pytorch-fid and torchvision ({e.name or e} is missing); "
            "pip install 'kscu[eval]'"
        ) from None
    return inception, fid_score


def weights_loader(inception_weights: str | Path | None):
    """A stand-in for pytorch-fid's ``load_state_dict_from_url`` that never unpickles code."""
    import torch

    def read(path: Path) -> dict:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file, or one that holds more than tensors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise KscuError(
                f"cannot read Inception weights {path} ({first}); delete it and give "
                f"{WEIGHTS_FILE} (tensors only)"
            ) from None

    def load(url: str, *args: Any, **kwargs: Any) -> dict:
        if inception_weights is not None:
            return read(Path(inception_weights))
        cache = Path(torch.hub.get_dir()) / "checkpoints"  # where pytorch-fid's loader looks
        path = cache / Path(url).name
        if not path.is_file():
            try:
                cache.mkdir(parents=True, exist_ok=True)
                digest = torch.hub.HASH_REGEX.search(path.name).group(1)
                torch.hub.download_url_to_file(url, str(path), digest, progress=False)
            except Exception as e:  # URLError, timeouts, a hash mismatch: all mean "fetch it"
                raise KscuError(
                    f"FID needs pytorch-fid's Inception weights {path.name}, which are not in "
                    f"{cache} and could not be downloaded ({type(e).__name__}; offline?); "
                    f"download {url} into {cache}, or pass --inception-weights FILE"
                ) from None
        return read(path)

    return load


def load_inception(inception_weights: str | Path | None = None, dims: int = FID_DIMS):
    """pytorch-fid's InceptionV3 up to the block of ``dims`` features, weights read safely."""
    inception, _ = library()
    if inception_weights is not None and not Path(inception_weights).is_file():
        raise KscuError(
            f"--inception-weights {inception_weights} does not exist; give {WEIGHTS_FILE}"
        )
    block = inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
    with mock.patch.object(
        inception, "load_state_dict_from_url", weights_loader(inception_weights)
    ):
        try:
            model = inception.InceptionV3([block])
        except RuntimeError as e:  # load_state_dict: missing/unexpected/mis-shaped tensors
            first = str(e).strip().splitlines()[0]
            raise KscuError(
                f"{inception_weights} is not pytorch-fid's FID Inception ({first}); "
                f"give {WEIGHTS_FILE}"
            ) from None
    return model.eval().requires_grad_(False)


def weights_identity(inception_weights: str | Path | None) -> str:
    """What the cached features depend on: the standard file, or a given file's content."""
    if inception_weights is None:
        return WEIGHTS_FILE
    path = Path(inception_weights)
    if not path.is_file():
        raise KscuError(f"--inception-weights {path} does not exist; give {WEIGHTS_FILE}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_label(inception_weights: str | Path | None, identity: str) -> str:
    """Which Inception weights made a number, as the result (and ``kscu report``, which flags
    runs that differ) shows it: the release file, or the given file's name and sha256, since
    features from other weights make another, incomparable FID."""
    if inception_weights is None:
        return f"{WEIGHTS_FILE} (pytorch-fid's release, from the torch hub cache)"
    return f"{Path(inception_weights).name} (sha256 {identity})"


def image_sizes(files: list[Path], what: str, workers: Workers) -> tuple[int, int]:
    """The one size of a set of images; a clear error if they mix sizes or cannot be read.

    pytorch-fid batches images as they are, so a set must be of one size.
    """

    def sizes(share: list[Path]) -> list[tuple[int, int]]:
        out = []
        for f in share:
            try:
                with Image.open(f) as im:
                    out.append(im.size)
            except (OSError, ValueError) as e:
                raise KscuError(f"cannot read image {f}: {e}; delete or regenerate it") from None
        return out

    found: dict[tuple[int, int], str] = {}
    for f, size in zip(files, workers.map(sizes, files), strict=True):
        found.setdefault(tuple(size), f.name)
    if len(found) > 1:
        listed = ", ".join(f"{w}x{h} ({name})" for (w, h), name in list(found.items())[:3])
        raise KscuError(
            f"{what} mixes image sizes ({listed}); FID compares sets of one size: "
            "resize/center-crop them to one size first (COCO: 512x512)"
        )
    return next(iter(found))


class Features:
    """pytorch-fid features of image sets; the network is built only if an image needs it."""

    def __init__(
        self, inception_weights: str | Path | None, batch_size: int, dims: int, workers: Workers
    ) -> None:
        self.weights = inception_weights
        self.batch_size = batch_size
        self.dims = dims
        self.workers = workers
        self.protocol = {
            "library": PROTOCOL,
            "dims": dims,
            "weights": weights_identity(inception_weights),
            **versions("pytorch-fid", "torchvision"),
        }
        self.model = None

    def compute(self, share: list[tuple[Path, str]]) -> list[np.ndarray]:
        if not share:
            return []
        _, fid_score = library()
        if self.model is None:
            self.model = load_inception(self.weights, self.dims).to(self.workers.device)
        files = [path for path, _ in share]
        try:
            feats = fid_score.get_activations(
                files,
                self.model,
                min(self.batch_size, len(files)),
                self.dims,
                self.workers.device,
                num_workers=0,
            )
        except (OSError, ValueError, SyntaxError):
            for f in files:
                load_rgb(f)  # names the unreadable file in a one-line error
            raise
        return [row.astype(np.float32) for row in feats]

    def of(self, folder: str | Path, files: list[Path], use_cache: bool) -> tuple[np.ndarray, int]:
        """(N, dims) features of ``files``, in order, and how many went through the network
        (the rest came from the cache): counted per side, so the result can say which."""
        cache = ImageCache(folder, "fid", self.protocol, arrays=True) if use_cache else None
        feats, computed = cached_map([(f, "") for f in files], self.compute, cache, self.workers)
        return np.stack([np.asarray(f, np.float64) for f in feats]), computed


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance, as pytorch-fid's ``calculate_activation_statistics``."""
    if features.shape[0] < 2:
        raise KscuError(f"FID needs at least 2 images per set, got {features.shape[0]}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's ``calculate_frechet_distance``, its failure turned into advice."""
    _, fid_score = library()
    try:
        return float(fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
    except ValueError as e:  # "Imaginary component": too few images for a stable sqrtm
        raise KscuError(f"FID is undefined for these sets ({e}); use more images") from None


def load_stats(path: Path, dims: int = FID_DIMS) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, what else the file says) from an ``.npz`` of reference statistics."""
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            info = json.loads(str(data["info"])) if "info" in data.files else {}
    except (OSError, ValueError, KeyError) as e:
        raise KscuError(
            f"--reference {path} is not an .npz of FID statistics with mu and sigma ({e}); "
            "give an image folder or a file written by --save-reference-stats"
        ) from None
    if mu.shape != (dims,) or sigma.shape != (dims, dims):
        raise KscuError(
            f"--reference {path} holds statistics of shape {mu.shape}/{sigma.shape}, "
            f"not of {dims}-d features; give statistics made with --dims {dims}"
        )
    return mu, sigma, info


def is_reference_stats(path: Path) -> bool:
    """Whether ``path`` is a statistics file ``--save-reference-stats`` wrote (``mu``,
    ``sigma`` and kscu's ``info``), the only kind of file it may replace."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not {"mu", "sigma", "info"} <= set(data.files):
                return False
            info = json.loads(str(data["info"]))
    except Exception:  # not an .npz at all (any of numpy's, zipfile's or json's errors)
        return False
    return isinstance(info, dict) and info.get("protocol") == PROTOCOL


def check_stats_output(path: str | Path, overwrite: bool) -> None:
    """Fail before any feature is computed if ``--save-reference-stats`` cannot be written
    or would replace a file (an earlier statistics file only with ``overwrite``)."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise KscuError(f"--save-reference-stats {path} must end in .npz")
    check_writable(path, folder=False, flag="--save-reference-stats")
    name = f"--save-reference-stats {path}"
    check_replaceable(path, name, "reference statistics file", is_reference_stats, overwrite)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, info: dict) -> None:
    """pytorch-fid's statistics format (``mu``, ``sigma``) plus how they were made."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, info=json.dumps(info))


def evaluate_fid(
    images: str | Path,
    reference: str | Path,
    inception_weights: str | Path | None = None,
    batch_size: int = 32,
    save_reference_stats: str | Path | None = None,
    use_cache: bool = True,
    dims: int = FID_DIMS,
    overwrite: bool = False,
) -> dict:
    """FID of the images in one folder against a reference folder or statistics file.

    ``dims`` other than 2048 (pytorch-fid's 64, 192, 768: earlier Inception blocks) make a
    number that is not comparable with published FIDs; they exist for quick checks.
    ``overwrite`` lets ``save_reference_stats`` replace an earlier statistics file.
    """
    inception, _ = library()  # a missing library fails before any work
    if dims not in inception.InceptionV3.BLOCK_INDEX_BY_DIM:
        known = ", ".join(map(str, sorted(inception.InceptionV3.BLOCK_INDEX_BY_DIM)))
        raise KscuError(f"--dims {dims} is not one of pytorch-fid's feature sizes ({known})")
    check_batch_size(batch_size)
    reference = Path(reference)
    stats_file = reference.suffix.lower() == ".npz"
    if stats_file and not reference.is_file():
        raise KscuError(f"--reference {reference} does not exist; give a folder or an .npz")
    if stats_file:
        ref_mu, ref_sigma, ref_info = load_stats(reference, dims)
    if save_reference_stats is not None:
        if stats_file:
            raise KscuError("--save-reference-stats needs --reference to be an image folder")
        check_stats_output(save_reference_stats, overwrite)
    files = list_images(images, "--images")
    ref_files = [] if stats_file else list_images(reference, "--reference")
    if len(files) < 2 or (not stats_file and len(ref_files) < 2):
        raise KscuError("FID needs at least 2 images in each folder (thousands for a real number)")
    workers = Workers()
    size = image_sizes(files, f"--images {images}", workers)
    ref_size = None if stats_file else image_sizes(ref_files, f"--reference {reference}", workers)
    features = Features(inception_weights, batch_size, dims, workers)
    weights = weights_label(inception_weights, features.protocol["weights"])
    made = {
        "protocol": PROTOCOL,
        "library_version": features.protocol["pytorch-fid"],
        "resize": RESIZE,
        "dims": dims,
        "inception_weights": weights,
    }
    feats, computed = features.of(images, files, use_cache)
    mu, sigma = statistics(feats)
    ref_computed = 0
    if not stats_file:
        ref_feats, ref_computed = features.of(reference, ref_files, use_cache)
        ref_mu, ref_sigma = statistics(ref_feats)
        ref_info = {**made, "images": len(ref_files), "reference_dir": str(reference.resolve())}
        if save_reference_stats is not None and workers.is_main:
            save_stats(save_reference_stats, ref_mu, ref_sigma, ref_info)
    return {
        "metric": "fid",
        "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
        **made,
        "images": len(files),
        "reference_images": ref_info.get("images", len(ref_files)),
        "image_size": list(size),
        "reference_size": list(ref_size) if ref_size else None,
        "feature_extractor": f"pytorch-fid InceptionV3, {dims}-d features, {weights}",
        "weights_source": str(inception_weights or "torch hub cache (pytorch-fid's release)"),
        "images_dir": str(Path(images).resolve()),
        "reference": str(reference.resolve()),
        "reference_stats_info": ref_info if stats_file else None,
        **cache_counts(computed, len(files)),
        **{f"reference_{k}": v for k, v in cache_counts(ref_computed, len(ref_files)).items()},
        "versions": versions("pytorch-fid", "torchvision", "scipy", "pillow", "numpy"),
    }
