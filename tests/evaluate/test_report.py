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
