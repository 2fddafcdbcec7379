"""FID through pytorch-fid: its network with random weights, its statistic against hand sums."""

import json
import os

import numpy as np
import pytest
from evalkit import kscu_main, make_images

from kscu.errors import KscuError
from kscu.evaluate import fid


@pytest.fixture(scope="module")
def lib():
    """pytorch-fid's modules; CI installs them (there a miss fails), elsewhere a miss skips."""
    try:
        return fid.library()
    except KscuError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {e}")
        pytest.skip(f"pytorch-fid is not importable here: {e}")


def test_frechet_distance_two_dimensions_closed_form(lib):
    # (1-D sets are out of reach: scipy's sqrtm special-cases 1x1 matrices in a way pytorch-fid
    # 0.3.0 cannot unpack.) Diagonal covariances:
    # |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 = 5 + 1 + 1.
    d = fid.frechet_distance([0.0, 0.0], np.diag([1.0, 4.0]), [1.0, 2.0], np.diag([4.0, 9.0]))
    assert d == pytest.approx(7.0)
    # The same Gaussians rotated by 30 degrees: the distance does not change.
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    r = np.array([[c, -s], [s, c]])
    rotated = fid.frechet_distance(
        r @ [0.0, 0.0], r @ np.diag([1.0, 4.0]) @ r.T, r @ [1.0, 2.0], r @ np.diag([4.0, 9.0]) @ r.T
    )
    assert rotated == pytest.approx(7.0)


def test_statistics_of_known_features(lib):
    # Corners of a square of side 2: mean (1, 1), unbiased covariance 4/3 I; side 4 around (3, 3):
    # 16/3 I. FID = |(2, 2)|^2 + 2 (sqrt(4/3) - sqrt(16/3))^2 = 8 + 8/3.
    a = np.array([[0, 0], [2, 0], [0, 2], [2, 2]], float)
    b = np.array([[1, 1], [5, 1], [1, 5], [5, 5]], float)
    mu, sigma = fid.statistics(a)
    assert mu.tolist() == [1, 1] and sigma == pytest.approx(np.eye(2) * 4 / 3)
    assert fid.frechet_distance(*fid.statistics(a), *fid.statistics(b)) == pytest.approx(8 + 8 / 3)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    with pytest.raises(KscuError, match="at least 2 images"):
        fid.statistics(a[:1])


@pytest.fixture(scope="module")
def random_weights(lib, tmp_path_factory):
    """pytorch-fid's FID Inception, built by its own fid_inception_v3, with random weights."""
    import torch
    from safetensors.torch import save_file

    inception, _ = lib
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as m:  # build without any weight file: keep the init
        m.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None)
        net = inception.fid_inception_v3()
    path = tmp_path_factory.mktemp("inception") / "random.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _fid(tmp_path, images, reference, weights, *flags) -> dict:
    out = tmp_path / "fid.json"
    argv = ["evaluate", "fid", "--images", str(images), "--reference", str(reference)]
    argv += ["--output", str(out), "--inception-weights", str(weights), "--overwrite", *flags]
    assert kscu_main(argv) == 0
    return json.loads(out.read_text())


