"""Every command for every family, end to end through ``kscu.cli.main`` on saved tiny folders.

SDXL, FLUX.1-dev and the FLUX.1-schnell stand-in (no guidance embedding), as a user runs them:
the same commands, flags and files as for SD; mistakes end as one ``error:`` line, exit 2.
"""

import copy
import csv
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_families import save_pipeline

from kscu.cli import main
from kscu.preview import HEADER, LABEL_WIDTH, PER_PROMPT

PNG = b"\x89PNG\r\n\x1a\n"
# Small and fast: 32 px, few steps; FLUX with 16 T5 tokens; schnell as its users run it.
STEPS = {
    "sdxl": ["--num-steps", "6", "--start-step", "3"],
    "flux": ["--num-steps", "6", "--start-step", "3", "--max-sequence-length", "16"],
    "schnell": ["--num-steps", "4", "--start-step", "1", "--max-sequence-length", "16"],
}
FAMILY = {"sdxl": "sdxl", "flux": "flux", "schnell": "flux"}


def cli(capsys, *args):
    capsys.readouterr()  # what fixtures printed before is not the command's
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def erase_cmd(model, output, *extra):
    return ["erase", "--concept", "church", "--model", model, "--output", output, "--quiet", *extra]


def one_line_error(code, err, *words):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("variant", ["sdxl", "flux", "schnell"])
@pytest.mark.parametrize("method", ["kscu", "esd"])
def test_erase(variant, method, model_dir, tmp_path, capsys):
    # esd: no --start-step (it draws every step) and FLUX's default 512 T5 tokens
    steps = STEPS[variant] if method == "kscu" else STEPS[variant][:2]
    args = ["--method", method, "--iterations", "3", "--resolution", "32", "--no-preview"]
    code, out, err = cli(capsys, *erase_cmd(model_dir(variant), tmp_path / "run", *args, *steps))
    assert code == 0, err
    assert "erased church" in out and not (tmp_path / "run" / "preview.png").exists()
    assert (tmp_path / "run" / "weights.safetensors").read_bytes()
    meta = json.loads((tmp_path / "run" / "kscu.json").read_text())
    cfg = meta["config"]
    assert meta["family"] == cfg["family"] == FAMILY[variant]
    assert (cfg["method"], cfg["iterations"], cfg["resolution"]) == (method, 3, 32)
    assert len(meta["losses"]) == 3 and meta["resolution"] == 32
    n = cfg["num_steps"]
    assert len(meta["timesteps"]) == n
    if method == "esd":
        assert (cfg["start_step"], cfg["lambda2"], cfg["augment"]) == (0, 0.0, False)
    else:
        assert [s for _, s in meta["schedule"]] == list(range(cfg["start_step"], n))[:3]
    if variant == "sdxl":
        assert (cfg["lr"], cfg["scope"], cfg["trajectory_guidance"]) == (1e-5, "noxattn", 3.0)
        assert meta["unconditional"] == "zeros" and meta["loss_space"] == "epsilon"
    else:
        assert (cfg["lr"], cfg["scope"], cfg["trajectory_guidance"]) == (1e-4, "attn", 3.5)
        assert cfg["max_sequence_length"] == (16 if method == "kscu" else 512)
        assert meta["loss_space"] == "velocity"
        assert meta["guidance_embedding"] == (3.5 if variant == "flux" else None)
    if variant == "schnell":
        assert meta["timesteps"] == [1000, 750, 500, 250]  # --num-steps 4, no shift


def test_flux_flags_are_checked_against_flux_s_table(model_dir, tmp_path, capsys):
    """--scope attn and a step count below SD's default start (14) are valid for FLUX: the
    flags must be checked against the model's family, not SD's."""
    fast = ["--iterations", "1", "--resolution", "32", "--max-sequence-length", "16"]
    code, _, err = cli(
        capsys, *erase_cmd(model_dir("flux"), tmp_path / "a", "--scope", "attn"), *fast
    )
    assert code == 0, err
    code, _, err = cli(
        capsys, *erase_cmd(model_dir("flux"), tmp_path / "b", "--num-steps", "10"), *fast
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "b" / "kscu.json").read_text())
    assert meta["config"]["start_step"] == 8  # FLUX's class default


