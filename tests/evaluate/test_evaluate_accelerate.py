"""An error in one process's share reaches every process: all exit 2 with the one-line error.

Before, the process holding a corrupt image raised while the others waited in the gather until
the process group timed out (30 minutes by default).
"""

import time

import pytest
from evalkit import accelerate_launcher, make_images, run_kscu, spawn_ranks


@pytest.fixture
def corrupt_folder(tmp_path):
    images = tmp_path / "images"
    make_images(images, 4, size=(32, 32))
    data = (images / "1.png").read_bytes()
    (images / "1.png").write_bytes(data[: len(data) // 2])  # rank 1's share: 1.png, 3.png
    return images


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_every_rank_exits_2_with_the_one_line_error(tmp_path, corrupt_folder):
    start = time.monotonic()
    args = ["evaluate", "nudity", "--images", str(corrupt_folder)]
    ranks = spawn_ranks([*args, "--output", str(tmp_path / "n.json")])
    assert time.monotonic() - start < 120
    for code, stderr in ranks:
        assert code == 2, stderr[-2000:]
        assert "Traceback" not in stderr, stderr[-2000:]
        errors = _error_lines(stderr)
        assert len(errors) == 1 and "cannot read image" in errors[0] and "1.png" in errors[0]
    assert not (tmp_path / "n.json").exists()


def test_under_accelerate_launch_the_run_ends_promptly(tmp_path, corrupt_folder):
    start = time.monotonic()
    proc = run_kscu(
        [
            "evaluate",
            "nudity",
            "--images",
            str(corrupt_folder),
            "--output",
            str(tmp_path / "n.json"),
        ],
        launcher=accelerate_launcher(),
        timeout=120,
    )
    assert time.monotonic() - start < 120
    assert proc.returncode != 0
    assert any(
        "cannot read image" in line and "1.png" in line for line in _error_lines(proc.stderr)
    )
    assert "exitcode  : 2" in proc.stderr  # torchrun's summary of its workers
    assert not (tmp_path / "n.json").exists()
