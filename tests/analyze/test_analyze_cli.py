"""``kscu analyze --output``: an earlier analysis there is refused before any model loads, and
with ``--overwrite`` replaced file by file, each only once the new one is complete; the folder's
other files (an erase's run beside it, notes) are never touched.

The measurement, the scorer and the model loading are stand-ins (the real ones:
tests/test_analyze.py); what runs for real is the CLI's check and its writing of analyze.json and
analyze.png. Before: a second run silently wrote over the first; then, with --overwrite, any
file of those names was replaced, a user's own analyze.json or plot included.
"""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

import kscu.analyze.analysis
import kscu.analyze.plot
import kscu.analyze.scorers
import kscu.cli
import kscu.memory
import kscu.models
from kscu.errors import KscuError

ALREADY = (
    "error: {}/analyze.json already holds a commitment analysis; move it away or give a new "
    "--output folder, or pass --overwrite to replace it\n"
)
FOREIGN = (
    "error: {}/analyze.{} already exists and is not a kscu commitment {}{}; move it away or give "
    "a new --output folder (kscu does not replace a file it did not write, even with "
    "--overwrite)\n"
)
UNMARKED = " (it carries no kscu marker; plots from earlier kscu versions have none either)"


class Scorer:
    def check(self, concept):
        pass


@pytest.fixture
def loads(monkeypatch):
    """Stand-ins for the heavy work; returns the list of model loads made."""
    calls = []

    def fake_analyze(pipe, model, concepts, mode, settings, scorer, **kwargs):
        curve = [0.0, 0.05, 0.5, 1.0]
        return {
            "seed": settings.seed,  # tells the runs apart
            "curve": curve,
            "recommended_start_step": 1,
            "task_defaults": {"class": 1},
            "mode_default_start_step": 1,
            "reliable": settings.threshold != 0.5,  # 0.5: as if the scorer saw no contrast
            "scorer": {"name": "stand-in"},
            "per_concept": {"circle": {"forward": curve, "reverse_complement": curve}},
            "seconds": 0.0,
        }

    monkeypatch.setattr(kscu.analyze.analysis, "analyze", fake_analyze)
    monkeypatch.setattr(kscu.analyze.scorers, "make_scorer", lambda *a: Scorer())
    monkeypatch.setattr(kscu.models, "load_pipeline", lambda *a, **k: calls.append(a))
    return calls


@pytest.fixture
def scorers(monkeypatch):
    """The scorers made (the CLIP scorer loads a model of its own)."""
    made = []
    monkeypatch.setattr(kscu.analyze.scorers, "make_scorer", lambda *a: made.append(a) or Scorer())
    return made


def analyze(capsys, output, *flags):
    argv = ["analyze", "--concept", "circle", "--output", output, "--device", "cpu", "--quiet"]
    try:
        code = kscu.cli.main([str(a) for a in [*argv, *flags]])
    except SystemExit as e:  # argparse: an unknown flag
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def hidden_siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


def seed_in(folder):
    return json.loads((folder / "analyze.json").read_text())["seed"]


@pytest.fixture
def old(tmp_path, capsys, loads):
    """A folder holding a finished analysis (seed 1)."""
    folder = tmp_path / "an"
    code, _, err = analyze(capsys, folder, "--seed", "1")
    assert code == 0, err
    assert {p.name for p in folder.iterdir()} == {"analyze.json", "analyze.png"}
    loads.clear()
    return folder


def test_second_run_is_refused_before_any_model_loads(old, loads, capsys):
    before = snapshot(old)
    code, out, err = analyze(capsys, old, "--seed", "2")
    assert code == 2 and err == ALREADY.format(old), err
    assert loads == [] and out == ""
    assert snapshot(old) == before and hidden_siblings(old) == []


def test_overwrite_replaces_the_analysis_and_keeps_other_files(old, capsys, monkeypatch):
    (old / "weights.safetensors").write_bytes(b"an erase run beside the analysis")
    seen = []
    real_plot = kscu.analyze.plot.plot_curve

    def plot(path, *args):
        seen.append(seed_in(old))  # the old analysis is still there while the new one is drawn
        real_plot(path, *args)

    monkeypatch.setattr(kscu.analyze.plot, "plot_curve", plot)
    code, _, err = analyze(capsys, old, "--seed", "2", "--overwrite")
    assert code == 0, err
    assert seen == [1] and seed_in(old) == 2
    assert (old / "analyze.png").read_bytes()[:4] == b"\x89PNG"
    assert (old / "weights.safetensors").read_bytes() == b"an erase run beside the analysis"
    assert hidden_siblings(old) == [] and not [p for p in old.iterdir() if p.name[0] == "."]


