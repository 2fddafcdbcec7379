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

Reference statistics: a FID compares the features of two sets, so both must come from the same
network and protocol. The statistics kscu writes record how they were made (``info``); loading
them refuses, before any image is scored, a file made with other Inception weights, another
feature extractor or ``--dims``, or another resize. A file without that record (pytorch-fid's
own ``--save-stats``, published COCO statistics) is accepted, but never assumed to match: the
result says ``"reference_provenance": "unknown"`` and which settings went unchecked, and one
warning line says so. The file is read with ``allow_pickle=False`` and checked (``mu`` and
``sigma`` present, real, finite, of the feature size) so a bad one is a one-line error.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from PIL import Image

from kscu.errors import KscuError
from kscu.evaluate.cache import ImageCache, cached_map
from kscu.evaluate.common import (
    SIXTEEN_BIT,
    UNREADABLE_IMAGE,
    Workers,
    cache_counts,
    check_batch_size,
    check_replaceable,
    list_images,
    load_rgb,
    versions,
)
from kscu.fileio import atomic_target, check_writable, file_sha256
from kscu.protocol import FID_DIMS

PROTOCOL = "pytorch-fid"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
RESIZE = "bilinear to 299x299 inside pytorch-fid's InceptionV3 (F.interpolate, align_corners=False)"
# torch hub's naming convention: the file name carries the start of the file's sha256, which is
# what torch hub (and so pytorch-fid) checks a download against
RELEASE_SHA256_PREFIX = re.search(r"-([0-9a-f]{8,})\.", WEIGHTS_FILE).group(1)
# The settings of ``made`` that fix the features, checked when reference statistics are loaded
# (library_version is not: pytorch-fid's releases share the network and its preprocessing).
CHECKED_SETTINGS = {
    "protocol": "feature extractor",
    "dims": "feature dims",
    "resize": "resize",
    "inception_weights": "Inception weights",
}
# What a file that is not a readable .npz raises from np.load or from reading one of its arrays
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


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


