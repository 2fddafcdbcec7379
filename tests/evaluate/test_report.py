"""`kscu report`: one page comparing runs, checked as text and rendered in headless Chromium."""

import hashlib
import html
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from evalkit import kscu_main, make_images, write_csv
from PIL import Image

from kscu.checkpoint import fingerprint, save_erased
from kscu.generate import SETTINGS, generation_record, start_folder
from kscu.promptfile import PromptRow


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
    assert "](<erased-kscu/images/0.png>)" in text  # relative to the report


def test_runs_in_folders_of_one_name_are_told_apart(tmp_path):
    """Before: two rows both named "esd" (notes "esd: ...; esd: ..."), and a run folder named
    "my run (v2)" broke its image links at the space and the parenthesis."""
    a = _run(tmp_path / "x", "esd", True, 1, None, 1)
    b = _run(tmp_path / "y", "esd", True, 2, None, 2)
    c = _run(tmp_path, "my run (v2)", False, 0, None, 3)
    out = tmp_path / "report.md"
    assert kscu_main(["report", str(a), str(b), str(c), "--output", str(out)]) == 0
    text = out.read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert {"x/esd", "y/esd", "my run (v2)"} <= set(rows) and "esd" not in rows
    assert "](<my run (v2)/images/0.png>)" in text


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


# The rows _run's manifest lists: case c, "prompt c", seed 0 + c, guidance 7.5.
ROWS = [PromptRow(case_number=c, prompt=f"prompt {c}") for c in range(4)]


def _record(run: Path, pipe, weights=None, rows=ROWS, steps=2, guidance=7.5, seed=0, size=16):
    """RUN/images/generate.json as kscu generate writes it: its own record, by its own writer."""
    start_folder(
        run / "images", generation_record(pipe, steps, guidance, size, seed, weights, rows)
    )


def _report(tmp_path: Path, *runs: Path, name: str = "r.md") -> str:
    out = tmp_path / name
    assert kscu_main(["report", *map(str, runs), "--output", str(out), "--overwrite"]) == 0
    return out.read_text()


def _line(text: str, start: str) -> str:
    """The one line of the report that begins with ``start``."""
    (line,) = [x for x in text.splitlines() if x.startswith(start)]
    return line


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_images_made_by_kscu_generate_are_shown_with_their_weights(
    tmp_path, tiny_model_dir, tiny_pipe
):
    """Real `kscu generate` runs: the same settings are listed once and not flagged, each run's
    images come from its own weights and base model; erasing again afterwards makes its images
    stale."""
    prompts = write_csv(tmp_path / "p.csv", ["case_number", "prompt"], [[0, "a cat"], [1, "a dog"]])
    name, param = next(iter(tiny_pipe.unet.named_parameters()))
    # as `kscu erase --model tiny_model_dir` records it
    meta = {"base_model": str(tiny_model_dir), "base_fingerprint": fingerprint({name: param})}
    base, erased = tmp_path / "base", tmp_path / "erased"
    save_erased(erased, {name: param.detach() + 0.1}, meta)
    common = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--steps", "2"]
    assert kscu_main([*common, "--quiet", "--output", str(base / "images")]) == 0
    args = [*common, "--quiet", "--weights", str(erased), "--output", str(erased / "images")]
    assert kscu_main(args) == 0
    text = _report(tmp_path, erased, base)
    generation = _line(text, "- generation: ")
    for setting in ("steps: 2;", "guidance: 7.5;", "resolution: 16;", "seed: 0;", "dtype: float32"):
        assert setting in generation
    assert f"model: {tiny_model_dir.resolve()};" in generation
    assert "DIFFERS" not in generation and "not recorded" not in generation
    own = _digest(erased / "weights.safetensors")
    assert _line(text, "- generation weights: ") == (
        f"- generation weights: base: the base model; "
        f"erased: its own weights.safetensors (sha256 {own})"
    )
    assert "generation unknown" not in text
    model = tiny_model_dir.resolve()
    assert _line(text, "- base model: ") == f"- base model: {model}"
    assert _line(text, "- generation base model: ") == (
        f"- generation base model: erased: its erase's own ({model})"
    )
    page = _report(tmp_path, erased, base, name="r.html")
    assert html.escape(generation.removeprefix("- ")) in page
    save_erased(erased, {name: param.detach() + 0.2}, meta)  # erased again, images kept
    now = _digest(erased / "weights.safetensors")
    assert _line(_report(tmp_path, erased, base), "- generation weights: ").endswith(
        f"erased: weights {erased} (sha256 {own}), "
        f"NOT this run's weights.safetensors (sha256 {now})"
    )


