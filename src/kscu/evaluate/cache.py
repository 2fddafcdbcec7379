"""Per-image results kept beside the images, so a rerun computes only the images that are new.

What an evaluator finds in one image depends on the image's bytes and on the protocol that
looked at it (model id and its files, library versions, resize). So each protocol has one cache
file, ``IMAGES/.kscu-cache/{metric}-{protocol digest}.json`` (``.npz`` for feature vectors), or
``$KSCU_CACHE/evaluate/...`` when that is set (one cache for every folder; use it when an image
folder is read-only). It maps the sha256 of an image file (plus the prompt, where the result
depends on it) to the raw result: every detection with its score, the feature vector, the
score, the predicted label. Thresholds and statistics are applied afterwards, so changing them
costs nothing. Renaming or moving images keeps their entries; editing an image makes it new.

Under ``accelerate launch`` each process hashes and computes its share; only the main process
writes, atomically (a reader sees the old file or the new one, never half of one).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kscu.distributed import Workers
from kscu.fileio import atomic_target, file_sha256, write_text

FORMAT = 1  # of the cache files: a change makes old files miss


def cache_folder(images: str | Path) -> Path:
    if os.environ.get("KSCU_CACHE"):
        return Path(os.environ["KSCU_CACHE"]).expanduser() / "evaluate"
    return Path(images) / ".kscu-cache"


class ImageCache:
    """The cache of one metric under one protocol: item key -> raw per-image result.

    ``arrays=True`` stores equal-length vectors (FID features) in an ``.npz`` read without
    pickle; otherwise values are anything JSON holds.
    """

    def __init__(
        self,
        images: str | Path,
        metric: str,
        protocol: dict,
        arrays: bool = False,
        valid: Callable[[Any], bool] = lambda entry: True,
    ):
        text = json.dumps(
            {"format": FORMAT, "metric": metric, **protocol}, sort_keys=True, default=str
        )
        self.protocol = json.loads(text)  # as it reads back from the file
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.arrays, self.valid = arrays, valid  # an entry valid() refuses is computed again
        self.path = cache_folder(images) / f"{metric}-{digest}.{'npz' if arrays else 'json'}"

    def load(self) -> dict[str, Any]:
        """The stored entries; an unreadable file counts as empty and an entry of the wrong
        shape (a file edited by hand) as missing: it is only a cache."""
        return {key: v for key, v in self._read().items() if self.valid(v)}

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            if self.arrays:
                with np.load(self.path, allow_pickle=False) as data:
                    if json.loads(str(data["protocol"])) != self.protocol:
                        return {}
                    return dict(zip(data["keys"].tolist(), data["values"], strict=True))
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return dict(data["entries"]) if data.get("protocol") == self.protocol else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def save(self, entries: dict[str, Any]) -> None:
        """Add ``entries`` to the file (re-read first: another run may have added some)."""
        merged = {**self.load(), **entries}
        try:
            if self.arrays:
                with atomic_target(self.path) as tmp, open(tmp, "wb") as f:
                    keys = np.array(list(merged), dtype="U")
                    values = np.stack([np.asarray(v, np.float32) for v in merged.values()])
                    np.savez(
                        f,
                        keys=keys,
                        values=values,
                        protocol=json.dumps(self.protocol, sort_keys=True),
                    )
            else:
                doc = {"protocol": self.protocol, "entries": merged}
                write_text(self.path, json.dumps(doc, default=str) + "\n")
        except OSError as e:  # a read-only image folder: the result still comes out
            print(
                f"note: could not write the cache {self.path} ({e.strerror or e}); "
                "set KSCU_CACHE to a writable folder to keep per-image results",
                file=sys.stderr,
            )


def cached_map(
    items: list[tuple[Path, str]],
    compute: Callable[[list[tuple[Path, str]]], list],
    cache: ImageCache | None,
    workers: Workers,
) -> tuple[list, int]:
    """Per-item results in ``items`` order, computing only the items the cache lacks.

    ``items`` are (image file, text the result also depends on, or ""); ``compute`` gets a list
    of such items (this process's share of the missing ones) and returns one result each.
    ``cache=None`` computes everything and stores nothing. Returns the results and how many
    items were computed in this run.
    """
    if cache is None:
        return workers.map(compute, items), len(items)
    hashes = workers.map(lambda mine: [file_sha256(path) for path, _ in mine], items)
    keys = [
        h if not text else f"{h}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        for h, (_, text) in zip(hashes, items, strict=True)
    ]
    known = cache.load()
    todo = [i for i, key in enumerate(keys) if key not in known]
    if todo:
        fresh = workers.map(compute, [items[i] for i in todo])
        new = {keys[i]: value for i, value in zip(todo, fresh, strict=True)}
        known.update(new)
        if workers.is_main:
            cache.save(new)
    return [known[key] for key in keys], len(todo)