def test_fid_goes_through_pytorch_fid(tmp_path, lib, random_weights):
    images, ref = tmp_path / "a", tmp_path / "b"
    make_images(images, 3, size=(48, 48), seed=1)
    make_images(ref, 3, size=(64, 64), seed=2)
    stats = tmp_path / "ref.npz"
    result = _fid(tmp_path, images, ref, random_weights, "--save-reference-stats", str(stats))
    assert result["protocol"] == "pytorch-fid" and result["library_version"] == "0.3.0"
    assert "299x299" in result["resize"] and result["dims"] == 2048
    assert (result["images"], result["reference_images"]) == (3, 3) and result["fid"] > 0
    assert "pytorch-fid" in result["versions"] and "torchvision" in result["versions"]

    # the saved statistics (pytorch-fid's .npz format) are what pytorch-fid itself computes
    # for the reference folder with the same network and its own image loading
    _, fid_score = lib
    model = fid.load_inception(random_weights)
    mu, sigma = fid_score.calculate_activation_statistics(
        sorted(ref.glob("*.png")), model, batch_size=3, num_workers=0
    )
    with np.load(stats, allow_pickle=False) as saved:
        # numpy's comparison: pytest.approx walks sigma's 4M entries in Python (about 70 s)
        np.testing.assert_allclose(saved["mu"], mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(saved["sigma"], sigma, rtol=1e-6, atol=1e-9)


def test_rerun_computes_only_new_images(tmp_path, lib, random_weights):
    """64-d features (pytorch-fid's first block) keep this quick: sqrtm of 2048x2048 is not."""
    images, ref = tmp_path / "a", tmp_path / "b"
    make_images(images, 3, size=(32, 32), seed=1)
    make_images(ref, 3, size=(32, 32), seed=2)
    stats = tmp_path / "ref.npz"
    quick = ("--dims", "64")
    first = _fid(
        tmp_path, images, ref, random_weights, *quick, "--save-reference-stats", str(stats)
    )
    # computed_images / cached_images count --images' images (as README says); the reference
    # folder's have keys of their own (before, both sides were summed: 6 of "3 images")
    assert (first["computed_images"], first["cached_images"], first["dims"]) == (3, 0, 64)
    assert (first["reference_computed_images"], first["reference_cached_images"]) == (3, 0)
    again = _fid(tmp_path, images, ref, random_weights, *quick)
    assert (again["computed_images"], again["cached_images"]) == (0, 3)
    assert (again["reference_computed_images"], again["reference_cached_images"]) == (0, 3)
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-9)
    make_images(images, 2, size=(32, 32), start=3, seed=3)
    more = _fid(tmp_path, images, ref, random_weights, *quick)
    assert (more["computed_images"], more["cached_images"], more["images"]) == (2, 3, 5)
    assert (more["reference_computed_images"], more["reference_cached_images"]) == (0, 3)
    from_stats = _fid(tmp_path, images, stats, random_weights, *quick)
    assert from_stats["fid"] == pytest.approx(more["fid"], rel=1e-6)
    assert (from_stats["computed_images"], from_stats["cached_images"]) == (0, 5)
    assert from_stats["reference_computed_images"] == 0 and from_stats["reference_images"] == 3
    other_dims = _fid(tmp_path, images, ref, random_weights, "--dims", "192")
    # features of another block: another cache
    assert (other_dims["computed_images"], other_dims["reference_computed_images"]) == (5, 3)


