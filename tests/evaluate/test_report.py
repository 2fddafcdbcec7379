"""`kscu report`: one page comparing runs, checked as text and rendered in headless Chromium."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from evalkit import kscu_main, make_images, write_csv
from PIL import Image


def _run(root: Path, name: str, erased: bool, flagged: int, fid: float | None, seed: int):
    run = root / name
    make_images(run / "images", 4, size=(64, 64), seed=seed)
    write_csv(
        run / "images" / "manifest.csv",
        ["case_number", "prompt", "seed", "guidance", "file"],
        [[c, f"prompt {c}", c, 7.5, f"{c}.png"] for c in range(4)],
    )
    (run / "eval").mkdir()
    nudity = {
        "metric": "nudity",
        "images": 4,
        "flagged": flagged,
        "total": flagged * 2,
        "per_class": {"FEMALE_BREAST_EXPOSED": flagged, "BELLY_EXPOSED": flagged},
        "threshold": 0.6,
        "nudenet_version": "3.4.2",
        "versions": {"torch": "x"},
        "per_image": {},
    }
    (run / "eval" / "nudity.json").write_text(json.dumps(nudity))
    if fid is not None:
        (run / "eval" / "fid.json").write_text(
            json.dumps({"metric": "fid", "fid": fid, "images": 4})
        )
    if erased:
        (run / "kscu.json").write_text(
            json.dumps(
                {
                    "config": {"concepts": ["nudity"], "mode": "nudity", "method": "kscu"},
                    "base_model": "tiny/sd",
                    "final_loss": 0.0123,
                    "seconds": 42.0,
                }
            )
        )
        (run / "weights.safetensors").write_bytes(b"")
    return run


@pytest.fixture
def runs(tmp_path):
    return [
        _run(tmp_path, "erased-kscu", True, 1, 14.1, 1),
        _run(tmp_path, "base", False, 3, None, 2),
    ]


def test_markdown_report(tmp_path, runs):
    out = tmp_path / "report.md"
    assert kscu_main(["report", *map(str, runs), "--output", str(out)]) == 0
    text = out.read_text()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| run |"))
    for col in (
        "nudity/flagged",
        "nudity/total",
        "nudity/per_class/FEMALE_BREAST_EXPOSED",
        "fid/fid",
        "train/final_loss",
    ):
        assert col in header
    assert "threshold" not in header  # a setting, listed under Protocol instead
    base = next(line for line in lines if line.startswith("| base |"))
    erased = next(line for line in lines if line.startswith("| erased-kscu |"))
    assert lines.index(base) < lines.index(erased)  # the base model comes first
    assert "base model" in base and "erased: nudity" in erased and "14.1" in erased
    assert "threshold: 0.6" in text and "nudenet_version: 3.4.2" in text
    assert "](erased-kscu/images/0.png)" in text  # relative to the report


def test_html_report_in_headless_chromium(tmp_path, runs):
    out = tmp_path / "report.html"
    assert kscu_main(["report", *map(str, runs), "--output", str(out), "--samples", "3"]) == 0
    page = out.read_text()
    assert page.count("data:image/jpeg;base64,") == 6  # 2 runs x 3 samples, embedded
    assert "nudity/flagged ↓" in page and "fid/fid ↓" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        reason = "chromium not installed (apt-get install -y chromium; .ci/run does)"
        if os.environ.get("CI") == "true":  # CI installs it: there a miss is a failure
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,800",
            f"--screenshot={shot}",
            out.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", out.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'id="metrics"' in dom and dom.count("<img") == 6
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (800, 1200)
    assert img.std() > 10  # text and thumbnails drawn, not a blank page
    # the thumbnails are drawn: the noise images make the sample region very busy
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 1000


def test_run_dir_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert kscu_main(["report", str(tmp_path / "empty"), "--output", str(tmp_path / "r.html")]) == 2
    assert "no kscu.json" in capsys.readouterr().err
    assert (
        kscu_main(["report", str(tmp_path / "missing"), "--output", str(tmp_path / "r.html")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "existing.csv").write_text("prompt\n")  # a file where a run folder belongs
    args = ["report", str(tmp_path / "existing.csv"), "--output", str(tmp_path / "r.html")]
    assert kscu_main(args) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    make_images(tmp_path / "r" / "images", 1)
    assert kscu_main(["report", str(tmp_path / "r"), "--output", str(tmp_path / "r.pdf")]) == 2
    assert ".html or .md" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
    out = ["--output", str(tmp_path / "r.html")]
    assert kscu_main(["report", str(tmp_path / "r"), *out, "--samples=-1"]) == 2
    assert "--samples must be >= 0" in capsys.readouterr().err  # before: one image fewer
    (tmp_path / "adir.html").mkdir()
    assert kscu_main(["report", str(tmp_path / "r"), "--output", str(tmp_path / "adir.html")]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err  # before: a traceback


def test_an_earlier_report_is_replaced_only_with_overwrite(tmp_path, runs, capsys):
    for name in ("report.html", "report.md"):
        out = tmp_path / name
        args = ["report", *map(str, runs), "--output", str(out)]
        assert kscu_main(args) == 0
        out.write_text(out.read_text() + "OLD")
        assert kscu_main(args) == 2
        err = capsys.readouterr().err
        assert f"--output {out} already holds a report" in err and "--overwrite" in err
        assert len(err.strip().splitlines()) == 1 and out.read_text().endswith("OLD")
        assert kscu_main([*args, "--overwrite"]) == 0
        assert not out.read_text().endswith("OLD")


@pytest.mark.parametrize(
    "name, text",
    [
        ("README.md", "# my project\n\n## kscu report\n"),
        ("index.html", "<!doctype html><title>mine</title>"),
        ("erased-kscu/eval/nudity.md", None),  # the nudity table an evaluation wrote
    ],
)
def test_other_files_are_never_replaced_even_with_overwrite(tmp_path, runs, capsys, name, text):
    out = tmp_path / name
    if text is not None:
        out.write_text(text)
    else:
        out.write_text("NudeNet 3.4.2, EXPOSED classes\n\n| class | detections |\n")
    before = out.read_text()
    for flags in ([], ["--overwrite"]):
        assert kscu_main(["report", *map(str, runs), "--output", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert f"--output {out} already exists and is not a kscu report" in err
        assert len(err.strip().splitlines()) == 1 and out.read_text() == before


@pytest.mark.parametrize(
    "manifest",
    [
        b"\xff\xfecase_number,prompt\n0,a\n",  # not UTF-8: before, a UnicodeDecodeError traceback
        b'case_number,prompt\n0,"' + b"x" * 200_000 + b'"\n',  # a csv.Error
    ],
)
def test_an_unreadable_manifest_is_a_one_line_error(tmp_path, runs, capsys, manifest):
    path = runs[0] / "images" / "manifest.csv"
    path.write_bytes(manifest)
    out = tmp_path / "r.html"
    assert kscu_main(["report", *map(str, runs), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read image manifest {path}")
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_manifest_with_a_byte_order_mark_is_read(tmp_path, runs):
    path = runs[0] / "images" / "manifest.csv"
    path.write_text(path.read_text().replace("prompt 0", "bom prompt 0"), "utf-8-sig")
    page = tmp_path / "r.html"
    assert kscu_main(["report", str(runs[0]), "--output", str(page)]) == 0
    assert "bom prompt 0" in page.read_text()


def test_an_empty_images_folder_names_the_run_folder(tmp_path, capsys):
    """Before: "--images RUN/images has no images", a flag report does not have."""
    run = tmp_path / "emptyimgrun"
    (run / "images").mkdir(parents=True)
    assert kscu_main(["report", str(run), "--output", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "--images" not in err and f"{run / 'images'} has no images" in err
    assert "kscu generate" in err and "remove the folder" in err
    assert len(err.strip().splitlines()) == 1


def test_the_same_run_twice_is_refused(tmp_path, runs, capsys):
    """Before: two rows of one model, which read as two results."""
    erased = runs[0]
    again = tmp_path / "." / erased.name
    args = ["report", str(erased), str(again), "--output", str(tmp_path / "r.md")]
    assert kscu_main(args) == 2
    err = capsys.readouterr().err
    assert "is given twice" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.md").exists()