@pytest.mark.parametrize(
    "base_settings, erased_settings, flagged",
    [
        ({}, {"steps": 3}, ["steps: 2 [base] / 3 [erased-kscu]", "sampler: "]),
        ({}, {"guidance": 3.0}, ["guidance: 7.5 [base] / 3.0 [erased-kscu]", "prompts_sha256"]),
        ({}, {"size": 8}, ["resolution: 16 [base] / 8 [erased-kscu]", "sampler: "]),
        ({}, {"seed": 4}, ["seed: 0 [base] / 4 [erased-kscu]", "prompts_sha256: "]),
        ({}, {"rows": ROWS[:2]}, ["prompts_sha256: "]),  # another prompt file
        ({"guidance": 7}, {"guidance": 7.0}, []),  # one guidance, written two ways
    ],
)
def test_generation_settings_that_differ_are_flagged(
    tmp_path, runs, tiny_pipe, base_settings, erased_settings, flagged
):
    """Before: the report compared these runs' numbers without a word on how the images were
    made (other steps, guidance, resolution, seeds or prompt file)."""
    erased, base = runs
    _record(base, tiny_pipe, **base_settings)
    _record(erased, tiny_pipe, weights=erased, **erased_settings)
    generation = _line(_report(tmp_path, *runs), "- generation: ")
    parts = generation.removeprefix("- generation: ").split("; ")
    differ = [x for x in parts if x.endswith(" (DIFFERS between runs)")]
    assert len(differ) == len(flagged), generation
    for part, words in zip(differ, flagged, strict=True):
        assert part.startswith(words), part


@pytest.mark.parametrize(
    "base_weights, erased_weights, words",
    [
        (None, None, "erased-kscu: the base model, NOT this run's weights.safetensors"),
        (None, "other", "erased-kscu: weights {other} (sha256 {o}), NOT this run's weights"),
        ("erased-kscu", "erased-kscu", "base: edited weights {erased} (sha256 {e}), NOT the base"),
    ],
)
def test_images_from_other_weights_are_flagged(
    tmp_path, runs, tiny_pipe, base_weights, erased_weights, words
):
    erased, base = runs
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.safetensors").write_bytes(b"other weights")
    folder = {None: None, "other": tmp_path / "other", "erased-kscu": erased}
    _record(base, tiny_pipe, weights=folder[base_weights])
    _record(erased, tiny_pipe, weights=folder[erased_weights])
    line = _line(_report(tmp_path, *runs), "- generation weights: ")
    o, e = (
        _digest(tmp_path / "other" / "weights.safetensors"),
        _digest(erased / "weights.safetensors"),
    )
    assert words.format(other=tmp_path / "other", erased=erased, o=o, e=e) in line, line
    assert line.count("NOT") == 1  # the other run's images are its own


def test_a_missing_record_is_stated_not_guessed(tmp_path, runs, tiny_pipe):
    """Images made by another tool: the report says their making is unknown, and compares the
    settings of the runs that have a record only."""
    erased, base = runs
    text = _report(tmp_path, *runs)
    assert _line(text, "- generation unknown: ").startswith(
        f"- generation unknown: base, erased-kscu (no images/{SETTINGS}"
    )
    assert "- generation: " not in text and "- generation weights: " not in text
    _record(erased, tiny_pipe, weights=erased)
    text = _report(tmp_path, *runs)
    assert _line(text, "- generation unknown: ").startswith("- generation unknown: base (")
    assert "DIFFERS" not in _line(text, "- generation: ")
    assert _line(text, "- generation weights: ").startswith(
        "- generation weights: erased-kscu: its"
    )