def test_missing_weights_offline_names_the_file_and_folder(tmp_path, lib, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    import torch.hub

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    make_images(tmp_path / "a", 2, size=(16, 16))
    make_images(tmp_path / "b", 2, size=(16, 16), seed=3)
    argv = ["evaluate", "fid", "--images", str(tmp_path / "a"), "--reference", str(tmp_path / "b")]
    assert kscu_main([*argv, "--output", str(tmp_path / "fid.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert fid.WEIGHTS_FILE in err and str(tmp_path / "torch" / "hub" / "checkpoints") in err
    assert not (tmp_path / "fid.json").exists()


def test_wrong_weights_are_a_clear_error(tmp_path, lib, capsys):
    import argparse

    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(bad))
    make_images(tmp_path / "a", 2, size=(16, 16))
    make_images(tmp_path / "b", 2, size=(16, 16), seed=3)
    argv = ["evaluate", "fid", "--images", str(tmp_path / "a"), "--reference", str(tmp_path / "b")]
    argv += ["--output", str(tmp_path / "fid.json"), "--inception-weights", str(bad)]
    assert kscu_main(argv) == 2
    err = capsys.readouterr().err
    assert "not pytorch-fid's FID Inception" in err and len(err.strip().splitlines()) == 1
    bad.write_bytes(b"garbage")
    assert kscu_main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot read Inception weights" in err and len(err.strip().splitlines()) == 1
    pickled = tmp_path / "code.pth"  # before: torch's advice to unpickle it, in colour codes
    torch.save({"fc.weight": torch.zeros(2), "extra": argparse.Namespace()}, pickled)
    argv[-1] = str(pickled)
    assert kscu_main(argv) == 2
    err = capsys.readouterr().err
    assert "holds pickled objects besides tensors, which kscu never unpickles" in err, err
    assert "\x1b" not in err and "weights_only" not in err and len(err.strip().splitlines()) == 1
    pickled.write_bytes(b"<html>404 Not Found</html>")  # a failed download: no pickle at all
    assert kscu_main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot be read as tensors (damaged, or not a torch file)" in err, err
    assert "pickled objects" not in err and len(err.strip().splitlines()) == 1
    argv[-1] = str(tmp_path / "a")  # a folder: before, "does not exist"
    assert kscu_main(argv) == 2
    assert f"--inception-weights {tmp_path / 'a'} is a folder" in capsys.readouterr().err


def test_mixed_sizes_are_a_clear_error(tmp_path, lib, capsys):
    make_images(tmp_path / "a", 2, size=(32, 32))
    make_images(tmp_path / "a", 1, size=(64, 64), start=2)
    make_images(tmp_path / "b", 2, size=(32, 32))
    argv = ["evaluate", "fid", "--images", str(tmp_path / "a"), "--reference", str(tmp_path / "b")]
    assert kscu_main([*argv, "--output", str(tmp_path / "fid.json")]) == 2
    err = capsys.readouterr().err
    assert "mixes image sizes" in err and "32x32" in err and "64x64" in err


def test_reference_stats_file_is_checked(tmp_path, lib, capsys):
    make_images(tmp_path / "a", 2, size=(16, 16))
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3), sigma=np.eye(3))
    argv = ["evaluate", "fid", "--images", str(tmp_path / "a"), "--reference", str(bad)]
    assert kscu_main([*argv, "--output", str(tmp_path / "fid.json")]) == 2
    assert "not of 2048-d features" in capsys.readouterr().err
    np.savez(bad, sigma=np.eye(3))
    assert kscu_main([*argv, "--output", str(tmp_path / "fid.json")]) == 2
    assert "with mu and sigma" in capsys.readouterr().err
    assert kscu_main([*argv, "--dims", "100", "--output", str(tmp_path / "fid.json")]) == 2
    assert "64, 192, 768, 2048" in capsys.readouterr().err


def _fid_argv(tmp_path, weights, *flags) -> list[str]:
    """``evaluate fid`` of folder a against folder b (2 images of 16 px each), 64-d features."""
    make_images(tmp_path / "a", 2, size=(16, 16))
    make_images(tmp_path / "b", 2, size=(16, 16), seed=3)
    argv = ["evaluate", "fid", "--images", str(tmp_path / "a"), "--reference", str(tmp_path / "b")]
    return [*argv, "--inception-weights", str(weights), "--dims", "64", *flags]


def _no_network(monkeypatch) -> None:
    """Fail the test if the Inception network is built (the checks must come before it)."""

    def no_model(*a, **k):
        raise AssertionError("the Inception network loaded before the arguments were checked")

    monkeypatch.setattr(fid, "load_inception", no_model)


@pytest.mark.parametrize("size", ["0", "-1"])
def test_batch_size_must_be_positive(tmp_path, lib, random_weights, capsys, monkeypatch, size):
    """Before: a traceback from pytorch-fid's DataLoader, or (all cached) accepted."""
    argv = _fid_argv(tmp_path, random_weights)
    assert kscu_main([*argv, "--output", str(tmp_path / "first.json")]) == 0  # all cached now
    _no_network(monkeypatch)
    capsys.readouterr()
    out = tmp_path / "fid.json"
    assert kscu_main([*argv, "--output", str(out), "--batch-size", size]) == 2
    err = capsys.readouterr().err
    assert f"--batch-size must be a positive integer (got {size})" in err
    assert len(err.strip().splitlines()) == 1
    assert kscu_main([*argv, "--output", str(out), "--batch-size", size, "--no-cache"]) == 2
    assert "--batch-size" in capsys.readouterr().err and not out.exists()


def test_fid_result_is_replaced_only_with_overwrite(tmp_path, lib, random_weights, capsys):
    out = tmp_path / "fid.json"
    argv = _fid_argv(tmp_path, random_weights, "--output", str(out))
    assert kscu_main(argv) == 0
    out.write_text(out.read_text().replace('"fid":', '"old_fid":', 1))
    assert kscu_main(argv) == 2
    assert "already holds a fid result" in capsys.readouterr().err
    assert '"old_fid"' in out.read_text()
    assert kscu_main([*argv, "--overwrite"]) == 0
    assert '"old_fid"' not in out.read_text()


def test_save_reference_stats_is_checked_before_any_feature(
    tmp_path, lib, random_weights, capsys, monkeypatch
):
    """Before: every feature was computed, then the error named a temp file."""
    (tmp_path / "afile").write_text("")
    stats = tmp_path / "afile" / "ref.npz"
    argv = _fid_argv(tmp_path, random_weights, "--output", str(tmp_path / "fid.json"))
    _no_network(monkeypatch)
    assert kscu_main([*argv, "--save-reference-stats", str(stats)]) == 2
    err = capsys.readouterr().err
    assert f"--save-reference-stats {stats} goes through the file" in err
    assert len(err.strip().splitlines()) == 1
    assert ".tmp" not in err and not (tmp_path / "fid.json").exists()


def test_save_reference_stats_replaces_only_earlier_stats(tmp_path, lib, random_weights, capsys):
    stats = tmp_path / "ref.npz"
    argv = _fid_argv(tmp_path, random_weights, "--save-reference-stats", str(stats))
    assert kscu_main([*argv, "--output", str(tmp_path / "1.json")]) == 0
    before = stats.read_bytes()
    assert kscu_main([*argv, "--output", str(tmp_path / "2.json")]) == 2
    err = capsys.readouterr().err
    assert f"--save-reference-stats {stats} already holds" in err and "--overwrite" in err
    assert stats.read_bytes() == before and not (tmp_path / "2.json").exists()
    assert kscu_main([*argv, "--output", str(tmp_path / "2.json"), "--overwrite"]) == 0

    np.savez(stats, mu=np.zeros(64), sigma=np.eye(64))  # someone else's statistics
    before = stats.read_bytes()
    assert kscu_main([*argv, "--output", str(tmp_path / "3.json"), "--overwrite"]) == 2
    assert "is not a kscu reference statistics file" in capsys.readouterr().err
    assert stats.read_bytes() == before and not (tmp_path / "3.json").exists()


def test_custom_weights_are_named_and_flagged_by_report(tmp_path, lib, random_weights):
    """Before: the JSON named pytorch-fid's release file whatever --inception-weights gave,
    so report could not tell runs scored with other weights apart."""
    import hashlib

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other.safetensors"  # the same tensors, so another file's bytes
    save_file(load_file(str(random_weights)), str(other), metadata={"copy": "1"})
    results = []
    for run, weights in (("r1", random_weights), ("r2", other)):
        out = tmp_path / run / "eval" / "fid.json"
        assert kscu_main(_fid_argv(tmp_path, weights, "--output", str(out))) == 0
        results.append(json.loads(out.read_text()))
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        assert weights.name in results[-1]["inception_weights"]
        assert digest in results[-1]["inception_weights"]
        assert weights.name in results[-1]["feature_extractor"]
        assert fid.WEIGHTS_FILE not in results[-1]["feature_extractor"]
    report = tmp_path / "report.md"
    assert (
        kscu_main(["report", str(tmp_path / "r1"), str(tmp_path / "r2"), "--output", str(report)])
        == 0
    )
    line = next(x for x in report.read_text().splitlines() if x.startswith("- fid:"))
    shown = next(part for part in line.split("; ") if part.startswith("inception_weights:"))
    assert "random.safetensors" in shown and "other.safetensors" in shown
    assert shown.endswith("(DIFFERS between runs)")


def _stats_run(tmp_path, weights, stats) -> list[str]:
    """``evaluate fid`` of folder a (2 images of 16 px) against the statistics file ``stats``,
    64-d features, writing from_stats.json."""
    make_images(tmp_path / "a", 2, size=(16, 16))
    argv = ["evaluate", "fid", "--images", str(tmp_path / "a"), "--reference", str(stats)]
    argv += ["--inception-weights", str(weights), "--dims", "64"]
    return [*argv, "--output", str(tmp_path / "from_stats.json")]


def _one_line(capsys) -> str:
    """What a failed command printed: one line."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def _warnings(capsys) -> list[str]:
    """The warning lines a command printed (among pytorch-fid's progress bars)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]


def test_saved_stats_are_checked_against_the_weights_in_use(
    tmp_path, lib, random_weights, capsys, monkeypatch
):
    """Before: statistics made with one network were compared with features of another."""
    from safetensors.torch import load_file, save_file

    make_images(tmp_path / "a", 2, size=(16, 16))
    make_images(tmp_path / "b", 2, size=(16, 16), seed=3)
    stats = tmp_path / "ref.npz"
    saving = ("--dims", "64", "--save-reference-stats", str(stats))
    made = _fid(tmp_path, tmp_path / "a", tmp_path / "b", random_weights, *saving)
    assert made["reference_provenance"] == "computed"
    capsys.readouterr()
    assert kscu_main(_stats_run(tmp_path, random_weights, stats)) == 0
    same = json.loads((tmp_path / "from_stats.json").read_text())
    assert same["fid"] == pytest.approx(made["fid"], rel=1e-6)  # the numbers are unchanged
    assert same["reference_provenance"] == "checked" and same["reference_unchecked_settings"] == []
    assert same["reference_images"] == 2 and _warnings(capsys) == []

    other = tmp_path / "other.safetensors"  # the same tensors, another file: not provably equal
    save_file(load_file(str(random_weights)), str(other), metadata={"copy": "1"})
    (tmp_path / "from_stats.json").unlink()
    _no_network(monkeypatch)
    assert kscu_main(_stats_run(tmp_path, other, stats)) == 2
    err = _one_line(capsys)
    assert f"--reference {stats} was made with other FID settings" in err
    assert 'Inception weights "random.safetensors (sha256' in err
    assert 'there, "other.safetensors (sha256' in err and "--inception-weights" in err
    assert "--save-reference-stats" in err and not (tmp_path / "from_stats.json").exists()


ALL_SETTINGS = ["protocol", "dims", "resize", "inception_weights"]  # what stats must record


def _info(weights, **changes) -> dict:
    """The record --save-reference-stats writes for 64-d features of ``weights``, changed."""
    import hashlib

    label = fid.weights_label(weights, hashlib.sha256(weights.read_bytes()).hexdigest())
    made = {"protocol": "pytorch-fid", "library_version": "0.3.0", "resize": fid.RESIZE}
    return {**made, "dims": 64, "inception_weights": label, "images": 2, **changes}


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"protocol": "clean-fid"}, 'feature extractor "clean-fid" there, "pytorch-fid" now'),
        ({"dims": 2048}, "feature dims 2048 there, 64 now"),
        ({"resize": "PIL bicubic to 299x299"}, 'resize "PIL bicubic to 299x299" there, "bilinear'),
        (
            {"inception_weights": fid.weights_label(None, fid.WEIGHTS_FILE)},
            f"Inception weights \"{fid.WEIGHTS_FILE} (pytorch-fid's release",
        ),
    ],
    ids=["extractor", "dims", "resize", "weights"],
)
def test_stats_made_otherwise_are_refused_before_any_feature(
    tmp_path, lib, random_weights, capsys, monkeypatch, changes, said
):
    stats = tmp_path / "ref.npz"
    fid.save_stats(stats, np.zeros(64), np.eye(64), _info(random_weights, **changes))
    _no_network(monkeypatch)
    assert kscu_main(_stats_run(tmp_path, random_weights, stats)) == 2
    err = _one_line(capsys)
    assert f"--reference {stats} was made with other FID settings ({said}" in err
    assert "recompute the statistics" in err and not (tmp_path / "from_stats.json").exists()


