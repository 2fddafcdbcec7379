"""Erase output folders (a complete run or nothing new; a run is replaced only on request), and
what the runner sets up before the model loads."""

import json
import os
import re
import subprocess
import sys

import pytest

import kscu.checkpoint
import kscu.memory
import kscu.runner
from kscu.allocator import LABELS, glibc, huge_pages_on_request
from kscu.cli import main
from kscu.config import EraseConfig
from kscu.errors import KscuError
from kscu.runner import erase_to_folder

SHORT = ["--iterations", "2", "--num-steps", "4", "--start-step", "1", "--quiet"]


def erase_cli(model, output, capsys, *extra):
    args = ["erase", "--concept", "church", "--model", model, "--output", output, *SHORT, *extra]
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def hidden_siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def old_run(tiny_model_dir, tmp_path, capsys):
    """A finished run with a preview, as a lab's results folder would hold."""
    run = tmp_path / "run"
    code, err = erase_cli(tiny_model_dir, run, capsys, "--preview", "--lr", "1e-3")
    assert code == 0, err
    assert {p.name for p in run.iterdir()} == {"weights.safetensors", "kscu.json", "preview.png"}
    return run


def test_existing_run_is_refused_before_any_model_loads(
    old_run, tiny_model_dir, capsys, monkeypatch
):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(kscu.runner, "load_pipeline", no_load)
    before = snapshot(old_run)
    code, err = erase_cli(tiny_model_dir, old_run, capsys, "--no-preview")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "already holds a run" in err and "--overwrite" in err
    assert snapshot(old_run) == before and hidden_siblings(old_run) == []