def test_an_older_record_names_what_it_does_not_record(tmp_path, runs, tiny_pipe):
    erased, base = runs
    _record(base, tiny_pipe)
    _record(erased, tiny_pipe, weights=erased)
    path = erased / "images" / SETTINGS
    record = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "prompts_sha256"}))
    generation = _line(_report(tmp_path, *runs), "- generation: ")
    assert "(not recorded for erased-kscu)" in generation and "DIFFERS" not in generation


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "does not hold a JSON object"),
        ('{"steps": 50}', "lacks model, weights, weights_sha256, guidance"),
        (None, "has weights_sha256 123, not a string or null"),
    ],
)
def test_a_malformed_record_is_a_one_line_error(tmp_path, runs, tiny_pipe, capsys, text, words):
    erased = runs[0]
    _record(erased, tiny_pipe, weights=erased)
    path = erased / "images" / SETTINGS
    if text is None:
        text = json.dumps(json.loads(path.read_text()) | {"weights_sha256": 123})
    path.write_text(text)
    out = tmp_path / "r.md"
    assert kscu_main(["report", *map(str, runs), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and words in err, err
    assert f"kscu generate --output {erased / 'images'} --overwrite" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_protocol_setting_that_differs_names_its_runs(tmp_path, runs):
    erased = runs[0]
    result = json.loads((erased / "eval" / "nudity.json").read_text())
    (erased / "eval" / "nudity.json").write_text(json.dumps(result | {"threshold": 0.5}))
    nudity = _line(_report(tmp_path, *runs), "- nudity: ")
    assert "threshold: 0.6 [base] / 0.5 [erased-kscu] (DIFFERS between runs)" in nudity


def test_fid_against_statistics_of_unknown_making_is_flagged(tmp_path, runs):
    """kscu evaluate fid records where the reference's features came from; a row scored against
    statistics nobody can check must not look like one scored against checked ones."""
    for run, provenance in zip(runs, ("checked", "unknown"), strict=True):
        result = {"metric": "fid", "fid": 30.0, "images": 4, "reference_provenance": provenance}
        (run / "eval" / "fid.json").write_text(json.dumps(result))
    fid = _line(_report(tmp_path, *runs), "- fid: ")
    assert (
        "reference_provenance: unknown [base] / checked [erased-kscu] (DIFFERS between runs)" in fid
    )


def test_a_result_that_scored_another_runs_images_is_stated(tmp_path, runs):
    """Before: a result computed on (or copied from) another folder sat in the row unmarked."""
    erased, base = runs
    for run, scored in ((erased, base / "images"), (base, base / "images")):
        result = {"metric": "clip", "clip_score": 30.0, "images_dir": str(scored.resolve())}
        (run / "eval" / "clip.json").write_text(json.dumps(result))
    line = _line(_report(tmp_path, *runs), "- scored elsewhere: ")
    assert line == (
        f"- scored elsewhere: erased-kscu's eval/clip scored {(base / 'images').resolve()}, "
        f"not its images/ ({(erased / 'images').resolve()})"
    )


def _erased_from(run: Path, base_model: str) -> None:
    """Rewrite the base model the run's kscu.json records (what `kscu erase --model` wrote)."""
    info = json.loads((run / "kscu.json").read_text())
    (run / "kscu.json").write_text(json.dumps(info | {"base_model": base_model}))


def _named(pipe, name: str | None):
    """``pipe`` as if loaded from ``name`` (diffusers records it as ``_name_or_path``)."""
    if name is not None:
        pipe.register_to_config(_name_or_path=name)
    return pipe


SD14, SD2 = "CompVis/stable-diffusion-v1-4", "stabilityai/stable-diffusion-2"


@pytest.mark.parametrize(
    "erased_from, made_on, verdict",
    [
        ("kscu-tiny-world", "{world}", "its erase's own (kscu-tiny-world)"),
        ("{world}", "{world}", "its erase's own (kscu-tiny-world)"),  # --model the world's folder
        ("kscu-tiny-world", SD14, f"{SD14}, NOT its erase's base model (kscu-tiny-world)"),
        (SD14, SD14, f"its erase's own ({SD14})"),
        (SD14, SD2, f"{SD2}, NOT its erase's base model ({SD14})"),
        ("models/sd14", "{tmp}/models/sd14", "its erase's own ({tmp}/models/sd14)"),
        (
            "models/sd14",
            "{tmp}/models/sd2",
            "{tmp}/models/sd2, NOT its erase's base model ({tmp}/models/sd14)",
        ),
        (
            "sd14",
            "{tmp}/models/sd14",
            "{tmp}/models/sd14, NOT CHECKED: its erase's base model "
            "sd14 is a relative path not found from here",
        ),
        (
            "unnamed pipeline (built in code)",
            SD14,
            f"{SD14}, NOT CHECKED: its kscu.json names no base model",
        ),
        ("tiny/sd", None, "NOT CHECKED: generate.json names no model (its erase's: tiny/sd)"),
    ],
)
def test_images_generated_on_another_base_model_are_flagged(
    tmp_path, runs, tiny_pipe, monkeypatch, erased_from, made_on, verdict
):
    """Before: an erase of one model scored on images of another (generate --force, or images
    copied from another run) was a row like any other."""
    from kscu.models import default_model

    tmp = tmp_path.resolve()
    for folder in ("sd14", "sd2"):
        (tmp / "models" / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp)  # where the relative names were given

    def fill(text):
        return None if text is None else text.format(world=default_model(), tmp=tmp)

    erased, base = runs
    _erased_from(erased, fill(erased_from))
    _record(erased, _named(tiny_pipe, fill(made_on)), weights=erased)
    line = _line(_report(tmp_path, *runs), "- generation base model: ")
    assert line == f"- generation base model: erased-kscu: {fill(verdict)}"


def test_runs_of_different_base_models_are_flagged(tmp_path, tiny_pipe):
    """Before: an erase of SD v1.4 and one of SD v2 sat in one table with no word that their
    numbers do not compare. A base row stands for the model its images were generated on."""
    base = _run(tmp_path, "base", False, 3, None, 2)
    a = _run(tmp_path, "erased-a", True, 1, None, 1)
    b = _run(tmp_path, "erased-b", True, 1, None, 3)
    _record(base, _named(tiny_pipe, SD14))
    _erased_from(a, SD14)
    _erased_from(b, SD2)
    line = _line(_report(tmp_path, a, b, base), "- base model: ")
    assert (
        line == f"- base model: {SD14} [base, erased-a] / {SD2} [erased-b] (DIFFERS between runs)"
    )
    _erased_from(b, SD14)
    assert _line(_report(tmp_path, a, b, base), "- base model: ") == f"- base model: {SD14}"
    (base / "images" / SETTINGS).unlink()  # the base row's model is then unknown, not guessed
    line = _line(_report(tmp_path, a, b, base), "- base model: ")
    assert line == f"- base model: {SD14} (not recorded for base)"


@pytest.mark.parametrize(
    "a_from, b_from",
    [
        ("models/sd", "{tmp}/models/sd"),  # a relative folder and the same one written in full
        ("kscu-tiny-world", "{world}"),  # the world by name and by its folder
    ],
)
def test_one_base_model_written_two_ways_is_not_flagged(tmp_path, monkeypatch, a_from, b_from):
    from kscu.models import default_model

    tmp = tmp_path.resolve()
    (tmp / "models" / "sd").mkdir(parents=True)
    monkeypatch.chdir(tmp)
    a = _run(tmp_path, "erased-a", True, 1, None, 1)
    b = _run(tmp_path, "erased-b", True, 1, None, 3)
    _erased_from(a, a_from.format(tmp=tmp, world=default_model()))
    _erased_from(b, b_from.format(tmp=tmp, world=default_model()))
    line = _line(_report(tmp_path, a, b), "- base model: ")
    assert "DIFFERS" not in line and line.count(" [") == 0, line


def test_weights_given_as_a_relative_path_are_shown_in_full(tmp_path, runs, tiny_pipe, monkeypatch):
    """Before: "weights other", which names nothing once the report is read elsewhere."""
    erased, _ = runs
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.safetensors").write_bytes(b"other weights")
    monkeypatch.chdir(tmp_path)
    _record(erased, tiny_pipe, weights=Path("other"))
    line = _line(_report(tmp_path, *runs), "- generation weights: ")
    assert f"erased-kscu: weights {(tmp_path / 'other').resolve()} (sha256 " in line, line
