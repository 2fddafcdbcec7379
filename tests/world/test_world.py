"""Tests of the bundled tiny world: data, tokenizer, classifier, shipped pipeline."""

from __future__ import annotations

import argparse
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kscu.errors import KscuError
from kscu.world import COLORS, SHAPES, TEXTURES, concept_kind, default_model_path
from kscu.world.classifier import load_classifier
from kscu.world.data import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    render,
    sample_batch,
    sample_caption,
)
from kscu.world.quality import score_pipeline

torch.set_num_threads(min(torch.get_num_threads(), 2))


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    os.environ["HF_HUB_OFFLINE"] = "1"
    pipe = StableDiffusionPipeline.from_pretrained(str(default_model_path()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_vocabulary_is_single_lowercase_words():
    assert len(SHAPES) >= 8 and len(COLORS) >= 6 and len(TEXTURES) >= 6
    words = SHAPES + COLORS + TEXTURES
    assert len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() for w in words)
    assert len(TRAIN_TEMPLATES) + len(HELDOUT_TEMPLATES) >= 10
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)


def test_concept_kind():
    assert concept_kind("circle") == "shape"
    assert concept_kind(" Red ") == "color"
    assert concept_kind("striped") == "texture"
    with pytest.raises(KscuError, match="circle"):
        concept_kind("church")


def test_render_is_seeded_and_in_range():
    a = render("star", "blue", "dotted", np.random.default_rng(3))
    b = render("star", "blue", "dotted", np.random.default_rng(3))
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert render("ring", "red", "wavy", np.random.default_rng(0), size=64).shape == (3, 64, 64)


def test_captions_include_partial_and_empty():
    rng = np.random.default_rng(0)
    labels = {"shape": "circle", "color": "red", "texture": "striped"}
    captions = [sample_caption(labels, rng) for _ in range(2000)]
    assert 0.05 < captions.count("") / len(captions) < 0.15
    for word in ("circle", "red", "striped"):
        assert word in captions  # bare concept words, as erasure prompts them


def test_tokenizer_handles_odd_text():
    from transformers import CLIPTokenizer

    folder = default_model_path()
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    assert (folder / "tokenizer" / "vocab.json").is_file()
    assert (folder / "tokenizer" / "merges.txt").is_file()
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert tok.model_max_length == config["max_position_embeddings"] <= 24
    rng = np.random.default_rng(0)
    words = "a red star on a striped background".split()
    texts = ["", "circle", "qz!circle", "heart#a", "Über ✨ 日本 \t\n", "x" * 200]
    texts += [" ".join(rng.permutation(words)) for _ in range(5)]
    for text in texts:
        ids = tok(
            text, padding="max_length", truncation=True, max_length=tok.model_max_length
        ).input_ids
        assert len(ids) == tok.model_max_length
        assert max(ids) < config["vocab_size"]
    for word in SHAPES + COLORS + TEXTURES:
        assert len(tok(word).input_ids) == 3, word  # bos, the word, eos


def test_classifier_accuracy_on_fresh_renders(classifier):
    images, _, labels = sample_batch(300, np.random.default_rng(12345))
    pred = classifier.predict(images)
    for kind in ("shape", "color", "texture"):
        acc = np.mean([p == lab[kind] for p, lab in zip(pred[kind], labels, strict=True)])
        assert acc >= 0.98, (kind, acc)
    assert classifier.features(images[:5]).shape[0] == 5


def test_classifier_accepts_pil_and_other_sizes(classifier):
    from PIL import Image

    img = render("cross", "green", "checkered", np.random.default_rng(1), size=64)
    pil = Image.fromarray((img.transpose(1, 2, 0) * 255).astype(np.uint8))
    pred = classifier.predict([pil])
    assert pred["shape"] == ["cross"] and pred["color"] == ["green"]
    assert classifier.predict(torch.from_numpy(img)[None])["texture"] == ["checkered"]


def test_bundled_model_is_small_and_has_cross_attention(pipe):
    total = sum(p.stat().st_size for p in default_model_path().rglob("*.safetensors"))
    assert total <= 25 * 2**20
    names = [n for n, _ in pipe.unet.named_modules()]
    assert any(n.endswith("attn2") for n in names) and any(n.endswith("attn1") for n in names)
    sched = pipe.scheduler.config
    assert sched.num_train_timesteps == 1000 and sched.steps_offset == 1
    assert pipe.safety_checker is None