def test_a_folder_of_other_files_is_never_replaced(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("mine")
    code, err = erase_cli(tiny_model_dir, folder, capsys, "--no-preview", "--overwrite")
    assert code == 2 and "holds no kscu run" in err and len(err.strip().splitlines()) == 1
    assert snapshot(folder) == {"todo.txt": b"mine"}


def test_a_file_as_output_is_refused(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "weights"
    path.write_text("x")
    code, err = erase_cli(tiny_model_dir, path, capsys, "--no-preview")
    assert code == 2 and "is a file" in err and path.read_text() == "x"


def test_new_and_empty_folders_are_written(tiny_model_dir, tmp_path, capsys):
    nested = tmp_path / "a" / "b" / "run"
    assert erase_cli(tiny_model_dir, nested, capsys, "--no-preview")[0] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert erase_cli(tiny_model_dir, empty, capsys, "--no-preview")[0] == 0
    for run in (nested, empty):
        assert {p.name for p in run.iterdir()} == {"weights.safetensors", "kscu.json"}
        assert hidden_siblings(run) == []


def test_crash_between_weights_and_json_leaves_the_old_run_intact(
    old_run, tiny_model_dir, monkeypatch
):
    before = snapshot(old_run)
    written = []

    def crash(path, data):  # save_erased writes the weights, then the JSON through this
        written.extend(p.name for p in path.parent.iterdir())
        raise RuntimeError("power cut")

    monkeypatch.setattr(kscu.checkpoint, "write_json", crash)
    cfg = EraseConfig(concepts=["church"], lr=5e-3, iterations=2, num_steps=4, start_step=1)
    with pytest.raises(RuntimeError, match="power cut"):
        erase_to_folder(cfg, str(tiny_model_dir), old_run, progress=False, overwrite=True)
    assert written == ["weights.safetensors"]  # the crash came after the new weights
    assert snapshot(old_run) == before
    assert hidden_siblings(old_run) == []


def test_overwrite_never_replaces_a_folder_made_meanwhile(tiny_model_dir, tmp_path, monkeypatch):
    """Before: with --overwrite, a folder made at --output while the erase ran (no run there at
    the start) was replaced, its files deleted."""
    out = tmp_path / "out"
    real = kscu.runner.erase

    def erase_while_someone_writes(*args, **kwargs):
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
        return real(*args, **kwargs)

    monkeypatch.setattr(kscu.runner, "erase", erase_while_someone_writes)
    cfg = EraseConfig(concepts=["church"], iterations=2, num_steps=4, start_step=1)
    with pytest.raises(KscuError, match="was filled by something else meanwhile"):
        erase_to_folder(cfg, str(tiny_model_dir), out, progress=False, overwrite=True)
    assert snapshot(out) == {"thesis.tex": b"precious"} and hidden_siblings(out) == []


def test_overwrite_replaces_the_whole_run(old_run, tiny_model_dir, capsys):
    old_weights = (old_run / "weights.safetensors").read_bytes()
    code, err = erase_cli(
        tiny_model_dir, old_run, capsys, "--no-preview", "--overwrite", "--lr", "2e-3"
    )
    assert code == 0, err
    assert {p.name for p in old_run.iterdir()} == {"weights.safetensors", "kscu.json"}  # no stale
    assert (old_run / "weights.safetensors").read_bytes() != old_weights
    assert json.loads((old_run / "kscu.json").read_text())["config"]["lr"] == 2e-3
    assert hidden_siblings(old_run) == []


def test_python_api_refuses_without_overwrite(old_run, tiny_model_dir):
    cfg = EraseConfig(concepts=["church"], iterations=2, num_steps=4, start_step=1)
    with pytest.raises(KscuError, match="overwrite=True"):
        erase_to_folder(cfg, str(tiny_model_dir), old_run, progress=False)


@pytest.mark.parametrize(
    "flags, asked",
    [([], False), (["--no-reuse-freed-memory"], True), (["--reuse-freed-memory"], False)],
)
def test_returning_freed_memory_asks_torch_for_huge_pages_before_the_model_loads(
    tiny_model_dir, tmp_path, capsys, monkeypatch, huge_page_requests, flags, asked
):
    """torch reads its huge-page switch at its first CPU allocation, so the runner must ask
    before loading (and stop asking after it); kept blocks are reused, so nothing is asked for
    then."""
    events = huge_page_requests
    load = kscu.runner.load_pipeline
    monkeypatch.setattr(
        kscu.runner, "load_pipeline", lambda *a, **k: events.append("load") or load(*a, **k)
    )
    code, err = erase_cli(tiny_model_dir, tmp_path / "run", capsys, "--device", "cpu", *flags)
    assert code == 0, err
    asking = asked and glibc() is not None  # only where kscu returns freed memory
    assert events == (["ask", "load", "asked"] if asking else ["load"])
    meta = json.loads((tmp_path / "run" / "kscu.json").read_text())
    assert meta["config"]["reuse_freed_memory"] is not asked
    if glibc() is not None:
        assert meta["host_allocator"] == LABELS[not asked]


CHILD = """
import os, sys, torch, kscu.runner
from kscu.allocator import huge_page_bytes, torch_gets_huge_pages
from kscu.config import EraseConfig

def load(*args, **kwargs):  # where the model would load: torch's first large buffer
    block = torch.ones(64 * 2**20 // 4)
    print(huge_page_bytes())

def after_load(*args, **kwargs):  # the runner's next step: the request is withdrawn by now
    print("THP_MEM_ALLOC_ENABLE" in os.environ, torch_gets_huge_pages())
    raise SystemExit(0)

kscu.runner.load_pipeline = load
kscu.runner.memory_plan = after_load
cfg = EraseConfig(concepts=["circle"], device="cpu", reuse_freed_memory=sys.argv[2] == "keep")
kscu.runner.erase_to_folder(cfg, None, sys.argv[1], progress=False)
"""


@pytest.mark.skipif(
    not huge_pages_on_request(),
    reason="needs the kernel's huge pages on request (madvise), where asking makes a difference",
)
@pytest.mark.parametrize("allocator, huge", [("keep", False), ("return", True)])
def test_torch_gets_huge_pages_only_when_freed_memory_is_returned(tmp_path, allocator, huge):
    """torch reads its huge-page switch once, at its first CPU allocation of any size: the
    runner must ask before anything makes a tensor, which the real runner (up to the model's
    load, in a fresh process) is checked for here."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    child = [sys.executable, "-c", CHILD, str(tmp_path / "run"), allocator]
    out = subprocess.run(child, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    huge_bytes, left_in_environment, granted = out.stdout.split()
    assert int(huge_bytes) >= 32 * 2**20 if huge else int(huge_bytes) < 8 * 2**20
    # torch keeps what it read: huge pages after the request has left the environment
    assert (left_in_environment, granted) == ("False", str(huge))


@pytest.mark.parametrize(
    "index_change, words",
    [
        ({"_class_name": "StableDiffusionXLPipeline"}, "declared a sdxl pipeline but has no"),
        ({"_class_name": "FluxPipeline"}, "no transformer|cannot load the transformer"),
        (None, "model_index.json does not hold a JSON object"),
    ],
)
def test_a_pipeline_folder_that_does_not_match_its_class_is_one_line(
    tiny_model_dir, tmp_path, capsys, index_change, words
):
    """Before: AttributeError tracebacks from --plan, and from a real erase once loaded."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    text = "[]" if index_change is None else json.dumps({**index, **index_change})
    (model / "model_index.json").write_text(text)
    for extra in (["--plan"], ["--output", tmp_path / "run", "--no-preview"]):
        args = ["erase", "--concept", "church", "--model", model, *SHORT, *extra]
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and re.search(words, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


# A pipeline passed without a model: the pipeline says which model it is, not the default.
FAST_CFG = dict(concepts=["church"], iterations=4, num_steps=6, start_step=2)


def run_meta(folder):
    return json.loads((folder / "kscu.json").read_text())


@pytest.fixture
def preset_model(tiny_model_dir, tmp_path):
    """The tiny pipeline saved with a preset of its own, as a lab's tuned model folder."""
    import shutil

    model = tmp_path / "own-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "kscu_preset.json").write_text(json.dumps({"modes": {"class": {"lr": 3e-4}}}))
    return model


def test_a_pipeline_built_in_code_gets_no_world_preset_and_is_named_truthfully(
    tiny_pipe, _tiny_template, tmp_path
):
    """Before: the bundled world's preset (lr 2e-5), base_model "kscu-tiny-world" and the
    world's memory plan were applied to the user's own pipeline."""
    import copy

    result, _ = erase_to_folder(EraseConfig(**FAST_CFG), None, tmp_path / "run", False, tiny_pipe)
    assert result.config.preset == {}
    assert result.config.lr == kscu.config.resolve(EraseConfig(**FAST_CFG)).lr == 1e-5
    meta = run_meta(tmp_path / "run")
    assert meta["base_model"] == kscu.runner.UNNAMED_PIPELINE and meta["preset"] == {}
    assert set(meta["memory_plan"]) == {"error"}
    assert "unnamed pipeline" in meta["memory_plan"]["error"]
    # the name is only a label: a copy of the same base takes the erase (fingerprints agree)
    meta = kscu.checkpoint.load_erased(copy.deepcopy(_tiny_template), tmp_path / "run")
    assert meta["base_model"] == kscu.runner.UNNAMED_PIPELINE


def test_a_pipeline_loaded_from_a_folder_is_that_model(preset_model, tmp_path):
    from kscu.models import load_pipeline

    pipe = load_pipeline(str(preset_model))
    result, _ = erase_to_folder(EraseConfig(**FAST_CFG), None, tmp_path / "run", False, pipe)
    assert result.config.lr == 3e-4 and result.config.preset == {"lr": 3e-4}
    meta = run_meta(tmp_path / "run")
    assert meta["base_model"] == str(preset_model)
    assert "error" not in meta["memory_plan"], meta["memory_plan"]


def test_an_explicit_model_is_kept_whatever_the_pipeline(preset_model, tiny_pipe, tmp_path):
    """Unchanged: ``model`` names the model, also beside a pipeline built in code."""
    result, _ = erase_to_folder(
        EraseConfig(**FAST_CFG), str(preset_model), tmp_path / "run", False, tiny_pipe
    )
    assert result.config.lr == 3e-4
    assert run_meta(tmp_path / "run")["base_model"] == str(preset_model)


def test_the_bundled_world_pipeline_is_still_the_world(tmp_path):
    """``kscu bench`` passes the loaded world with model None: its preset and name stay."""
    from kscu.models import default_model, load_pipeline, read_preset

    world = load_pipeline(None)
    cfg = EraseConfig(**{**FAST_CFG, "concepts": ["circle"]})
    result, _ = erase_to_folder(cfg, None, tmp_path / "run", False, world)
    assert result.config.lr == read_preset(None)["modes"]["class"]["lr"] != 1e-5
    meta = run_meta(tmp_path / "run")
    assert meta["base_model"] == kscu.runner.BUNDLED_MODEL
    assert "error" not in meta["memory_plan"], meta["memory_plan"]
    # loaded before the erase: its weights are in the measured start, so not in the planned span
    plan = meta["memory_plan"]
    assert meta["peak_memory_start"] == kscu.memory.START_AFTER_LOAD
    assert meta["peak_memory_planned_bytes"] == plan["total_bytes"] - plan["bytes"]["weights"]
    # the same folder by another spelling is still the world
    other = kscu.runner.identify_model(None, world)
    assert other == kscu.runner.identify_model(None, None)
    spelled = type("Named", (), {"name_or_path": default_model() + "/../model/."})()
    assert kscu.runner.identify_model(None, spelled) == other


@pytest.mark.parametrize("loaded", [False, True])
def test_auto_start_step_on_a_users_pipeline_is_not_scored_by_the_world(
    loaded, tiny_pipe, tiny_model_dir, tmp_path, monkeypatch
):
    """Before: the world's classifier judged the user's model and refused "church" as not a
    concept of the tiny world. Only the scorer's choice is checked (CLIP would be loaded)."""
    import kscu.analyze.scorers as scorers
    from kscu.models import load_pipeline

    class Chosen(Exception):
        pass

    def chosen(kind):
        def stop(*args, **kwargs):
            raise Chosen(kind)

        return stop

    monkeypatch.setattr(scorers, "WorldScorer", chosen("world"))
    monkeypatch.setattr(scorers, "ClipScorer", chosen("clip"))
    monkeypatch.setenv("KSCU_CACHE", str(tmp_path / "cache"))
    pipe = load_pipeline(str(tiny_model_dir)) if loaded else tiny_pipe
    cfg = EraseConfig(**{**FAST_CFG, "start_step": "auto"})
    with pytest.raises(Chosen) as why:
        erase_to_folder(cfg, None, tmp_path / "run", False, pipe)
    assert str(why.value) == "clip"


def test_a_pipeline_of_a_class_kscu_does_not_know_is_erased_with_a_named_family(
    tiny_pipe, tmp_path
):
    """Before: erase_to_folder asked the pipeline's class even when the config named the family
    (EraseConfig(family="sd")): "the pipeline is a Unrelated, which kscu does not support"."""

    class Unrelated:  # holds SD's parts, as a diffusers variant pipeline would
        pass

    pipe = Unrelated()
    pipe.__dict__.update(tiny_pipe.components, vae_scale_factor=tiny_pipe.vae_scale_factor)
    cfg = EraseConfig(concepts=["church"], iterations=4, num_steps=6, start_step=2, family="sd")
    result, _ = erase_to_folder(cfg, None, tmp_path / "run", progress=False, pipe=pipe)
    record = json.loads((tmp_path / "run" / "kscu.json").read_text())
    assert len(result.losses) == 4 and record["device"] == "cpu"


def test_the_pipeline_returned_under_bf16_generates_and_the_weights_stay_exact(
    tiny_model_dir, tmp_path
):
    """README's Python API: ``pipe("...")`` right after ``erase_to_folder(... dtype="bfloat16")``.
    Before: "mat1 and mat2 must have the same dtype" (a float32 denoiser beside bf16 encoders)."""
    import torch
    from safetensors.torch import load_file

    from kscu.config import EraseConfig

    cfg = EraseConfig(concepts=["cat"], dtype="bfloat16", iterations=3, num_steps=6, start_step=2)
    result, pipe = erase_to_folder(cfg, str(tiny_model_dir), tmp_path / "run", progress=False)
    assert pipe.unet.dtype == torch.bfloat16
    image = pipe("a cat", num_inference_steps=2, output_type="np").images[0]
    assert image.shape[-1] == 3
    saved = load_file(str(tmp_path / "run" / "weights.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert all(torch.equal(saved[n], t) for n, t in result.tensors.items())


def test_a_relative_model_folder_is_recorded_as_an_absolute_path(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Before: ``base_model`` was "tiny-model0" as typed, which names nothing once the report
    (or anyone) reads kscu.json from another folder. A hub id stays as given."""
    monkeypatch.chdir(tiny_model_dir.parent)
    relative = tiny_model_dir.name
    erase_to_folder(EraseConfig(**FAST_CFG), relative, tmp_path / "run", False)
    assert run_meta(tmp_path / "run")["base_model"] == str(tiny_model_dir.resolve())
    assert kscu.runner.identify_model("owner/not-here").name == "owner/not-here"


def test_a_model_folder_missing_a_part_or_given_a_run_says_which(tiny_model_dir, tmp_path):
    """Before: diffusers' "no file named config.json found in directory" for a missing unet/,
    and "no model_index.json" alone for an erase run given as --model."""
    import shutil

    from kscu.errors import KscuError
    from kscu.models import model_family

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    shutil.rmtree(copy / "unet")
    with pytest.raises(KscuError, match=r"has no unet/, which its model_index.json names"):
        model_family(str(copy))
    run = tmp_path / "run"
    run.mkdir()
    (run / "kscu.json").write_text("{}")
    with pytest.raises(KscuError, match=r"it is an erase run: give its base model as --model"):
        model_family(str(run))


def test_a_resolution_the_sampler_refuses_is_refused_before_the_model_loads(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """Before: the model loaded, the first-use payment ran (58 s on the world), then the
    preview's sampler refused the size."""

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kscu.runner, "load_pipeline", no_load)
    out = tmp_path / "run"
    args = ["erase", "--model", str(tiny_model_dir), "--concept", "c", "--resolution", "4096"]
    assert main([*args, "--iterations", "2", "--output", str(out)]) == 2
    assert "--resolution 4096 is over 4x this model's native" in capsys.readouterr().err
    assert not out.exists()
    # more steps than the scheduler has: the message names the flag (before: none)
    args = ["erase", "--model", str(tiny_model_dir), "--concept", "c", "--num-steps", "2000"]
    assert main([*args, "--iterations", "2", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2000 sampling steps" in err and "--num-steps of erase" in err, err
    assert not out.exists()
