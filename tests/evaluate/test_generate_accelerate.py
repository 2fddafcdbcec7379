"""`accelerate launch -m kscu generate`: 2 CPU processes write each image exactly once; resume.

A ``sitecustomize`` on PYTHONPATH logs every PNG save (process id + file) and can end a process
abruptly after N saves, so the test sees exactly what each process wrote, and can interrupt a
run at a known point without timing games.
"""

import csv
import socket
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from evalkit import run_kscu, write_csv
from PIL import Image

HOOK = """
import os
_log = os.environ.get("KSCU_TEST_SAVE_LOG")
if _log:
    from PIL import Image
    _orig = Image.Image.save
    _die = int(os.environ.get("KSCU_TEST_DIE_AFTER", "0"))
    _count = [0]

    def _save(self, fp, *args, **kwargs):
        result = _orig(self, fp, *args, **kwargs)
        with open(_log, "a") as f:
            f.write(f"{os.getpid()} {os.path.basename(str(fp))}\\n")
        _count[0] += 1
        if _die and _count[0] >= _die:
            os._exit(17)  # a crash in the middle of a run: no cleanup, no manifest
        return result

    Image.Image.save = _save
"""

ROWS = [[c, f"a photo number {c}", 100 + c, 7.5] for c in range(7)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher() -> list[str]:
    """accelerate with 2 CPU processes.

    ``--cpu --num_processes 2`` starts ONE process in accelerate 1.x (its CPU multi-process
    path goes through mpirun); ``--multi_gpu`` starts 2 torchrun workers, which form a CPU
    (gloo) group when the machine has no GPU.
    """
    port = str(_free_port())
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"] + (
        f"--num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no "
        f"--main_process_port {port} -m"
    ).split()


def _saved(log: Path) -> list[tuple[str, str]]:
    """(pid, image name) per save; temp names like .3.png.abc.tmp map back to 3.png."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        pid, name = line.split(" ", 1)
        if name.startswith("."):
            name = name[1:].split(".png")[0] + ".png"
        out.append((pid, name))
    return out


@pytest.fixture
def hooked(tmp_path, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("KSCU_TEST_SAVE_LOG", str(tmp_path / "saves.log"))
    return tmp_path / "saves.log"


def _generate(tiny_sd, csv_path, out, launcher=None):
    return run_kscu(
        [
            "generate",
            "--model",
            str(tiny_sd),
            "--prompts",
            str(csv_path),
            "--output",
            str(out),
            "--steps",
            "2",
            "--quiet",
        ],
        launcher=launcher,
    )


def test_two_processes_write_each_image_once(tmp_path, tiny_sd, hooked):
    prompts = write_csv(
        tmp_path / "p.csv",
        ["case_number", "prompt", "evaluation_seed", "evaluation_guidance"],
        ROWS,
    )
    out = tmp_path / "images"
    proc = _generate(tiny_sd, prompts, out, _launcher())
    assert proc.returncode == 0, proc.stderr[-3000:]
    saves = _saved(hooked)
    names = Counter(name for _, name in saves)
    expected = {f"{c}.png" for c in range(7)}
    assert set(names) == expected and all(n == 1 for n in names.values()), names
    assert len({pid for pid, _ in saves}) == 2  # both processes did a share
    assert {p.name for p in out.glob("*.png")} == expected
    with (out / "manifest.csv").open(newline="") as f:
        manifest = list(csv.DictReader(f))
    assert sorted(int(r["case_number"]) for r in manifest) == list(range(7))
    assert {r["file"] for r in manifest} == expected
    assert not list(out.glob(".*.tmp"))

    # same images as one process makes: the split does not change a pixel
    single = tmp_path / "single"
    assert _generate(tiny_sd, prompts, single).returncode == 0
    for c in range(7):
        a = np.asarray(Image.open(out / f"{c}.png"))
        b = np.asarray(Image.open(single / f"{c}.png"))
        assert np.array_equal(a, b), c

    # running again makes nothing
    hooked.unlink()
    proc = _generate(tiny_sd, prompts, out, _launcher())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [n for _, n in _saved(hooked) if n != "manifest.csv"] == []


def test_interrupted_run_resumes(tmp_path, tiny_sd, hooked, monkeypatch):
    prompts = write_csv(
        tmp_path / "p.csv",
        ["case_number", "prompt", "evaluation_seed", "evaluation_guidance"],
        ROWS,
    )
    out = tmp_path / "images"
    monkeypatch.setenv("KSCU_TEST_DIE_AFTER", "3")
    crashed = _generate(tiny_sd, prompts, out)
    assert crashed.returncode == 17
    # the 3rd image died between its write and its rename (like a kill -9 mid-write)
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert len(first) == 2 and not (out / "manifest.csv").exists()

    monkeypatch.delenv("KSCU_TEST_DIE_AFTER")
    hooked.unlink()
    proc = _generate(tiny_sd, prompts, out, _launcher())
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = Counter(name for _, name in _saved(hooked))
    assert set(resumed) == {f"{c}.png" for c in range(7)} - set(first)
    assert all(n == 1 for n in resumed.values())
    for name, data in first.items():  # finished images were left alone
        assert (out / name).read_bytes() == data
    assert len(list(out.glob("*.png"))) == 7 and (out / "manifest.csv").exists()


def test_two_processes_generate_flux_each_image_once(tmp_path, hooked):
    """The same launch for a FLUX.1-dev folder: each image once, the same pixels as one process.
    (The split is the family's own sampler walk per image; FLUX.1-schnell's walk, without the
    guidance embedding, is generated and resumed in tests/families/test_commands.py.)"""
    from tiny_families import build_tiny_flux_pipeline, save_pipeline

    model = save_pipeline(build_tiny_flux_pipeline(guidance_embeds=True), tmp_path / "m")
    prompts = write_csv(
        tmp_path / "p.csv",
        ["case_number", "prompt", "evaluation_seed", "evaluation_guidance"],
        [[c, f"a photo number {c}", 100 + c, 3.5] for c in range(4)],
    )

    def generate(out, launcher=None):
        args = ["generate", "--model", str(model), "--prompts", str(prompts), "--output", str(out)]
        return run_kscu([*args, "--steps", "2", "--resolution", "32", "--quiet"], launcher=launcher)

    out = tmp_path / "images"
    proc = generate(out, _launcher())
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = Counter(name for _, name in _saved(hooked) if name.endswith(".png"))
    assert set(names) == {f"{c}.png" for c in range(4)} and set(names.values()) == {1}
    assert len({pid for pid, _ in _saved(hooked)}) == 2
    single = tmp_path / "single"
    assert generate(single).returncode == 0
    for c in range(4):
        a, b = Image.open(out / f"{c}.png"), Image.open(single / f"{c}.png")
        assert np.array_equal(np.asarray(a), np.asarray(b)), c
