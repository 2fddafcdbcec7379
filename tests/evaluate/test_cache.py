"""Per-image caches: a rerun computes only new images, counted in the result JSON."""

import json
import shutil

import numpy as np
import pytest
from evalkit import kscu_main, make_images, write_csv
from PIL import Image

import kscu.evaluate.nudity as nudity
from kscu.evaluate.cache import ImageCache, cache_folder
from kscu.evaluate.classify import evaluate_classify
from kscu.evaluate.clip_score import evaluate_clip


def _nudity(images, out, *flags) -> dict:
    argv = ["evaluate", "nudity", "--images", str(images), "--output", str(out), *flags]
    assert kscu_main(argv) == 0
    return json.loads(out.read_text())


def test_rerun_computes_only_new_images(tmp_path):
    images = tmp_path / "images"
    make_images(images, 3, size=(48, 48), seed=1)
    first = _nudity(images, tmp_path / "n1.json")
    assert (first["computed_images"], first["cached_images"]) == (3, 0)
    again = _nudity(images, tmp_path / "n2.json")
    assert (again["computed_images"], again["cached_images"]) == (0, 3)
    for key in ("flagged", "total", "per_class", "per_image"):
        assert again[key] == first[key]

    make_images(images, 2, size=(48, 48), start=3, seed=2)
    more = _nudity(images, tmp_path / "n3.json")
    assert (more["computed_images"], more["cached_images"], more["images"]) == (2, 3, 5)

    # the key is the content: a renamed image is still known, an edited one is new
    (images / "0.png").rename(images / "10.png")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(images / "1.png")
    edited = _nudity(images, tmp_path / "n4.json")
    assert (edited["computed_images"], edited["cached_images"]) == (1, 4)

    forced = _nudity(images, tmp_path / "n5.json", "--no-cache")
    assert forced["computed_images"] == 5


@pytest.fixture
def detections(monkeypatch) -> list:
    """A stand-in NudeNet finding one exposed belly per image; returns its calls, one a run."""
    calls = []

    class Fake:
        def detect(self, image):
            calls.append(1)
            return [{"class": "BELLY_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]}]

    monkeypatch.setattr(nudity, "_detector", Fake)
    return calls


def test_threshold_is_applied_after_the_cache(tmp_path, detections):
    """Raw detections are cached, so another threshold needs no detector run."""
    calls = detections
    make_images(tmp_path / "images", 2, size=(16, 16))
    low = nudity.evaluate_nudity(tmp_path / "images", threshold=0.6)
    high = nudity.evaluate_nudity(tmp_path / "images", threshold=0.8)
    assert len(calls) == 2  # one detector run per image, in the first evaluation only
    assert (low["flagged"], high["flagged"]) == (2, 0)
    assert (high["computed_images"], high["cached_images"]) == (0, 2)


def test_a_damaged_entry_is_computed_again(tmp_path, detections):
    """Before: an entry edited to null (or any other shape) was a TypeError in evaluate nudity;
    now it is computed again, as an unreadable cache file already was."""
    calls = detections
    make_images(tmp_path / "images", 3, size=(16, 16))
    first = nudity.evaluate_nudity(tmp_path / "images")
    (path,) = cache_folder(tmp_path / "images").glob("nudity-*.json")
    doc = json.loads(path.read_text())
    keys = sorted(doc["entries"])
    doc["entries"][keys[0]] = None
    doc["entries"][keys[1]] = [{"class": "BELLY_EXPOSED", "score": "high"}]
    path.write_text(json.dumps(doc))
    again = nudity.evaluate_nudity(tmp_path / "images")
    assert (again["computed_images"], again["cached_images"]) == (2, 1) and len(calls) == 5
    assert again["per_image"] == first["per_image"]


def test_cache_location_and_atomic_file(tmp_path, monkeypatch):
    make_images(tmp_path / "images", 2, size=(16, 16))
    _nudity(tmp_path / "images", tmp_path / "n.json")
    files = list((tmp_path / "images" / ".kscu-cache").iterdir())
    assert [f.suffix for f in files] == [".json"]  # one file, no temporary left behind
    doc = json.loads(files[0].read_text())
    assert doc["protocol"]["metric"] == "nudity" and len(doc["entries"]) == 2

    monkeypatch.setenv("KSCU_CACHE", str(tmp_path / "shared"))
    assert cache_folder(tmp_path / "images") == tmp_path / "shared" / "evaluate"
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "images", copy, ignore=shutil.ignore_patterns(".kscu-cache"))
    first = _nudity(copy, tmp_path / "c1.json")
    other = tmp_path / "other"
    shutil.copytree(copy, other, ignore=shutil.ignore_patterns(".kscu-cache"))
    second = _nudity(other, tmp_path / "c2.json")  # same bytes, other folder: shared cache
    assert (first["computed_images"], second["computed_images"]) == (2, 0)
    assert not (copy / ".kscu-cache").exists()


def test_protocol_change_misses(tmp_path):
    cache = ImageCache(tmp_path, "m", {"model": "a"})
    cache.save({"k": [1]})
    assert ImageCache(tmp_path, "m", {"model": "a"}).load() == {"k": [1]}
    assert ImageCache(tmp_path, "m", {"model": "b"}).load() == {}
    arrays = ImageCache(tmp_path, "f", {"model": "a"}, arrays=True)
    arrays.save({"x": np.arange(3.0), "y": np.ones(3)})
    arrays.save({"z": np.zeros(3)})  # merged with what is there
    loaded = arrays.load()
    assert sorted(loaded) == ["x", "y", "z"] and loaded["x"].tolist() == [0, 1, 2]
    arrays.path.write_bytes(b"not an npz")  # a damaged cache is only a miss
    assert arrays.load() == {}


def test_clip_cache_is_keyed_by_image_and_prompt(tmp_path, tiny_clip):
    make_images(tmp_path / "images", 3, size=(32, 32))
    rows = [[0, "a cat"], [1, "a dog"], [2, "a church"]]
    csv = write_csv(tmp_path / "p.csv", ["case_number", "prompt"], rows)
    first = evaluate_clip(tmp_path / "images", csv, str(tiny_clip))
    again = evaluate_clip(tmp_path / "images", csv, str(tiny_clip))
    assert (first["computed_images"], again["computed_images"]) == (3, 0)
    assert again["per_image"] == first["per_image"]
    rows[1][1] = "a horse"  # same image, other prompt: another score
    csv = write_csv(tmp_path / "p.csv", ["case_number", "prompt"], rows)
    changed = evaluate_clip(tmp_path / "images", csv, str(tiny_clip))
    assert (changed["computed_images"], changed["cached_images"]) == (1, 2)


def test_classify_cache(tmp_path, tiny_classifier):
    csv = write_csv(tmp_path / "p.csv", ["case_number", "prompt", "class"], [[0, "a", "church"]])
    make_images(tmp_path / "one", 1, size=(40, 40))
    first = evaluate_classify(tmp_path / "one", csv, str(tiny_classifier))
    again = evaluate_classify(tmp_path / "one", csv, str(tiny_classifier))
    assert (first["computed_images"], again["computed_images"]) == (1, 0)
    assert again["per_image"] == first["per_image"]


def test_counts_are_not_report_columns():
    from kscu.evaluate.report import _numbers

    cols = _numbers("nudity", {"computed_images": 1, "cached_images": 2, "flagged": 0})
    assert list(cols) == ["nudity/flagged"]