def test_bundled_model_generates(pipe):
    gen = torch.Generator().manual_seed(0)
    out = pipe(
        ["a red circle", ""],
        num_inference_steps=3,
        guidance_scale=7.5,
        generator=gen,
        output_type="pt",
    ).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_generated_shapes_are_recognized(pipe, classifier):
    result = score_pipeline(pipe, n_images=32, seed=0, steps=20, classifier=classifier)
    # Chance is 1/8, 1/6, 1/6; the bundled model scores 0.97 / 1.00 / 0.94 here (32 images).
    assert result["shape"] >= 0.8, result
    assert result["color"] >= 0.8, result
    assert result["texture"] >= 0.7, result


def test_cli_registers_world_train(tmp_path):
    from kscu.world.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", "train", "--output", str(tmp_path), "--only", "classifier"])
    assert callable(args.func) and args.only == "classifier" and args.device == "cpu"
    bad = parser.parse_args(
        ["world", "train", "--output", str(tmp_path), "--init-from", str(tmp_path / "missing")]
    )
    with pytest.raises(KscuError, match="init-from"):
        bad.func(bad)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--device", "tpu"], "unknown --device 'tpu'"),
        (["--device", "cudax"], "unknown --device 'cudax'"),  # before: "--device cuda was given"
        (["--lr=-1"], "--lr must be a finite number > 0"),
        (["--lr", "inf"], "--lr must be a finite number > 0"),  # before: NaN weights saved, exit 0
        (["--seed=-1"], "--seed must be in [0, "),  # before: numpy's ValueError, a log left behind
        (["--snapshot-every=-5"], "--snapshot-every must be >= 0"),
        (
            ["--init-from", "{p}/pickled"],
            "no vae/diffusion_pytorch_model.safetensors",
        ),  # a .bin is never read
        (["--only", "classifier", "--init-from", "{p}/pickled"], "--only classifier trains none"),
        (["--output", "{p}/afile"], "is a file; give a folder"),
    ],
)
def test_world_train_refuses_bad_input_before_writing(tmp_path, extra, words):
    """Before: torch's error for the device, and the learning rate's only after the classifier
    had trained; both left a half-made folder behind."""
    from kscu.world.cli import register

    (tmp_path / "afile").write_text("x")
    for part in ("vae", "text_encoder", "unet", "tokenizer"):  # pickled weights only
        (tmp_path / "pickled" / part).mkdir(parents=True)
        (tmp_path / "pickled" / part / "diffusion_pytorch_model.bin").write_bytes(b"x")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    extra = [e.format(p=tmp_path) for e in extra]
    args = parser.parse_args(["world", "train", "--output", str(out), *extra])
    with pytest.raises(KscuError, match=re.escape(words)):
        args.func(args)
    assert not out.exists()


def test_world_train_cli_defaults_are_the_settings_defaults(tmp_path):
    from dataclasses import fields

    from kscu.world.cli import register
    from kscu.world.settings import WorldTrainSettings

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", "train", "--output", str(tmp_path)])
    got = {f.name: getattr(args, f.name) for f in fields(WorldTrainSettings)}
    assert WorldTrainSettings(**got) == WorldTrainSettings()


WORLD_ALREADY = (
    "error: --output {} already holds a world train run; give a new folder, or pass --overwrite "
    "/ overwrite=True to replace it (the old world train run stays until the new one is complete)\n"
)
WORLD_FOREIGN = (
    "error: --output {} is not empty and holds no kscu world train run; "
    "give a new or empty folder\n"
)


def world_train(capsys, output, *flags):
    import kscu.cli

    argv = ["world", "train", "--output", output, "--only", "classifier", *flags]
    try:
        code = kscu.cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse: an unknown flag
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def hidden_siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


def classifier_seed(folder):
    return json.loads((folder / "classifier" / "config.json").read_text())["seed"]


@pytest.fixture
def old_world(tmp_path, capsys, monkeypatch):
    """A folder holding a finished world train run (seed 1), trained by a stand-in for the
    classifier's training; ``old_world.calls`` then lists each later training as (the folder
    trained into, the classifier seed the old folder held meanwhile)."""
    import kscu.world.train

    folder = tmp_path / "world"
    calls = []

    def train_classifier(out, device, seed, steps, log):
        held = classifier_seed(folder) if (folder / "classifier").is_dir() else None
        calls.append((out, held))
        (out / "classifier").mkdir(exist_ok=True)  # as save_classifier does
        (out / "classifier" / "config.json").write_text(json.dumps({"seed": seed}))

    monkeypatch.setattr(kscu.world.train, "train_classifier", train_classifier)
    code, _, err = world_train(capsys, folder, "--seed", "1")
    assert code == 0, err
    assert {p.name for p in folder.iterdir()} == {"classifier", "train.log"}
    calls.clear()
    return SimpleNamespace(folder=folder, calls=calls)