def first_line(e: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message; terminal colour
    codes (torch's unpickling errors carry bold ones) are dropped."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    return (text.strip().splitlines() or [type(e).__name__])[0]


def weights_loader(inception_weights: str | Path | None):
    """A stand-in for pytorch-fid's ``load_state_dict_from_url`` that never unpickles code."""
    import torch

    def read(path: Path) -> dict:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # torch's own text advises weights_only=False
            what = "cannot be read as tensors (damaged, or not a torch file)"
            if "Unsupported global" in str(e):
                what = "holds pickled objects besides tensors, which kscu never unpickles"
            raise KscuError(
                f"Inception weights {path} {what}; give {WEIGHTS_FILE} (tensors only) or a "
                ".safetensors copy"
            ) from None
        except Exception as e:  # a damaged file
            raise KscuError(
                f"cannot read Inception weights {path} ({first_line(e)}); delete it and give "
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
    if inception_weights is not None:
        _check_weights_file(Path(inception_weights))
    block = inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
    with mock.patch.object(
        inception, "load_state_dict_from_url", weights_loader(inception_weights)
    ):
        try:
            model = inception.InceptionV3([block])
        except RuntimeError as e:  # load_state_dict: missing/unexpected/mis-shaped tensors
            raise KscuError(
                f"{inception_weights} is not pytorch-fid's FID Inception ({first_line(e)}); "
                f"give {WEIGHTS_FILE}"
            ) from None
    return model.eval().requires_grad_(False)


def weights_identity(inception_weights: str | Path | None) -> str:
    """What the cached features depend on: the standard file, or a given file's content."""
    if inception_weights is None:
        return WEIGHTS_FILE
    path = Path(inception_weights)
    _check_weights_file(path)
    return file_sha256(path)


def _check_weights_file(path: Path) -> None:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise KscuError(f"--inception-weights {path} {what}; give {WEIGHTS_FILE}")


def weights_label(inception_weights: str | Path | None, identity: str) -> str:
    """Which Inception weights made a number, as the result (and ``kscu report``, which flags
    runs that differ) shows it: the release file, or the given file's name and sha256, since
    features from other weights make another, incomparable FID."""
    if inception_weights is None:
        return f"{WEIGHTS_FILE} (pytorch-fid's release, from the torch hub cache)"
    return f"{Path(inception_weights).name} (sha256 {identity})"


def weights_key(label: str) -> str:
    """Which weights a ``weights_label`` names, for comparing two of them: the release, or a
    file's sha256; a label kscu did not write stands for itself (it matches only its equal).

    A given file whose sha256 begins with the digits in the release's name counts as the
    release: that is the check torch hub applies to pytorch-fid's own download, and it lets the
    same file passed by ``--inception-weights`` match statistics made from the hub cache.
    """
    if label == weights_label(None, WEIGHTS_FILE):
        return WEIGHTS_FILE
    found = re.search(r"\(sha256 ([0-9a-f]{64})\)$", label)
    if found is None:
        return label
    return WEIGHTS_FILE if found.group(1).startswith(RELEASE_SHA256_PREFIX) else found.group(1)


def settings(inception_weights: str | Path | None, identity: str, dims: int) -> dict:
    """How this run's features are made, as the result and saved statistics record it."""
    return {
        "protocol": PROTOCOL,
        "library_version": versions("pytorch-fid")["pytorch-fid"],
        "resize": RESIZE,
        "dims": dims,
        "inception_weights": weights_label(inception_weights, identity),
    }


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
                    sixteen = im.mode in SIXTEEN_BIT
            except UNREADABLE_IMAGE as e:
                raise KscuError(f"cannot read image {f}: {e}; delete or regenerate it") from None
            if sixteen:  # pytorch-fid reads the files itself; its RGB conversion clips them
                raise KscuError(
                    f"{f} is a 16-bit grayscale image, which pytorch-fid would read as nearly "
                    "white; save the set as 8-bit images"
                )
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
        self,
        inception_weights: str | Path | None,
        identity: str,
        batch_size: int,
        dims: int,
        workers: Workers,
    ) -> None:
        self.weights = inception_weights
        self.batch_size = batch_size
        self.dims = dims
        self.workers = workers
        self.protocol = {  # the cache's key: features from other settings are not reused
            "library": PROTOCOL,
            "dims": dims,
            "weights": identity,
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


def stats_error(path: Path, problem: str) -> KscuError:
    """The one-line error for a statistics file that cannot be used, with what to give instead."""
    return KscuError(
        f"--reference {path} {problem}; give an image folder, or an .npz of float mu and sigma "
        "(--save-reference-stats, or pytorch-fid's --save-stats)"
    )


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """``mu``, ``sigma`` and ``info`` (those present) of an ``.npz``, never unpickling anything."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError:  # neither zip nor .npy: numpy would have to unpickle it
        raise stats_error(path, "is not an .npz archive (kscu never unpickles a file)") from None
    except UNREADABLE as e:  # empty, truncated, unreadable
        raise stats_error(path, f"is not a readable .npz ({first_line(e)})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise stats_error(path, "holds a single .npy array, not an .npz with mu and sigma")
    arrays = {}
    with loaded as data:
        for key in ("mu", "sigma", "info"):
            if key not in data.files:
                continue
            try:
                arrays[key] = data[key]
            except UNREADABLE as e:  # an object array (only unpickling reads it), a damaged one
                raise stats_error(path, f"cannot read its {key} ({first_line(e)})") from None
    missing = [key for key in ("mu", "sigma") if key not in arrays]
    if missing:
        raise stats_error(
            path,
            f"is not an .npz of FID statistics with mu and sigma (no {' or '.join(missing)})",
        )
    return arrays


def checked_array(path: Path, key: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` as float64 if it holds finite real numbers of ``shape``, else a one-line error
    (a complex array would lose its imaginary part silently, a NaN would make the FID NaN)."""
    if array.dtype.kind not in "iuf":
        raise stats_error(path, f"holds {key} of dtype {array.dtype}, not real numbers")
    if array.shape != shape:
        dims = shape[0]
        raise KscuError(
            f"--reference {path} holds {key} of shape {array.shape}, not of {dims}-d features "
            f"{shape}; give statistics made with --dims {dims}"
        )
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise stats_error(path, f"holds {bad} non-finite values (NaN or inf) in {key}")
    return np.asarray(array, np.float64)


def stats_info(raw: np.ndarray | None) -> dict | None:
    """kscu's record of how statistics were made (a JSON object), or None if there is none."""
    if raw is None or raw.shape != () or raw.dtype.kind != "U":
        return None
    try:
        info = json.loads(str(raw))
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def load_stats(path: Path, dims: int = FID_DIMS) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """(mu, sigma, kscu's info or None) from an ``.npz`` of reference statistics."""
    arrays = read_npz(path)
    mu = checked_array(path, "mu", arrays["mu"], (dims,))
    sigma = checked_array(path, "sigma", arrays["sigma"], (dims, dims))
    check_covariance(path, sigma)
    return mu, sigma, stats_info(arrays.get("info"))


def check_covariance(path: Path, sigma: np.ndarray) -> None:
    """A sigma that no set of features has (not symmetric, or a clearly negative variance
    along some direction) makes the Frechet distance's square root complex, which would be
    reported as too few images; say what is wrong with the file instead. The tolerances pass
    any covariance numpy computes, singular ones (fewer images than dims) included."""
    scale = float(np.abs(sigma).max()) or 1.0
    asymmetry = float(np.abs(sigma - sigma.T).max())
    if asymmetry > 1e-6 * scale:
        raise stats_error(path, f"holds a sigma that is not symmetric (by up to {asymmetry:.3g})")
    lowest = float(np.linalg.eigvalsh(sigma)[0])
    if lowest < -1e-6 * scale * len(sigma):
        raise stats_error(
            path, f"holds a sigma that is not a covariance (an eigenvalue of {lowest:.3g})"
        )


def unchecked_settings(path: Path, info: dict | None, made: dict) -> list[str]:
    """The settings ``info`` does not record (so could not be compared), after refusing
    statistics whose recorded settings differ from this run's (``made``): their FID would
    compare features of two networks or protocols."""
    info = info or {}
    differ = []
    for key, name in CHECKED_SETTINGS.items():
        if key not in info:
            continue
        theirs, now = info[key], made[key]
        if key == "inception_weights":
            same = isinstance(theirs, str) and weights_key(theirs) == weights_key(now)
        else:
            same = theirs == now
        if not same:
            differ.append(f"{name} {json.dumps(theirs)} there, {json.dumps(now)} now")
    if differ:
        raise KscuError(
            f"--reference {path} was made with other FID settings ({'; '.join(differ)}), so "
            "its FID would compare features of two protocols; recompute the statistics from "
            "the reference images with these settings (--save-reference-stats), or run with "
            "the ones they were made with (the matching --inception-weights, --dims)"
        )
    return [key for key in CHECKED_SETTINGS if key not in info]


def warn_unchecked(path: Path, unchecked: list[str]) -> None:
    """One stderr line: these statistics are used, but how they were made is partly unknown."""
    if len(unchecked) == len(CHECKED_SETTINGS):
        what = "has no kscu record of how it was made (e.g. pytorch-fid's --save-stats wrote it)"
    else:
        what = f"does not record its {', '.join(CHECKED_SETTINGS[k] for k in unchecked)}"
    print(
        f"warning: --reference {path} {what}, so it cannot be checked against this run's "
        "settings; the result records reference_provenance unknown",
        file=sys.stderr,
    )


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


def provenance(stats_file: bool, unchecked: list[str]) -> str:
    """Where the reference's features come from, as the result says: ``computed`` now from
    its images, statistics whose record matches this run (``checked``), or ``unknown``."""
    if not stats_file:
        return "computed"
    return "unknown" if unchecked else "checked"


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
    identity = weights_identity(inception_weights)
    made = settings(inception_weights, identity, dims)
    weights = made["inception_weights"]
    unchecked: list[str] = []
    if stats_file:
        ref_mu, ref_sigma, ref_info = load_stats(reference, dims)
        unchecked = unchecked_settings(reference, ref_info, made)
    if save_reference_stats is not None:
        if stats_file:
            raise KscuError("--save-reference-stats needs --reference to be an image folder")
        check_stats_output(save_reference_stats, overwrite)
    files = list_images(images, "--images", cases=False)
    ref_files = [] if stats_file else list_images(reference, "--reference", cases=False)
    if len(files) < 2 or (not stats_file and len(ref_files) < 2):
        raise KscuError("FID needs at least 2 images in each folder (thousands for a real number)")
    workers = Workers()
    if unchecked and workers.is_main:
        warn_unchecked(reference, unchecked)
    size = image_sizes(files, f"--images {images}", workers)
    ref_size = None if stats_file else image_sizes(ref_files, f"--reference {reference}", workers)
    features = Features(inception_weights, identity, batch_size, dims, workers)
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
        "reference_images": (ref_info or {}).get("images") if stats_file else len(ref_files),
        "image_size": list(size),
        "reference_size": list(ref_size) if ref_size else None,
        "feature_extractor": f"pytorch-fid InceptionV3, {dims}-d features, {weights}",
        "weights_source": str(inception_weights or "torch hub cache (pytorch-fid's release)"),
        "images_dir": str(Path(images).resolve()),
        "reference": str(reference.resolve()),
        "reference_stats_info": ref_info if stats_file else None,
        "reference_provenance": provenance(stats_file, unchecked),
        "reference_unchecked_settings": unchecked,
        **cache_counts(computed, len(files)),
        **{f"reference_{k}": v for k, v in cache_counts(ref_computed, len(ref_files)).items()},
        "versions": versions("pytorch-fid", "torchvision", "scipy", "pillow", "numpy"),
    }
