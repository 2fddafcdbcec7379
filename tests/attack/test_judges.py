"""The judges read the saved PNGs and say whether the concept is there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kscu.attack.judges import ClipJudge, NudityJudge, WorldJudge, judge_kind, make_judge
from kscu.errors import KscuError
from kscu.preview import save_png
from kscu.sampling import to_pil
from kscu.world.data import render


def _pngs(folder, shapes: list[str]) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate(shapes):
        image = torch.from_numpy(render(shape, "red", "plain", rng))[None]
        path = folder / f"{i}.png"
        save_png(to_pil(image)[0], path)
        paths.append(path)
    return paths


def test_world_judge_finds_the_shape_and_only_it(tmp_path):
    paths = _pngs(tmp_path, ["heart", "heart", "circle", "square"])
    verdicts = WorldJudge("heart").verdicts(paths)
    assert [v["found"] for v in verdicts] == [True, True, False, False]
    assert verdicts[2]["label"] == "circle"


def test_nudity_judge_finds_nothing_in_a_drawn_shape(tmp_path):
    verdicts = NudityJudge().verdicts(_pngs(tmp_path, ["heart"]))
    assert verdicts == [{"found": False, "detections": []}]


def test_clip_judge_gives_a_probability(tmp_path, tiny_clip):
    verdicts = ClipJudge("heart", "class", str(tiny_clip)).verdicts(_pngs(tmp_path, ["heart"]))
    assert 0 <= verdicts[0]["probability"] <= 1
    assert verdicts[0]["found"] == (verdicts[0]["probability"] > 0.5)


def test_auto_picks_the_judge_by_model_and_mode():
    assert judge_kind("auto", "class", True, None) == "world"
    assert judge_kind("auto", "nudity", False, None) == "nudenet"
    assert judge_kind("auto", "class", False, "church") == "imagenet"
    assert judge_kind("auto", "style", False, None) == "clip"
    with pytest.raises(KscuError, match="--imagenet-class"):
        make_judge("imagenet", "church", "class", False)