@pytest.mark.parametrize("variant", ["sdxl", "flux"])
def test_erase_preview(variant, model_dir, tmp_path, capsys):
    """preview.png: the concept and "" before and after, 4 seeds each, at the run's resolution
    (32 px images, drawn 64 px wide)."""
    args = ["--iterations", "2", "--resolution", "32", "--preview", *STEPS[variant]]
    code, _, err = cli(capsys, *erase_cmd(model_dir(variant), tmp_path / "run", *args))
    assert code == 0, err
    preview = tmp_path / "run" / "preview.png"
    assert preview.read_bytes()[:8] == PNG
    side, gap = 64, 8  # compose() draws images at least 64 px wide
    width = LABEL_WIDTH + 2 * PER_PROMPT * side + gap
    assert Image.open(preview).size == (width, 2 * HEADER + 2 * side)


def test_a_bf16_flux_folder_erases_with_float32_exact_updates(template, tmp_path, capsys):
    """FLUX.1 ships bf16 weights: --dtype bfloat16 computes in bf16 from them, and the saved
    weights are that base plus float32 updates: lr 1e-5 steps, below half a bf16 ulp of most
    weights, still move every trainable element (KSCU_METHOD.md section 8)."""
    model = save_pipeline(copy.deepcopy(template("flux")).to(torch.bfloat16), tmp_path / "bf16")
    args = ["--dtype", "bfloat16", "--lr", "1e-5", "--iterations", "3", "--resolution", "32"]
    code, _, err = cli(capsys, *erase_cmd(model, tmp_path / "run", *args, *STEPS["flux"]))
    assert code == 0, err
    saved = load_file(str(tmp_path / "run" / "weights.safetensors"))
    (file,) = (model / "transformer").glob("*.safetensors")
    base = load_file(str(file))
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert all(base[n].dtype == torch.bfloat16 for n in saved)
    total = sum(t.numel() for t in saved.values())
    changed = sum((t != base[n].float()).sum().item() for n, t in saved.items())
    assert changed / total >= 0.999, changed / total
    meta = json.loads((tmp_path / "run" / "kscu.json").read_text())
    assert meta["config"]["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "variant, steps, guidance", [("sdxl", 50, 5.0), ("flux", 28, 3.5), ("schnell", 28, 3.5)]
)
def test_generate_resumes_and_records_the_family_s_defaults(
    variant, steps, guidance, model_dir, run_dir, tmp_path, capsys
):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("case_number,prompt\n0,a church\n1,a cat\n")
    base = ["generate", "--model", model_dir(variant), "--prompts", prompts, "--resolution", "32"]
    code, out, err = cli(capsys, *base, "--output", tmp_path / "img", "--quiet")
    assert code == 0, err
    assert "wrote 2 new images" in out
    images = sorted((tmp_path / "img").glob("*.png"))
    assert [p.name for p in images] == ["0.png", "1.png"]
    assert Image.open(images[0]).size == (32, 32)
    record = json.loads((tmp_path / "img" / "generate.json").read_text())
    assert record["family"] == FAMILY[variant]
    assert (record["steps"], record["guidance"], record["resolution"]) == (steps, guidance, 32)
    assert len(record["sampler"]["timesteps"]) == steps
    if variant == "sdxl":
        assert record["sampler"]["timesteps"][0] == 981 and record["sampler"]["unconditional"]
    else:
        assert record["sampler"]["guidance_embedding"] == (3.5 if variant == "flux" else None)
    rows = list(csv.DictReader((tmp_path / "img" / "manifest.csv").open()))
    assert [r["file"] for r in rows] == ["0.png", "1.png"]
    # resume: a rerun with the same settings writes nothing new
    stamps = {p.name: p.stat().st_mtime_ns for p in images}
    code, out, err = cli(capsys, *base, "--output", tmp_path / "img", "--quiet")
    assert code == 0 and "wrote 0 new images" in out, err
    assert {p.name: p.stat().st_mtime_ns for p in images} == stamps
    # the erased weights: recorded, and they change the images
    weights = ["--weights", run_dir(variant)]
    code, _, err = cli(capsys, *base, *weights, "--output", tmp_path / "erased", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "erased" / "generate.json").read_text())["weights_sha256"]
    erased = Image.open(tmp_path / "erased" / "0.png").tobytes()
    assert erased != Image.open(images[0]).tobytes()


