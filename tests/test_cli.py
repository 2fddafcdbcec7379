"""The command line as a user meets it: files written, and one-line errors with exit code 2."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from kscu.allocator import glibc
from kscu.cli import main

FAST = ["--iterations", "4", "--num-steps", "6", "--start-step", "2", "--quiet"]


def pixels(path):
    return np.asarray(Image.open(path))


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_erase_writes_weights_and_record(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        [
            "erase",
            "--concept",
            "church,cat",
            "--mode",
            "class",
            "--model",
            tiny_model_dir,
            "--output",
            out,
            "--lr",
            "1e-3",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, stdout
    tensors = load_file(str(out / "weights.safetensors"))
    assert "down_blocks.0.attentions.0.proj_in.weight" in tensors
    meta = json.loads((out / "kscu.json").read_text())
    assert meta["config"]["concepts"] == ["church", "cat"]
    assert meta["config"]["lr"] == 1e-3 and meta["config"]["scope"] == "noxattn"
    assert meta["base_model"] == str(tiny_model_dir)
    assert len(meta["losses"]) == 4 and isinstance(meta["seconds"], float)
    assert meta["schedule"][0] == ["church", 2]
    assert meta["config"]["reuse_freed_memory"] is True
    kept = "freed blocks kept for reuse" if glibc() is not None else "system default"
    assert meta["host_allocator"] == kept
    assert meta["config"]["trace_denoiser"] is True
    assert meta["denoiser_calls"] == "replayed (2 recorded)"  # with and without gradients


def test_model_preset_is_applied_and_recorded(tiny_model_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "kscu_preset.json").write_text(json.dumps({"lr": 0.002}))
    code, _, _ = run_cli(
        ["erase", "--concept", "x", "--model", model, "--output", tmp_path / "r", *FAST], capsys
    )
    assert code == 0
    meta = json.loads((tmp_path / "r" / "kscu.json").read_text())
    assert meta["config"]["lr"] == 0.002 and meta["preset"] == {"lr": 0.002}


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--concept", " "], "empty concept"),
        (["--concept", "x", "--mode", "poetry"], "unknown mode"),
        (["--concept", "x", "--start-step", "6"], "--start-step"),
        (["--concept", "x", "--iterations", "0"], "--iterations"),
        (
            ["--concept", "x", "--negative-guidance", "nan"],
            "must be a finite number >= 0 (got nan)",
        ),
        (["--concept", "x", "--fast-cpu-conv", "--dtype", "bfloat16"], "--fast-cpu-conv"),
        (["--concept", "x", "--fast-cpu-conv", "--device", "cuda"], "--fast-cpu-conv"),
        (["--concept", "x", "--offload-adam", "--lean-adam"], "--offload-adam"),
    ],
)
def test_bad_erase_input_is_one_line_exit_2_no_weights(
    tiny_model_dir, tmp_path, capsys, extra, words
):
    out = tmp_path / "run"
    fast = ["--num-steps", "6", "--quiet"]
    if "--iterations" not in extra:
        fast += ["--iterations", "4"]
    if "--start-step" not in extra:
        fast += ["--start-step", "2"]
    code, _, err = run_cli(
        ["erase", *extra, "--model", tiny_model_dir, "--output", out, *fast], capsys
    )
    assert code == 2
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "weights.safetensors").exists()


def test_a_concept_outside_the_bundled_world_is_refused(tmp_path, capsys):
    """Before: with --no-preview the bundled world was trained on a word it does not know."""
    out = tmp_path / "o"
    args = ["erase", "--concept", "circle, unicorn", "--no-preview", "--output", out]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "'unicorn' is not a concept of the tiny world" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_truncated_checkpoint_is_one_line(tiny_model_dir, tmp_path, capsys):
    """Before: safetensors' own error as a traceback, from the dtype check of an erase."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (weights,) = (model / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    args = ["erase", "--concept", "church", "--model", model, "--output", tmp_path / "o"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "is not a readable safetensors file" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("plan", [False, True])