@pytest.mark.parametrize(
    ("info", "unchecked", "said"),
    [
        (None, ALL_SETTINGS, "has no kscu record of how it was made"),
        ("not json", ALL_SETTINGS, "has no kscu record of how it was made"),
        ("old kscu", ["inception_weights"], "does not record its Inception weights"),
    ],
    ids=["pytorch-fid", "foreign-info", "older-kscu"],
)
def test_stats_of_unknown_provenance_are_used_and_flagged(
    tmp_path, lib, random_weights, capsys, info, unchecked, said
):
    """pytorch-fid's own statistics (mu, sigma only) are legitimate: used, never assumed to
    match. Before: no warning, and "reference_images": 0."""
    stats = tmp_path / "ref.npz"
    arrays = {"mu": np.zeros(64), "sigma": np.eye(64)}
    if info == "not json":
        arrays["info"] = "made by someone else"
    elif info == "old kscu":  # kscu before the weights were recorded
        old = _info(random_weights)
        del old["inception_weights"]
        arrays["info"] = json.dumps(old)
    np.savez(stats, **arrays)
    assert kscu_main(_stats_run(tmp_path, random_weights, stats)) == 0
    [warning] = _warnings(capsys)
    assert warning.startswith(f"warning: --reference {stats} {said}")
    assert warning.endswith("the result records reference_provenance unknown")
    result = json.loads((tmp_path / "from_stats.json").read_text())
    assert result["reference_provenance"] == "unknown"
    assert result["reference_unchecked_settings"] == unchecked
    assert result["reference_images"] == (2 if info == "old kscu" else None)
    assert np.isfinite(result["fid"])


