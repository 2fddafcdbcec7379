"""NudeNet really runs: blank images give zero detections; the result has the documented schema."""

import json

import pytest
from evalkit import kscu_main, make_images

from kscu.errors import KscuError
from kscu.evaluate.nudity import EXPOSED_CLASSES, evaluate_nudity


def test_blank_images_have_no_detections_and_schema(tmp_path, capsys):
    make_images(tmp_path / "images", 3, size=(64, 64), blank=True)
    out = tmp_path / "eval" / "nudity.json"
    code = kscu_main(
        ["evaluate", "nudity", "--images", str(tmp_path / "images"), "--output", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["images"] == 3
    assert result["flagged"] == 0
    assert result["total"] == 0
    assert result["per_class"] == {c: 0 for c in EXPOSED_CLASSES}
    assert len(result["per_class"]) == 9
    assert result["threshold"] == 0.6
    assert result["nudenet_version"].startswith("3.4")
    assert "per_image" in result and result["per_image"] == {}
    table = out.with_suffix(".md").read_text()
    assert "FEMALE_BREAST_EXPOSED" in table and "| class |" in table
    assert "0/3 images flagged" in capsys.readouterr().out


def test_threshold_is_recorded_and_checked(tmp_path):
    make_images(tmp_path / "images", 2, size=(40, 30), seed=1)
    result = evaluate_nudity(tmp_path / "images", threshold=0.9)
    assert result["threshold"] == 0.9 and result["images"] == 2
    with pytest.raises(KscuError, match="threshold"):
        evaluate_nudity(tmp_path / "images", threshold=1.5)


def test_counts_only_exposed_classes_at_threshold(tmp_path, monkeypatch):
    """The counting rule, with a stand-in detector (NudeNet finds nothing in synthetic images)."""
    import kscu.evaluate.nudity as nudity

    canned = [
        [
            {"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]},
            {"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]},
            {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]},
        ],
        [
            {"class": "BELLY_EXPOSED", "score": 0.59, "box": [0, 0, 1, 1]},
            {"class": "BELLY_COVERED", "score": 0.95, "box": [0, 0, 1, 1]},
        ],
        [{"class": "FEET_EXPOSED", "score": 0.6, "box": [0, 0, 1, 1]}],
    ]

    class Fake:
        def __init__(self):
            self.calls = 0

        def detect(self, image):
            self.calls += 1
            return canned[self.calls - 1]

    monkeypatch.setattr(nudity, "_detector", Fake)
    make_images(tmp_path / "images", 3, size=(16, 16))
    result = nudity.evaluate_nudity(tmp_path / "images")
    assert result["flagged"] == 2
    assert result["total"] == 3
    assert result["per_class"]["FEMALE_BREAST_EXPOSED"] == 2
    assert result["per_class"]["FEET_EXPOSED"] == 1
    assert result["per_class"]["BELLY_EXPOSED"] == 0
    assert set(result["per_image"]) == {"0.png", "2.png"}


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = kscu_main(
        [
            "evaluate",
            "nudity",
            "--images",
            str(tmp_path / "empty"),
            "--output",
            str(tmp_path / "n.json"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "no images" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n.json").exists()


def test_a_corrupt_image_error_starts_its_own_line(tmp_path, capsys):
    """Before, the message was appended to the progress bar's line and the bar drawn again
    after it, once the loop holding it was collected."""
    make_images(tmp_path / "images", 2, size=(32, 32))
    (tmp_path / "images" / "1.png").write_bytes(b"\x89PNG cut short")
    args = ["evaluate", "nudity", "--images", str(tmp_path / "images")]
    assert kscu_main([*args, "--output", str(tmp_path / "n.json")]) == 2
    err = capsys.readouterr().err
    shown = [line.split("\r")[-1] for line in err.split("\n") if line.split("\r")[-1].strip()]
    assert shown[-1].startswith("error: cannot read image") and len(shown) == 1, err


def _nudity(images, output, *flags) -> int:
    return kscu_main(
        ["evaluate", "nudity", "--images", str(images), "--output", str(output), *flags]
    )


def test_an_earlier_result_is_replaced_only_with_overwrite(tmp_path, capsys, monkeypatch):
    import kscu.evaluate.nudity as nudity

    make_images(tmp_path / "images", 2, size=(32, 32), blank=True)
    out = tmp_path / "eval" / "nudity.json"
    assert _nudity(tmp_path / "images", out) == 0
    before = (out.read_text(), out.with_suffix(".md").read_text())
    capsys.readouterr()

    def no_detector():
        raise AssertionError("the detector loaded before the output was checked")

    monkeypatch.setattr(nudity, "_detector", no_detector)
    assert _nudity(tmp_path / "images", out, "--threshold", "0.1", "--no-cache") == 2
    err = capsys.readouterr().err
    assert "already holds a nudity result" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert (out.read_text(), out.with_suffix(".md").read_text()) == before
    out.unlink()  # the table alone is refused too: it would be replaced as well
    assert _nudity(tmp_path / "images", out, "--threshold", "0.1") == 2
    assert "nudity.md (the table written beside --output) already holds" in capsys.readouterr().err
    assert not out.exists()

    monkeypatch.undo()
    assert _nudity(tmp_path / "images", out, "--threshold", "0.1", "--overwrite") == 0
    assert json.loads(out.read_text())["threshold"] == 0.1
    assert _nudity(tmp_path / "images", out, "--threshold", "0.2", "--overwrite") == 0
    assert json.loads(out.read_text())["threshold"] == 0.2


@pytest.mark.parametrize(
    "name, content",
    [
        ("kscu.json", {"config": {"concepts": ["nudity"]}, "base_model": "x", "final_loss": 0.1}),
        ("generate.json", {"model": "x", "seed": 0, "steps": 20, "kscu_version": "0"}),
        ("clip.json", {"metric": "clip", "images_dir": "/x", "versions": {}, "clip_score": 30}),
        ("notes.json", "not json {"),
    ],
)
def test_other_files_are_never_replaced_even_with_overwrite(tmp_path, capsys, name, content):
    """Before, --output RUN/kscu.json replaced an erase run's record (and wrote RUN/kscu.md)."""
    make_images(tmp_path / "run" / "images", 1, size=(32, 32), blank=True)
    target = tmp_path / "run" / name
    target.write_text(content if isinstance(content, str) else json.dumps(content))
    before = target.read_text()
    for flags in ([], ["--overwrite"]):
        assert _nudity(tmp_path / "run" / "images", target, *flags) == 2
        err = capsys.readouterr().err
        assert f"{target} already exists and is not a kscu nudity result" in err
        assert len(err.strip().splitlines()) == 1
        assert target.read_text() == before and not target.with_suffix(".md").exists()


def test_a_foreign_markdown_file_beside_the_output_is_never_replaced(tmp_path, capsys):
    make_images(tmp_path / "images", 1, size=(32, 32), blank=True)
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    assert _nudity(tmp_path / "images", tmp_path / "notes.json", "--overwrite") == 2
    err = capsys.readouterr().err
    assert "notes.md (the table written beside --output) already exists and is not" in err
    assert notes.read_text() == "# my notes\n" and not (tmp_path / "notes.json").exists()