def test_a_truncated_text_encoder_is_one_line_before_the_erase_starts(
    tiny_model_dir, tmp_path, capsys, monkeypatch, plan
):
    """Before: safetensors' traceback (exit 1) from diffusers' load, after a CPU erase had paid
    its first use (seconds), and --plan sized a model that cannot be loaded."""
    import kscu.memory

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (weights,) = (model / "text_encoder").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])  # the header intact, the data short

    def paid(*args):
        raise AssertionError("the first use was paid for a model that cannot be loaded")

    monkeypatch.setattr(kscu.memory, "pay_first_use", paid)
    flags = ["--plan"] if plan else ["--output", tmp_path / "o", *FAST]
    code, out, err = run_cli(["erase", "--concept", "cat", "--model", model, *flags], capsys)
    assert code == 2 and out == "" and not (tmp_path / "o").exists()
    assert err.startswith(f"error: {weights} is not a readable safetensors file (")
    assert len(err.strip().splitlines()) == 1


def test_a_broken_variant_file_beside_the_weights_does_not_block(tiny_model_dir, tmp_path, capsys):
    """diffusers loads a variant (``*.fp16.safetensors``) only when asked for one, which kscu
    never does, so the check of a folder's files must not refuse a model over it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "text_encoder" / "model.fp16.safetensors").write_bytes(b"an unfinished download")
    code, out, err = run_cli(["erase", "--concept", "cat", "--model", model, "--plan"], capsys)
    assert code == 0 and "trainable" in out, err


def test_missing_model_folder(tmp_path, capsys):
    code, _, err = run_cli(
        ["erase", "--concept", "x", "--model", tmp_path / "nope", "--output", tmp_path / "o"],
        capsys,
    )
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["erase", "--concept", "cat", "--plan"], ["generate"]])
def test_a_single_file_checkpoint_says_how_to_convert_it(tmp_path, capsys, command):
    """Before: "is not a diffusers pipeline folder (no model_index.json); give the folder that
    holds model_index.json", which a single-file checkpoint has none of."""
    ckpt = tmp_path / "v1-5-pruned-emaonly.safetensors"
    ckpt.write_bytes(b"not read")
    extra = (
        ["--prompt", "a cat", "--output", tmp_path / "images"] if command == ["generate"] else []
    )
    code, out, err = run_cli([*command, "--model", ckpt, *extra], capsys)
    assert code == 2 and out == "" and not (tmp_path / "images").exists()
    assert err == (
        f"error: {ckpt} is a single-file checkpoint; kscu loads diffusers pipeline folders: "
        "convert it once (diffusers: PIPELINE_CLASS.from_single_file(FILE).save_pretrained(DIR)) "
        "and pass --model DIR\n"
    )


@pytest.mark.parametrize("plan", [False, True])
def test_a_folder_with_pickle_weights_is_one_line_before_loading(
    tiny_model_dir, tmp_path, capsys, plan
):
    """Before: diffusers' own error line, then ours; and --plan sized the model it cannot load."""
    import torch

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for f in (model / "unet").glob("*.safetensors"):
        torch.save(load_file(str(f)), f.with_suffix(".bin"))  # as older checkpoints ship
        f.unlink()
    flags = ["--plan"] if plan else ["--output", tmp_path / "out", *FAST]
    code, out, err = run_cli(["erase", "--concept", "cat", "--model", model, *flags], capsys)
    assert code == 2 and out == "" and not (tmp_path / "out").exists()
    assert err == (
        f"error: {model / 'unet'} holds pickle weights only, which kscu does not load; save the "
        "model with safetensors (diffusers: save_pretrained(DIR, safe_serialization=True))\n"
    )