def test_a_failed_overwrite_leaves_the_old_analysis(old, capsys, monkeypatch):
    before = snapshot(old)

    def crash(*args):
        raise RuntimeError("power cut")

    monkeypatch.setattr(kscu.analyze.plot, "plot_curve", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        analyze(capsys, old, "--seed", "2", "--overwrite")
    assert snapshot(old) == before and hidden_siblings(old) == []


def test_other_files_in_the_folder_are_kept(tmp_path, loads, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "kscu.json").write_text("{}")  # e.g. the erase the analysis belongs with
    code, _, err = analyze(capsys, folder)
    assert code == 0, err
    assert {p.name for p in folder.iterdir()} == {"kscu.json", "analyze.json", "analyze.png"}
    assert (folder / "kscu.json").read_text() == "{}"


def test_the_current_folder_as_output(tmp_path, loads, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = analyze(capsys, ".")
    assert code == 0, err
    assert {p.name for p in tmp_path.iterdir()} == {"analyze.json", "analyze.png"}


def test_new_and_empty_folders_are_written(tmp_path, loads, capsys):
    nested, empty = tmp_path / "a" / "b" / "an", tmp_path / "empty"
    empty.mkdir()
    for folder in (nested, empty):
        code, out, err = analyze(capsys, folder)
        assert code == 0 and "recommended start step" in out, err
        assert {p.name for p in folder.iterdir()} == {"analyze.json", "analyze.png"}
        assert hidden_siblings(folder) == []


def test_a_fallback_start_is_not_printed_as_a_recommendation(tmp_path, loads, capsys):
    """Before: "recommended start step 14" for the mode's default, when the scorer could not
    tell the concept from the neutral prompt (only analyze.json said "reliable": false)."""
    code, out, err = analyze(capsys, tmp_path / "a", "--threshold", "0.5")
    assert code == 0, err
    assert out.startswith("no start step measured for circle (the curve is not informative)")
    assert "the class default 1 of 4 is kept" in out and "recommended" not in out


def test_stride_is_checked_against_the_model_s_own_steps(tmp_path, loads, capsys):
    """The tiny world samples 50 steps: a stride of 30 fits them. Before: refused against a
    28-step guess made before the model's steps were known."""
    code, _, err = analyze(capsys, tmp_path / "a", "--stride", "30")
    assert code == 0, err
    code, _, err = analyze(capsys, tmp_path / "b", "--stride", "50")
    assert (
        code == 2 and err == "error: --stride must be in [1, 49] for 50 sampling steps (got 50)\n"
    )
    code, _, err = analyze(capsys, tmp_path / "c", "--stride", "30", "--num-steps", "20")
    assert code == 2 and "--stride must be in [1, 19] for 20 sampling steps" in err
    assert len(loads) == 1  # only the run that was fine loaded the model
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_an_unwritable_cache_is_refused_before_any_model_loads(
    tmp_path, loads, capsys, monkeypatch
):
    """Before: the cache entry failed to write only after the whole measurement."""
    (tmp_path / "cachefile").write_text("not a folder")
    monkeypatch.setenv("KSCU_CACHE", str(tmp_path / "cachefile"))
    code, _, err = analyze(capsys, tmp_path / "an")
    assert code == 2 and err.count("\n") == 1, err
    assert "goes through the file" in err and "$KSCU_CACHE" in err and "--no-cache" in err
    assert loads == [] and not (tmp_path / "an").exists()
    code, _, err = analyze(capsys, tmp_path / "an", "--no-cache")  # no cache: nothing to check
    assert code == 0, err


def foreign_json(folder):
    """analyze.json files analyze did not write: a user's own notes, an erase's kscu.json (its
    analysis is under start_step_analysis), a list, text that is not JSON."""
    (folder / "analyze.json").write_text(
        {
            "notes": '{"curve": "mine"}',
            "erase record": json.dumps({"config": {}, "start_step_analysis": {"curve": [0.0]}}),
            "list": '["curve", "recommended_start_step", "per_concept"]',
            "text": "my own analysis, in words",
        }[folder.name]
    )


@pytest.mark.parametrize("kind", ["notes", "erase record", "list", "text"])
def test_an_analyze_json_analyze_did_not_write_is_kept_even_with_overwrite(
    tmp_path, loads, capsys, kind
):
    folder = tmp_path / kind
    folder.mkdir()
    foreign_json(folder)
    before = snapshot(folder)
    for flags in ([], ["--overwrite"]):
        code, out, err = analyze(capsys, folder, *flags)
        assert code == 2 and err == FOREIGN.format(folder, "json", "analysis", ""), err
        assert out == "" and loads == [] and snapshot(folder) == before


def unmarked_png(path):
    """A PNG without the marker: a user's plot, or one drawn by kscu before it marked them."""
    Image.new("RGB", (72, 42), "white").save(path)


def test_a_png_without_the_marker_is_kept_even_with_overwrite(old, loads, capsys):
    """An earlier kscu's analysis (its JSON is an analysis, its plot unmarked) is refused with
    --overwrite and without it alike, naming the plot and its fix, not --overwrite."""
    unmarked_png(old / "analyze.png")
    before = snapshot(old)
    for flags in ([], ["--overwrite"]):
        code, out, err = analyze(capsys, old, "--seed", "2", *flags)
        assert code == 2 and err == FOREIGN.format(old, "png", "plot", UNMARKED), err
        assert out == "" and loads == [] and snapshot(old) == before
    (old / "analyze.png").unlink()  # moved away: the fix the message gives
    code, _, err = analyze(capsys, old, "--seed", "2", "--overwrite")
    assert code == 0 and seed_in(old) == 2, err


@pytest.mark.parametrize("kind", ["jpeg", "folder", "text"])
def test_other_things_named_analyze_png_are_kept(tmp_path, loads, capsys, kind):
    folder = tmp_path / "an"
    folder.mkdir()
    png = folder / "analyze.png"
    if kind == "jpeg":
        Image.new("RGB", (8, 8)).save(png, format="JPEG")
    elif kind == "folder":
        png.mkdir()
    else:
        png.write_text("not an image")
    code, _, err = analyze(capsys, folder, "--overwrite")
    assert code == 2 and err == FOREIGN.format(folder, "png", "plot", UNMARKED), err
    assert loads == [] and not (folder / "analyze.json").exists()


def test_the_plot_carries_the_marker_overwrite_looks_for(old):
    with Image.open(old / "analyze.png") as im:
        assert im.info["kscu"] == "analyze"


def few_timesteps_model(tmp_path, timesteps):
    """The bundled world's configs (no weights: the early check reads none) with a scheduler of
    ``timesteps`` train timesteps."""
    folder = tmp_path / "model"
    source = kscu.models.default_model()
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "num_train_timesteps": timesteps})
    )
    return folder