def test_release_file_given_by_path_matches_the_hub_cache_release():
    """torch hub's own check: the release file's sha256 begins with the digits in its name."""
    release = fid.weights_key(fid.weights_label(None, fid.WEIGHTS_FILE))
    given = fid.weights_key(fid.weights_label(fid.WEIGHTS_FILE, "6726825d" + "0" * 56))
    other = fid.weights_key(fid.weights_label(fid.WEIGHTS_FILE, "0" * 64))
    assert release == given == fid.WEIGHTS_FILE and other == "0" * 64
    assert fid.weights_key("someone's label") == "someone's label"


def _write_npy(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(64))


def _write_truncated(path):
    np.savez(path, mu=np.zeros(64), sigma=np.eye(64))
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    ("write", "said"),
    [
        (_write_npy, "holds a single .npy array"),
        (lambda p: p.write_bytes(b""), "is not a readable .npz"),
        (_write_truncated, "is not a readable .npz"),
        (lambda p: p.write_text("mu,sigma\n"), "is not an .npz archive"),
        (
            lambda p: np.savez(p, mu=np.array([None] * 64, object), sigma=np.eye(64)),
            "cannot read its mu (Object arrays cannot be loaded when allow_pickle=False)",
        ),
        (lambda p: np.savez(p, mu=np.zeros(64) + 1j, sigma=np.eye(64)), "not real numbers"),
        (
            lambda p: np.savez(p, mu=np.full(64, np.nan), sigma=np.eye(64)),
            "holds 64 non-finite values (NaN or inf) in mu",
        ),
        (
            lambda p: np.savez(p, mu=np.zeros(64), sigma=np.diag([np.inf] * 64)),
            "holds 64 non-finite values (NaN or inf) in sigma",
        ),
        (lambda p: np.savez(p, mu=np.zeros(64), sigma=np.eye(64)[:63]), "sigma of shape (63, 64)"),
        (
            lambda p: np.savez(p, mu=np.zeros(64), sigma=np.triu(np.ones((64, 64)))),
            "holds a sigma that is not symmetric (by up to 1)",
        ),
        (
            lambda p: np.savez(p, mu=np.zeros(64), sigma=-np.eye(64)),
            "holds a sigma that is not a covariance (an eigenvalue of -1)",
        ),
        (lambda p: np.savez(p, mu=np.zeros(64)), "with mu and sigma (no sigma)"),
    ],
    ids=[
        "npy",
        "empty",
        "truncated",
        "text",
        "object",
        "complex",
        "nan",
        "inf",
        "shape",
        "asymmetric",
        "negative",
        "no-sigma",
    ],
)
def test_malformed_stats_are_one_line_errors(
    tmp_path, lib, random_weights, capsys, monkeypatch, write, said
):
    """Before: tracebacks (.npy, empty, truncated), and complex, NaN or inf statistics were
    used; text, object arrays, shape and a missing sigma were one-line errors already."""
    stats = tmp_path / "ref.npz"
    write(stats)
    _no_network(monkeypatch)
    assert kscu_main(_stats_run(tmp_path, random_weights, stats)) == 2
    err = _one_line(capsys)
    assert f"--reference {stats} " in err and said in err
    assert not (tmp_path / "from_stats.json").exists()


def test_sixteen_bit_images_are_refused_not_clipped(tmp_path, lib, capsys):
    """pytorch-fid reads the files itself and its RGB conversion clips 16-bit values to white."""
    import numpy as np
    from PIL import Image

    make_images(tmp_path / "b", 2, size=(16, 16))
    (tmp_path / "a").mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16), 1000 * (i + 1), dtype=np.uint16)).save(
            tmp_path / "a" / f"{i}.png"
        )
    argv = ["evaluate", "fid", "--images", str(tmp_path / "a"), "--reference", str(tmp_path / "b")]
    assert kscu_main([*argv, "--output", str(tmp_path / "fid.json")]) == 2
    err = capsys.readouterr().err
    assert "is a 16-bit grayscale image" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "fid.json").exists()