def test_a_folder_missing_its_weights_is_one_line(tiny_model_dir, tmp_path):
    """Before: diffusers logged "An error occurred while trying to fetch ..." before our line."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    args = ["erase", "--concept", "cat", "--model", model, "--output", tmp_path / "out", *FAST]
    # a process of its own: diffusers' log handler writes to the stderr it found at import
    proc = subprocess.run(
        [sys.executable, "-m", "kscu", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "out").exists()
    err = proc.stderr
    assert err.startswith(f"error: cannot load model {model} (") and err.count("\n") == 1, err


def test_generate_from_csv_uses_row_seeds_and_resumes(tiny_model_dir, tmp_path, capsys):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(
        "case_number,prompt,evaluation_seed,evaluation_guidance\n3,a church,7,5.0\n5,a cat,,\n"
    )
    out = tmp_path / "img"
    args = [
        "generate",
        "--model",
        tiny_model_dir,
        "--prompts",
        csv_path,
        "--output",
        out,
        "--steps",
        "3",
        "--quiet",
    ]
    assert run_cli(args, capsys)[0] == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["3.png", "5.png"]
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [(r["case_number"], r["seed"], r["guidance"]) for r in rows] == [
        ("3", "7", "5.0"),
        ("5", "5", "7.5"),
    ]
    # the row's own seed and guidance win: same image as asking for them directly
    single = tmp_path / "single"
    assert (
        run_cli(
            [
                "generate",
                "--model",
                tiny_model_dir,
                "--prompt",
                "a church",
                "--seed",
                "7",
                "--guidance",
                "5.0",
                "--output",
                single,
                "--steps",
                "3",
                "--quiet",
            ],
            capsys,
        )[0]
        == 0
    )
    assert np.array_equal(pixels(out / "3.png"), pixels(single / "0.png"))
    # resumable: existing images are kept, missing ones made
    (out / "5.png").unlink()
    mtime = (out / "3.png").stat().st_mtime_ns
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "wrote 1 new" in stdout
    assert (out / "3.png").stat().st_mtime_ns == mtime and (out / "5.png").exists()


def test_generate_with_erased_weights(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        run_cli(
            [
                "erase",
                "--concept",
                "church",
                "--model",
                tiny_model_dir,
                "--output",
                run,
                "--lr",
                "1e-2",
                *FAST,
            ],
            capsys,
        )[0]
        == 0
    )
    common = ["--model", tiny_model_dir, "--prompt", "church", "--steps", "3", "--quiet"]
    assert run_cli(["generate", *common, "--output", tmp_path / "a"], capsys)[0] == 0
    assert (
        run_cli(["generate", *common, "--weights", run, "--output", tmp_path / "b"], capsys)[0] == 0
    )
    assert not np.array_equal(pixels(tmp_path / "a" / "0.png"), pixels(tmp_path / "b" / "0.png"))


@pytest.mark.parametrize(
    "content, words",
    [
        ("text,seed\nhello,1\n", "no 'prompt' column"),
        ("prompt\n", "no rows"),
        (b"\xff\xfe\x00bad", "cannot read"),
    ],
)
def test_bad_prompt_files(tiny_model_dir, tmp_path, capsys, content, words):
    path = tmp_path / "p.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run_cli(
        ["generate", "--model", tiny_model_dir, "--prompts", path, "--output", tmp_path / "o"],
        capsys,
    )
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_console_entry_point_and_python_m(tmp_path):
    args = ["erase", "--concept", "x", "--mode", "nope", "--output", str(tmp_path / "o")]
    for cmd in ([str(Path(sys.executable).parent / "kscu")], [sys.executable, "-m", "kscu"]):
        res = subprocess.run([*cmd, *args], capture_output=True, text=True)
        assert res.returncode == 2 and res.stderr.startswith("error: unknown mode"), res.stderr


def test_an_unreachable_hub_is_one_line_without_retries(tmp_path):
    """Without a network every Hub lookup retried for ~25 s, a line per retry, before failing;
    the CLI now uses the local cache alone when the Hub's host name does not resolve."""
    env = {**os.environ, "HF_ENDPOINT": "https://hub.invalid", "HF_HOME": str(tmp_path / "hf")}
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    args = ["erase", "--model", "kscu-test/not-cached", "--concept", "church", "--plan"]
    res = subprocess.run(
        [sys.executable, "-m", "kscu", *args], capture_output=True, text=True, env=env
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: cannot load model kscu-test/not-cached"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # no retries, no notices


def test_the_offline_switch_is_left_alone_behind_a_proxy(monkeypatch):
    from kscu.cli import _offline_without_hub

    monkeypatch.delitem(sys.modules, "huggingface_hub", raising=False)  # as in a new process
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # each restored (or removed) after the test
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # the proxy resolves names
    _offline_without_hub()
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.delenv("HTTPS_PROXY")
    _offline_without_hub()
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_name_server_that_does_not_answer_leaves_the_switch_alone(monkeypatch):
    import socket
    import time

    import kscu.cli

    monkeypatch.delitem(sys.modules, "huggingface_hub", raising=False)
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kscu.cli, "HUB_LOOKUP_SECONDS", 0.2)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a: time.sleep(2))  # hangs past the wait
    start = time.monotonic()
    kscu.cli._offline_without_hub()
    assert time.monotonic() - start < 1.5 and "HF_HUB_OFFLINE" not in os.environ