def test_more_steps_than_the_scheduler_has_fail_before_any_model_loads(
    tmp_path, loads, scorers, capsys
):
    """Before: the scorer and the whole model loaded, then the sampler refused the steps."""
    code, out, err = analyze(capsys, tmp_path / "a", "--num-steps", "100000")
    assert code == 2 and out == "", err
    assert err == (
        "error: 100000 sampling steps: this model's scheduler has 1000 timesteps; give between 1 "
        "and 1000 steps (--num-steps of erase and analyze, --steps of generate, bench and "
        "attack)\n"
    )
    model = few_timesteps_model(tmp_path, 40)  # the family's 50 steps: more than it has
    code, _, err = analyze(capsys, tmp_path / "b", "--model", model)
    assert code == 2 and "50 sampling steps: this model's scheduler has 40 timesteps" in err
    assert loads == [] and scorers == []
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    code, _, err = analyze(capsys, tmp_path / "c", "--model", model, "--num-steps", "40")
    assert code == 0 and len(loads) == 1, err  # as many as it has: fine


def test_steps_not_knowable_before_loading_are_left_to_the_later_check(
    tmp_path, loads, capsys, monkeypatch
):
    """A model whose configs cannot be read without loading (a hub id offline) is not refused
    early: analyze checks the steps on the loaded pipeline (tests/test_analyze.py)."""

    def offline(*args):
        raise OSError("we have no connection to the Hub")

    monkeypatch.setattr(kscu.memory, "meta_pipeline", offline)
    code, _, err = analyze(capsys, tmp_path / "an", "--num-steps", "100000")
    assert code == 0 and len(loads) == 1, err


@pytest.mark.parametrize("seed, samples", [(2**64, 1), (2**64 - 1, 2), (-(2**63) - 1, 1)])
def test_a_seed_torch_cannot_take_is_refused_before_the_model_loads(seed, samples):
    """Before: torch's OverflowError at the first noise, after the model had loaded."""
    from kscu.analyze.settings import AnalyzeSettings

    with pytest.raises(KscuError, match=r"--seed .*: the noise seeds seed..seed\+samples-1"):
        AnalyzeSettings(seed=seed, samples=samples).validate()
    AnalyzeSettings(seed=2**64 - 2, samples=2).validate()  # the last one torch takes