def test_world_train_refuses_a_folder_holding_a_run_before_training(old_world, capsys):
    """Before: a second run into the same --output trained and wrote over the first."""
    folder, before = old_world.folder, tree(old_world.folder)
    code, out, err = world_train(capsys, folder, "--seed", "2")
    assert code == 2 and err == WORLD_ALREADY.format(folder), err
    assert old_world.calls == [] and out == ""  # nothing trained, nothing logged
    assert tree(folder) == before and hidden_siblings(folder) == []
    with pytest.raises(KscuError, match=re.escape("pass --overwrite / overwrite=True")):
        from kscu.world.train import run

        run(folder)  # the Python API refuses too
    assert old_world.calls == [] and tree(folder) == before


def test_world_train_overwrite_replaces_the_run_only_once_complete(old_world, capsys):
    folder = old_world.folder
    (folder / "notes.txt").write_text("described the old run")
    code, out, err = world_train(capsys, folder, "--seed", "2", "--overwrite")
    assert code == 0, err
    [(trained_in, held)] = old_world.calls
    assert trained_in != folder and held == 1  # trained aside; the old run there meanwhile
    assert {p.name for p in folder.iterdir()} == {"classifier", "train.log"}  # replaced whole
    assert classifier_seed(folder) == 2
    log = (folder / "train.log").read_text()
    assert log.count("world train:") == 1 and "seed=2" in log and "done" in log
    assert hidden_siblings(folder) == []


def test_world_train_failed_overwrite_leaves_the_old_run(old_world, capsys, monkeypatch):
    import kscu.world.train

    before = tree(old_world.folder)

    def crash(*args):
        raise RuntimeError("power cut")

    monkeypatch.setattr(kscu.world.train, "train_classifier", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        world_train(capsys, old_world.folder, "--overwrite")
    assert tree(old_world.folder) == before and hidden_siblings(old_world.folder) == []


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("Unable to allocate 7.28 TiB"),
        RuntimeError("DefaultCPUAllocator: not enough memory"),
    ],
)
def test_world_train_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch, error):
    """Before: numpy's _ArrayMemoryError traceback (``--batch-size 1000000000000``), after the
    VAE had trained."""
    import kscu.world.train

    def crash(*args):
        raise error

    monkeypatch.setattr(kscu.world.train, "train_classifier", crash)
    code, _, err = world_train(capsys, tmp_path / "w", "--batch-size", "1000000000000")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "out of memory training the world (--batch-size 1000000000000" in err


def test_world_train_points_an_unfinished_run_to_its_snapshot(old_world, capsys):
    """Before: the message said only "already holds a world train run" (no way to continue)."""
    folder = old_world.folder
    (folder / "snapshot" / "unet").mkdir(parents=True)  # a run stopped before its model/
    before = tree(folder)
    code, out, err = world_train(capsys, folder)
    assert code == 2 and old_world.calls == [] and tree(folder) == before
    assert err == (
        f"error: --output {folder} holds an unfinished world train run; continue it with "
        f"--init-from {folder / 'snapshot'} and a new --output, or pass --overwrite to start "
        "again\n"
    )


def test_world_train_interrupted_overwrite_keeps_its_snapshot(old_world, capsys, monkeypatch):
    """Before: the hidden folder went with the snapshots of the interrupted run."""
    import kscu.world.train

    before = tree(old_world.folder)
    (old_world.folder.parent / "world-snapshot").mkdir()  # an earlier kept one is not replaced

    def stopped(out, *args):
        (out / "snapshot" / "unet").mkdir(parents=True)
        (out / "snapshot" / "unet" / "weights").write_text("step 500")
        raise RuntimeError("power cut")

    monkeypatch.setattr(kscu.world.train, "train_classifier", stopped)
    with pytest.raises(RuntimeError, match="power cut"):
        world_train(capsys, old_world.folder, "--overwrite")
    kept = old_world.folder.parent / "world-snapshot-2"
    assert tree(old_world.folder) == before and hidden_siblings(old_world.folder) == []
    assert (kept / "unet" / "weights").read_text() == "step 500"
    assert f"continue with --init-from {kept}" in capsys.readouterr().err