def test_start_step_auto_uses_and_records_the_analysis(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    import kscu.analyze

    calls = []

    def fake(pipe, model, concepts, mode, **kwargs):
        calls.append((model, concepts, mode))
        return {"curve": [0.0] * 50, "recommended_start_step": 3, "rule": "test"}

    monkeypatch.setattr(kscu.analyze, "auto_start_step", fake, raising=False)
    out = tmp_path / "run"
    code, _, err = run_cli(
        [
            "erase",
            "--concept",
            "church",
            "--model",
            tiny_model_dir,
            "--output",
            out,
            "--start-step",
            "auto",
            "--iterations",
            "4",
            "--num-steps",
            "6",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    meta = json.loads((out / "kscu.json").read_text())
    assert calls == [(str(tiny_model_dir), ["church"], "class")]
    assert meta["config"]["start_step"] == 3 and meta["schedule"][0] == ["church", 3]
    assert meta["start_step_analysis"]["recommended_start_step"] == 3


def test_start_step_auto_is_refused_for_esd(tmp_path, capsys):
    code, _, err = run_cli(
        [
            "erase",
            "--concept",
            "x",
            "--method",
            "esd",
            "--start-step",
            "auto",
            "--model",
            tmp_path,
            "--output",
            tmp_path / "o",
        ],
        capsys,
    )
    assert code == 2 and "auto is for --method kscu" in err


def test_esd_augmentation_flags():
    from kscu.cli import build_parser, erase_config_from_args
    from kscu.config import resolve

    def augment(*flags):
        args = build_parser().parse_args(["erase", "--concept", "c", "--output", "o", *flags])
        return resolve(erase_config_from_args(args)).augment

    assert augment("--method", "esd") is False
    assert augment("--method", "esd", "--augment") is True
    assert augment() is True and augment("--no-augment") is False


@pytest.mark.parametrize(
    "field, flag",
    [("reuse_freed_memory", "--no-reuse-freed-memory"), ("trace_denoiser", "--no-trace-denoiser")],
)
def test_exact_speed_switches_are_on_unless_turned_off(field, flag):
    from kscu.cli import build_parser, erase_config_from_args
    from kscu.config import resolve

    def value(*flags):
        args = build_parser().parse_args(["erase", "--concept", "c", "--output", "o", *flags])
        return getattr(resolve(erase_config_from_args(args)), field)

    assert value() is True and value(flag) is False


def test_help_imports_neither_torch_nor_torchvision():
    """Before: import kscu imported torch and torchvision (3 s here) before --help could print."""
    code = (
        "import sys, kscu.cli\n"
        "try:\n"
        "    kscu.cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'diffusers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "[]"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX here")
def test_ctrl_c_while_the_libraries_import_is_one_line(tmp_path):
    """Before: a Ctrl-C in the first seconds (kscu/__init__ importing torch and torchvision,
    before main's handler existed) printed a KeyboardInterrupt traceback."""
    import signal
    import time

    out = tmp_path / "run"
    args = ["erase", "--concept", "circle", "--iterations", "20", "--output", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kscu", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as in a terminal: a shell's background job (CI run with &) inherits SIGINT ignored,
        # and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(1.0)  # inside main by now (kscu.cli imports in 0.1 s), still importing torch
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stderr == "interrupted\n", stderr[-2000:]
    assert stdout == "" and not out.exists()
