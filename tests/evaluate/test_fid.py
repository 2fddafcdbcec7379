"""FID: the statistic against a hand computation, and the image path end to end."""

import json

import numpy as np
import pytest
from evalkit import kscu_main, make_images

from kscu.evaluate.fid import (
    WEIGHTS_FILE,
    FIDInception,
    fid_from_features,
    frechet_distance,
)


def test_fid_matches_hand_computation():
    # Set 1: corners of a square of side 2 -> mean (1, 1), unbiased covariance 4/3 I.
    a = np.array([[0, 0], [2, 0], [0, 2], [2, 2]], float)
    # Set 2: corners of a square of side 4 -> mean (3, 3), covariance 16/3 I.
    b = np.array([[1, 1], [5, 1], [1, 5], [5, 5]], float)
    # |mu1-mu2|^2 = 8; Tr(S1 + S2 - 2 sqrt(S1 S2)) = 2 * (4/3 + 16/3 - 2 * 8/3) = 8/3
    assert fid_from_features(a, b) == pytest.approx(8 + 8 / 3, rel=1e-9)
    assert fid_from_features(a, a) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_one_dimension():
    # In 1-D the distance is (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_frechet_distance_non_diagonal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) @ np.array([[1, 0.5, 0], [0, 1, 0.3], [0, 0, 2]])
    y = rng.normal(size=(300, 3)) + 1
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T  # S1^(1/2)
    w2 = np.linalg.eigvalsh(r1 @ s2 @ r1)  # Tr((S1 S2)^(1/2)) = Tr((S1^½ S2 S1^½)^½)
    d = x.mean(0) - y.mean(0)
    want = d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(w2).sum()
    assert fid_from_features(x, y) == pytest.approx(want, rel=1e-8)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """The FID network with random weights, saved the way a converted weight file would be."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in FIDInception().state_dict().items()}, str(path))
    return path


def test_fid_end_to_end(tmp_path, random_inception):
    make_images(tmp_path / "a", 2, size=(48, 48), seed=1)
    make_images(tmp_path / "b", 2, size=(64, 64), seed=2)
    out = tmp_path / "fid.json"
    args = [
        "evaluate",
        "fid",
        "--images",
        str(tmp_path / "a"),
        "--reference",
        str(tmp_path / "b"),
        "--output",
        str(out),
        "--inception-weights",
        str(random_inception),
    ]
    assert kscu_main(args) == 0
    result = json.loads(out.read_text())
    assert result["metric"] == "fid" and result["images"] == 2
    assert result["reference_images"] == 2 and result["fid"] > 0
    assert "versions" in result and WEIGHTS_FILE in result["feature_extractor"]


def test_missing_weights_offline_names_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # empty cache
    import torch.hub

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    make_images(tmp_path / "a", 2, size=(16, 16))
    make_images(tmp_path / "b", 2, size=(16, 16), seed=3)
    code = kscu_main(
        [
            "evaluate",
            "fid",
            "--images",
            str(tmp_path / "a"),
            "--reference",
            str(tmp_path / "b"),
            "--output",
            str(tmp_path / "fid.json"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert WEIGHTS_FILE in err and "--inception-weights" in err
    assert not (tmp_path / "fid.json").exists()


def test_mixed_sizes_are_a_clear_error(tmp_path, capsys):
    make_images(tmp_path / "a", 2, size=(32, 32))
    make_images(tmp_path / "a", 1, size=(64, 64), start=2)
    make_images(tmp_path / "b", 2, size=(32, 32))
    code = kscu_main(
        [
            "evaluate",
            "fid",
            "--images",
            str(tmp_path / "a"),
            "--reference",
            str(tmp_path / "b"),
            "--output",
            str(tmp_path / "fid.json"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "mixes image sizes" in err and "32x32" in err and "64x64" in err