def test_a_snapshot_is_saved_whole_or_not_at_all(pipe, tmp_path, monkeypatch):
    """Before: a snapshot written again over the last one could stop half-way, mixing both."""
    import kscu.world.train

    folder = tmp_path / "snapshot"
    parts = (pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet)
    kscu.world.train.save_pipeline(folder, *parts)
    before = tree(folder)
    assert "unet/diffusion_pytorch_model.safetensors" in before

    def crash(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(kscu.world.train.world_tokenizer, "save_tokenizer_files", crash)
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1.0)  # a later snapshot's weights
    try:
        with pytest.raises(KeyboardInterrupt):
            kscu.world.train.save_pipeline(folder, *parts)
    finally:
        with torch.no_grad():
            next(pipe.unet.parameters()).sub_(1.0)
    assert tree(folder) == before and hidden_siblings(folder) == []


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_world_train_never_replaces_a_folder_of_other_files(flags, tmp_path, capsys, monkeypatch):
    import kscu.world.train

    def no_training(*args):
        raise AssertionError("training started")

    monkeypatch.setattr(kscu.world.train, "train_classifier", no_training)
    folder = tmp_path / "notes"
    (folder / "model").mkdir(parents=True)  # a folder named like a world part is not a run
    (folder / "model" / "todo.txt").write_text("mine")
    code, _, err = world_train(capsys, folder, *flags)
    assert code == 2 and err == WORLD_FOREIGN.format(folder), err
    assert tree(folder) == {"model/todo.txt": b"mine"}


def test_world_train_overwrite_for_real(tmp_path, capsys, monkeypatch):
    """The real classifier training (1 step, not scored), into a new folder and then over it."""
    import kscu.world.train

    monkeypatch.setattr(kscu.world.train, "evaluate_classifier", lambda *args: {})  # 2000 renders
    folder = tmp_path / "world"
    for seed in (0, 1):
        code, _, err = world_train(
            capsys, folder, "--seed", seed, "--classifier-steps", "1", "--overwrite"
        )
        assert code == 0, err
        assert classifier_seed(folder) == seed and hidden_siblings(folder) == []
    assert {p.name for p in folder.iterdir()} == {"classifier", "train.log"}
    assert (folder / "classifier" / "model.safetensors").is_file()


def test_world_train_overwrite_of_one_part_keeps_the_other(old_world, capsys):
    """Before: --only classifier --overwrite deleted the run's model/ with the old classifier."""
    folder = old_world.folder
    (folder / "model" / "unet").mkdir(parents=True)
    (folder / "model" / "unet" / "weights").write_text("the trained world model")
    code, _, err = world_train(capsys, folder, "--seed", "2", "--overwrite")
    assert code == 0, err
    assert classifier_seed(folder) == 2  # the part asked for is retrained
    assert (folder / "model" / "unet" / "weights").read_text() == "the trained world model"
    assert (
        "kept model/ of the run replaced (--only classifier)" in (folder / "train.log").read_text()
    )
    assert hidden_siblings(folder) == []


@pytest.mark.parametrize("steps, warmup", [(20, 0.05), (3000, 0.05), (400, 0.3), (1, 0.05)])
def test_one_cycle_runs_every_step_count_and_keeps_the_usual_ones(steps, warmup):
    """Before: ``world train --vae-steps 20`` ended in torch's ZeroDivisionError (a warm-up of
    exactly one step). Other step counts keep torch's own schedule, value for value."""
    from kscu.world.train import one_cycle

    def lrs(make):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched, seen = make(opt), []
        for _ in range(steps):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step() if len(seen) < steps else None
        return seen

    ours = lrs(lambda opt: one_cycle(opt, 1e-3, steps, warmup))
    assert len(ours) == steps and all(np.isfinite(ours))
    if warmup * steps != 1:
        torchs = lrs(
            lambda o: torch.optim.lr_scheduler.OneCycleLR(
                o, max_lr=1e-3, total_steps=steps, pct_start=warmup
            )
        )
        assert ours == torchs


def test_the_standalone_entry_prints_its_error_on_stderr(tmp_path, capsys):
    """Before: ``python -m kscu.world.cli train --lr 0`` printed its error on stdout."""
    from kscu.world.cli import main

    assert main(["train", "--output", str(tmp_path / "w"), "--lr", "0"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: --lr must be a finite number > 0")