@pytest.mark.parametrize("variant, defaults", [("sdxl", (14, 24, 40)), ("flux", (8, 14, 22))])
def test_analyze(variant, defaults, model_dir, tiny_clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KSCU_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "an"
    args = ["--scorer", "clip", "--clip-model", tiny_clip, "--samples", "1", "--num-steps", "4"]
    args += ["--stride", "2", "--resolution", "32", "--device", "cpu", "--quiet"]
    code, stdout, err = cli(
        capsys,
        "analyze",
        "--concept",
        "church",
        "--model",
        model_dir(variant),
        "--output",
        out,
        *args,
    )
    assert code == 0, err
    data = json.loads((out / "analyze.json").read_text())
    assert len(data["curve"]) == 4 and data["measured_steps"] == [0, 2]
    assert 0 <= data["recommended_start_step"] <= 3  # ceil(0.9 * 4) - 1
    assert (data["settings"]["num_steps"], data["settings"]["resolution"]) == (4, 32)
    assert data["settings"]["guidance"] == (5.0 if variant == "sdxl" else 3.5)
    task = data["task_defaults"]
    assert (task["class"], task["style"], task["instance"]) == defaults
    assert (out / "analyze.png").read_bytes()[:8] == PNG
    # random tiny CLIP: its curve may or may not be informative; the line must say which
    assert ("recommended start step" in stdout) == data["reliable"]


def test_erase_start_step_auto_on_flux(model_dir, tiny_clip, tmp_path, capsys, monkeypatch):
    """--start-step auto: the switch-prompt analysis on FLUX's own sampler, recorded."""
    monkeypatch.setenv("KSCU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KSCU_CLIP_MODEL", str(tiny_clip))
    args = ["--start-step", "auto", "--num-steps", "4", "--iterations", "2", "--resolution", "32"]
    code, _, err = cli(capsys, *erase_cmd(model_dir("flux"), tmp_path / "run", *args))
    assert code == 0, err
    meta = json.loads((tmp_path / "run" / "kscu.json").read_text())
    analysis = meta["start_step_analysis"]
    assert meta["config"]["start_step"] == analysis["recommended_start_step"]
    assert len(analysis["curve"]) == 4 and analysis["scorer"]["name"] == "clip"


@pytest.mark.parametrize(
    "model, weights", [("flux", "sd"), ("flux", "sdxl"), ("sdxl", "flux"), ("sdxl", "sd")]
)
def test_generate_refuses_a_checkpoint_of_another_family(
    model, weights, model_dir, run_dir, tmp_path, capsys
):
    args = ["generate", "--model", model_dir(model), "--weights", run_dir(weights)]
    code, _, err = cli(capsys, *args, "--prompt", "a church", "--output", tmp_path / "o")
    one_line_error(code, err, f"erased from a {weights} model, but this pipeline is {model}")
    assert not (tmp_path / "o").exists()


@pytest.fixture
def unsupported(tmp_path):
    """A pipeline folder of a class kscu does not support."""
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    return folder


@pytest.mark.parametrize(
    "args, words",
    [
        (["erase", "--concept", "church", "--family", "sd3"], ["unknown family 'sd3'"]),
        (["generate", "--prompt", "a church", "--family", "sd3"], ["unknown family 'sd3'"]),
        (["erase", "--concept", "church", "--family", "sd"], ["'flux' family, not 'sd'"]),
        (["generate", "--prompt", "a church", "--family", "sdxl"], ["'flux' family, not 'sdxl'"]),
        (
            ["erase", "--concept", "church", "--max-sequence-length", "-5", "--plan"],
            ["--max-sequence-length must be in [1, 512] (got -5)"],
        ),
        (["erase", "--concept", "church", "--scope", "xattn"], ["unknown scope 'xattn' for flux"]),
        (
            ["erase", "--concept", "church", "--max-sequence-length", "600", "--iterations", "1"],
            ["--max-sequence-length must be in [1, 512] (got 600)"],
        ),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(args, words, model_dir, tmp_path, capsys):
    fast = ["--resolution", "32"]
    if args[0] == "erase":
        fast += ["--num-steps", "2", "--start-step", "1", "--quiet"]
    code, _, err = cli(
        capsys, *args, "--model", model_dir("flux"), *fast, "--output", tmp_path / "o"
    )
    one_line_error(code, err, *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["erase", "--concept", "church"],
        ["generate", "--prompt", "a church"],
        ["analyze", "--concept", "church", "--scorer", "clip"],
    ],
)
def test_an_unsupported_pipeline_class_is_one_line_and_exit_2(
    command, unsupported, tiny_clip, tmp_path, capsys
):
    extra = ["--clip-model", tiny_clip] if command[0] == "analyze" else []
    code, _, err = cli(capsys, *command, *extra, "--model", unsupported, "--output", tmp_path / "o")
    one_line_error(code, err, "KandinskyPipeline, which kscu does not support")
    assert not (tmp_path / "o").exists()
